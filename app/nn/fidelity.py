"""Gradient fidelity: how far the sketched weight gradients are from the exact ones, next to SGD's own noise.

The trace estimator of a stochastic convolution is unbiased, but its variance grows with the number
of voxels and falls only as ``1/r`` (``docs/method.md``, "Maths in short"). Whether that matters depends on what
the optimizer already tolerates: the mini-batch noise of SGD. For the current model state and one
batch, :func:`gradient_fidelity` computes

* the exact gradient ``g`` (every stochastic layer inside :func:`app.nn.exact`);
* ``n_draws`` stochastic gradients ``ĝ`` with the layers' current sketch options;
* optionally the exact gradient ``g'`` of another batch (the SGD-noise reference),

and reports, per stochastic convolution weight and for the whole network, the cosine and the
relative error ``‖ĝ − g‖ / ‖g‖`` (root mean square over draws) of the estimate, and the same two
figures for ``g'`` against ``g``. The input gradients of a stochastic layer are exact, so every
other parameter (biases, norms) gets its exact gradient in both passes: a layer's error is its own.

Note on the reference: ``‖g' − g‖`` is the difference of two independent mini-batch gradients, so
its expected square is twice the variance of one mini-batch gradient around the full-data one; the
estimator's ``‖ĝ − g‖`` adds to a single batch's variance. Estimator error equal to the reference
figure therefore means "as much extra noise as the mini-batch noise, times √2"; ``ratio=1/√2`` in
:func:`allocate_probes` asks for the stricter comparison.

:func:`allocate_probes` uses these figures to pick, per layer, the smallest number of probes whose
error stays below that layer's SGD noise (exact backprop where the input is small or no candidate
is good enough), and :class:`ProbeAllocator` re-runs it every N training steps.

Nothing here changes the model: no optimizer step, ``.grad`` fields untouched (gradients come from
``torch.autograd.grad``), buffers (batch-norm running statistics) restored, torch's global RNG and
the probe-seed stream of :func:`app.nn.manual_seed` left as they were, and every forward pass of
one measurement replays the same RNG state (identical dropout masks).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn as nn

from . import probes as _probes
from .convert import exact, stochastic_layers
from .functional import DEFAULT_SKETCH
from .modules import StochasticConvMixin
from .probes import check_probe_options

__all__ = [
    "LayerFidelity",
    "Agreement",
    "FidelityReport",
    "gradient_fidelity",
    "compare_estimators",
    "fidelity_figures",
    "allocate_probes",
    "ProbeAllocator",
    "split_sketch_config",
    "DEFAULT_CANDIDATES",
]

LossFn = Callable[..., torch.Tensor]
"""``loss_fn(model, batch) -> scalar loss`` (``loss_fn(model)`` when no batch is passed)."""

DEFAULT_CANDIDATES = (0, 32, 64, 128, 256, 512, 1024)


# ----------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Agreement:
    """How one gradient (a parameter, a group of them) agrees with the exact one.

    Attributes:
        cosine: mean over draws of ``cos(ĝ, g)`` (NaN when there were no draws).
        rel_error: ``sqrt(mean over draws of ‖ĝ − g‖²) / ‖g‖``.
        sgd_cosine: ``cos(g', g)`` with ``g'`` the exact gradient of the reference batch (NaN without one).
        sgd_rel_error: ``‖g' − g‖ / ‖g‖`` (NaN without a reference batch).
        norm: ``‖g‖``.
    """

    cosine: float
    rel_error: float
    sgd_cosine: float
    sgd_rel_error: float
    norm: float

    @property
    def noise_ratio(self) -> float:
        """``rel_error / sgd_rel_error``: below 1, the estimator adds less noise than a change of batch."""
        if not self.sgd_rel_error > 0:
            return math.nan
        return self.rel_error / self.sgd_rel_error


@dataclass(frozen=True)
class LayerFidelity(Agreement):
    """:class:`Agreement` of one stochastic convolution's weight gradient, with the layer's context.

    Attributes:
        name: qualified module name.
        depth: position of the layer among the stochastic layers in the forward pass (0 = first run).
        voxels: spatial voxels of the layer's input in this batch (``prod(S)``, per sample).
        batch: samples in the layer's input.
        in_channels: channels of the layer's input.
        kernel_numel: kernel offsets ``K``.
        n_probes: the layer's ``n_probes`` during the draws.
        sketched: whether the draws used the sketch (False: exact by ``n_probes=0``, ``min_voxels``, ...).
        sketch: the sketch the layer runs (``"spectral"``/``"shifted"``/``"offset"``).
    """

    name: str = ""
    depth: int = -1
    voxels: int = 0
    batch: int = 0
    in_channels: int = 0
    kernel_numel: int = 1
    n_probes: int = 0
    sketched: bool = False
    sketch: str = DEFAULT_SKETCH

    @property
    def sketch_numbers(self) -> int:
        """Numbers (fp32-sized) the sketch keeps for this layer: ``r·C_in``, ``r·C_in·K`` for ``offset``,
        ``B·r·(2·C_in + 3)`` for ``spectral`` (complex coefficients, int64 frequencies, weights); 0 when exact."""
        if not self.sketched:
            return 0
        if self.sketch == "spectral":
            return self.batch * self.n_probes * (2 * self.in_channels + 3)
        return self.n_probes * self.in_channels * (self.kernel_numel if self.sketch == "offset" else 1)

    @property
    def input_numbers(self) -> int:
        """Numbers of the input that exact backprop keeps: ``B·C_in·prod(S)``."""
        return self.batch * self.in_channels * self.voxels


@dataclass(frozen=True)
class FidelityReport(Mapping[str, float]):
    """Result of :func:`gradient_fidelity`; also a read-only mapping of flat scalar figures.

    Attributes:
        layers: one :class:`LayerFidelity` per stochastic convolution that got a gradient, in forward order.
        network: all trainable parameters together (what the optimizer sees).
        convs: the stochastic convolutions' weights together (the only sketched gradients).
        n_draws: stochastic gradients drawn.
        has_reference: whether a reference batch was given (the ``sgd_*`` figures are NaN otherwise).

    As a mapping (e.g. ``dict(report)`` for a logger) its keys are ``cos_network``, ``rel_network``,
    ``cos_convs``, ``rel_convs``, ``rel_max`` (worst layer), ``cos/<layer>``, ``rel/<layer>``; with a
    reference batch also ``sgd_cos_network``, ``sgd_rel_network``, ``sgd_cos_convs``,
    ``sgd_rel_convs``, ``noise_ratio_max`` (worst layer's ``rel_error / sgd_rel_error``) and
    ``sgd_rel/<layer>``. :func:`fidelity_figures` adds a ``fidelity/`` prefix.
    """

    layers: tuple[LayerFidelity, ...]
    network: Agreement
    convs: Agreement
    n_draws: int
    has_reference: bool
    _figures: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_figures", self._flat())

    def _flat(self) -> dict[str, float]:
        out: dict[str, float] = {}
        groups = (("network", self.network), ("convs", self.convs))
        if self.n_draws:
            for key, a in groups:
                out[f"cos_{key}"], out[f"rel_{key}"] = a.cosine, a.rel_error
            rels = [layer.rel_error for layer in self.layers if not math.isnan(layer.rel_error)]
            out["rel_max"] = max(rels) if rels else math.nan
        if self.has_reference:
            for key, a in groups:
                out[f"sgd_cos_{key}"], out[f"sgd_rel_{key}"] = a.sgd_cosine, a.sgd_rel_error
            if self.n_draws:
                ratios = [layer.noise_ratio for layer in self.layers if not math.isnan(layer.noise_ratio)]
                out["noise_ratio_max"] = max(ratios) if ratios else math.nan
        for layer in self.layers:
            if self.n_draws:
                out[f"cos/{layer.name}"], out[f"rel/{layer.name}"] = layer.cosine, layer.rel_error
            if self.has_reference:
                out[f"sgd_rel/{layer.name}"] = layer.sgd_rel_error
        return out

    def __getitem__(self, key: str) -> float:
        return self._figures[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._figures)

    def __len__(self) -> int:
        return len(self._figures)

    def layer(self, name: str) -> LayerFidelity:
        """The figures of the layer called ``name``."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no stochastic layer {name!r} in this report; layers: {[lay.name for lay in self.layers]}")


def fidelity_figures(report: FidelityReport, prefix: str = "fidelity/") -> dict[str, float]:
    """Flat ``{prefix + key: value}`` scalars of ``report`` for a logger (W&B), e.g. ``fidelity/cos_network``.

    NaN figures (a layer whose exact gradient is zero) are left out.
    """
    return {prefix + k: float(v) for k, v in report.items() if not math.isnan(v)}


# ---------------------------------------------------------------------------------------- measurement


def _call(loss_fn: LossFn, model: nn.Module, batch: Any) -> torch.Tensor:
    loss = loss_fn(model) if batch is None else loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"a tensor of shape {tuple(loss.shape)}"
        raise ValueError(f"loss_fn must return a scalar tensor, but returned {got}")
    return loss


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module  # its reducer expects .backward(); the wrapped module computes the same loss
    return model


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Restores buffers, torch's RNG (CPU and the model's CUDA device) and the probe-seed stream on
    exit; yields ``rewind()``, which puts torch's RNG back to its state at entry (same dropout masks)."""
    device = _device_of(model)
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    stream = _probes.seed_state()
    with torch.random.fork_rng(devices=[index] if cuda else []):
        cpu_state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(index) if cuda else None

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, index)

        try:
            yield rewind
        finally:
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            _probes.set_seed_state(stream)


