"""Time the data path of training: preprocess once, then the steady-state wall time per step.

Writes (or reuses) a Decathlon-shaped synthetic data set with :func:`app.data.make_synthetic_dataset`
(default 20 training + 1 validation cases of 256 x 256 x 200 voxels at 0.8 x 0.8 x 2.5 mm, three
classes), then measures:

* ``preprocessing``: :func:`app.data.prepare_datalist` into an empty cache folder (each case read,
  its voxels checked, reoriented, resampled to ``--target-spacing``, normalised, cropped, stored),
  then again with every entry present (files hashed, nothing preprocessed);
* per patch size, the training loader alone (no network): seconds per batch from the stored
  arrays (``data.cache=disk``) and, for comparison, preprocessing at every access (``none``);
* per patch size and sketch: the training loop's own figures (:class:`app.train.loop.Trainer`, the
  configuration ``data=decathlon`` composed with the given settings) over ``--steps`` steps after a
  warm-up epoch of as many: wall time per step with the data wait included
  (``train/step_time_s``), the data wait per step, its share, and wall / compute = step time over
  (step time - data wait), the figure the GPU target bounds (<= 1.15).

Prints markdown, environment first (torch, CUDA, cuDNN, GPU, cores, loader workers).

Run from the repository root with the package importable (``pip install -e .``).

Examples:
    python scripts/bench_data.py --device cuda                                  # 20 cases, 80^3 and 128^3
    python scripts/bench_data.py --device cpu --cases 3 --shape 128 128 100 --patch 48 --steps 4
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from app.data import (
    Preprocessing,
    build_loaders,
    load_datalist,
    make_synthetic_dataset,
    prepare_datalist,
    resolve_num_workers,
)
from app.train import config_dir
from app.train.distributed import cleanup, init_distributed
from app.train.loop import Trainer
from app.train.state import seed_epoch, seed_everything


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    p.add_argument("--cases", type=int, default=20, help="training cases (default 20; one validation case more)")
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 200], help="voxels per case (default 256 256 200)")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], help="voxel size in mm (default 0.8 0.8 2.5)")
    p.add_argument("--target-spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5],
                   help="data.preprocessing.spacing (default 1.5 1.5 1.5, conf/data/decathlon.yaml's)")
    p.add_argument("--patch", type=int, nargs="+", default=[80, 128], help="cubic patch sizes (default 80 128)")
    p.add_argument("--sketch", nargs="+", default=["exact", "default"], help="sketch configs (default exact default)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="timed steps, after a warm-up epoch of as many (default 20)")
    p.add_argument("--num-workers", default="auto", help="trainer.num_workers (default auto)")
    p.add_argument("--augment-on", default="workers", choices=["workers", "device"], help="data.augment_on")
    p.add_argument("--amp", default="off", help="trainer.amp (default off)")
    p.add_argument("--root", type=Path, default=None,
                   help="data set folder (default $STOCHPROP_DATA or ~/.cache/stochprop, bench-decathlon-<cases>-<shape>)")
    p.add_argument("--existing", action="store_true",
                   help="--root is a Decathlon folder on disk (e.g. real scans): time it as it is, generate nothing")
    p.add_argument("--cache-dir", type=Path, default=None, help="cache folder (default: a temporary one, removed after)")
    p.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for the training rows")
    return p.parse_args()


def _environment(device: torch.device, workers: int) -> list[str]:
    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}, "
             f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores, "
             f"loader workers {workers}"]
    if device.type == "cuda":
        lines.append(f"- CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(device)}")
    return lines


def _loader_row(datalist, pre, patch: int, cache: str, cache_dir: Path, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per training batch of the loader alone, after one batch of warm-up (worker start)."""
    prepared = None if cache != "disk" else prepare_datalist(datalist, pre, datalist.n_classes, "disk", cache_dir, progress=False)
    train, _ = build_loaders(datalist, pre, (patch,) * 3, datalist.n_classes, batch_size=args.batch_size,
                             num_workers=args.num_workers, cache=cache, cache_dir=cache_dir, prepared=prepared,
                             augment_on=args.augment_on, device_type=device.type)
    batches = iter(_endless(train))
    next(batches)
    started = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    seconds = (time.perf_counter() - started) / args.steps
    del batches, train
    gc.collect()
    return seconds


def _endless(loader):
    loader.batch_sampler.endless = True
    return loader


