"""``python -m app.bench profile``: where a training step's host and device time go, layer by layer.

Every convolution, normalisation and activation of a network (the default DynUNet planned for
``--edge``, or MONAI's UNet) is run alone, forward and then backward, at the input shape it sees
inside the network, under ``torch.profiler``, once as the plain torch layer and once converted
(stochastic convolutions, lean norms and activations). Per layer and pass it reports:

* ``ops``: ATen operators the host dispatches (on CUDA, ``launches``: kernels launched);
* ``host ms``: wall time of the pass on the host, the device synchronised at the end;
* ``device ms`` (CUDA): summed kernel time; ``host ms`` far above it means the pass is host-bound
  (the GPU waits on Python and dispatch), which is what CUDA-graph capture removes.

A summary sums each layer kind (stochastic conv, lean norm, lean activation and their exact
counterparts) over the network. Prints markdown and writes ``profile.md``/``profile.json`` to
``--out`` when given.

``--steps VARIANT ...`` profiles whole training steps instead (``app.measure.TrainingStep``:
forward, DiceCE, backward, AdamW), one per variant side by side: host and device time per step and
the operators that take the most device time (self time, summed over the step), so what is left of
a variant's step against another one's is named operator by operator.

Examples::

    python -m app.bench profile --edge 128 --device cuda --amp bf16
    python -m app.bench profile --edge 32 --device cpu     # seconds on a laptop
    python -m app.bench profile --edge 256 --device cuda --steps amp stochastic+lean+amp
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import app.nn
from app.measure import environment, markdown_table, synchronize
from app.measure.step import TrainingStep
from app.measure.variants import parse_variant
from app.bench.networks import add_model_arguments, bench_model_config
from app.models import build_model
from app.utils import amp_dtype, atomic_path, resolve_device

__all__ = ["LayerProfile", "PassProfile", "StepProfile", "layer_kind", "main", "profile_calls", "profile_layer",
           "profile_layers", "profile_step"]

_PROFILED = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.ReLU, nn.LeakyReLU,
             nn.PReLU, nn.GELU)


@dataclass
class PassProfile:
    """One forward or backward pass of one layer: dispatched ops, kernels, host and device time."""

    ops: int
    kernels: int
    host_ms: float
    device_ms: float


@dataclass
class LayerProfile:
    """A layer of the network, converted and plain, forward and backward."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    converted_forward: PassProfile
    converted_backward: PassProfile
    plain_forward: PassProfile
    plain_backward: PassProfile


