"""The segmentation loss of training, planning and benchmarks, with deep supervision."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["deep_supervision_loss", "main_output"]


def deep_supervision_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], logits: torch.Tensor, label: torch.Tensor
) -> torch.Tensor:
    """``loss_fn`` over every output head, weighted ``1, 1/2, 1/4, ...`` and normalised (nnU-Net's rule).

    The logits are cast to fp32 first: the loss runs outside autocast, as in training.

    Args:
        loss_fn: e.g. MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        logits: ``(B, C, *S)`` of one head, or ``(B, H, C, *S)`` of ``H`` heads (MONAI's DynUNet
            with ``deep_supervision=True`` in training mode, heads upsampled to ``S``, the
            full-resolution one first).
        label: ``(B, 1, *S)`` class indices.

    Returns:
        The scalar loss.
    """
    logits = logits.float()
    if logits.ndim != label.ndim + 1:
        return loss_fn(logits, label)
    weights = [0.5**i for i in range(logits.shape[1])]
    return sum(w * loss_fn(logits[:, i], label) for i, w in enumerate(weights)) / sum(weights)


def main_output(output: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The full-resolution output of a network that may return its deep-supervision heads as a list."""
    return output[0] if isinstance(output, (list, tuple)) else output
