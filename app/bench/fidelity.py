"""``python -m app.bench fidelity``: how far sketched weight gradients are from exact ones, next to SGD noise.

For one model state (a checkpoint, or a fresh network optionally trained a few exact steps so that
its gradients carry signal) and real training batches, every convolution is made stochastic and,
for each estimator and number of probes, ``app.nn.compare_estimators`` measures per layer and for the
whole network the cosine and relative error of the sketched ``dW`` against the exact one (root mean
square over draws), and the same figures for the exact gradient of another batch: the mini-batch
noise SGD already lives with. Prints markdown tables headed by the environment and writes
``fidelity.md``, ``fidelity.json`` and ``fidelity.png`` (relative error per layer against depth, one
line per estimator and ``r``, SGD noise dashed) to ``--out``.

Estimator names: a sketch (``auto``: the layers' default, spectral; ``spectral``; ``shifted``;
``offset``) followed by optional ``-gaussian`` /
``-orthogonal`` / ``-rademacher`` (probe family, default rademacher) and ``-nocv`` (no control
variate), e.g. ``shifted``, ``offset``, ``shifted-gaussian``, ``shifted-orthogonal``, ``shifted-nocv``.

Examples::

    python -m app.bench fidelity --data synthetic --patch 64 --warmup-steps 50 --n-probes 16 64 256 --out bench-out
    python -m app.bench fidelity --checkpoint outputs/train/.../checkpoints/best.pt --data mni --patch 96
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from app.measure import MIB, environment, markdown_table
from app.models import deep_supervision_loss
from app.nn import DEFAULT_SKETCH, PROBE_FAMILIES, convert, manual_seed, storage_errors
from app.nn.fidelity import FidelityReport, compare_estimators, fidelity_figures
from app.nn.functional import SKETCHES
from app.utils import amp_dtype, parse_key_values, resolve_device

__all__ = ["ESTIMATOR_DEFAULTS", "estimator_options", "fidelity_figures", "plot_fidelity", "run", "main"]

ESTIMATOR_DEFAULTS = ["auto", "shifted", "offset", "shifted-gaussian", "shifted-orthogonal", "shifted-nocv"]


def estimator_options(name: str) -> dict[str, Optional[str]]:
    """``set_sketch_options`` keywords of an estimator name such as ``shifted-orthogonal`` or ``offset-nocv``.

    Raises:
        ValueError: unknown sketch or modifier (with a did-you-mean).
    """
    tokens = name.lower().split("-")
    sketches = ["auto", *SKETCHES]
    words = sketches + list(PROBE_FAMILIES) + ["nocv"]

    def bad(token: str, allowed: Sequence[str]) -> ValueError:
        close = difflib.get_close_matches(token, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ValueError(f"estimator {name!r}: unknown part {token!r}{hint}; an estimator is a sketch "
                          f"{sketches} followed by optional -{'/-'.join(PROBE_FAMILIES)} and -nocv")

    if tokens[0] not in sketches:
        raise bad(tokens[0], words)
    options = {"sketch": DEFAULT_SKETCH if tokens[0] == "auto" else tokens[0], "probes": "rademacher", "control": "mean"}
    for token in tokens[1:]:
        if token in PROBE_FAMILIES:
            options["probes"] = token
        elif token == "nocv":
            options["control"] = "none"
        else:
            raise bad(token, words)
    return options


# ----------------------------------------------------------------------------------------------- inputs


def _patch(values: Sequence[int]) -> list[int]:
    if len(values) == 1:
        return [int(values[0])] * 3
    if len(values) != 3:
        raise ValueError(f"--patch takes one size or three sizes, but got {list(values)}")
    return [int(v) for v in values]


def dataset_root(data: str, data_root: Optional[str], patch: Sequence[int], n_cases: int) -> Path:
    """The folder of ``--data``: generated for ``synthetic`` (volumes at least the patch, at least 48³) and ``mni``."""
    from app.data import make_mni_dataset, make_synthetic_dataset

    base = Path(data_root or os.environ.get("STOCHPROP_DATA", "~/.cache/stochprop")).expanduser()
    if data == "synthetic":
        shape = [max(48, int(p)) for p in patch]
        root = base / f"synthetic-{'x'.join(map(str, shape))}-{n_cases}"
        return make_synthetic_dataset(root, n_train=n_cases, n_val=1, shape=shape)
    if data == "mni":
        return make_mni_dataset(base / "mni", n_train=max(n_cases, 2), n_val=1)
    root = Path(data).expanduser()
    if not root.exists():
        raise ValueError(f"--data must be 'synthetic', 'mni' or an existing folder, but got {data!r}")
    return root


def _batches(loader: Any) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def make_loss(amp: Optional[torch.dtype], device: torch.device) -> Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """The training loss (DiceCE, deep-supervision heads weighted 1, 1/2, ...) as ``loss_fn(model, batch)``."""
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        image, label = batch["image"].to(device), batch["label"].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(image)
        return deep_supervision_loss(dice_ce, logits, label)

    return loss_fn


def setup(args: argparse.Namespace) -> tuple[nn.Module, Callable, Iterator[dict[str, torch.Tensor]], dict[str, Any]]:
    """Model (on the device, exact), loss and an endless batch iterator from the command line."""
    from app.data import Preprocessing, build_loaders, load_datalist
    from app.models import build_model, load_checkpoint, model_from_checkpoint

    device = resolve_device(args.device, option="--device")
    patch = _patch(args.patch)
    torch.manual_seed(args.seed)
    root = dataset_root(args.data, args.data_root, patch, args.n_cases)
    datalist = load_datalist(root, validate=True)
    info: dict[str, Any] = {"data": str(root), "patch": patch, "batch_size": args.batch_size}
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ckpt)
        pre = Preprocessing.from_dict(ckpt["preprocessing"])
        if len(ckpt["class_names"]) != datalist.n_classes:
            raise ValueError(f"{args.checkpoint}: {len(ckpt['class_names'])} classes, but {root} has {datalist.n_classes}")
        info["model"] = f"checkpoint {args.checkpoint} ({ckpt['model_config']['name']}, step {ckpt.get('global_step', '?')})"
    else:
        pre = Preprocessing(in_channels=datalist.n_channels or 1)
        spacing = [float(s) for s in (datalist.median_spacing or (1.0, 1.0, 1.0))]
        config = {"name": args.model, "in_channels": pre.in_channels, "out_channels": datalist.n_classes,
                  "patch_size": patch, "spacing": spacing, **parse_key_values(args.model_arg)}
        model = build_model(config)
        info["model"] = f"fresh {args.model} {parse_key_values(args.model_arg) or ''}".strip()
    train_loader, _ = build_loaders(datalist, pre, patch, datalist.n_classes, batch_size=args.batch_size, seed=args.seed)
    model.to(device).train()
    loss_fn = make_loss(amp_dtype(args.amp, "--amp"), device)
    batches = _batches(train_loader)
    if args.warmup_steps:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
        for _ in range(args.warmup_steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, next(batches))
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        info["warmup"] = f"{args.warmup_steps} exact AdamW steps (lr {args.lr}), last loss {loss.item():.4f}"
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, loss_fn, batches, info


# ----------------------------------------------------------------------------------------------- output


def variant_label(estimator: str, n_probes: int) -> str:
    return f"{estimator} r{n_probes}"


def summary_rows(reports: dict[str, FidelityReport]) -> list[list[Any]]:
    """One row per variant: sketch size, network/conv figures, layers within SGD noise."""
    rows = []
    for label, rep in reports.items():
        sketch = sum(layer.sketch_numbers for layer in rep.layers)
        inputs = sum(layer.input_numbers for layer in rep.layers)
        ratios = sorted(layer.noise_ratio for layer in rep.layers if not math.isnan(layer.noise_ratio))
        within = sum(r <= 1.0 for r in ratios)
        rows.append([
            label, 4 * sketch / MIB, 100.0 * sketch / max(inputs, 1), rep.network.cosine, rep.network.rel_error,
            rep.convs.cosine, rep.convs.rel_error, ratios[len(ratios) // 2] if ratios else math.nan,
            ratios[-1] if ratios else math.nan, f"{within}/{len(ratios)}",
        ])
    return rows


SUMMARY_HEADER = ["estimator", "sketch MiB", "% of inputs", "cos net", "rel err net", "cos convs", "rel err convs",
                  "median err/SGD", "worst err/SGD", "layers <= SGD"]


def layer_rows(reports: dict[str, FidelityReport]) -> tuple[list[str], list[list[Any]]]:
    """Per layer: depth, name, voxels, channels, SGD rel error, then each variant's rel error."""
    first = next(iter(reports.values()))
    header = ["depth", "layer", "voxels", "C_in", "SGD rel err"] + list(reports)
    rows = []
    for i, layer in enumerate(first.layers):
        rows.append([layer.depth, f"`{layer.name}`", layer.voxels, layer.in_channels, layer.sgd_rel_error]
                    + [rep.layers[i].rel_error for rep in reports.values()])
    return header, rows


