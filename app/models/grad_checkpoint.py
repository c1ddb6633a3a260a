"""Gradient (activation) checkpointing per encoder/decoder stage of the supported U-Nets.

Each stage's ``forward`` is run under :func:`torch.utils.checkpoint.checkpoint`
(non-reentrant) while training with gradients enabled: its intermediate activations are
freed after the forward pass and recomputed in the backward pass. Only the stage
outputs (and the skip connections, which the forward pass needs anyway) stay in memory.

The stage modules keep their parameters, buffers and ``state_dict`` keys: the class of
each stage is swapped for a subclass that overrides ``forward`` and nothing else, so
checkpoints written with or without this option are interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["enable_grad_checkpointing", "stages"]


def _dynunet(m: DynUNet) -> list[nn.Module]:
    return [m.input_block, *m.downsamples, m.bottleneck, *m.upsamples]


def _basicunet(m: BasicUNet) -> list[nn.Module]:
    return [m.conv_0, m.down_1, m.down_2, m.down_3, m.down_4, m.upcat_4, m.upcat_3, m.upcat_2, m.upcat_1]


def _segresnet(m: SegResNet) -> list[nn.Module]:
    return [m.convInit, *m.down_layers, *m.up_layers]


def _unet(m: UNet) -> list[nn.Module]:
    # The encoder/decoder blocks are the outermost Convolution / ResidualUnit modules
    # (UNet nests them in SkipConnection/Sequential containers).
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (Convolution, ResidualUnit)):
                found.append(child)
            else:
                visit(child)

    visit(m)
    return found


_STAGES: dict[type, Callable[[nn.Module], list[nn.Module]]] = {
    DynUNet: _dynunet,
    BasicUNet: _basicunet,
    SegResNet: _segresnet,
    UNet: _unet,
}


def stages(model: nn.Module) -> list[nn.Module]:
    """Return the encoder/decoder stage modules of a supported network.

    Raises:
        ValueError: the network is not one of DynUNet, UNet, BasicUNet, SegResNet.
    """
    for cls, find in _STAGES.items():
        if isinstance(model, cls):
            return find(model)
    names = ", ".join(c.__name__ for c in _STAGES)
    raise ValueError(
        f"trainer.grad_checkpointing supports {names}, but got {type(model).__name__}; "
        "set trainer.grad_checkpointing=false"
    )


_SUBCLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward runs under non-reentrant checkpointing."""
    if getattr(cls, "_grad_checkpointed", False):
        return cls
    if cls not in _SUBCLASSES:

        def forward(self, *args, **kwargs):  # noqa: ANN001, ANN202 (same signature as the base)
            if self.training and torch.is_grad_enabled():
                return checkpoint(super(sub, self).forward, *args, use_reentrant=False, **kwargs)
            return super(sub, self).forward(*args, **kwargs)

        sub = type(cls.__name__, (cls,), {"forward": forward, "_grad_checkpointed": True, "__module__": cls.__module__})
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def enable_grad_checkpointing(model: nn.Module) -> int:
    """Checkpoint every encoder/decoder stage of ``model`` in place.

    Args:
        model: a DynUNet, UNet, BasicUNet or SegResNet (possibly already converted to
            stochastic convolutions: the stages keep whatever layers they contain).

    Returns:
        The number of stages now checkpointed.
    """
    found = stages(model)
    for stage in found:
        stage.__class__ = _checkpointed_class(type(stage))
    return len(found)