@contextlib.contextmanager
def _sketch_options(layers: Sequence[StochasticConvMixin], options: Optional[Mapping[str, Any]]) -> Iterator[None]:
    """Sets ``options`` (``set_sketch_options`` keywords) on every layer; restores each layer's own on exit."""
    saved = [(layer.n_probes, layer.probes, layer.sketch, layer.control, layer.min_voxels) for layer in layers]
    try:
        if options:
            for layer, (n, p, s, c, v) in zip(layers, saved):
                kw = dict(n_probes=n, probes=p, sketch=s, control=c, min_voxels=v)
                kw.update(options)
                layer.set_sketch_options(**kw)
        yield
    finally:
        for layer, args in zip(layers, saved):
            layer.set_sketch_options(*args)


@dataclass
class _LayerInfo:
    depth: int = -1
    voxels: int = 0
    batch: int = 0
    in_channels: int = 0
    sketched: bool = False


class _Measurement:
    """Exact gradient of a batch (and the reference figures) for one model state, then any number of
    draws under any sketch options, all compared against it."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any, reference_batch: Any, rewind: Callable[[], None]):
        self.model, self.loss_fn, self.batch, self.rewind = model, loss_fn, batch, rewind
        params, seen = [], set()
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if not params:
            raise ValueError("gradient_fidelity: the model has no parameter that requires a gradient")
        self.params = params
        index = {id(p): i for i, p in enumerate(params)}
        self.layers: list[tuple[str, StochasticConvMixin, int]] = [
            (name, layer, index[id(layer.weight)]) for name, layer in stochastic_layers(model) if id(layer.weight) in index
        ]
        self.info = {name: _LayerInfo() for name, _, _ in self.layers}
        with self._recording(first_pass=True), exact(model):
            self.exact = self._gradients(batch)
        self.used = [g is not None for g in self.exact]
        dev = _device_of(model)
        self.exact_sq = torch.stack([
            e.double().pow(2).sum() if e is not None else torch.zeros((), dtype=torch.float64, device=dev) for e in self.exact
        ]).cpu()
        self.reference: Optional[torch.Tensor] = None  # per parameter (g'·g, g'·g', ‖g' − g‖²)
        if reference_batch is not None:
            with exact(model):
                ref = self._gradients(reference_batch)
            self.reference = self._stats(ref)

    # -- passes

    def _gradients(self, batch: Any) -> list[Optional[torch.Tensor]]:
        self.rewind()
        loss = _call(self.loss_fn, self.model, batch)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [None if g is None else g.detach() for g in grads]

    @contextlib.contextmanager
    def _recording(self, first_pass: bool) -> Iterator[None]:
        """Forward pre-hooks noting each layer's input size and order (first pass) or whether it sketches."""
        handles, counter = [], [0]

        def hook_for(name: str, layer: StochasticConvMixin):
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0]
                info = self.info[name]
                if first_pass:
                    if info.depth < 0:
                        info.depth, counter[0] = counter[0], counter[0] + 1
                        info.voxels, info.batch, info.in_channels = math.prod(x.shape[2:]), x.shape[0], x.shape[1]
                else:
                    info.sketched = info.sketched or layer.uses_sketch(x)

            return hook

        if not first_pass:
            for info in self.info.values():
                info.sketched = False
        try:
            for name, layer, _ in self.layers:
                handles.append(layer.register_forward_pre_hook(hook_for(name, layer)))
            yield
        finally:
            for h in handles:
                h.remove()

    # -- statistics

    def _stats(self, grads: list[Optional[torch.Tensor]]) -> torch.Tensor:
        """``(n_params, 3)``: ``ĝ·g``, ``ĝ·ĝ``, ``‖ĝ − g‖²`` per parameter (float64, CPU, one transfer)."""
        zero = torch.zeros((), dtype=torch.float64, device=_device_of(self.model))
        rows = []
        for g, e in zip(grads, self.exact):
            if g is None or e is None:
                rows.append(torch.stack([zero, zero, zero]))
                continue
            g64, e64 = g.double(), e.double()
            rows.append(torch.stack([(g64 * e64).sum(), (g64 * g64).sum(), (g64 - e64).pow(2).sum()]))
        return torch.stack(rows).cpu()

    def draws(self, n_draws: int) -> torch.Tensor:
        """``(n_draws, n_params, 3)`` statistics of stochastic gradients under the layers' current options."""
        out = []
        for i in range(n_draws):
            with self._recording(first_pass=False) if i == 0 else contextlib.nullcontext():
                out.append(self._stats(self._gradients(self.batch)))
        return torch.stack(out) if out else torch.zeros((0, len(self.params), 3), dtype=torch.float64)

    # -- report

    @staticmethod
    def _agreement(ee: float, draws: torch.Tensor, ref: Optional[torch.Tensor]) -> Agreement:
        """``draws``: ``(n_draws, 3)`` sums over a group; ``ref``: ``(3,)`` or None."""
        norm = math.sqrt(ee)

        def cos(ge: float, gg: float) -> float:
            return ge / math.sqrt(gg * ee) if gg > 0 and ee > 0 else math.nan

        def rel(dd: float) -> float:
            if ee > 0:
                return math.sqrt(dd) / norm
            return 0.0 if dd == 0 else math.nan

        if draws.shape[0]:
            cosine = sum(cos(float(d[0]), float(d[1])) for d in draws) / draws.shape[0]
            rel_error = rel(float(draws[:, 2].mean()))
        else:
            cosine = rel_error = math.nan
        sgd_cosine = sgd_rel = math.nan
        if ref is not None:
            sgd_cosine, sgd_rel = cos(float(ref[0]), float(ref[1])), rel(float(ref[2]))
        return Agreement(cosine, rel_error, sgd_cosine, sgd_rel, norm)

    def report(self, draws: torch.Tensor) -> FidelityReport:
        ref = self.reference
        layers = []
        for name, layer, i in self.layers:
            if not self.used[i]:
                continue
            a = self._agreement(float(self.exact_sq[i]), draws[:, i], None if ref is None else ref[i])
            info = self.info[name]
            layers.append(LayerFidelity(
                **vars(a), name=name, depth=info.depth, voxels=info.voxels, batch=info.batch,
                in_channels=info.in_channels, kernel_numel=math.prod(layer.weight.shape[2:]),
                n_probes=layer.n_probes, sketched=info.sketched and draws.shape[0] > 0, sketch=layer.sketch,
            ))
        layers.sort(key=lambda lay: lay.depth)
        conv_idx = [i for _, _, i in self.layers if self.used[i]]

        def group(idx: Sequence[int]) -> Agreement:
            idx_t = torch.tensor(list(idx), dtype=torch.long)
            return self._agreement(
                float(self.exact_sq[idx_t].sum()), draws[:, idx_t].sum(1),
                None if ref is None else ref[idx_t].sum(0),
            )

        return FidelityReport(
            layers=tuple(layers), network=group(range(len(self.params))), convs=group(conv_idx),
            n_draws=int(draws.shape[0]), has_reference=ref is not None,
        )


