"""``python -m app.bench memory``: peak memory and step time of whole U-Nets, per memory lever.

For each network, volume edge and variant (exact, bf16 autocast, gradient checkpointing,
stochastic convolutions, lean layers and their combinations; :mod:`app.measure.variants`) it runs
real training steps (:func:`app.measure.measure_step`: forward, DiceCE, backward, AdamW) and reports
the peak device memory, its ratio to exact backprop, the step time and its ratio, the bytes
saved for backward (device independent) and, on CUDA, ``calib`` = (peak - 4 x parameter bytes) /
saved bytes, the factor :mod:`app.plan`'s CPU estimate multiplies saved bytes by. Rows that do not fit say ``OOM``; once a variant is out
of memory, its larger sizes are not tried. ``--max-cube`` adds the largest cube that trains within
``--cap-gib`` per variant (the planner's search, :func:`app.plan.plan`).

Outputs: the markdown table (with the environment line) on stdout and in ``DIR/memory.md``, a plot
of peak memory against the volume edge (one line per variant, log y) in ``DIR/memory.png``, raw
numbers in ``DIR/memory.json``. Measurements also go into the planner's calibration cache, so
``python -m app.plan`` reuses them.

On the CPU there is no peak to measure: use tiny sizes (``--sizes 32 48``); the table and the plot
show saved bytes and time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from app.measure import (
    COMPONENTS,
    ERROR,
    GIB,
    MIB,
    OK,
    OOM,
    StepStats,
    device_name,
    environment,
    markdown_table,
    measure_step,
    parse_variant,
)
from app.bench.networks import BENCH_MODELS
from app.nn import DEFAULT_N_PROBES
from app.nn.functional import SKETCHES
from app.nn.lean import STORAGE_DTYPES
from app.models.compiled import COMPILE_MODES
from app.plan.cache import CalibrationCache, cache_key, default_cache_path
from app.plan.planner import STATE_BYTES_PER_PARAMETER_BYTE, PlanResult, plan
from app.utils import atomic_path, resolve_device

__all__ = ["BENCH_MODELS", "DEFAULT_SIZES", "DEFAULT_VARIANTS", "main", "run", "write_plot"]

DEFAULT_SIZES = [96, 128, 192, 256, 384]
DEFAULT_VARIANTS = [
    "exact", "amp", "ckpt", "amp+ckpt", "stochastic", "stochastic+amp", "stochastic+ckpt",
    "stochastic+lean", "stochastic+lean+amp", "stochastic+lean+ckpt",
]
MAX_CUBE_VARIANTS = ["exact", "ckpt", "stochastic+lean", "stochastic+lean+amp"]


def _measure(model: str, edge: int, variant: str, args: argparse.Namespace, device: torch.device,
             cache: CalibrationCache) -> StepStats:
    cfg = BENCH_MODELS[model]
    patch = (edge, edge, edge)
    options = _sketch_options(args)
    stats = measure_step(cfg, patch_size=patch, batch_size=args.batch_size, variant=variant, n_probes=args.n_probes,
                         device=device, warmup=args.warmup, repeat=args.repeat, memory_cap_gib=args.cap_gib,
                         sketch_options=options, report_errors=True, compile=args.compile)
    if args.compile != "off":  # the planner's calibration is of eager steps
        return stats
    key, fields = cache_key(
        model_config=cfg, device=stats.device, variant=stats.variant, patch_size=patch,
        batch_size=args.batch_size, n_probes=args.n_probes, sketch_options=options,
    )
    cache.store(key, fields, stats, None if args.cap_gib is None else args.cap_gib * GIB)
    return stats


def _sketch_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {} if args.sketch is None else {"sketch": args.sketch}
    if args.lean_storage is not None:
        options["lean_storage"] = args.lean_storage
    if args.conv_block is not None:
        options["conv_block"] = args.conv_block
    return options


def run(args: argparse.Namespace, device: torch.device,
        on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """All (edge, model, variant) rows, small edges first, as plain dicts (``StepStats.to_dict`` plus
    ``model`` and ``edge``); ``on_row(rows)`` after each one (progress, partial outputs)."""
    cache = CalibrationCache(None if args.no_cache else (args.cache or default_cache_path()))
    rows: list[dict[str, Any]] = []
    failed: dict[str, set[str]] = {model: set() for model in args.models}  # OOM or error at a smaller edge
    for edge in sorted(args.sizes):
        for model in args.models:
            for variant in args.variants:
                if variant in failed[model]:
                    stats = StepStats(variant, (edge,) * 3, args.batch_size, status=OOM,
                                      reason="not run: a smaller size did not fit")
                else:
                    stats = _measure(model, edge, variant, args, device, cache)
                if stats.status in (OOM, ERROR):
                    failed[model].add(variant)
                rows.append({"model": model, "edge": edge, **stats.to_dict()})
                if on_row is not None:
                    on_row(rows)
    return rows


def _num(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _ratio(a: float | None, b: float | None) -> float:
    return math.nan if a is None or b is None or not b else a / b


def table(rows: list[dict[str, Any]], cuda: bool) -> str:
    """The markdown table of :func:`run`'s rows (peak columns only when measured on CUDA)."""
    exact = {(r["model"], r["edge"]): r for r in rows if r["variant"] == "exact" and r["status"] == OK}
    header = ["model", "edge", "variant"]
    header += ["peak GiB", "peak / exact"] if cuda else []
    header += ["step ms", "time / exact", "saved MiB", "saved B/voxel"]
    header += ["calib"] if cuda else []  # (peak - parameter state) / saved: app.plan's CPU calibration factor
    out = []
    for r in rows:
        ref = exact.get((r["model"], r["edge"]), {})
        if r["status"] != OK:
            label = "OOM" if r["status"] == OOM else r["status"]
            out.append([r["model"], r["edge"], r["variant"], label] + [math.nan] * (len(header) - 4))
            continue
        line = [r["model"], r["edge"], r["variant"]]
        if cuda:
            line += [_num(r["peak_bytes"]) / GIB, _ratio(r["peak_bytes"], ref.get("peak_bytes"))]
        line += [_num(r["step_seconds"]) * 1e3, _ratio(r["step_seconds"], ref.get("step_seconds")),
                 _num(r["saved_bytes"]) / MIB, _num(r["saved_bytes_per_voxel"])]
        if cuda:
            state = STATE_BYTES_PER_PARAMETER_BYTE * _num(r["parameter_bytes"])
            line += [_ratio(_num(r["peak_bytes"]) - state, r["saved_bytes"])]
        out.append(line)
    return markdown_table(header, out)


