"""``python -m app.plan`` / ``stochprop-plan``: the largest training patch per variant within a memory budget.

Example (on the GPU that will train)::

    python -m app.plan --model dynunet --budget-gib 24 --spacing 1 1 1 \\
        --variants exact amp ckpt stochastic stochastic+lean+amp

Prints one markdown row per variant and batch size: the largest patch whose training step runs
within the budget, its measured peak memory and step time. Measurements are kept in the
calibration cache (``--cache``; see :mod:`app.plan.cache`), so a second run is instant. Without a
GPU the peaks are estimated from the bytes saved for backward (counted on the CPU) and the output
says so.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from app.measure import COMPONENTS, GIB, environment, markdown_table, parse_variant
from app.models import MODEL_NAMES
from app.nn import DEFAULT_N_PROBES
from app.plan.cache import default_cache_path
from app.plan.planner import (
    STATE_BYTES_PER_PARAMETER_BYTE,
    PlanResult,
    calibration_factor,
    plan,
)
from app.utils import parse_key_values, resolve_device

__all__ = ["DEFAULT_VARIANTS", "main", "model_config_from_args", "results_table"]

DEFAULT_VARIANTS = [
    "exact", "amp", "ckpt", "stochastic", "stochastic+amp", "stochastic+amp+ckpt", "stochastic+lean", "stochastic+lean+amp",
]


def model_config_from_args(name: str, in_channels: int, out_channels: int, pairs: list[str]) -> dict[str, Any]:
    """``{"name", "in_channels", "out_channels"}`` plus ``--model-arg KEY=VALUE`` pairs (values read as YAML)."""
    return {"name": name, "in_channels": in_channels, "out_channels": out_channels, **parse_key_values(pairs)}


def _gib(v: float) -> float:
    return v / GIB if not math.isnan(v) else math.nan


def results_table(results: list[PlanResult]) -> str:
    """Markdown table: one row per plan result."""
    rows = []
    for r in results:
        s = r.stats
        if r.patch_size is None:
            status = "none fits" if s is None or s.status in ("ok", "oom", "error") else s.status
            reason = "" if s is None else s.reason
            rows.append([r.variant, r.batch_size, status, math.nan, math.nan, math.nan, reason[:60]])
            continue
        rows.append([
            r.variant, r.batch_size, "x".join(map(str, r.patch_size)), _gib(s.peak_bytes),
            s.step_seconds * 1e3, s.saved_bytes_per_voxel, s.extra.get("source", ""),
        ])
    header = ["variant", "batch", "largest patch", "peak GiB" + (" (est.)" if results and results[0].estimated else ""),
              "step ms", "saved B/voxel", "source"]
    return markdown_table(header, rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app.plan",
        description="Largest training patch per variant within a GPU memory budget, by measurement "
        "(estimated from saved-tensor bytes when no GPU is present).",
    )
    p.add_argument("--model", default="dynunet", choices=MODEL_NAMES, help="network (app.models). Default dynunet")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=3)
    p.add_argument("--model-arg", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra model config key (YAML value), e.g. base_features=16 or channels=[32,64,128,256,320]")
    p.add_argument("--budget-gib", type=float, default=None, help="memory budget. Default: the device's memory")
    p.add_argument("--spacing", type=float, nargs="+", default=[1.0, 1.0, 1.0], help="voxel spacing. Default 1 1 1")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--n-probes", type=int, default=DEFAULT_N_PROBES, help=f"probes per stochastic layer. Default {DEFAULT_N_PROBES}")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help=f"'+'-joined components of {', '.join(COMPONENTS)}. Default: {' '.join(DEFAULT_VARIANTS)}")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu. Default auto: cuda when available")
    p.add_argument("--max-edge", type=int, default=512, help="largest candidate edge (finest axis). Default 512")
    p.add_argument("--edge-step", type=int, default=None,
                   help="candidate edges are multiples of lcm(divisor, this). Default: the network's divisor")
    p.add_argument("--max-shape", type=int, nargs="+", default=None, help="per axis, the largest useful size (data shape)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per measurement. Default 1")
    p.add_argument("--repeat", type=int, default=2, help="timed steps per measurement. Default 2")
    p.add_argument("--cache", default=None, help=f"calibration cache file. Default {default_cache_path()}")
    p.add_argument("--no-cache", action="store_true", help="measure everything again, store nothing")
    p.add_argument("--reference-edge", type=int, default=64,
                   help="CPU estimate: saved bytes are counted at this edge and the next candidate. Default 64")
    p.add_argument("--calibration", type=float, default=None,
                   help="CPU estimate: peak bytes per saved byte (default: app.plan.planner.calibration_factor)")
    p.add_argument("--verbose", action="store_true", help="also list every candidate measured")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        variants = [parse_variant(v).name for v in args.variants]
        cfg = model_config_from_args(args.model, args.in_channels, args.out_channels, args.model_arg)
        device = resolve_device(args.device, option="--device")
    except ValueError as err:
        parser.error(str(err))
    cache: Any = False if args.no_cache else (args.cache or True)
    results: list[PlanResult] = []
    try:
        for batch in args.batch_sizes:
            for variant in variants:
                results.append(plan(
                    cfg, args.budget_gib, args.spacing, variant, batch, device, n_probes=args.n_probes,
                    cache=cache, max_edge=args.max_edge, max_shape=args.max_shape, edge_step=args.edge_step, warmup=args.warmup,
                    repeat=args.repeat, reference_edge=args.reference_edge, calibration=args.calibration,
                ))
    except ValueError as err:
        print(f"stochprop-plan: error: {err}", file=sys.stderr)
        return 1
    first = results[0]
    print(f"## Largest training patch within {first.budget_bytes / GIB:.2f} GiB: {args.model}, spacing {args.spacing}")
    print(f"\n{environment()}")
    if first.estimated:
        factors = ", ".join(sorted({f"{v} {calibration_factor(v):g}" for v in variants}))
        print(
            "\nNOTE: no CUDA device: the peaks below are ESTIMATES, not measurements: peak = calibration factor x "
            f"bytes saved for backward (counted on this CPU at {args.reference_edge}^3 and the next candidate, extrapolated linearly in voxels) + "
            f"{STATE_BYTES_PER_PARAMETER_BYTE} x parameter bytes; factors (app.plan.planner.CALIBRATION_FACTORS): "
            f"{args.calibration if args.calibration is not None else factors}. Run on the training GPU to measure."
        )
    print()
    print(results_table(results))
    if args.verbose:
        for r in results:
            print(f"\n{r.variant}, batch {r.batch_size}: " + "; ".join(
                f"{'x'.join(map(str, t.patch_size))} {t.status}"
                + (f" {_gib(t.peak_bytes):.2f} GiB" if not math.isnan(t.peak_bytes) else "")
                + f" ({t.extra.get('source', '')})" for t in r.trials))
    return 0


if __name__ == "__main__":
    sys.exit(main())