def _check_model(model: nn.Module, n_draws: int) -> nn.Module:
    model = _unwrap(model)
    if not isinstance(n_draws, int) or n_draws < 0:
        raise ValueError(f"n_draws must be an int >= 0, but got n_draws={n_draws!r}")
    if not model.training:
        raise ValueError(
            "gradient fidelity is measured on the training-mode gradient (stochastic layers are exact in eval "
            "mode); call model.train() first"
        )
    return model


def gradient_fidelity(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any = None,
    *,
    reference_batch: Any = None,
    n_draws: int = 4,
) -> FidelityReport:
    """Compares the stochastic weight gradients of the current model state with the exact ones.

    Args:
        model: a model with stochastic convolutions (``app.nn.convert``), in training mode; a DDP
            wrapper is looked through.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (``loss_fn(model)`` when ``batch`` is None).
            Called ``2 + n_draws`` times; it may move the batch to the device and use autocast.
        batch: the batch the gradients are taken on.
        reference_batch: another batch: its exact gradient against ``batch``'s is the SGD-noise
            reference (``sgd_*`` figures). Default None (no reference).
        n_draws: stochastic gradients drawn (with each layer's current sketch options). Default 4;
            0 gives the SGD-noise figures alone.

    Returns:
        A :class:`FidelityReport` (per-layer and whole-network cosine and relative error).

    Example:
        >>> loss_fn = lambda m, b: DiceCELoss(to_onehot_y=True, softmax=True)(m(b["image"]), b["label"])
        >>> report = gradient_fidelity(model, loss_fn, batch, reference_batch=other_batch)
        >>> report["rel_network"], report.layer("input_block.conv1.conv").noise_ratio
    """
    return compare_estimators(model, loss_fn, batch, reference_batch=reference_batch, variants={"": {}}, n_draws=n_draws)[""]


