"""Lean versions of MONAI's DynUNet blocks: the same layers, a forward pass that holds fewer tensors.

With stochastic convolutions and lean norms/activations, a U-Net's saved state is small and its
memory peak is set by what the forward pass itself holds at once. MONAI's blocks hold more than
their maths needs:

- a module's input stays referenced until it returns (``nn.Module.__call__`` keeps its arguments),
  so a block keeps its input beside every intermediate tensor;
- the up block concatenates the up-sampled tensor and the skip into a tensor of twice their
  channels, while the caller (``DynUNetSkipLayer``) still holds the skip;
- each norm writes a new tensor beside the convolution output it reads.

The subclasses here change only ``forward`` (same ``__init__``, parameters and state-dict keys,
checkpoints interchange with MONAI's) and compute the same maths:

- :class:`LeanUnetUpBlock` convolves the up-sampled tensor and the skip separately, with the two
  halves of the first convolution's weight, and sums the two outputs:
  ``conv(cat(u, s), W) = conv(u, W[:, :C]) + conv(s, W[:, C:])``. No concatenated tensor exists,
  each part is released as soon as it is convolved, and a stochastic convolution sketches the two
  parts with the layer's own options;
- :class:`LeanDynUNetSkipLayer` hands the decoder input and the skip over to the up block in a list
  the up block empties, so no frame keeps them while the full-resolution block runs;
- the norms of the lean blocks run in place (:attr:`app.nn.lean.LeanNormMixin.inplace`) on the
  convolution outputs the blocks own; the activations run in place as MONAI configures them.

Hooks: the split convolution runs the convolution module's forward pre-hooks with a ``meta``
tensor of the concatenated input's shape (what :func:`app.nn.gradient_fidelity` records). A block
or convolution with forward hooks, a grouped or wrapped first convolution (dropout), or an up block
whose ``forward`` is replaced (gradient checkpointing) takes MONAI's path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from monai.networks.blocks.convolutions import Convolution
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock, UnetUpBlock
from monai.networks.nets.dynunet import DynUNetSkipLayer
from torch.nn.modules.conv import _ConvNd

from .lean import LeanNormMixin

__all__ = ["LeanUnetBasicBlock", "LeanUnetResBlock", "LeanUnetUpBlock", "LeanDynUNetSkipLayer", "BLOCK_OF", "own_norms"]


def _plain_conv(wrapper: nn.Module) -> Optional[_ConvNd]:
    """The convolution of a MONAI ``Convolution`` holding nothing else (no norm, act or dropout), or None."""
    if type(wrapper) is not Convolution or list(wrapper._modules) != ["conv"]:
        return None
    conv = wrapper.conv
    return conv if isinstance(conv, _ConvNd) and not conv.transposed else None


def _has_forward_hooks(module: nn.Module) -> bool:
    """Forward hooks a direct call to the module's maths would skip (module or global)."""
    from torch.nn.modules import module as module_globals

    return bool(module._forward_hooks or module_globals._global_forward_hooks)


def _run_pre_hooks(conv: nn.Module, placeholder: torch.Tensor) -> None:
    """Runs ``conv``'s forward pre-hooks (global then its own, as ``nn.Module.__call__``) on ``(placeholder,)``."""
    from torch.nn.modules import module as module_globals

    for hook in (*module_globals._global_forward_pre_hooks.values(), *conv._forward_pre_hooks.values()):
        hook(conv, (placeholder,))


def split_conv(conv: _ConvNd, parts: list[torch.Tensor]) -> torch.Tensor:
    """``conv(torch.cat(parts, 1))`` as a sum of one convolution per part, emptying ``parts``.

    Each part is convolved with its slice of the weight along the input channels (the bias is added
    once) through the module's own convolution hook, so a stochastic convolution sketches each part
    with its options, and each part is dropped from ``parts`` before the next one is convolved:
    once the caller holds no other reference, it is freed as soon as it is consumed. The outputs
    are summed in place in the first one. Exact as the concatenated convolution up to the order of
    the sums (under autocast: one more rounding of the output to the autocast dtype).

    Args:
        conv: an ungrouped, non-transposed ``torch.nn.Conv{1,2,3}d`` (or stochastic subclass).
        parts: ``(B, C_i, *S)`` tensors with ``Σ C_i = conv.in_channels``; emptied.

    Shape:
        output ``(B, C_out, *S_out)``, as ``conv`` on the concatenation.
    """
    channels = [p.shape[1] for p in parts]
    if conv.groups != 1 or sum(channels) != conv.in_channels:
        raise ValueError(f"split_conv needs an ungrouped convolution whose in_channels ({conv.in_channels}) is the "
                         f"parts' total, but got groups={conv.groups} and parts of {channels} channels")
    first = parts[0]
    if conv._forward_pre_hooks or nn.modules.module._global_forward_pre_hooks:
        _run_pre_hooks(conv, torch.empty((first.shape[0], conv.in_channels, *first.shape[2:]), dtype=first.dtype, device="meta"))
    del first
    out: Optional[torch.Tensor] = None
    start = 0
    parts.reverse()  # popped from the end: first part first
    while parts:
        part = parts.pop()
        width = part.shape[1]
        weight = conv.weight[:, start:start + width]
        y = conv._conv_forward(part, weight, conv.bias if out is None else None)
        del part
        out = y if out is None else out.add_(y)
        del y
        start += width
    return out


