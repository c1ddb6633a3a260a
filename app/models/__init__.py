"""Segmentation networks: nnU-Net-style planning, a config-driven factory, checkpoints.

Public API:

* :func:`plan_dynunet`, :func:`check_patch_size`: DynUNet topology from patch size and spacing;
* :func:`build_model`, :func:`resolve_model_config`: networks from plain-data configs;
* :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`model_from_checkpoint`: the
  checkpoint format shared by training and inference (loads with ``weights_only=True``);
* :func:`enable_grad_checkpointing`: gradient checkpointing per encoder/decoder stage;
* :func:`deep_supervision_loss`, :func:`main_output`: the loss over deep-supervision heads.
"""

from app.models.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from app.models.factory import MODEL_NAMES, build_model, resolve_model_config
from app.models.grad_checkpoint import enable_grad_checkpointing
from app.models.losses import deep_supervision_loss, main_output
from app.models.planner import DynUNetPlan, check_patch_size, plan_dynunet

__all__ = [
    "FORMAT_VERSION",
    "MODEL_NAMES",
    "CheckpointError",
    "DynUNetPlan",
    "build_model",
    "check_patch_size",
    "deep_supervision_loss",
    "enable_grad_checkpointing",
    "load_checkpoint",
    "main_output",
    "model_from_checkpoint",
    "plan_dynunet",
    "resolve_model_config",
    "save_checkpoint",
]