def compare_estimators(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any = None,
    *,
    reference_batch: Any = None,
    variants: Mapping[str, Mapping[str, Any]],
    n_draws: int = 4,
) -> dict[str, FidelityReport]:
    """:func:`gradient_fidelity` for several sketch settings, sharing one exact and one reference pass.

    Args:
        model, loss_fn, batch, reference_batch, n_draws: as in :func:`gradient_fidelity`.
        variants: ``{label: options}`` with ``options`` keywords of ``set_sketch_options``
            (``n_probes``, ``probes``, ``sketch``, ``control``, ``min_voxels``) set on every stochastic
            layer for that variant (``{}``: the layers' own options); each layer's options are
            restored afterwards.

    Returns:
        ``{label: FidelityReport}`` in the order of ``variants``.
    """
    model = _check_model(model, n_draws)
    layers = [layer for _, layer in stochastic_layers(model)]
    for label, options in variants.items():
        unknown = set(options) - {"n_probes", "probes", "sketch", "control", "min_voxels"}
        if unknown:
            raise ValueError(f"variant {label!r}: unknown sketch options {sorted(unknown)}; "
                             "allowed: n_probes, probes, sketch, control, min_voxels")
    out: dict[str, FidelityReport] = {}
    with _untouched(model) as rewind:
        m = _Measurement(model, loss_fn, batch, reference_batch, rewind)
        for label, options in variants.items():
            with _sketch_options(layers, options):
                out[label] = m.report(m.draws(n_draws))
    return out