def write_plot(rows: list[dict[str, Any]], path: Path, cuda: bool, cap_gib: float | None = None) -> None:
    """Peak memory (CPU: saved bytes) against the volume edge, one line per variant, log y, one
    panel per model; written with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    key, unit, label = ("peak_bytes", GIB, "peak memory (GiB)") if cuda else ("saved_bytes", MIB, "saved for backward (MiB, CPU)")
    for ax, model in zip(axes[0], models):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            pts = [(r["edge"], r[key] / unit) for r in rows
                   if r["model"] == model and r["variant"] == variant and r["status"] == OK and r[key]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=variant)
        if cuda and cap_gib is not None:
            ax.axhline(cap_gib, color="grey", linestyle="--", linewidth=1, label=f"cap {cap_gib:g} GiB")
        ax.set_yscale("log")
        ax.set_xlabel("volume edge (voxels, cube)")
        ax.set_ylabel(label)
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(environment(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def max_cubes(args: argparse.Namespace, device: torch.device,
              on_result: Callable[[list[tuple[str, PlanResult]]], None] | None = None) -> list[tuple[str, PlanResult]]:
    """The largest cube per (model, variant) within ``--cap-gib`` (the planner's search)."""
    out: list[tuple[str, PlanResult]] = []
    for model in args.models:
        for variant in args.max_cube_variants:
            out.append((model, plan(
                BENCH_MODELS[model], args.cap_gib, (1.0, 1.0, 1.0), variant, args.batch_size, device,
                n_probes=args.n_probes, sketch_options=_sketch_options(args), cache=False if args.no_cache else (args.cache or True), max_edge=args.max_edge,
                edge_step=args.edge_step,
                warmup=args.warmup, repeat=args.repeat, reference_edge=min(args.sizes),
            )))
            if on_result is not None:
                on_result(out)
    return out


def max_cube_table(found: list[tuple[str, PlanResult]]) -> str:
    rows = []
    for model, r in found:
        s = r.stats
        if r.patch_size is None:
            rows.append([model, r.variant, "none", math.nan, math.nan, ""])
        else:
            rows.append([model, r.variant, r.patch_size[0], s.peak_bytes / GIB, s.step_seconds * 1e3,
                         s.extra.get("source", "")])
    est = " (estimated)" if found and found[0][1].estimated else ""
    return markdown_table(["model", "variant", "largest cube", f"peak GiB{est}", "step ms", "source"], rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=list(BENCH_MODELS))
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="cube edges. Default 96 128 192 256 384")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help=f"'+'-joined components of {', '.join(COMPONENTS)}. Default: {' '.join(DEFAULT_VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--n-probes", type=int, default=DEFAULT_N_PROBES)
    p.add_argument("--sketch", default=None, choices=list(SKETCHES),
                   help="sketch of the stochastic layers. Default: the layers' own default")
    p.add_argument("--lean-storage", default=None, choices=list(STORAGE_DTYPES),
                   help="dtype the lean layers keep x̂ in (lean variants). Default: app.nn.convert's (bfloat16)")
    p.add_argument("--conv-block", type=int, default=None,
                   help="elements above which the 'blocked' variants compute a convolution in channel blocks. "
                        "Default app.nn.CONV_BLOCK (2^27)")
    p.add_argument("--cap-gib", type=float, default=None,
                   help="limit the CUDA allocator to this many GiB (rows above it: OOM); the --max-cube budget")
    p.add_argument("--max-cube", action="store_true", help="also find the largest cube within --cap-gib per variant")
    p.add_argument("--max-cube-variants", nargs="+", default=None,
                   help=f"variants for --max-cube. Default: {' '.join(MAX_CUBE_VARIANTS)}")
    p.add_argument("--max-edge", type=int, default=512, help="largest cube tried by --max-cube. Default 512")
    p.add_argument("--edge-step", type=int, default=32,
                   help="--max-cube tries multiples of lcm(network divisor, this). Default 32")
    p.add_argument("--compile", default="off", choices=list(COMPILE_MODES),
                   help="torch.compile mode of every variant's network, as trainer.compile (reduce-overhead: CUDA "
                        "graphs; give --warmup 3). Compiled rows do not enter the calibration cache. Default off")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N, cpu. Default auto: cuda when available")
    p.add_argument("--out", default="bench_memory", help="output folder (memory.md, memory.png, memory.json)")
    p.add_argument("--cache", default=None, help=f"calibration cache to read/extend. Default {default_cache_path()}")
    p.add_argument("--no-cache", action="store_true", help="do not use the calibration cache")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        args.variants = list(dict.fromkeys(parse_variant(v).name for v in args.variants))
        args.max_cube_variants = [parse_variant(v).name for v in (args.max_cube_variants or MAX_CUBE_VARIANTS)]
        device = resolve_device(args.device, option="--device")
    except ValueError as err:
        parser.error(str(err))
    if args.max_cube and args.cap_gib is None and device.type == "cuda":
        parser.error("--max-cube needs --cap-gib (the memory budget of the search)")
    cuda = device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def report(rows: list[dict[str, Any]], found: list[tuple[str, PlanResult]]) -> str:
        cap = f", allocator cap {args.cap_gib:g} GiB" if args.cap_gib is not None and cuda else ""
        lines = [
            "## Training-step memory per variant (app.bench memory)", "", environment(), "",
            (f"batch {args.batch_size}, n_probes {args.n_probes}, sketch {args.sketch or 'default'}, "
             f"lean storage {args.lean_storage or 'default'}, compile {args.compile}, "
             f"{args.warmup} warm-up + {args.repeat} timed steps "
             f"(AdamW, DiceCE){cap}; peak = torch.cuda.max_memory_allocated over the timed steps; "
             "saved = bytes saved for backward by the forward pass and loss (parameters excluded)"),
        ]
        if not cuda:
            lines.append("CPU: no peak memory to measure; saved bytes and step time only.")
        lines += ["", table(rows, cuda)]
        if found:
            lines += ["", f"### Largest cube that trains within {found[0][1].budget_bytes / GIB:.3g} GiB", ""]
            if found[0][1].estimated:
                lines.append("CPU: peaks ESTIMATED from saved bytes x calibration factor (app.plan.planner), not measured.\n")
            lines.append(max_cube_table(found))
        return "\n".join(lines) + "\n"

    def save(rows: list[dict[str, Any]], found: list[tuple[str, PlanResult]]) -> str:
        """(Re)write memory.md and memory.json: partial results survive an interrupted run."""
        text = report(rows, found)
        with atomic_path(out / "memory.md") as tmp:
            tmp.write_text(text)
        raw = {"environment": environment(), "device": device_name(device), "args": vars(args), "rows": rows,
               "max_cube": [{"model": m, "variant": r.variant, "patch_size": r.patch_size,
                             "stats": None if r.stats is None else r.stats.to_dict()} for m, r in found]}
        with atomic_path(out / "memory.json") as tmp:
            tmp.write_text(json.dumps(raw, indent=1, default=str))
        return text

    def progress(rows: list[dict[str, Any]]) -> None:
        r = rows[-1]
        peak = f"{r['peak_bytes'] / GIB:.2f} GiB, " if r["peak_bytes"] is not None else ""
        time_ms = f"{r['step_seconds'] * 1e3:.0f} ms" if r["step_seconds"] is not None else r["status"]
        print(f"[memory] {r['model']} {r['edge']}^3 {r['variant']}: {peak}{time_ms}", file=sys.stderr, flush=True)
        save(rows, [])
        if r["model"] == args.models[-1] and r["variant"] == args.variants[-1]:  # an edge is complete
            write_plot(rows, out / "memory.png", cuda, args.cap_gib)

    def cube_progress(found: list[tuple[str, PlanResult]]) -> None:
        model, r = found[-1]
        size = "none" if r.patch_size is None else f"{r.patch_size[0]}^3"
        print(f"[memory] largest cube {model} {r.variant}: {size} ({len(r.trials)} candidates asked)",
              file=sys.stderr, flush=True)
        save(rows, found)

    rows = run(args, device, progress)
    write_plot(rows, out / "memory.png", cuda, args.cap_gib)
    found = max_cubes(args, device, cube_progress) if args.max_cube else []
    text = save(rows, found)
    print(text)
    print(f"wrote {os.fspath(out / 'memory.md')}, {os.fspath(out / 'memory.png')}, {os.fspath(out / 'memory.json')}")
    return 0