def layer_kind(module: nn.Module) -> str:
    """``"conv"``, ``"norm"`` or ``"act"`` for the layers :func:`profile_layers` profiles."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return "norm"
    return "act"


def profile_calls(calls: Sequence[Callable[[], Any]], device: torch.device) -> PassProfile:
    """Profiles ``calls`` run one after the other and returns the mean per call.

    ``ops`` counts ``aten::`` operators (nested ones included: what the dispatcher runs),
    ``kernels`` the device kernels, ``device_ms`` their summed duration, ``host_ms`` the wall
    time with the device synchronised at the end.
    """
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for call in calls:
            call()
        synchronize(device)
        host = time.perf_counter() - start
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::"))
    n = len(calls)
    return PassProfile(ops=round(ops / n), kernels=round(len(kernels) / n), host_ms=host * 1e3 / n,
                       device_ms=sum(e.device_time for e in kernels) / 1e3 / n)


@dataclass
class StepProfile:
    """One training step of a variant: totals per step and its operators by device (CPU: self) time."""

    variant: str
    kernels: int
    host_ms: float
    device_ms: float
    operators: list[tuple[str, int, float]]
    """``(operator, calls per step, self ms per step)``, most time first."""


def profile_step(step: Callable[[], Any], variant: str, device: torch.device, repeat: int = 3) -> StepProfile:
    """Profiles ``repeat`` calls of a training ``step`` (warmed up by the caller); means per step.

    On CUDA an operator's time is the device time of the kernels it launched itself (``self``), so
    the operators sum to the step's device time; on the CPU it is the operator's self CPU time.
    """
    synchronize(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(repeat):
            step()
        synchronize(device)
        host = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    operators = []
    for avg in prof.key_averages():
        self_us = avg.self_device_time_total if cuda else avg.self_cpu_time_total
        if self_us > 0 and (not cuda or avg.device_type == DeviceType.CPU):
            operators.append((avg.key, round(avg.count / repeat), self_us / 1e3 / repeat))
    operators.sort(key=lambda op: -op[2])
    return StepProfile(variant, kernels=round(len(kernels) / repeat), host_ms=host * 1e3 / repeat,
                       device_ms=sum(e.device_time for e in kernels) / 1e3 / repeat, operators=operators)


def step_tables(profiles: Sequence[StepProfile], cuda: bool, top: int) -> str:
    """Markdown: per variant, the step's totals, then the ``top`` operators of each by time."""
    count = "launches" if cuda else "ops"
    totals = [[p.variant, p.kernels if cuda else sum(op[1] for op in p.operators), p.host_ms]
              + ([p.device_ms] if cuda else []) for p in profiles]
    lines = [markdown_table(["variant", f"{count}/step", "host ms", *(["device ms"] if cuda else [])], totals)]
    unit = "device" if cuda else "self CPU"
    for p in profiles:
        total = sum(op[2] for op in p.operators) or 1.0
        rows = [[name, calls, ms, f"{100 * ms / total:.1f}"] for name, calls, ms in p.operators[:top]]
        lines += ["", f"**{p.variant}**: top {top} operators by {unit} time", "",
                  markdown_table(["operator", "calls/step", f"{unit} ms/step", "% of step"], rows)]
    return "\n".join(lines)


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape each profiled leaf layer sees in one forward pass of ``model``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules() if isinstance(m, _PROFILED)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def profile_layer(layer: nn.Module, shape: Sequence[int], device: torch.device, dtype: torch.dtype | None,
                  repeat: int = 3) -> tuple[PassProfile, PassProfile]:
    """``(forward, backward)`` profiles of ``layer`` on a random input of ``shape`` (after one warm-up
    step), under autocast to ``dtype`` when given."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tuple(shape), generator=gen).to(device).requires_grad_()

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return layer(x * 1.0)  # a fresh non-leaf input: in-place activations may write into it

    y = forward()
    grad = torch.randn(y.shape, generator=gen).to(device, y.dtype)
    y.backward(grad)
    fwd = profile_calls([forward] * repeat, device)
    outputs = [forward() for _ in range(repeat)]
    bwd = profile_calls([lambda y=y: y.backward(grad) for y in outputs], device)
    return fwd, bwd


def profile_layers(model: nn.Module, x: torch.Tensor, convert_options: dict[str, Any], dtype: torch.dtype | None,
                   repeat: int = 3) -> list[LayerProfile]:
    """Every conv/norm/activation of ``model`` alone at its input shape in ``model(x)``: plain, then
    converted with ``app.nn.convert(layer, **convert_options)``, forward and backward."""
    shapes = _layer_inputs(model, x)
    rows = []
    for name, module in model.named_modules():
        if name not in shapes:
            continue
        plain = copy.deepcopy(module).train()
        converted = app.nn.convert(copy.deepcopy(module), **convert_options).train()
        pf, pb = profile_layer(plain, shapes[name], x.device, dtype, repeat)
        cf, cb = profile_layer(converted, shapes[name], x.device, dtype, repeat)
        rows.append(LayerProfile(name, layer_kind(module), shapes[name], cf, cb, pf, pb))
    return rows


def summary_rows(rows: Sequence[LayerProfile], cuda: bool) -> list[list[Any]]:
    """Per layer kind and pass, converted vs plain: ops (or kernels), host ms, device ms, summed over layers."""
    out = []
    for kind in ("conv", "norm", "act"):
        group = [r for r in rows if r.kind == kind]
        if not group:
            continue
        for pass_name in ("forward", "backward"):
            line: list[Any] = [kind, len(group), pass_name]
            for side in ("converted", "plain"):
                ps = [getattr(r, f"{side}_{pass_name}") for r in group]
                line += [sum(p.kernels if cuda else p.ops for p in ps), sum(p.host_ms for p in ps)]
                line += [sum(p.device_ms for p in ps)] if cuda else []
            out.append(line)
    return out


def layer_rows(rows: Sequence[LayerProfile], cuda: bool) -> list[list[Any]]:
    out = []
    for r in rows:
        line: list[Any] = [r.name, r.kind, "x".join(map(str, r.input_shape))]
        for p in (r.converted_forward, r.converted_backward, r.plain_forward, r.plain_backward):
            line += [p.kernels if cuda else p.ops, p.host_ms] + ([p.device_ms] if cuda else [])
        out.append(line)
    return out


def _header(cuda: bool, sides: Sequence[str]) -> list[str]:
    count = "launches" if cuda else "ops"
    out = []
    for side in sides:
        out += [f"{side} {count}", f"{side} host ms"] + ([f"{side} device ms"] if cuda else [])
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.bench profile", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("Examples::")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--edge", type=int, default=64, help="cube edge of the input. Default 64")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--n-probes", type=int, default=app.nn.DEFAULT_N_PROBES,
                   help=f"probes of the converted convolutions. Default {app.nn.DEFAULT_N_PROBES}")
    p.add_argument("--no-lean", action="store_true", help="convert the convolutions only")
    p.add_argument("--amp", default="off", help="autocast of the passes: bf16, fp16 or off. Default off")
    p.add_argument("--repeat", type=int, default=3, help="profiled calls per pass (their mean is reported). Default 3")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N. Default auto")
    p.add_argument("--layers", action="store_true", help="also print the per-layer table")
    p.add_argument("--steps", nargs="+", default=None, metavar="VARIANT",
                   help="profile whole training steps of these variants (e.g. amp stochastic+lean+amp) instead of layers")
    p.add_argument("--top", type=int, default=15, help="operators listed per variant with --steps. Default 15")
    p.add_argument("--out", default=None, help="folder for profile.md and profile.json")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device, option="--device")
        dtype = amp_dtype(args.amp, "--amp")
        cfg = bench_model_config(args.model, args.model_arg, [args.edge] * 3)
    except ValueError as err:
        parser.error(str(err))
    cuda = device.type == "cuda"
    if args.steps:
        return _main_steps(args, cfg, device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    x = torch.randn(args.batch_size, 1, args.edge, args.edge, args.edge, device=device)
    options = {"n_probes": args.n_probes, "lean": not args.no_lean}
    rows = profile_layers(model, x, options, dtype, args.repeat)
    sides = ["converted", "plain"]
    lines = [
        f"## Per-layer profile: {args.model} at {args.edge}^3, batch {args.batch_size}, amp {args.amp}, "
        f"converted = app.nn.convert(n_probes={args.n_probes}, lean={not args.no_lean})", "", environment(), "",
        markdown_table(["kind", "layers", "pass", *_header(cuda, sides)], summary_rows(rows, cuda)),
    ]
    if args.layers:
        passes = ["converted fwd", "converted bwd", "plain fwd", "plain bwd"]
        lines += ["", markdown_table(["layer", "kind", "input", *_header(cuda, passes)], layer_rows(rows, cuda))]
    return _report("\n".join(lines) + "\n", args, "layers", [asdict(r) for r in rows])


def _report(text: str, args: argparse.Namespace, key: str, data: list[dict[str, Any]]) -> int:
    """Prints ``text``; with ``--out`` writes it to profile.md and ``data`` under ``key`` to profile.json."""
    print(text)
    if args.out:
        out = Path(args.out)
        with atomic_path(out / "profile.md") as tmp:
            tmp.write_text(text)
        with atomic_path(out / "profile.json") as tmp:
            tmp.write_text(json.dumps({"environment": environment(), "args": vars(args), key: data}, indent=1))
    return 0


def _main_steps(args: argparse.Namespace, cfg: dict[str, Any], device: torch.device) -> int:
    """``--steps``: whole training steps per variant, side by side."""
    patch = (args.edge,) * 3
    profiles = []
    for name in args.steps:
        step = TrainingStep(cfg, parse_variant(name), patch, args.batch_size, args.n_probes, {}, device)
        step()  # warm-up: cuDNN plans, caches, allocator
        step()
        profiles.append(profile_step(step, name, device, args.repeat))
        print(f"[profile] {name}: {profiles[-1].host_ms:.1f} ms host, {profiles[-1].device_ms:.1f} ms device per step",
              flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = (f"## Training-step profile: {args.model} at {args.edge}^3, batch {args.batch_size}\n\n{environment()}\n\n"
            + step_tables(profiles, device.type == "cuda", args.top) + "\n")
    return _report(text, args, "steps", [asdict(p) for p in profiles])