# ----------------------------------------------------------------------------------- probe allocation


def _candidate_list(candidates: Sequence[int], layers: Sequence[StochasticConvMixin]) -> list[int]:
    values = sorted({int(c) for c in candidates} | {0})
    for c in values:
        if c < 0:
            raise ValueError(f"candidates must be ints >= 0, but got {list(candidates)}")
        for family in {layer.probes for layer in layers}:
            if c:
                check_probe_options(c, family)
    return values


def allocate_probes(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    reference_batch: Any,
    *,
    candidates: Sequence[int] = DEFAULT_CANDIDATES,
    n_draws: int = 2,
    min_voxels: int = 4096,
    ratio: float = 1.0,
    fallback: str = "exact",
    apply: bool = True,
) -> dict[str, int]:
    """Picks each stochastic layer's ``n_probes`` from measured error against SGD noise (and sets it).

    Per layer, in increasing order of ``candidates``, the first ``r > 0`` whose relative error
    (root mean square over ``n_draws`` draws) is at most ``ratio`` times the layer's SGD-noise
    relative error (exact gradient of ``reference_batch`` against ``batch``'s) wins: the least
    memory that keeps the estimator's noise below SGD's. Exact backprop (``0``) is chosen where

    * the layer's input has fewer than ``min_voxels`` voxels (cheap to keep, and few voxels to
      average over), or
    * the sketch would keep as many numbers as the input itself (``r ≥ B·prod(S)`` for the shifted
      sketch, ``r·K ≥ B·prod(S)`` for ``offset``), or
    * no candidate is good enough (with ``fallback="exact"``), or the layer got no gradient.

    All layers are measured at once for each candidate (their errors are independent: input
    gradients are exact), and layers already decided are made exact for the remaining draws.
    Costs ``2 + n_draws × (#candidates tried)`` forward/backward passes, and the memory of one exact
    backward pass of ``batch``.

    Args:
        model: a model with stochastic convolutions, in training mode.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        batch: the batch the errors are measured on.
        reference_batch: another batch from the same data (the SGD-noise reference).
        candidates: allowed ``n_probes`` values; ``0`` (exact) is always allowed. Default
            ``(0, 32, 64, 128, 256, 512, 1024)``; powers of two where a layer uses orthogonal probes.
        n_draws: stochastic gradients per candidate. Default 2.
        min_voxels: inputs with fewer voxels (per sample) than this stay exact. Default 4096 (16³).
        ratio: tolerance on ``rel_error / sgd_rel_error``. Default 1 (see the module docstring for
            ``1/√2``).
        fallback: what a (large-input) layer gets when no candidate meets the tolerance:
            ``"exact"`` (0, default: accuracy first) or ``"largest"`` (the largest candidate that
            is smaller than the input: memory first, for runs whose exact backprop does not fit).
        apply: set the chosen ``n_probes`` on the layers (their other options kept). Default True.

    Returns:
        ``{layer name: n_probes}`` for every stochastic layer, each value one of ``candidates`` or 0.
    """
    model = _check_model(model, n_draws)
    if n_draws < 1:
        raise ValueError(f"allocate_probes needs n_draws >= 1, but got n_draws={n_draws}")
    if reference_batch is None:
        raise ValueError("allocate_probes needs a reference_batch (another batch: the SGD-noise reference)")
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, but got ratio={ratio}")
    if fallback not in ("exact", "largest"):
        raise ValueError(f"fallback must be 'exact' or 'largest', but got fallback={fallback!r}")
    named = list(stochastic_layers(model))
    values = _candidate_list(candidates, [layer for _, layer in named])
    choice: dict[str, int] = {name: 0 for name, _ in named}
    with _untouched(model) as rewind:
        m = _Measurement(model, loss_fn, batch, reference_batch, rewind)
        undecided: dict[str, tuple[StochasticConvMixin, int]] = {}
        for name, layer, i in m.layers:
            info = m.info[name]
            if m.used[i] and info.depth >= 0 and info.voxels >= max(min_voxels, layer.min_voxels):
                undecided[name] = (layer, i)
        for r in (v for v in values if v > 0):
            if not undecided:
                break
            per_layer = {}
            for name, (layer, _) in list(undecided.items()):
                info = m.info[name]
                sketch = layer.sketch
                size = {"offset": r * math.prod(layer.weight.shape[2:]), "spectral": 2 * r * info.batch}.get(sketch, r)
                if size >= info.batch * info.voxels:  # the sketch is no smaller than the input
                    del undecided[name]
                else:
                    per_layer[name] = r
                    if fallback == "largest":
                        choice[name] = r  # the largest useful candidate so far, unless one passes below
            others = [layer for name, layer in named if name not in per_layer]
            stochastic = [layer for name, layer in named if name in per_layer]
            with _sketch_options(others, {"n_probes": 0}), _sketch_options(stochastic, {"n_probes": r}):
                report = m.report(m.draws(n_draws))
            for name in per_layer:
                fig = report.layer(name)
                if fig.rel_error <= ratio * fig.sgd_rel_error:
                    choice[name] = r
                    del undecided[name]
    if apply:
        for name, layer in named:
            layer.set_sketch_options(choice[name], layer.probes, layer.sketch, layer.control, layer.min_voxels)
    return choice


