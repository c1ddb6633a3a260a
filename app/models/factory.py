"""Build segmentation networks from plain-data configs.

A model config is a plain ``dict`` (it is stored in checkpoints)::

    {"name": "dynunet", "in_channels": 1, "out_channels": 3, "spatial_dims": 3,
     "patch_size": [128, 128, 128], "spacing": [1.0, 1.0, 1.0]}

:func:`resolve_model_config` fills in every default (for ``dynunet``: the nnU-Net plan
derived by :func:`~app.models.planner.plan_dynunet`) and returns a config that rebuilds
the very same network; :func:`build_model` builds it. The networks are plain MONAI nets;
conversion of their convolutions to stochastic layers is done by the caller
(``app.nn.convert``).

Keys common to every net:

* ``name``: one of :data:`MODEL_NAMES` (default ``"dynunet"``);
* ``in_channels``, ``out_channels`` (required), ``spatial_dims`` (default 3);
* ``patch_size``, ``spacing`` (optional metadata; ``patch_size`` is the default
  sliding-window ROI at inference; for ``dynunet`` both drive the planner);
* ``residual`` (optional, restoration): the network's output is added to its input, so it
  learns the correction of the input rather than the whole output, and its output layer starts
  at zero, so the untrained network returns its input; needs ``in_channels == out_channels``.
  Kept in the resolved config only when true.

Everything else is passed to the MONAI constructor; unknown keys raise ``ValueError``.
"""

from __future__ import annotations

import copy
import difflib
import enum
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet
from torch import nn

from app.models.planner import check_patch_size, plan_dynunet

__all__ = ["MODEL_NAMES", "DEFAULT_MODEL", "ThresholdNet", "build_model", "resolve_model_config"]

DEFAULT_MODEL = "dynunet"

# Keys understood by the factory itself rather than by the network constructor.
_COMMON_KEYS = ("name", "spatial_dims", "in_channels", "out_channels", "patch_size", "spacing", "residual")
# Planner knobs accepted in a dynunet config (consumed when the plan is derived).
_PLANNER_KEYS = ("min_feature_size", "max_depth", "base_features", "max_features")


class ThresholdNet(nn.Module):
    """Test/diagnostic model: class logits from intensity thresholds, no convolutions.

    Voxel ``x`` (channel 0 of the input) gets class ``k`` = number of thresholds ``<= x``,
    through logits ``logit_k = sharpness * sum_{j < k} (x - t_j)`` whose argmax is exactly
    that class. A "perfect model" whose output is known, used to check that inference
    puts labels back on the right voxels.

    Args:
        spatial_dims: number of spatial dimensions (unused; kept for a uniform config).
        in_channels: input channels; only channel 0 is read.
        out_channels: number of classes, ``len(thresholds) + 1``.
        thresholds: increasing intensity thresholds, ``out_channels - 1`` of them.
        sharpness: logit scale. Default 10.

    Shape:
        - Input: ``(N, C_in, *S)``
        - Output: ``(N, out_channels, *S)``
    """

    thresholds: torch.Tensor

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        thresholds: Sequence[float],
        sharpness: float = 10.0,
    ) -> None:
        super().__init__()
        t = [float(v) for v in thresholds]
        if len(t) != out_channels - 1 or t != sorted(t):
            raise ValueError(
                f"threshold net needs out_channels - 1 = {out_channels - 1} increasing thresholds, but got {t}"
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.register_buffer("thresholds", torch.tensor(t, dtype=torch.float32))
        self.sharpness = float(sharpness)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, K, *S)`` for an input ``(N, C, *S)``."""
        x0 = x[:, :1].float()
        shape = (1, -1) + (1,) * (x.ndim - 2)
        steps = x0 - self.thresholds.view(shape)  # (N, K-1, *S)
        logits = torch.cat([torch.zeros_like(x0), torch.cumsum(steps, dim=1)], dim=1)
        return self.sharpness * logits


def _tuple_args(value: Any) -> Any:
    """Turn a stored ``[name, {kwargs}]`` layer spec back into the tuple MONAI expects."""
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict):
        return (value[0], value[1])
    return value


def _plain(value: Any) -> Any:
    """Recursively convert tuples to lists and enums to values: plain, storable data."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _constructor_defaults(cls: type[nn.Module], skip: Sequence[str] = ()) -> dict[str, Any]:
    params = inspect.signature(cls).parameters
    return {
        k: p.default
        for k, p in params.items()
        if k != "self"
        and k not in skip
        and p.default is not inspect.Parameter.empty
        and p.kind is p.POSITIONAL_OR_KEYWORD
    }