class LeanUnetBasicBlock(UnetBasicBlock):
    """MONAI's ``UnetBasicBlock`` (conv → norm → act, twice) with its norms in place on the
    convolution outputs (:class:`LeanNormMixin` norms; others run as they are)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.after_first_conv(self.conv1(inp))

    def after_first_conv(self, out: torch.Tensor) -> torch.Tensor:
        """The block after its first convolution, given that convolution's output (which it overwrites)."""
        out = self.lrelu(self.norm1(out))
        return self.lrelu(self.norm2(self.conv2(out)))


class LeanUnetResBlock(UnetResBlock):
    """MONAI's ``UnetResBlock`` with its norms in place on the convolution outputs, and the residual
    added in place as MONAI does."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.norm2(self.conv2(out))
        residual = self.conv3(inp) if hasattr(self, "conv3") else inp
        if hasattr(self, "norm3"):
            residual = self.norm3(residual)
        out += residual
        del residual
        return self.lrelu(out)


class LeanUnetUpBlock(UnetUpBlock):
    """MONAI's ``UnetUpBlock`` without the concatenation: the first convolution of its basic block
    runs on the up-sampled tensor and on the skip separately (:func:`split_conv`).

    :meth:`consume` takes the two inputs in a list and empties it, so a caller that passes its only
    references lets each input be freed as soon as it is used; ``forward`` is ``consume`` of its
    two arguments (which its caller still holds).
    """

    def forward(self, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.consume([inp, skip])

    def splits(self) -> bool:
        """True when the block can run without the concatenation (see the module docstring)."""
        block = self.conv_block
        conv = _plain_conv(block.conv1)
        return (conv is not None and conv.groups == 1 and isinstance(block, LeanUnetBasicBlock)
                and not _has_forward_hooks(block) and not block._forward_pre_hooks
                and not _has_forward_hooks(block.conv1) and not block.conv1._forward_pre_hooks
                and not _has_forward_hooks(conv))

    def consume(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The block on ``parts = [inp, skip]``, emptying the list.

        Shape:
            ``inp`` ``(B, C_in, *S)``, ``skip`` ``(B, C_out, *S_up)``; output ``(B, C_out, *S_up)``.
        """
        inp, skip = parts
        parts.clear()
        up = self.transp_conv(inp)
        del inp
        if not self.splits():
            return self.conv_block(torch.cat((up, skip), dim=1))
        pair = [up, skip]
        del up, skip
        return self.conv_block.after_first_conv(split_conv(self.conv_block.conv1.conv, pair))


class LeanDynUNetSkipLayer(DynUNetSkipLayer):
    """MONAI's ``DynUNetSkipLayer`` handing the decoder input and the skip over to a
    :class:`LeanUnetUpBlock` (:meth:`LeanUnetUpBlock.consume`) instead of holding them while it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        downout = self.downsample(x)
        nextout = self.next_layer(downout)
        up = self.upsample
        if type(up).forward is LeanUnetUpBlock.forward and not _has_forward_hooks(up) and not up._forward_pre_hooks:
            parts = [nextout, downout]
            del nextout, downout
            upout = up.consume(parts)
        else:
            upout = up(nextout, downout)
            del nextout, downout
        if self.super_head is not None and self.heads is not None and self.index > 0:
            self.heads[self.index - 1] = self.super_head(upout)
        return upout


BLOCK_OF: dict[type, type] = {
    UnetBasicBlock: LeanUnetBasicBlock,
    UnetResBlock: LeanUnetResBlock,
    UnetUpBlock: LeanUnetUpBlock,
    DynUNetSkipLayer: LeanDynUNetSkipLayer,
}
"""MONAI block -> its lean subclass (``app.nn.convert(..., lean=True)`` swaps them)."""

_OWNED_NORMS = {LeanUnetBasicBlock: ("norm1", "norm2"), LeanUnetResBlock: ("norm1", "norm2", "norm3")}


def own_norms(module: nn.Module) -> None:
    """Turns ``inplace`` on for the lean norms of every lean block in ``module``: each reads a
    convolution output that only its block holds."""
    for block in module.modules():
        for name in _OWNED_NORMS.get(type(block), ()):
            norm = getattr(block, name, None)
            if isinstance(norm, LeanNormMixin):
                norm.inplace = True