class ProbeAllocator:
    """Runs :func:`allocate_probes` at the start of training and every ``every`` steps after.

    The reference batch is the batch of the previous call, so the first allocation happens at the
    second call (step 1: the first step trains with the layers' initial options).

    Args:
        model: the model (its stochastic layers get the chosen ``n_probes``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (moves the batch to the device itself).
        every: steps between allocations; 0 allocates once. Default 0.
        **kwargs: keywords of :func:`allocate_probes` (``candidates``, ``n_draws``, ``min_voxels``, ``ratio``,
            ``fallback``).

    Example (inside a training loop)::

        allocator = ProbeAllocator(model, loss_fn, every=500)
        for step, batch in enumerate(batches):
            allocator.maybe_reallocate(step, batch)
            ...  # forward, backward, optimizer step
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, every: int = 0, **kwargs: Any) -> None:
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0 (0: allocate once), but got every={every!r}")
        unknown = set(kwargs) - {"candidates", "n_draws", "min_voxels", "ratio", "fallback"}
        if unknown:
            raise ValueError(
                f"ProbeAllocator: unknown options {sorted(unknown)}; allowed: candidates, n_draws, min_voxels, ratio, fallback"
            )
        self.model, self.loss_fn, self.every, self.options = model, loss_fn, every, kwargs
        self.allocation: Optional[dict[str, int]] = None
        self.last_step: Optional[int] = None
        self._previous: Any = None

    def due(self, step: int) -> bool:
        """Whether a call at ``step`` (with a reference batch at hand) allocates."""
        if self.allocation is None:
            return True
        return self.every > 0 and step - (self.last_step or 0) >= self.every

    def maybe_reallocate(self, step: int, batch: Any) -> Optional[dict[str, int]]:
        """Allocates when due and a previous batch is known; returns the new allocation, else None.

        Call once per optimizer step, before the step, with that step's (first) batch.
        """
        reference, self._previous = self._previous, batch
        if reference is None or not self.due(step):
            return None
        self.allocation = allocate_probes(self.model, self.loss_fn, batch, reference, **self.options)
        self.last_step = step
        return self.allocation


def split_sketch_config(sketch: Mapping[str, Any]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Splits a training config's ``sketch`` group into ``convert`` keywords and allocator keywords.

    With ``n_probes: auto`` the model starts at the largest candidate and the ``auto_*`` keys
    (``auto_every``, ``auto_candidates``, ``auto_draws``, ``auto_min_voxels``, ``auto_ratio``, ``auto_fallback``) become
    :class:`ProbeAllocator` keywords; otherwise the allocator keywords are None. ``auto_*`` keys are
    never passed to ``convert``.

    Returns:
        ``(convert_kwargs, allocator_kwargs or None)``.
    """
    cfg = dict(sketch)
    auto = {k[len("auto_"):]: cfg.pop(k) for k in list(cfg) if k.startswith("auto_")}
    if str(cfg.get("n_probes")).lower() != "auto":
        return cfg, None
    names = {"every": "every", "candidates": "candidates", "draws": "n_draws", "min_voxels": "min_voxels", "ratio": "ratio",
             "fallback": "fallback"}
    unknown = set(auto) - set(names)
    if unknown:
        raise ValueError(f"sketch: unknown keys {sorted('auto_' + k for k in unknown)}; "
                         f"allowed: {sorted('auto_' + k for k in names)}")
    kwargs = {names[k]: v for k, v in auto.items() if v is not None}
    if "candidates" in kwargs:
        kwargs["candidates"] = tuple(int(c) for c in kwargs["candidates"])
    if "every" in kwargs:
        kwargs["every"] = int(kwargs["every"])
    cfg["n_probes"] = max(kwargs.get("candidates", DEFAULT_CANDIDATES))
    return cfg, kwargs