def _check_keys(name: str, cfg: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ValueError(f"model '{name}' does not accept config keys {unknown}; allowed keys are {sorted(allowed)}")


def _resolve_dynunet(cfg: dict[str, Any]) -> dict[str, Any]:
    planner_kw = {k: cfg.pop(k) for k in _PLANNER_KEYS if k in cfg}
    given = [k for k in ("kernel_size", "strides", "filters", "upsample_kernel_size") if cfg.get(k) is not None]
    if "kernel_size" not in given or "strides" not in given:
        if cfg.get("patch_size") is None or cfg.get("spacing") is None:
            raise ValueError(
                "dynunet config needs either 'kernel_size' and 'strides' or 'patch_size' and 'spacing' "
                f"to plan them, but got keys {sorted(cfg)}"
            )
        plan = plan_dynunet(cfg["patch_size"], cfg["spacing"], **planner_kw)
        cfg["kernel_size"], cfg["strides"] = plan.kernel_size, plan.strides
        cfg.setdefault("filters", plan.filters)
        if cfg["filters"] is None:
            cfg["filters"] = plan.filters
    elif planner_kw:
        raise ValueError(f"planner keys {sorted(planner_kw)} given together with explicit kernel_size/strides")
    n = len(cfg["strides"])
    if len(cfg["kernel_size"]) != n:
        raise ValueError(f"dynunet kernel_size has {len(cfg['kernel_size'])} stages but strides has {n}")
    if cfg.get("filters") is None:
        cfg["filters"] = [min(32 * 2**i, 320) for i in range(n)]
    if cfg.get("upsample_kernel_size") is None:
        cfg["upsample_kernel_size"] = cfg["strides"][1:]
    if cfg.get("patch_size") is not None:
        check_patch_size(cfg["patch_size"], cfg["strides"])
    # nnU-Net defaults: instance norm, LeakyReLU(0.01), no deep supervision.
    cfg.setdefault("norm_name", ("INSTANCE", {"affine": True}))
    cfg.setdefault("act_name", ("leakyrelu", {"inplace": True, "negative_slope": 0.01}))
    cfg.setdefault("deep_supervision", False)
    return cfg


def _resolve_unet(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg.setdefault("channels", [16, 32, 64, 128, 256])
    cfg.setdefault("strides", [2] * (len(cfg["channels"]) - 1))
    cfg.setdefault("num_res_units", 2)
    return cfg


def _resolve_segresnet(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg.setdefault("init_filters", 16)
    return cfg


def _resolve_threshold(cfg: dict[str, Any]) -> dict[str, Any]:
    if "thresholds" not in cfg:
        raise ValueError("threshold model config needs 'thresholds' (out_channels - 1 increasing values)")
    return cfg


# name -> (constructor, resolver filling net-specific defaults)
_REGISTRY: dict[str, tuple[type[nn.Module], Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "dynunet": (DynUNet, _resolve_dynunet),
    "unet": (UNet, _resolve_unet),
    "basicunet": (BasicUNet, lambda cfg: cfg),
    "segresnet": (SegResNet, _resolve_segresnet),
    # Test/diagnostic model (no convolutions): see ThresholdNet.
    "threshold": (ThresholdNet, _resolve_threshold),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _lookup_name(name: Any) -> str:
    key = str(name).lower()
    if key in _REGISTRY:
        return key
    close = difflib.get_close_matches(key, MODEL_NAMES, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown model name {name!r}{hint}; allowed names: {', '.join(MODEL_NAMES)}")


def resolve_model_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Return the fully explicit config: every constructor argument filled in, plain data.

    Args:
        cfg: a model config (see the module docstring). Not modified.

    Returns:
        A new dict of plain data (lists, dicts, str, numbers, bool, None) that
        :func:`build_model` turns into the same network every time, and that is a fixed
        point: ``resolve_model_config(resolve_model_config(c)) == resolve_model_config(c)``.

    Raises:
        ValueError: unknown model name (with a did-you-mean), missing or unknown keys,
            or a ``patch_size`` that does not fit the network's downsampling.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"model config must be a mapping, but got {type(cfg).__name__}")
    out: dict[str, Any] = copy.deepcopy(dict(cfg))
    name = _lookup_name(out.get("name", DEFAULT_MODEL))
    out["name"] = name
    for key in ("in_channels", "out_channels"):
        if not isinstance(out.get(key), int) or isinstance(out.get(key), bool) or out[key] < 1:
            raise ValueError(f"model config needs a positive integer '{key}', but got {key}={out.get(key)!r}")
    if out.get("residual"):
        if out["in_channels"] != out["out_channels"]:
            raise ValueError(f"residual=True needs in_channels == out_channels, but got in_channels={out['in_channels']}, "
                             f"out_channels={out['out_channels']}")
        out["residual"] = True
    else:
        out.pop("residual", None)
    out.setdefault("spatial_dims", 3)
    out.setdefault("patch_size", None)
    out.setdefault("spacing", None)
    ctor, resolver = _REGISTRY[name]
    out = resolver(out)
    defaults = _constructor_defaults(ctor, skip=_COMMON_KEYS)
    _check_keys(name, out, list(_COMMON_KEYS) + list(inspect.signature(ctor.__init__).parameters))
    for key, value in defaults.items():
        out.setdefault(key, value)
    return _plain(out)


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a segmentation network from a (possibly partial) model config.

    Args:
        cfg: model config (see the module docstring); resolved with
            :func:`resolve_model_config` first.

    Returns:
        The MONAI network (or the diagnostic :class:`ThresholdNet`), in training mode.

    Shape:
        - Input: ``(N, in_channels, *S)``; for ``dynunet`` each ``S[d]`` must be a
          multiple of the product of the strides along ``d`` (see
          :func:`~app.models.planner.check_patch_size`); ``unet`` and ``basicunet``
          similarly need multiples of ``2 ** (depth - 1)`` for exact shapes
          (``basicunet`` pads odd sizes itself).
        - Output: ``(N, out_channels, *S)`` (``dynunet`` with deep supervision in
          training mode: ``(N, 1 + deep_supr_num, out_channels, *S)``); with ``residual``, the
          input is added to it (to every head), by a forward hook that keeps the state_dict keys.

    Examples:
        >>> net = build_model({"name": "dynunet", "in_channels": 1, "out_channels": 2,
        ...                    "patch_size": [32, 32, 32], "spacing": [1.0, 1.0, 1.0]})
    """
    resolved = resolve_model_config(cfg)
    ctor, _ = _REGISTRY[resolved["name"]]
    params = set(inspect.signature(ctor.__init__).parameters) - {"self"}
    kwargs = {k: _tuple_args(v) for k, v in resolved.items() if k in params}
    net = ctor(**kwargs)
    if resolved.get("residual"):
        _zero_output_layers(net, resolved["out_channels"])
        net.register_forward_hook(_add_input)
    return net


def _zero_output_layers(net: nn.Module, out_channels: int) -> None:
    """Zero weights and biases of the layers that produce the output: DynUNet's output block and
    deep-supervision heads; in other networks every convolution with ``out_channels`` outputs (the
    output layer, and the blocks at output width that follow it, such as UNet's last residual unit)."""
    if isinstance(net, DynUNet):
        heads = [net.output_block, *getattr(net, "deep_supervision_heads", [])]  # heads exist with deep supervision only
        convs = [m for head in heads for m in head.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    else:
        convs = [m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == out_channels]
    for conv in convs:
        nn.init.zeros_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


def _add_input(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook of ``residual`` networks: ``output + input``, for one head ``(N, C, *S)``, stacked
    heads ``(N, H, C, *S)`` or a list of heads."""
    x = args[0]
    if isinstance(output, (list, tuple)):
        return type(output)(o + x for o in output)
    return output + (x.unsqueeze(1) if output.ndim == x.ndim + 1 else x)  # promoted: fp32 input, bf16 output -> fp32