def plot_fidelity(reports: dict[str, FidelityReport], path: Path, title: str = "") -> Path:
    """PNG: relative error (log) and cosine per layer against depth, one line per variant, SGD noise dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rel, ax_cos) = plt.subplots(1, 2, figsize=(13, 5.5))
    cmap = plt.get_cmap("tab10")
    estimators = list(dict.fromkeys(label.rsplit(" r", 1)[0] for label in reports))
    probes = sorted({int(label.rsplit(" r", 1)[1]) for label in reports})
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "D", "v"]
    for label, rep in reports.items():
        est, r = label.rsplit(" r", 1)
        color = cmap(estimators.index(est) % 10)
        k = probes.index(int(r))
        depth = [layer.depth for layer in rep.layers]
        kw = dict(color=color, linestyle=styles[k % len(styles)], marker=markers[k % len(markers)], markersize=3,
                  linewidth=1.2, label=label)
        ax_rel.plot(depth, [layer.rel_error for layer in rep.layers], **kw)
        ax_cos.plot(depth, [layer.cosine for layer in rep.layers], **kw)
    first = next(iter(reports.values()))
    if first.has_reference:
        depth = [layer.depth for layer in first.layers]
        sgd = dict(color="black", linestyle="--", linewidth=2.2, label="SGD noise (other batch)")
        ax_rel.plot(depth, [layer.sgd_rel_error for layer in first.layers], **sgd)
        ax_cos.plot(depth, [layer.sgd_cosine for layer in first.layers], **sgd)
    ax_rel.set_yscale("log")
    ax_rel.set_ylabel("relative error of dW  ‖ĝ − g‖ / ‖g‖")
    ax_cos.set_ylabel("cosine(ĝ, g)")
    ax_cos.set_ylim(top=1.05)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_rel, ax_cos):
        ax.set_xlabel("layer depth (forward order)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax_rel.get_legend_handles_labels()
    ncol = min(len(labels), 4)
    rows = -(-len(labels) // ncol)
    fig.set_size_inches(13, 4.8 + 0.22 * rows)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, (0.15 + 0.2 * rows) / (4.8 + 0.22 * rows), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(report: FidelityReport) -> dict[str, Any]:
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    return {
        "network": {k: clean(v) for k, v in vars(report.network).items()},
        "convs": {k: clean(v) for k, v in vars(report.convs).items()},
        "n_draws": report.n_draws,
        "layers": [{k: clean(v) for k, v in vars(layer).items()} for layer in report.layers],
    }


def run(args: argparse.Namespace) -> tuple[str, dict[str, FidelityReport]]:
    """Measures every variant; returns the markdown text and the reports."""
    variants = {}
    for est in args.estimators:
        options = estimator_options(est)
        for r in args.n_probes:
            if r < 1:
                raise ValueError(f"--n-probes values must be >= 1 (exact is the reference), but got {r}")
            if options["probes"] == "orthogonal" and r & (r - 1):
                raise ValueError(f"estimator {est!r} uses Hadamard blocks: --n-probes must be powers of two, but got {r}")
            variants[variant_label(est, r)] = {**options, "n_probes": r, "min_voxels": args.min_voxels}
    manual_seed(args.seed)
    model, loss_fn, batches, info = setup(args)
    batch, reference = next(batches), next(batches)
    storage_lines = _storage_section(model, loss_fn, batch, reference, args.storages) if args.storages else []
    env = environment()
    reports: dict[str, FidelityReport] = {}
    lines = [f"# Lean storage — {env}", ""]
    if variants:
        convert(model, 16)
        reports = compare_estimators(model, loss_fn, batch, reference_batch=reference, variants=variants, n_draws=args.draws)
        lines = _estimator_lines(reports, info, args, env)
    text = "\n".join([*lines, *storage_lines])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.md").write_text(text)
        if reports:
            payload = {"environment": env, "info": info, "args": vars(args),
                       "reports": {k: _jsonable(v) for k, v in reports.items()}}
            (out / "fidelity.json").write_text(json.dumps(payload, indent=1, default=str))
            plot_fidelity(reports, out / "fidelity.png", title=f"{info['model']}, patch {info['patch']} — {env}")
    return text, reports


def _estimator_lines(reports: dict[str, FidelityReport], info: dict[str, Any], args: argparse.Namespace, env: str) -> list[str]:
    """Markdown lines of the estimator comparison: header, network summary, per-layer errors."""
    first = next(iter(reports.values()))
    return [
        f"# Gradient fidelity — {env}",
        "",
        f"Model: {info['model']}, {info['parameters'] / 1e6:.2f}M parameters"
        + (f"; {info['warmup']}" if "warmup" in info else "") + ".",
        (f"Data: {info['data']}, patch {info['patch']}, batch {info['batch_size']}, amp {args.amp}; "
         f"{args.draws} draws per estimator; SGD noise: exact gradient of another batch "
         f"(rel err {first.network.sgd_rel_error:.3g}, cos {first.network.sgd_cosine:.3g} for the whole network)."),
        "",
        ("rel err: ‖ĝ − g‖/‖g‖ (rms over draws); err/SGD: a layer's rel err over its SGD-noise rel err "
         "(≤ 1: the estimator adds less noise than a change of batch); sketch MiB: fp32 numbers the sketches keep."),
        "",
        markdown_table(SUMMARY_HEADER, summary_rows(reports)),
        "",
        "Relative error of each layer's dW:",
        "",
        markdown_table(*layer_rows(reports)),
        "",
    ]


def _storage_section(model: nn.Module, loss_fn: Callable, batch: Any, reference: Any, storages: Sequence[str]) -> list[str]:
    """Markdown lines: the gradient error of each lean storage dtype against fp32 storage, exact
    convolutions (:func:`app.nn.storage_errors`), next to the SGD noise of the same batches."""
    results = storage_errors(model, loss_fn, batch, reference, storages=storages)
    rows = [[r.storage, r.network, r.sgd_noise, r.network / r.sgd_noise if r.sgd_noise else math.nan, r.worst_ratio, r.worst]
            for r in results]
    return [
        "Lean storage: gradient error of the lean layers' stored x̂ in each dtype against fp32 storage (exact "
        "convolutions, lean norms and activations), next to the SGD noise of the same batches:",
        "",
        markdown_table(["storage", "network rel err", "SGD noise rel err", "err / SGD", "worst layer err / SGD", "worst layer"], rows),
        "",
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app.bench fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model state")
    g.add_argument("--checkpoint", help="a checkpoint of app.models (last.pt/best.pt of a training run)")
    g.add_argument("--model", default="dynunet", help="fresh network name when no checkpoint (default dynunet)")
    g.add_argument("--model-arg", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra model config keys, e.g. base_features=16 max_features=128")
    g.add_argument("--warmup-steps", type=int, default=0, help="exact AdamW steps before measuring (default 0)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate of the warm-up steps (default 1e-3)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="synthetic, mni, or a dataset folder (default synthetic)")
    g.add_argument("--data-root", help="where generated data sets live (default $STOCHPROP_DATA or ~/.cache/stochprop)")
    g.add_argument("--n-cases", type=int, default=8, help="training cases of a generated data set (default 8)")
    g.add_argument("--patch", type=int, nargs="+", default=[64], help="patch size, one or three values (default 64)")
    g.add_argument("--batch-size", type=int, default=2, help="patches per batch (default 2)")
    g = p.add_argument_group("estimators")
    g.add_argument("--n-probes", type=int, nargs="+", default=[16, 64, 256], help="probe counts (default 16 64 256)")
    g.add_argument("--estimators", nargs="*", default=ESTIMATOR_DEFAULTS,
                   help="estimator names (default: %(default)s); none: only --storages")
    g.add_argument("--storages", nargs="+", default=[], metavar="DTYPE",
                   help="also the gradient error of lean storage dtypes against fp32 storage, e.g. bfloat16 "
                        "float8_e4m3fn float8_e5m2 (app.nn.storage_errors)")
    g.add_argument("--min-voxels", type=int, default=0, help="layers with smaller inputs stay exact (default 0)")
    g.add_argument("--draws", type=int, default=4, help="stochastic gradients per estimator (default 4)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--amp", choices=["off", "bf16"], default="off", help="autocast of the forward passes (default off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", help="folder for fidelity.md, fidelity.json and fidelity.png")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for est in args.estimators:
        estimator_options(est)  # fail on a typo before any work
    text, reports = run(args)
    print(text)
    if args.out:
        print(f"wrote {Path(args.out) / 'fidelity.md'}" + (", fidelity.json, fidelity.png" if reports else ""))
    return 0
