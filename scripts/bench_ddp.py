"""Data-parallel scaling, 1 vs N processes (GPUs): training throughput per variant and patch size,
and the final Dice of the synthetic task trained to the same number of optimizer steps.

For every process count of ``--processes`` the script launches itself under ``torchrun --standalone``
(a free port on this machine; NCCL with ``NCCL_NVLS_ENABLE=0``, NVLink multicast off, on GPUs; gloo
on the CPU), and each launch measures two things:

* **Throughput.** Each process runs :class:`app.measure.step.TrainingStep` of the benchmark network
  under a variant (forward, DiceCE, backward, AdamW) on random data of its own, its model wrapped in
  ``DistributedDataParallel`` as training wraps it when there are several processes. A step's time
  is the slowest rank's (synchronised device, ``--repeat`` steps after ``--warmup``); the table
  gives the median, volumes/s = processes x batch / step time, and the scaling efficiency against
  one process.
* **Training.** ``app.train.train`` on the configured data (the synthetic task by default) with
  ``trainer.max_steps=--train-steps``, the overrides after ``--`` and ``logger=disabled``: each
  process loads ``trainer.batch_size`` patches per step, so N processes see N times the patches at
  the same step count. Rank 0 reports the final and best validation mean Dice and the wall time.

Writes ``<out>/nproc_<N>.json`` per launch, and ``<out>/bench_ddp.json`` / ``bench_ddp.md`` with the
tables and the environment; prints the markdown.

    # two H200s:
    python scripts/bench_ddp.py --processes 1 2 --sizes 128 256 --variants exact amp stochastic+lean+amp \\
        --train-steps 400 --out outputs/bench_ddp -- trainer.patch_size=[96,96,96] trainer.amp=bf16 \\
        trainer.steps_per_epoch=50
    # CPU smoke test (gloo, tiny):
    python scripts/bench_ddp.py --device cpu --processes 1 2 --sizes 16 --variants exact stochastic+lean \\
        --model-arg base_features=4 max_features=16 --warmup 1 --repeat 2 --train-steps 2 --out /tmp/bench_ddp -- \\
        trainer.device=cpu trainer.patch_size=[16,16,16] trainer.batch_size=1 trainer.sw_batch_size=1 \\
        model.base_features=4 model.max_features=16 sketch.n_probes=4 trainer.steps_per_epoch=2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    from app.bench.networks import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the report")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (GPUs). Default 1 2")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cuda: one GPU per process. Default cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="cubic patch edges. Default 128 256")
    parser.add_argument("--variants", nargs="+", default=["exact", "amp", "stochastic+lean+amp"])
    parser.add_argument("--batch-size", type=int, default=1, help="patches per process and step. Default 1")
    parser.add_argument("--n-probes", type=int, default=None, help="sketch size (default: app.nn's)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=400, help="optimizer steps of the training part (0: none)")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun process
    parser.add_argument("overrides", nargs="*", help="training config overrides (after --)")
    return parser


# ----------------------------------------------------------------------------- one process


def _throughput(args: argparse.Namespace, info: Any) -> list[dict[str, Any]]:
    """Every (size, variant) on this process; the slowest rank's step times, on every rank."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import app.nn
    from app.bench.networks import bench_model_config
    from app.measure.step import TrainingStep
    from app.measure.timing import reset_peak, synchronize, timed_calls
    from app.measure.variants import parse_variant

    device = info.device
    n_probes = app.nn.DEFAULT_N_PROBES if args.n_probes is None else args.n_probes
    rows = []
    for size in args.sizes:
        patch = (size,) * 3
        cfg = bench_model_config(args.model, args.model_arg, patch)
        for name in args.variants:
            app.nn.manual_seed(1000 + info.rank)  # each rank its own sketches, as in training
            status, times, peak = "ok", [math.nan] * args.repeat, math.nan
            try:
                step = TrainingStep(cfg, parse_variant(name), patch, args.batch_size, n_probes, {}, device, seed=info.rank)
                if info.enabled:  # the weights are rank 0's from here on (DDP broadcasts them)
                    step.model = DistributedDataParallel(
                        step.model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)
                for _ in range(args.warmup):
                    step()
                base = reset_peak(device)
                times = timed_calls(step, device, args.repeat)
                if device.type == "cuda":
                    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
            except torch.OutOfMemoryError:
                status = "oom"
            step = None
            if device.type == "cuda":
                synchronize(device)
                torch.cuda.empty_cache()
            slowest = torch.tensor([*times, peak, float(status != "ok")], dtype=torch.float64, device=device)
            if info.enabled:
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            values = slowest.cpu().tolist()
            step_s = statistics.median(values[: args.repeat]) if values[-1] == 0 else math.nan
            rows.append({
                "size": size, "variant": name, "nproc": info.world_size, "batch_per_process": args.batch_size,
                "status": "ok" if values[-1] == 0 else "oom", "step_s": step_s,
                "volumes_per_s": info.world_size * args.batch_size / step_s, "peak_gib": values[args.repeat],
            })
    return rows


