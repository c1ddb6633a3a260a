"""Quality study: does stochastic backpropagation cost segmentation accuracy?

Trains exact and stochastic models with the same seeds (data, initialisation, patches and
augmentation are the same for a given seed; only the backward pass differs) through
``app.train.train`` on composed Hydra configs, and reports validation Dice per class, mean ± std
over seeds, for each task and configuration:

* at equal steps: every configuration trains ``--steps`` optimizer steps on ``--patch`` patches;
* at equal GPU memory (CUDA only): for each stochastic configuration, the peak memory of one of
  its training steps (:func:`app.measure.measure_step`) sets a budget, and exact backprop gets the
  largest cubic patch whose training step fits in it (:func:`app.plan.plan`; same network: the
  DynUNet topology planned for ``--patch`` is kept), then trains the same steps with the same seeds. On the CPU this part is skipped (and the report says so).

Tasks: ``synthetic`` (random shapes, ``app.data.make_synthetic_dataset``) and ``mni`` (grey/white
matter of nilearn's MNI152 template, ``app.data.make_mni_dataset``). Configurations: ``exact``,
``stochastic`` (the ``sketch`` defaults) and variants named like the fidelity benchmark's
estimators: ``stochastic-r64``, ``stochastic-r16-offset``, ``stochastic-gaussian``,
``stochastic-orthogonal``, ``stochastic-nocv``, ``stochastic-fp8`` (lean norms keep x̂ in
``float8_e4m3fn``; modifiers combine).

Writes ``<out>/quality_study.md`` (environment, tables) and ``<out>/quality_study.json`` (every
run's metrics); each run's folder is ``<out>/runs/<task>/<config>/seed<k>``. Run from the
repository root with the package importable (``pip install -e .`` or ``PYTHONPATH=.``).

Examples::

    # CPU smoke run (seconds):
    python scripts/quality_study.py --steps 4 --seeds 0 --patch 32 --out /tmp/quality -- \\
        model.base_features=4 model.max_features=16
    # H200: 3 seeds, synthetic task, 64^3 patches, exact vs stochastic, equal steps and equal memory:
    python scripts/quality_study.py --tasks synthetic --seeds 0 1 2 --steps 300 --patch 64 --out outputs/quality
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from app.measure import GIB, Variant, environment, measure_step, training_variant
from app.models import load_checkpoint
from app.nn.fidelity import split_sketch_config
from app.plan import plan
from app.train import config_dir, train

TASKS = ("synthetic", "mni")
SKETCH_MODIFIERS = {"offset": ("sketch", "offset"), "shifted": ("sketch", "shifted"), "spectral": ("sketch", "spectral"),
                    "gaussian": ("probes", "gaussian"),
                    "orthogonal": ("probes", "orthogonal"), "rademacher": ("probes", "rademacher"),
                    "nocv": ("control", "none"), "fp8": ("lean_storage", "float8_e4m3fn")}


def config_overrides(name: str) -> list[str]:
    """Hydra overrides of a configuration name (``exact``, ``stochastic``, ``stochastic-r64-offset``, ...).

    Raises:
        ValueError: unknown name or modifier.
    """
    if name == "exact":
        return ["sketch=exact"]
    tokens = name.split("-")
    if tokens[0] != "stochastic":
        raise ValueError(f"configuration {name!r}: must be 'exact' or start with 'stochastic' "
                         f"(e.g. stochastic, stochastic-r64, stochastic-offset, stochastic-nocv)")
    out = ["sketch=default"]
    for token in tokens[1:]:
        if token.startswith("r") and token[1:].isdigit() and int(token[1:]) > 0:
            out.append(f"sketch.n_probes={int(token[1:])}")
        elif token in SKETCH_MODIFIERS:
            key, value = SKETCH_MODIFIERS[token]
            out.append(f"sketch.{key}={value}")
        else:
            raise ValueError(f"configuration {name!r}: unknown modifier {token!r}; use rN (probes) or one of "
                             f"{sorted(SKETCH_MODIFIERS)}")
    return out


def task_overrides(task: str, args: argparse.Namespace) -> list[str]:
    """Data overrides of a task; generated data sets live under ``--data-root`` (one folder per setting)."""
    root = Path(args.data_root or os.environ.get("STOCHPROP_DATA", "~/.cache/stochprop")).expanduser()
    if task == "synthetic":
        shape = args.volume or max(48, args.patch)
        return ["data=synthetic", f"data.generate.root={root}/quality-synthetic-{shape}-{args.n_train}-{args.n_val}",
                f"data.generate.shape=[{shape},{shape},{shape}]", f"data.generate.n_train={args.n_train}",
                f"data.generate.n_val={args.n_val}", "data.cache=memory"]
    if task == "mni":
        return ["data=mni", f"data.generate.root={root}/quality-mni-{args.n_train}-{args.n_val}",
                f"data.generate.n_train={args.n_train}", f"data.generate.n_val={args.n_val}", "data.cache=memory"]
    raise ValueError(f"task must be one of {list(TASKS)}, but got {task!r}")


def compose_cfg(overrides: Sequence[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose("train", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def trainer_overrides(args: argparse.Namespace, patch: int, seed: int) -> list[str]:
    epochs = max(1, args.validations)
    return [
        f"trainer.max_steps={args.steps}", f"trainer.steps_per_epoch={math.ceil(args.steps / epochs)}",
        f"trainer.patch_size=[{patch},{patch},{patch}]", f"trainer.batch_size={args.batch_size}",
        f"trainer.seed={seed}", f"trainer.amp={args.amp}", f"trainer.device={args.device}",
        f"trainer.sw_batch_size={args.sw_batch_size}", f"logger={args.logger}",
    ]


def run_one(task: str, config: str, seed: int, patch: int, args: argparse.Namespace, out: Path,
            extra: Sequence[str] = ()) -> dict[str, Any]:
    """One training run; its validation metrics and costs."""
    overrides = [*task_overrides(task, args), *config_overrides(config), *trainer_overrides(args, patch, seed),
                 *args.overrides, *extra, f"output_dir={out}"]
    cfg = compose_cfg(overrides)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    start = time.perf_counter()
    metrics = train(cfg)
    wall = time.perf_counter() - start
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    history = ckpt["history"]
    peaks = [h["train/peak_memory_gb"] for h in history if "train/peak_memory_gb" in h]
    names = [str(n) for n in ckpt["class_names"][1:]]
    return {
        "task": task, "config": config, "seed": seed, "patch": patch, "steps": int(metrics["global_step"]),
        "dice": {n: float(metrics.get(f"val/dice/{n}", math.nan)) for n in names},
        "mean_dice": float(metrics.get("val/mean_dice", math.nan)),
        "best_mean_dice": float(metrics.get("val/best_mean_dice", math.nan)),
        "final_loss": float(metrics["train/epoch_loss"]),
        "step_time_s": float(np.mean([h["train/step_time_s"] for h in history])),
        "peak_memory_gb": max(peaks) if peaks else None,
        "fidelity": {k: float(v) for k, v in metrics.items() if k.startswith("fidelity/") and "/" not in k[9:]},
        "wall_s": wall, "model_config": ckpt["model_config"], "overrides": overrides,
    }


# ------------------------------------------------------------------------------------- equal memory


def step_variant(cfg: DictConfig, n_probes: int) -> Variant:
    """The measured variant of the run's training step: its autocast, checkpointing and lean
    settings, stochastic when ``n_probes > 0``."""
    return training_variant(n_probes=n_probes, amp=cfg.trainer.amp, grad_checkpointing=bool(cfg.trainer.grad_checkpointing),
                            lean=bool(cfg.sketch.get("lean", False)))


def pinned_model_overrides(model_config: dict[str, Any]) -> list[str]:
    """Overrides that rebuild exactly this DynUNet at any patch size (no re-planning)."""
    if model_config.get("name") != "dynunet":
        return []

    def lit(v: Any) -> str:
        return json.dumps(v).replace(" ", "")

    out = [f"~model.{k}" for k in ("base_features", "max_features", "min_feature_size", "max_depth")]
    out += [f"+model.{k}={lit(model_config[k])}" for k in ("kernel_size", "strides", "filters", "upsample_kernel_size")]
    return out


def equal_memory_patch(model_config: dict[str, Any], sketch: dict[str, Any], patch: int, cfg: DictConfig) -> tuple[int, float, float]:
    """``(exact patch, exact peak bytes, stochastic peak bytes)``: the largest cubic exact patch (at most
    ``patch``) whose training step fits the peak of the stochastic step at ``patch`` (the planner's search,
    :func:`app.plan.plan`, on the same network: ``model_config`` has its strides pinned)."""
    options = dict(split_sketch_config(sketch)[0])
    n_probes = int(options.pop("n_probes", 0))
    options.pop("lean", None)
    batch = int(cfg.trainer.batch_size)
    stochastic = measure_step(model_config, patch_size=(patch,) * 3, batch_size=batch, variant=step_variant(cfg, n_probes),
                              n_probes=n_probes, device="cuda", sketch_options=options)
    found = plan(model_config, stochastic.peak_bytes / GIB, (1.0, 1.0, 1.0), step_variant(cfg, 0), batch, "cuda",
                 cache=False, max_edge=patch)
    if found.patch_size is None:
        return 0, math.nan, stochastic.peak_bytes
    return found.patch_size[0], found.stats.peak_bytes, stochastic.peak_bytes


# ------------------------------------------------------------------------------------------ report


def _mean_std(values: Sequence[float]) -> str:
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}"


def summary_table(runs: Sequence[dict[str, Any]]) -> str:
    """One markdown table per task: a row per (configuration, patch), Dice per class mean ± std over seeds."""
    tables = []
    for task in dict.fromkeys(r["task"] for r in runs):
        task_runs = [r for r in runs if r["task"] == task]
        groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in task_runs:
            groups.setdefault((r["label"], r["patch"]), []).append(r)
        classes = list(dict.fromkeys(c for r in task_runs for c in r["dice"]))
        header = ["configuration", "patch", "steps", "seeds", *[f"Dice {c}" for c in classes], "mean Dice",
                  "s/step", "peak GiB", "dW rel err (net)"]
        lines = [f"**{task}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for (label, patch), rs in groups.items():
            peaks = [r["peak_memory_gb"] for r in rs if r["peak_memory_gb"] is not None]
            fid = [r["fidelity"].get("fidelity/rel_network", math.nan) for r in rs]
            row = [label, f"{patch}³", str(rs[0]["steps"]), ",".join(str(r["seed"]) for r in rs)]
            row += [_mean_std([r["dice"].get(c, math.nan) for r in rs]) for c in classes]
            row += [_mean_std([r["mean_dice"] for r in rs]), f"{np.mean([r['step_time_s'] for r in rs]):.3f}",
                    f"{max(peaks):.2f}" if peaks else "n/a", _mean_std(fid)]
            lines.append("| " + " | ".join(row) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["synthetic", "mni"], choices=TASKS)
    p.add_argument("--configs", nargs="+", default=["exact", "stochastic"], help="configurations (default exact stochastic)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    p.add_argument("--validations", type=int, default=1, help="validations per run, the last at the end (default 1)")
    p.add_argument("--patch", type=int, default=64, help="cubic training patch edge (default 64)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--sw-batch-size", type=int, default=2, help="sliding-window batch at validation")
    p.add_argument("--amp", default="off", choices=["off", "bf16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--equal-memory", choices=["auto", "off"], default="auto",
                   help="auto: on CUDA also train exact at the patch that fits the stochastic run's memory")
    p.add_argument("--volume", type=int, help="synthetic volume edge (default max(48, patch))")
    p.add_argument("--n-train", type=int, default=6, help="training cases of the generated data sets (default 6)")
    p.add_argument("--n-val", type=int, default=2, help="validation cases (default 2)")
    p.add_argument("--data-root", help="generated data sets (default $STOCHPROP_DATA or ~/.cache/stochprop)")
    p.add_argument("--logger", default="disabled", help="logger config: disabled | offline | online")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs, quality_study.md and .json")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (after --), e.g. model.base_features=16")
    args = p.parse_args(argv)
    for c in args.configs:
        config_overrides(c)  # typos fail before any training
    cuda = torch.cuda.is_available() and args.device != "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    report_md = args.out / "quality_study.md"

    def record(run: dict[str, Any], label: str) -> None:
        run["label"] = label
        runs.append(run)
        print(f"[quality] {run['task']} {label} seed {run['seed']} patch {run['patch']}: mean Dice "
              f"{run['mean_dice']:.4f} ({run['wall_s']:.0f} s)", flush=True)
        write(args, runs, notes, report_md)

    for task in args.tasks:
        for config in args.configs:
            for seed in args.seeds:
                out = args.out / "runs" / task / config / f"seed{seed}"
                record(run_one(task, config, seed, args.patch, args, out), config)
        if args.equal_memory == "off":
            continue
        if not cuda:
            notes.append(f"{task}: equal-memory comparison skipped: it needs CUDA (torch.cuda.max_memory_allocated), "
                         "and this run is on the CPU.")
            continue
        for config in [c for c in args.configs if c != "exact"]:
            first = next(r for r in runs if r["task"] == task and r["config"] == config)
            cfg = compose_cfg([*task_overrides(task, args), *config_overrides(config),
                               *trainer_overrides(args, args.patch, 0), *args.overrides, "output_dir=/tmp/unused"])
            sketch = OmegaConf.to_container(cfg.sketch, resolve=True)
            model_config = first["model_config"]
            patch, exact_peak, budget = equal_memory_patch(model_config, sketch, args.patch, cfg)
            label = f"exact, memory of {config}"
            notes.append(f"{task}: one training step of {config} at {args.patch}³ peaks at {budget / GIB:.2f} GiB; "
                         f"the largest exact patch within it is {patch}³ ({exact_peak / GIB:.2f} GiB), same network.")
            if patch == 0:
                notes.append(f"{task}: no exact patch fits the memory of {config}; equal-memory runs skipped.")
                continue
            for seed in args.seeds:
                out = args.out / "runs" / task / f"exact-memory-of-{config}" / f"seed{seed}"
                record(run_one(task, "exact", seed, patch, args, out, pinned_model_overrides(model_config)), label)
    text = write(args, runs, notes, report_md)
    print(text)
    return 0


def write(args: argparse.Namespace, runs: list[dict[str, Any]], notes: list[str], path: Path) -> str:
    """Writes the markdown report and the JSON of every run; returns the markdown."""
    lines = [
        f"# Quality study — {environment()}",
        "",
        f"Tasks {args.tasks}, configurations {args.configs}, seeds {args.seeds}, {args.steps} steps, batch "
        f"{args.batch_size}, amp {args.amp}; Dice of the last validation (sliding window over the validation "
        "volumes), mean ± std over seeds. Extra overrides: " + (" ".join(args.overrides) or "none") + ".",
        "",
        summary_table(runs) if runs else "(no run finished)",
        "",
    ]
    lines += [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    payload = {"environment": environment(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "notes": notes, "runs": runs}
    path.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    return text


if __name__ == "__main__":
    raise SystemExit(main())