def _train_row(overrides: list[str], steps: int) -> dict[str, float]:
    """One warm-up epoch, then the metrics of a timed one (the loop's own timing)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    dist_info = init_distributed(cfg.trainer.device)
    try:
        trainer = Trainer(cfg, dist_info)
        seed = int(cfg.trainer.seed)
        seed_everything(seed, deterministic=False)
        trainer.setup_data()
        trainer.setup_model()
        trainer.setup_loaders()
        trainer.setup_optim()
        for epoch in (0, 1):
            seed_epoch(seed, epoch, dist_info.rank, trainer.train_loader)
            metrics = trainer.train_epoch(epoch)
        del trainer
        gc.collect()
        return metrics
    finally:
        cleanup(dist_info)


def main() -> None:
    args = _args()
    from app.utils import resolve_device

    device = resolve_device(args.device, option="--device")
    shape = tuple(args.shape)
    root = args.root or Path(os.environ.get("STOCHPROP_DATA", "~/.cache/stochprop")).expanduser() / (
        f"bench-decathlon-{args.cases}-{'x'.join(map(str, shape))}")
    started = time.perf_counter()
    if args.existing:
        if not (root / "dataset.json").is_file():
            raise SystemExit(f"--existing: {root} has no dataset.json")
    else:
        make_synthetic_dataset(root, n_train=args.cases, n_val=1, shape=shape, n_classes=3, spacing=args.spacing, seed=0)
    generated = time.perf_counter() - started
    temporary = args.cache_dir is None
    cache = Path(tempfile.mkdtemp(prefix="bench-data-cache-")) if temporary else args.cache_dir
    try:
        datalist = load_datalist(root)
        pre = Preprocessing(spacing=tuple(args.target_spacing))
        started = time.perf_counter()
        train_cases, _ = prepare_datalist(datalist, pre, datalist.n_classes, "disk", cache, progress=True)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        prepare_datalist(datalist, pre, datalist.n_classes, "disk", cache, progress=False)
        warm = time.perf_counter() - started
        stored = train_cases.case(0).shape
        n_cases = len(datalist.train) + len(datalist.val)
        size_gb = sum(f.stat().st_size for f in cache.iterdir()) / 1e9

        workers = resolve_num_workers(args.num_workers, device.type)
        source = (f"{root}" if args.existing else
                  f"{'x'.join(map(str, shape))} voxels at {' x '.join(f'{s:g}' for s in args.spacing)} mm")
        print(f"## Data path: {n_cases} cases of {source}, resampled to {' x '.join(f'{s:g}' for s in args.target_spacing)} mm "
              f"({'x'.join(map(str, stored))} voxels stored), {device.type}\n")
        print("\n".join(_environment(device, workers)) + "\n")
        print("| preprocessing | s | s/case |\n|---|---:|---:|")
        print(f"| generate the data set (once; not part of training) | {generated:.1f} | {generated / n_cases:.2f} |")
        print(f"| first run: read, check, preprocess, store ({size_gb:.2f} GB) | {cold:.1f} | {cold / n_cases:.2f} |")
        print(f"| later runs: entries found (files hashed) | {warm:.1f} | {warm / n_cases:.2f} |\n")

        print(f"| loader alone (batch {args.batch_size}, {workers} workers) | data.cache=disk s/batch | data.cache=none s/batch |")
        print("|---|---:|---:|")
        for patch in args.patch:
            disk = _loader_row(datalist, pre, patch, "disk", cache, args, device)
            none = _loader_row(datalist, pre, patch, "none", cache, args, device)
            print(f"| {patch}³ | {disk:.3f} | {none:.3f} |", flush=True)
        print()

        print("| patch | sketch | batch | wall s/step | data wait s/step | data-wait share | wall / compute |")
        print("|---|---|---:|---:|---:|---:|---:|")
        out = Path(tempfile.mkdtemp(prefix="bench-data-run-"))
        try:
            for patch in args.patch:
                for sketch in args.sketch:
                    overrides = [
                        "data=decathlon", f"data.root={root}", f"data.cache_dir={cache}",
                        f"data.preprocessing.spacing=[{','.join(map(str, args.target_spacing))}]",
                        f"data.augment_on={args.augment_on}", f"sketch={sketch}",
                        f"trainer.patch_size=[{patch},{patch},{patch}]", f"trainer.batch_size={args.batch_size}",
                        f"trainer.device={device}", f"trainer.num_workers={args.num_workers}", f"trainer.amp={args.amp}",
                        f"trainer.steps_per_epoch={args.steps}", "trainer.max_epochs=2", "logger=disabled",
                        "logger.fidelity_every=0", f"output_dir={out}", *args.override,
                    ]
                    m = _train_row(overrides, args.steps)
                    step, wait = m["train/step_time_s"], m["train/data_wait_s"]
                    print(f"| {patch}³ | {sketch} | {args.batch_size} | {step:.3f} | {wait:.3f} | "
                          f"{100 * m['train/data_wait_fraction']:.1f}% | {step / max(step - wait, 1e-9):.2f}× |", flush=True)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if temporary:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
