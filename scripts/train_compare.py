"""Exact vs stochastic backpropagation: the same training run, once per ``sketch.n_probes``.

Every run uses the same config, seed, data and number of optimizer steps; only
``sketch.n_probes`` differs (0 = exact). The table reports final and best mean Dice, peak GPU
memory during training (``torch.cuda.max_memory_allocated`` per epoch, max over the epochs after
the first; CPU runs: n/a), the mean step time over the same epochs, and the environment.
Run it where ``app`` is importable (``pip install -e .`` or ``PYTHONPATH=.``).

Examples:
    # GPU benchmark on a Decathlon task, 2 x 300 steps at 128^3, bf16:
    python scripts/train_compare.py --out outputs/compare --probes 0,16 -- \\
        data=decathlon data.root=/data/Task09_Spleen trainer.patch_size=[128,128,128] \\
        trainer.max_steps=300 trainer.steps_per_epoch=50 trainer.amp=bf16 logger=disabled
    # CPU smoke test:
    python scripts/train_compare.py --out /tmp/compare -- experiment=smoke

Writes ``<out>/compare.json`` and ``<out>/compare.md``; each run's folder is ``<out>/probes_<r>``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from app.measure import environment_info
from app.models import load_checkpoint
from app.train import config_dir, train


def run_one(n_probes: int, out: Path, overrides: list[str]) -> dict[str, Any]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"sketch.n_probes={n_probes}", f"output_dir={out}"])
    GlobalHydra.instance().clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    metrics = train(cfg)
    history = load_checkpoint(out / "checkpoints" / "last.pt")["history"]
    # the first epoch holds one-off costs (allocator growth, lazy init): left out when there are more
    steady = history[1:] if len(history) > 1 else history
    times = [h["train/step_time_s"] for h in steady]
    peaks = [h["train/peak_memory_gb"] for h in steady if "train/peak_memory_gb" in h]
    return {
        "n_probes": n_probes,
        "steps": int(metrics["global_step"]),
        "final_mean_dice": metrics.get("val/mean_dice", math.nan),
        "best_mean_dice": metrics.get("val/best_mean_dice", math.nan),
        "step_time_s": sum(times) / len(times),
        "peak_memory_gb": max(peaks) if peaks else None,
        "final_loss": metrics["train/epoch_loss"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| n_probes | steps | final mean Dice | best mean Dice | step time (s) | peak GPU memory (GiB) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
        lines.append(f"| {r['n_probes'] or 'exact'} | {r['steps']} | {r['final_mean_dice']:.4f} | "
                     f"{r['best_mean_dice']:.4f} | {r['step_time_s']:.3f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the report")
    parser.add_argument("--probes", default="0,16", help="comma-separated sketch.n_probes values (0 = exact)")
    parser.add_argument("overrides", nargs="*", help="config overrides shared by every run (after --)")
    args = parser.parse_args(argv)
    probes = [int(p) for p in args.probes.split(",")]
    rows = [run_one(r, args.out / f"probes_{r}", args.overrides) for r in probes]
    report = {"environment": environment_info(), "overrides": args.overrides, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(report, indent=2))
    text = f"{table(rows)}\n\nEnvironment: {json.dumps(report['environment'])}\nOverrides: {' '.join(args.overrides)}\n"
    (args.out / "compare.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
