"""Training-step time of variants, eager, captured and ``torch.compile``d, side by side under each mode.

Each row: one ``app.measure.TrainingStep`` (forward under the variant's autocast, DiceCE, backward,
AdamW) of the benchmark network at one patch size, run as ``--modes`` say, as ``trainer.compile``
does: ``off`` (eager), ``cuda-graphs`` (forward, loss and backward captured as one CUDA graph),
or a ``torch.compile`` mode (``reduce-overhead`` replays forward and backward as CUDA graphs). The
median of ``--repeat`` steps after ``--warmup`` (capture and compilation happen in the warm-up),
and the ratio against the first variant at the same size and mode. Prints markdown.

    python scripts/bench_capture.py --sizes 64 128 256 --batch-size 1 \
        --variants amp stochastic+lean+amp --modes off cuda-graphs
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import app.nn
from app.bench.networks import add_model_arguments, bench_model_config
from app.measure import environment, markdown_table
from app.measure.step import TrainingStep
from app.measure.timing import synchronize, timed_calls
from app.measure.variants import parse_variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["amp", "stochastic+lean+amp"])
    parser.add_argument("--modes", nargs="+", default=["off", "cuda-graphs"],
                        help="off (eager), cuda-graphs, or torch.compile modes. Default off cuda-graphs")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        patch = (size,) * 3
        cfg = bench_model_config(args.model, args.model_arg, patch)
        for mode in args.modes:
            first = None
            for name in args.variants:
                torch._dynamo.reset()
                step = TrainingStep(cfg, parse_variant(name), patch, args.batch_size, app.nn.DEFAULT_N_PROBES, {}, device,
                                    compile=mode)
                for _ in range(max(args.warmup, step.calls_before_steady)):
                    step()
                synchronize(device)
                ms = statistics.median(timed_calls(step, device, args.repeat)) * 1e3
                first = ms if first is None else first
                rows.append([f"{size}^3", str(args.batch_size), mode, name, f"{ms:.1f}", f"{ms / first:.2f}"])
                print("[capture] " + " ".join(rows[-1]), file=sys.stderr, flush=True)
                del step
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"# Training step, {args.model} — {environment()}\n")
    print(markdown_table(["volume", "batch", "compile", "variant", "step ms", "vs first variant"], rows))


if __name__ == "__main__":
    main()
