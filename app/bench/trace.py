"""``python -m app.bench trace``: every byte alive at a training step's memory peak, and where it came from.

One training step (:class:`app.measure.TrainingStep`: forward, DiceCE, backward, AdamW) per variant
runs under ``torch.profiler`` with memory profiling. Its memory timeline (torch's own categories:
parameters, optimizer state, inputs, activations saved for backward, gradients, autograd detail,
temporaries) is replayed to the step's peak; there the live bytes are split by category (plus
library workspaces, which torch leaves uncategorised) and attributed to the module (forward) or
autograd node (backward) and the operator that allocated them; the table names where in the step
the peak is reached. A stacked plot shows allocated memory by category over the step.

Outputs: markdown on stdout and, with ``--out``, ``trace.md``, ``trace.json`` and ``trace.png``.

Examples::

    python -m app.bench trace --edge 256 --variants exact amp stochastic+lean+amp --out trace-256
    python -m app.bench trace --edge 32 --device cpu --variants exact stochastic+lean
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import app.nn
from app.bench.networks import add_model_arguments, bench_model_config
from app.measure import GIB, MIB, TrainingStep, environment, markdown_table, parse_variant
from app.utils import atomic_path, resolve_device

__all__ = ["CATEGORIES", "PEAK_CATEGORIES", "StepTrace", "main", "report", "trace_step", "write_plot"]

CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail", "unknown")
"""torch.profiler's memory categories, in the order of its timeline (``unknown``: not categorised)."""

WORKSPACE = "workspace"
"""Bytes allocated during the step outside every tensor operator the profiler records: library
workspaces (cuDNN's convolution workspace, cuFFT's work area, the CPU's im2col buffers). torch's
timeline counts them as ``unknown``; the split at the peak names them."""

PEAK_CATEGORIES = (*CATEGORIES, WORKSPACE)
"""The categories of the bytes alive at the peak (:attr:`StepTrace.at_peak`)."""


@dataclass
class StepTrace:
    """The memory of one traced training step.

    Attributes:
        peak_bytes: most bytes alive at once during the step (allocations the profiler saw).
        at_peak: bytes alive at the peak, per category (:data:`PEAK_CATEGORIES`).
        peak_during: ``(scope, operator)`` of the allocation that reached the peak: where in the
            step the peak happens (:data:`WORKSPACE` as the operator for a library workspace, whose
            scope is that of the allocation just before it).
        sources: bytes alive at the peak per ``(category, scope, operator)``, largest first;
            ``scope`` is the innermost module for the forward pass (``Conv3d_4``: the profiler's
            name, class and call index), the autograd node for the backward pass, ``optimizer``
            or ``-`` (outside both, or allocated before the step).
        times_us, by_category: the timeline for plots: per event time, bytes per category.
    """

    peak_bytes: int
    at_peak: dict[str, int]
    sources: list[tuple[str, str, str, int]]
    peak_during: tuple[str, str] = ("-", "-")
    times_us: list[float] = field(default_factory=list)
    by_category: list[list[int]] = field(default_factory=list)


def _category_name(category: Any) -> str:
    return "unknown" if category is None else category.name.lower()


def _allocation_sources(memory_profile: Any) -> dict[Any, tuple[str, str]]:
    """TensorKey -> ``(scope, operator)`` of the allocation that created it."""
    from torch._C._profiler import _EventType
    from torch.profiler._memory_profiler import TensorKey

    out: dict[Any, tuple[str, str]] = {}
    for event in memory_profile._op_tree.dfs():
        if event.typed[0] != _EventType.Allocation or event.typed[1].alloc_size <= 0:
            continue
        key = TensorKey.from_allocation(event.typed[1])
        if key is None:
            continue
        op, scope, parent = "-", "-", event.parent
        while parent is not None:
            name = parent.name
            if op == "-" and parent.typed[0] == _EventType.TorchOp:
                op = name
            if name.startswith("nn.Module: ") or name.startswith("autograd::engine::evaluate_function:"):
                scope = name.removeprefix("autograd::engine::evaluate_function: ").removeprefix("nn.Module: ")
                break
            if name.startswith("Optimizer.step"):
                scope = "optimizer"
                break
            parent = parent.parent
        out[key] = (scope, op)
    return out