def _training(args: argparse.Namespace, info: Any) -> dict[str, Any]:
    """``app.train.train`` to ``--train-steps`` steps (leaves the process group: the last collective work)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from app.train import config_dir, train

    out = args.out / f"train_nproc_{info.world_size}"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["logger=disabled", f"trainer.device={args.device}", *args.overrides,
                                          f"trainer.max_steps={args.train_steps}", f"output_dir={out}"])
    GlobalHydra.instance().clear()
    started = time.perf_counter()
    metrics = train(cfg)
    return {
        "nproc": info.world_size, "steps": int(metrics["global_step"]),
        "patches_per_step": info.world_size * int(cfg.trainer.batch_size) * int(cfg.trainer.grad_accum),
        "final_mean_dice": metrics.get("val/mean_dice", math.nan),
        "best_mean_dice": metrics.get("val/best_mean_dice", math.nan), "wall_s": time.perf_counter() - started,
        "run_dir": str(out),
    }


def worker(args: argparse.Namespace) -> None:
    """One process of a launch: throughput, then training; rank 0 writes ``<out>/nproc_<N>.json``."""
    from app.measure import environment_info
    from app.train.distributed import cleanup, init_distributed

    info = init_distributed(args.device)
    try:
        report: dict[str, Any] = {"nproc": info.world_size, "environment": environment_info(info.device),
                                  "throughput": _throughput(args, info) if args.sizes and args.variants else []}
        report["training"] = _training(args, info) if args.train_steps > 0 else None
    finally:
        cleanup(info)
    if info.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"nproc_{info.world_size}.json").write_text(json.dumps(report, indent=2))


# ----------------------------------------------------------------------------- the launches


def launch(n: int, argv: list[str], timeout: float) -> None:
    """This script under ``torchrun --standalone --nproc_per_node=n`` with ``--worker``."""
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), "--worker", *argv]
    subprocess.run(command, env=env, check=True, timeout=timeout)


def tables(reports: list[dict[str, Any]]) -> str:
    """The throughput and training tables, with the environment."""
    from app.measure import markdown_table

    first = {(r["size"], r["variant"]): r for r in reports[0]["throughput"]}
    rows = []
    for rep in reports:
        for r in rep["throughput"]:
            one = first.get((r["size"], r["variant"]))
            speedup = r["volumes_per_s"] / one["volumes_per_s"] if one else math.nan
            efficiency = speedup * one["nproc"] / r["nproc"] if one else math.nan
            rows.append([f"{r['size']}^3", r["variant"], r["nproc"], r["status"], 1e3 * r["step_s"], r["volumes_per_s"],
                         speedup, efficiency, r["peak_gib"]])
    text = markdown_table(["volume", "variant", "processes", "status", "step ms", "volumes/s",
                           f"vs {reports[0]['nproc']} process(es)", "efficiency", "peak GiB/process"], rows)
    trained = [rep["training"] for rep in reports if rep.get("training")]
    if trained:
        text += "\n\n" + markdown_table(
            ["processes", "steps", "patches/step", "final mean Dice", "best mean Dice", "wall min"],
            [[t["nproc"], t["steps"], t["patches_per_step"], t["final_mean_dice"], t["best_mean_dice"], t["wall_s"] / 60]
             for t in trained])
    return text + f"\n\nEnvironment: {json.dumps(reports[0]['environment'])}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.device == "cuda" and torch.cuda.device_count() < max(args.processes):
        raise SystemExit(f"--processes {max(args.processes)} needs as many GPUs, but {torch.cuda.device_count()} are visible")
    reports = []
    for n in args.processes:
        launch(n, argv, args.timeout)
        reports.append(json.loads((args.out / f"nproc_{n}.json").read_text()))
    text = tables(reports)
    (args.out / "bench_ddp.json").write_text(json.dumps({"argv": argv, "runs": reports}, indent=2))
    (args.out / "bench_ddp.md").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