def trace_step(step: TrainingStep, device: torch.device, top: int = 15) -> StepTrace:
    """Runs ``step()`` once (after a warm-up step) under the memory profiler; see :class:`StepTrace`."""
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    memory_profile = prof._memory_profile()
    timeline = MemoryProfileTimeline(memory_profile)
    events = [e for e in timeline.timeline if e[2][0].device == device or
              (device.type == "cuda" and e[2][0].device.type == "cuda")]

    def replay(stop: int | None) -> tuple[int, int, dict[Any, tuple[int, int]]]:
        """Replays the first ``stop`` events; returns (peak total, its index, live {key: (bytes, version)})."""
        live: dict[Any, tuple[int, int]] = {}
        total = best = best_at = 0
        for i, (_, action, (key, version), nbytes) in enumerate(events[:stop]):
            if action in (Action.PREEXISTING, Action.CREATE):
                live[key] = (nbytes, version)
                total += nbytes
            elif action == Action.INCREMENT_VERSION:
                live[key] = (live.get(key, (nbytes, version))[0], version + 1)
            elif action == Action.DESTROY:
                total -= live.pop(key, (nbytes, version))[0]
            if total > best:
                best, best_at = total, i + 1
        return best, best_at, live

    peak, peak_at, _ = replay(None)
    _, _, live = replay(peak_at)
    sources = _allocation_sources(memory_profile)

    # a block made during the step by no recorded operator is a workspace; its scope is that of the
    # allocation with a scope just before it (the operator that asked the library for it runs
    # there). The profiler may give every such block one key: the last creation before the peak
    # is the one alive at the peak.
    workspace_scope: dict[Any, str] = {}
    last_scope = "-"
    for _, action, (key, _v), _n in events[:peak_at]:
        if key in sources:
            last_scope = sources[key][0] if sources[key][0] != "-" else last_scope
        elif action == Action.CREATE:
            workspace_scope[key] = last_scope

    def source(key: Any) -> tuple[str, str]:
        """``(scope, operator)`` of the allocation that made ``key`` (``("-", "-")``: before the step)."""
        if key in sources:
            return sources[key]
        return (workspace_scope[key], WORKSPACE) if key in workspace_scope else ("-", "-")

    at_peak: dict[str, int] = {c: 0 for c in PEAK_CATEGORIES}
    grouped: dict[tuple[str, str, str], int] = defaultdict(int)
    for key, (nbytes, version) in live.items():
        scope, op = source(key)
        category = WORKSPACE if op == WORKSPACE else _category_name(memory_profile._categories.get(key, version))
        at_peak[category] += nbytes
        grouped[(category, scope, op)] += nbytes
    ranked = sorted(grouped.items(), key=lambda kv: -kv[1])[:top]
    times, sizes = timeline._coalesce_timeline(str(device))
    return StepTrace(
        peak_bytes=peak, at_peak=at_peak, sources=[(*k, v) for k, v in ranked],
        peak_during=source(events[peak_at - 1][2][0]) if peak_at else ("-", "-"),
        times_us=[float(t) for t in times], by_category=[list(s[1:]) for s in sizes],
    )


def write_plot(traces: dict[str, StepTrace], path: Path, title: str) -> None:
    """Allocated memory by category over the step, one panel per variant (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False, sharey=True)
    for ax, (name, trace) in zip(axes[0], traces.items()):
        if trace.times_us:
            t0 = trace.times_us[0]
            xs = [(t - t0) / 1e3 for t in trace.times_us]
            columns = list(zip(*trace.by_category)) if trace.by_category else []
            ax.stackplot(xs, *[[v / GIB for v in col] for col in columns], labels=list(CATEGORIES), step="post")
        ax.set_title(f"{name}: peak {trace.peak_bytes / GIB:.2f} GiB")
        ax.set_xlabel("host time in the step (ms)")  # allocations are stamped when the host issues them
        ax.set_ylabel("allocated (GiB)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(traces: dict[str, StepTrace], header: str) -> str:
    unit, label = (GIB, "GiB") if max((t.peak_bytes for t in traces.values()), default=0) > GIB else (MIB, "MiB")
    rows = [[name, t.peak_bytes / unit, *[t.at_peak[c] / unit for c in PEAK_CATEGORIES], " / ".join(t.peak_during)]
            for name, t in traces.items()]
    lines = [header, "", environment(), "",
             markdown_table(["variant", f"peak {label}", *[f"{c} {label}" for c in PEAK_CATEGORIES], "peak reached in"], rows)]
    for name, t in traces.items():
        lines += ["", f"### {name}: the largest sources alive at the peak", "",
                  markdown_table(["category", "scope", "operator", label],
                                 [[c, s, op, b / unit] for c, s, op, b in t.sources])]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.bench trace", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("Examples::")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--edge", type=int, default=128, help="cube edge of the input. Default 128")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["exact", "amp", "stochastic+lean+amp"],
                   help="variants to trace. Default: exact amp stochastic+lean+amp")
    p.add_argument("--n-probes", type=int, default=app.nn.DEFAULT_N_PROBES)
    p.add_argument("--top", type=int, default=15, help="sources listed per variant. Default 15")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N. Default auto")
    p.add_argument("--out", default=None, help="folder for trace.md, trace.json and trace.png")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device, option="--device")
        variants = [parse_variant(v) for v in args.variants]
        patch = (args.edge,) * 3
        resolved = bench_model_config(args.model, args.model_arg, patch)
    except ValueError as err:
        parser.error(str(err))
    traces: dict[str, StepTrace] = {}
    for variant in variants:
        step = TrainingStep(resolved, variant, patch, args.batch_size, args.n_probes, {}, device)
        traces[variant.name] = trace_step(step, device, args.top)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = (f"## Memory at the peak of one training step: {args.model} at {args.edge}^3, batch {args.batch_size}, "
              f"n_probes {args.n_probes} (torch.profiler memory categories)")
    text = report(traces, header)
    print(text)
    if args.out:
        out = Path(args.out)
        with atomic_path(out / "trace.md") as tmp:
            tmp.write_text(text)
        with atomic_path(out / "trace.json") as tmp:
            tmp.write_text(json.dumps({"environment": environment(), "args": vars(args), "traces": {
                name: {"peak_bytes": t.peak_bytes, "at_peak": t.at_peak, "peak_during": t.peak_during, "sources": t.sources}
                for name, t in traces.items()
            }}, indent=1))
        with atomic_path(out / "trace.png", suffix=".png") as tmp:
            write_plot(traces, tmp, f"{args.model} {args.edge}^3 — {environment()}")
    return 0
