"""The training loop behind ``python -m app.train``: :func:`train` takes a composed config and
returns the run's metrics.

One run, in order: join the process group (under ``torchrun``), seed, generate or locate the
data and validate every image/label pair (a :class:`~app.data.DataError` stops the run before
anything else happens), build the network, make its convolutions stochastic
(``app.nn.convert``), optionally checkpoint its stages, then train epoch by epoch: DiceCE loss
under autocast, gradient accumulation, clipping, one scheduler step per optimizer step;
sliding-window validation with per-class Dice every ``trainer.val_every`` epochs; ``last.pt``
every ``trainer.checkpoint_every_steps`` steps / ``trainer.checkpoint_every_minutes`` minutes and
every epoch, ``best.pt`` (by mean Dice), in ``<output_dir>/checkpoints``
(:mod:`app.train.checkpoints`). Only rank 0 logs and writes files.

``task=restoration`` trains on the same loop without labels: degraded windows of the clips in,
the clean windows as targets, L1 or MSE loss, PSNR and SSIM at validation (``best.pt`` by PSNR);
the network's output channels are its input channels. Checkpoints carry the task (``task``).
Validation of clips also renders the first validation clips as input | prediction | target
videos for W&B.

A checkpoint taken in the middle of an epoch resumes exactly: the epoch's loader is reseeded as
usual, the batches the run had already drawn in it are drawn again and dropped (the data time of
that part of the epoch, no network work), then every RNG stream is restored from the checkpoint.

SIGTERM and SIGINT finish the current step, write ``last.pt``, close the W&B run and raise
:class:`Preempted` (the command line exits with :data:`PREEMPTED_EXIT_CODE`); under ``torchrun``
the ranks agree on the step to stop after (one rank's signal stops them all: a stop flag is reduced
over the ranks at every step), rank 0 writes the checkpoint with every rank's RNG state, and every
rank raises :class:`Preempted`. A step whose loss or gradient is not finite is skipped
(no optimizer update; under fp16 the GradScaler's own skipping of overflowed steps is left alone),
counted, and logged; ``trainer.max_bad_steps`` of them in a row stop the run.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from monai.losses import DiceCELoss
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import app.nn
from app.data import (
    DataError,
    Degradation,
    Preprocessing,
    build_loaders,
    load_datalist,
    prepare_datalist,
    resolve_num_workers,
    scan_cases,
    shutdown_workers,
)
from app.data.patches import EpochBatches
from app.data.video import is_clip, open_clip
from app.models import (
    build_model,
    deep_supervision_loss,
    enable_grad_checkpointing,
    resolve_model_config,
    save_checkpoint,
)
from app.models.compiled import CUDA_GRAPHS, CapturedBackward, check_capturable, compile_model, uncompiled, uses_cuda_graphs
from app.nn.fidelity import split_sketch_config
from app.train.auto_patch import is_auto, resolve_auto_patch_size
from app.train.checkpoints import BEST, LAST, CheckpointStore, find_resume_on_rank0
from app.train.distributed import DistInfo, barrier, broadcast_object, check_replicas, cleanup, gather_object, init_distributed
from app.train.state import rank_rng, restore_rank_rng, rng_state, seed_epoch, seed_everything, set_rng_state
from app.train.tracking import Tracker
from app.train.validation import class_dice, mean_dice, validate, validate_restoration
from app.utils import amp_dtype, staggered

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "TrainingError", "train"]

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
"""Exit status of ``python -m app.train`` stopped by SIGTERM/SIGINT after writing its checkpoint
(``EX_TEMPFAIL``: run the same command with ``trainer.resume=auto`` to continue)."""
TASKS = ("segmentation", "restoration")
"""``task``: what the network learns (``conf/task``)."""
RESTORATION_LOSSES = ("l1", "mse")
# Channel names of a restoration network's outputs (the checkpoint's class_names: one per output channel).
_CHANNEL_NAMES = {1: ["grey"], 3: ["red", "green", "blue"]}
# Share of an epoch's wall time spent waiting for data above which the run warns (once).
DATA_WAIT_WARN_FRACTION = 0.2


class TrainingError(RuntimeError):
    """The run cannot go on for a reason the user can fix; the message is one line saying how."""


class Preempted(Exception):
    """The run stopped on SIGTERM/SIGINT after a complete step and a checkpoint.

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        step: optimizer steps done.
        checkpoint: the checkpoint written on the way out (None when no step had run yet).
    """

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no step had run, no checkpoint written"
        super().__init__(f"stopped by {signal_name} after step {step}; {where}; run again with trainer.resume=auto "
                         "(and the same hydra.run.dir) to continue")


def _innermost_data_error(exc: BaseException) -> DataError | None:
    """The :class:`DataError` behind a loader failure, if any, as a one-line error.

    MONAI wraps a transform's exception in a ``RuntimeError`` (the DataError is its cause); a
    DataLoader worker re-raises it with the worker's traceback in the message.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, DataError) and "\n" not in text:
            return e
        for line in reversed(text.splitlines()):
            if "DataError: " in line:
                return DataError(line.split("DataError: ", 1)[1].strip())
        e = e.__cause__ or e.__context__
    return None


def _checked(loader: Any, what: str) -> Iterator[Any]:
    """The loader's batches; its failures become the one-line errors of :func:`_loader_failure`."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (DataError, TrainingError):
            raise
        except Exception as exc:  # noqa: BLE001  MONAI and the DataLoader wrap the transforms' errors
            raise _loader_failure(exc, what) from None
        yield batch


def _loader_failure(exc: BaseException, what: str) -> Exception:
    """A loader exception as the one-line error the command line reports."""
    data_error = _innermost_data_error(exc)
    if data_error is not None:
        return data_error
    inner = exc
    while inner.__cause__ is not None:
        inner = inner.__cause__
    text = " ".join(str(inner).split())
    return TrainingError(f"loading a {what} batch failed ({type(inner).__name__}: {text}); check the data")


def out_of_memory_message(cfg: DictConfig, where: str) -> str:
    """One line naming the settings that lower memory, with their current values.

    Args:
        cfg: the run's config.
        where: ``"the training step"`` or ``"validation"`` (sliding-window inference).
    """
    t, s = cfg.trainer, cfg.sketch
    if where == "validation":
        hints = [f"lower trainer.sw_batch_size (now {t.sw_batch_size})", f"trainer.patch_size (now {list(t.patch_size)})"]
    else:
        hints = [
            f"lower trainer.patch_size (now {list(t.patch_size)})",
            f"trainer.batch_size (now {t.batch_size}; raise trainer.grad_accum to keep the effective batch)",
            f"sketch.n_probes (now {s.n_probes})" if str(s.n_probes) != "0"
            else "use stochastic backprop: sketch=default (now sketch.n_probes=0)",
        ]
        if amp_dtype(t.amp, "trainer.amp") is None:
            hints.append(f"set trainer.amp=bf16 (now {t.amp})")
        if not t.grad_checkpointing:
            hints.append("set trainer.grad_checkpointing=true (now false)")
    return f"CUDA out of memory during {where}: " + ", ".join(hints)


@dataclass
class _Progress:
    """What a checkpoint records about where the run is."""

    epoch: int = -1  # last completed epoch (0-based); -1 before the first
    global_step: int = 0  # optimizer steps taken
    best_metric: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    bad_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient, whole run


@dataclass
class _EpochState:
    """The epoch in progress, as a mid-epoch checkpoint records it."""

    epoch: int
    steps: int = 0  # optimizer steps done in this epoch
    losses: list[float] = field(default_factory=list)  # of the good steps
    bad_steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "steps": self.steps, "losses": list(self.losses), "bad_steps": self.bad_steps}


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image, label)`` as plain tensors on ``device``: MONAI's MetaTensor metadata is of no use
    to the network, and its per-op overhead and view tracking are avoided."""
    image, label = batch["image"], batch["label"]
    return (image.as_subclass(torch.Tensor).to(device, non_blocking=True),
            label.as_subclass(torch.Tensor).to(device, non_blocking=True))


def _unwrap(model: nn.Module) -> nn.Module:
    model = uncompiled(model)
    return model.module if isinstance(model, DistributedDataParallel) else model


class Trainer:
    """A short loop around lifecycle steps; built from a composed config, run by :meth:`fit`."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.amp_dtype = amp_dtype(cfg.trainer.amp, "trainer.amp")
        if self.amp_dtype is not None and self.device.type == "cpu":
            log.warning("trainer.amp=%s on the CPU: torch runs half-precision 3D convolutions through its slow "
                        "reference kernels, far slower than fp32; use trainer.amp=off on the CPU", cfg.trainer.amp)
        self.output_dir = Path(broadcast_object(dist_info, str(cfg.output_dir)))  # rank 0's: it alone writes there
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.store = CheckpointStore(self.ckpt_dir)
        self.progress = _Progress()
        self.tracker: Tracker | None = None
        self._last_batch: dict[str, torch.Tensor] | None = None
        self._previous_batch: dict[str, torch.Tensor] | None = None
        t = cfg.trainer
        for key in ("checkpoint_every_steps", "checkpoint_every_minutes", "max_bad_steps", "ddp_check_every"):
            value = t.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"trainer.{key} must be a number >= 0 or null, but got trainer.{key}={value!r}")
        self.every_steps = int(t.get("checkpoint_every_steps") or 0)
        self.every_seconds = 60.0 * float(t.get("checkpoint_every_minutes") or 0)
        self.max_bad_steps = int(t.get("max_bad_steps") or 0)
        self.ddp_check_every = int(t.get("ddp_check_every") or 0)
        self.last_checkpoint: tuple[Path, int] | None = None  # (path, global_step) of the newest one written
        self._last_save_time = time.monotonic()
        self._resume_epoch: tuple[_EpochState, dict[str, Any]] | None = None  # mid-epoch state and its RNG
        self._bad_in_row = 0
        self._stop_signal: int | None = None
        self._stop_agreed = False
        self._time_due = False  # rank 0's clock says a checkpoint is due (agreed with the step's flags)
        self._warned_data_wait = False
        self._first_step_of_process = True

    # ----------------------------------------------------------------------------- set-up

    def setup_data(self) -> None:
        """Generate (rank 0 first, then one process per other machine: :func:`app.utils.staggered`)
        or locate the data set and validate every pair."""
        data = self.cfg.data
        if data.generate is not None:
            gen = OmegaConf.to_container(data.generate, resolve=True)
            gen["root"] = str(Path(gen["root"]).expanduser())
            root = Path(staggered(lambda: instantiate(gen, _convert_="all")))
        else:
            root = Path(str(data.root)).expanduser()
        self.task = str(self.cfg.get("task", "segmentation"))
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, but got task={self.task!r}")
        restoration = self.task == "restoration"
        self.datalist = load_datalist(root, val_fraction=data.val_fraction, seed=data.split_seed, validate=True,
                                      labels=not restoration)
        if not self.datalist.val:
            raise TrainingError(
                f"{root}: no validation cases (the data set has no validation list and "
                f"data.val_fraction={data.val_fraction} leaves none); raise data.val_fraction"
            )
        self.class_names = [str(c) for c in self.datalist.class_names]
        self.n_classes = len(self.class_names)
        self.preprocessing = Preprocessing.from_dict(OmegaConf.to_container(data.preprocessing, resolve=True))
        self.degradation: Degradation | None = None
        if restoration:
            if self.preprocessing.intensity != "none":
                raise ValueError("task=restoration maps clips in [0, 1] to clips in [0, 1]; set "
                                 f"data.preprocessing.intensity=none (now {self.preprocessing.intensity})")
            r = self.cfg.restoration
            if str(r.loss) not in RESTORATION_LOSSES:
                raise ValueError(f"restoration.loss must be one of {list(RESTORATION_LOSSES)}, but got restoration.loss={r.loss!r}")
            self.degradation = Degradation.from_dict(OmegaConf.to_container(r.degradation, resolve=True))
            channels = self.preprocessing.in_channels
            self.class_names = _CHANNEL_NAMES.get(channels, [f"channel_{c}" for c in range(channels)])
        first_val = self.datalist.val[0]["image"] if self.datalist.val else None
        self.val_fps = open_clip(first_val).fps if first_val is not None and is_clip(first_val) else 0.0
        n_cases = len(self.datalist.train) + len(self.datalist.val)
        cache = str(data.get("cache", "disk"))
        if cache == "none" and self.cfg.trainer.get("scan_data", True):  # every voxel, before any training step
            started = time.perf_counter()
            scan_cases(self.datalist.train + self.datalist.val, self.n_classes, self.preprocessing)
            log.info("data: scanned the voxels of %d cases in %.1f s (trainer.scan_data=false skips this)",
                     n_cases, time.perf_counter() - started)
        # Preprocess once (data.cache=disk or memory), checking every voxel on the same read; with
        # data.cache=none the loaders preprocess at every access.
        started = time.perf_counter()
        self.prepared = prepare_datalist(
            self.datalist, self.preprocessing, self.n_classes, cache, data.get("cache_dir"),
            distributed=self.dist.enabled, threads=data.get("preprocess_threads"), progress=self.dist.is_main,
        )
        if cache != "none":
            log.info("data: %d cases preprocessed and checked, or found stored, in %.1f s (data.cache=%s)",
                     n_cases, time.perf_counter() - started, cache)
        log.info(
            "data: %s, %d training / %d validation cases, %s %s",
            root, len(self.datalist.train), len(self.datalist.val),
            "classes" if not restoration else f"restoration ({self.degradation}), channels", self.class_names,
        )

    def setup_model(self) -> None:
        """Resolve the model config against the data, build, convert, wrap."""
        cfg = self.cfg
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        n_out = len(self.class_names)  # segmentation: the classes; restoration: the input channels
        if model_cfg.get("out_channels") is None:
            model_cfg["out_channels"] = n_out
        elif model_cfg["out_channels"] != n_out:
            what = "classes" if self.degradation is None else "channels to restore"
            raise ValueError(
                f"model.out_channels={model_cfg['out_channels']} but the task has {n_out} {what} "
                f"{self.class_names}; leave model.out_channels=null"
            )
        if model_cfg.get("spacing") is None:
            model_cfg["spacing"] = [float(s) for s in self.datalist_spacing()]
        if is_auto(cfg.trainer.patch_size):  # the largest patch within trainer.memory_budget_gib
            model_cfg["patch_size"] = resolve_auto_patch_size(cfg, model_cfg, self.device, self.dist, self.datalist)
        self.model_config = resolve_model_config(model_cfg)
        with open_dict(cfg):  # the resolved config saved with the run holds what was derived
            cfg.model.out_channels = self.model_config["out_channels"]
            cfg.model.spacing = self.model_config["spacing"]
        model = build_model(self.model_config)
        # n_probes=auto: start at the largest candidate, then app.nn.ProbeAllocator picks per layer
        n_probes = cfg.sketch.n_probes
        if str(n_probes) != "auto" and (isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 0):
            raise ValueError(
                f"sketch.n_probes must be an integer >= 0 (0 = exact backprop) or auto, but got sketch.n_probes={n_probes!r}"
            )
        convert_kwargs, allocator_kwargs = split_sketch_config(OmegaConf.to_container(cfg.sketch, resolve=True))
        self.stochastic = int(convert_kwargs["n_probes"]) > 0
        if self.stochastic:
            app.nn.convert(model, **convert_kwargs)
            log.info("sketch: %d stochastic convolutions, %s", sum(1 for _ in app.nn.stochastic_layers(model)), convert_kwargs)
        else:
            log.info("sketch: exact backpropagation (sketch.n_probes=0)")
        if cfg.trainer.grad_checkpointing:
            log.info("gradient checkpointing of %d stages", enable_grad_checkpointing(model))
        model.to(self.device)
        self.n_parameters = sum(p.numel() for p in model.parameters())
        if self.dist.enabled:
            # find_unused_parameters: DynUNet always builds its deep-supervision heads.
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None, find_unused_parameters=True
            )
        self.compile_mode = str(cfg.trainer.get("compile", "off"))
        model = compile_model(model, self.compile_mode, self.device, str(cfg.trainer.get("compile_backend", "inductor")))
        self.captured: CapturedBackward | None = None
        if self.compile_mode == CUDA_GRAPHS:
            check_capturable(model, self.device, self.amp_dtype, self.dist.world_size)
            self.captured = CapturedBackward(self._scaled_batch_loss, list(model.parameters()))
            log.info("training step captured as a CUDA graph after %d eager steps (trainer.compile=%s)",
                     self.captured.warmup, CUDA_GRAPHS)
        elif self.compile_mode != "off":
            log.info("training model compiled: torch.compile mode=%s", self.compile_mode)
        self.model = model
        if self.degradation is None:
            self.loss_fn: nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)
        else:
            self.loss_fn = nn.L1Loss() if str(cfg.restoration.loss) == "l1" else nn.MSELoss()
        self.allocator = None
        if allocator_kwargs is not None and self.stochastic:
            self.allocator = app.nn.ProbeAllocator(_unwrap(model), self._batch_loss, **allocator_kwargs)

    def datalist_spacing(self) -> list[float]:
        """Voxel spacing the network sees: the preprocessing target, else the data's median."""
        if self.preprocessing.spacing is not None:
            return [float(s) for s in self.preprocessing.spacing]
        if self.datalist.median_spacing is None:  # only when load_datalist ran without validation
            raise ValueError("model.spacing is null and the data set's spacing is unknown; set data.preprocessing.spacing")
        return [float(s) for s in self.datalist.median_spacing]

    def setup_loaders(self) -> None:
        t, d = self.cfg.trainer, self.cfg.data
        self.num_workers = resolve_num_workers(t.num_workers, self.device.type)
        self.train_loader, self.val_loader = build_loaders(
            self.datalist,
            self.preprocessing,
            patch_size=list(t.patch_size),
            n_classes=self.n_classes,
            batch_size=int(t.batch_size),
            num_workers=self.num_workers,
            cache=d.cache,
            cache_dir=d.cache_dir,
            num_samples=int(d.num_samples),
            distributed=self.dist.enabled,
            seed=int(t.seed),
            prepared=self.prepared,
            oversample_foreground=float(d.get("oversample_foreground", 0.33)),
            augment_on=str(d.get("augment_on", "workers")),
            prefetch_factor=int(t.get("prefetch_factor") or 2),
            device_type=self.device.type,
            degradation=self.degradation,
        )
        self.device_augmentation = getattr(self.train_loader, "device_augmentation", None)
        log.info("data loader: %d worker processes (trainer.num_workers=%s), augmentation on the %s",
                 self.num_workers, t.num_workers, "device" if self.device_augmentation is not None else "workers")
        n_batches = len(self.train_loader)
        if n_batches == 0:
            raise TrainingError(
                f"no training batch: {len(self.datalist.train)} training cases, trainer.batch_size={t.batch_size}"
                + (f" over {self.dist.world_size} processes" if self.dist.enabled else "")
                + "; lower trainer.batch_size"
            )
        for key in ("grad_accum", "val_every"):
            if int(t[key]) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, but got trainer.{key}={t[key]}")
        accum = int(t.grad_accum)
        self.steps_per_epoch = int(t.steps_per_epoch) if t.steps_per_epoch else max(1, n_batches // accum)
        if t.max_steps:
            self.total_steps = int(t.max_steps)
            self.max_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        else:
            self.max_epochs = int(t.max_epochs)
            self.total_steps = self.max_epochs * self.steps_per_epoch
        if self.total_steps < 1:
            raise ValueError("trainer.max_epochs (or trainer.max_steps) must be >= 1")
        # one loader iterator streams the run, epoch after epoch (app.data.patches.EpochBatches)
        self.batch_stream: EpochBatches = self.train_loader.batch_sampler
        self.batch_stream.per_epoch, self.batch_stream.endless = self.steps_per_epoch * accum, True
        self._stream: Iterator[dict[str, torch.Tensor]] | None = None
        self._stream_at: tuple[int, int] = (-1, 0)  # (epoch, batches of it taken) of the next batch

    def setup_optim(self) -> None:
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = instantiate(o.optimizer, _convert_="all")(params)
        self.scheduler = instantiate(o.scheduler, _convert_="all")(self.optimizer, total_steps=self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.grad_clip = None if o.grad_clip is None else float(o.grad_clip)

    def maybe_resume(self) -> None:
        """``trainer.resume``: a path, or ``auto`` (the newest good checkpoint of this run folder), read by
        rank 0 and handed to every rank. A run may resume with another number of processes: it
        continues from the checkpoint's step, each rank with its own RNG state (fresh streams for a
        rank the checkpoint has none for)."""
        found = find_resume_on_rank0(self.cfg.trainer.resume, self.ckpt_dir, self.dist)
        if found is None:
            return
        path, ckpt = found
        missing = [k for k in ("optimizer", "scheduler", "epoch", "global_step", "rng") if k not in ckpt]
        if missing:
            raise TrainingError(f"{path}: not a training checkpoint (no {missing}); trainer.resume needs a last.pt or best.pt")
        if ckpt["model_config"] != self.model_config:
            diff = sorted(k for k in set(ckpt["model_config"]) | set(self.model_config)
                          if ckpt["model_config"].get(k) != self.model_config.get(k))
            raise TrainingError(f"{path}: its model differs from this run's in {diff}; resume with the same model/data settings")
        _unwrap(self.model).load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        best = ckpt.get("best_metric")
        self.progress = _Progress(
            epoch=int(ckpt["epoch"]),
            global_step=int(ckpt["global_step"]),
            best_metric=-math.inf if best is None else float(best),
            best_epoch=int(ckpt.get("best_epoch", -1)),
            history=list(ckpt.get("history", [])),
            bad_steps=int(ckpt.get("bad_steps", 0)),
        )
        allocation = ckpt.get("probe_allocation")
        if allocation:
            self._apply_allocation(allocation)
        partial = ckpt.get("partial_epoch")
        if partial:
            state = _EpochState(int(partial["epoch"]), int(partial["steps"]), [float(x) for x in partial["losses"]],
                                int(partial.get("bad_steps", 0)))
        rng = rank_rng(ckpt, self.dist.rank)  # None: this rank had no counterpart in the checkpoint's run
        if partial:
            self._resume_epoch = (state, rng)
        if rng is not None:
            set_rng_state(rng)
        self.last_checkpoint = (path, self.progress.global_step)
        was = int(ckpt.get("world_size", 1))
        if was != self.dist.world_size and self.dist.is_main:
            per_rank = int(self.cfg.trainer.batch_size) * int(self.cfg.trainer.grad_accum)
            log.warning("resuming a run of %d process(es) with %d: a step now averages %d patches instead of %d, "
                        "and the batches differ from an uninterrupted run's", was, self.dist.world_size,
                        self.dist.world_size * per_rank, was * per_rank)
        where = f"epoch {state.epoch + 1}, step {state.steps} of it" if partial else f"epoch {self.progress.epoch + 1} done"
        log.info("resumed from %s: %s, step %d", path, where, self.progress.global_step)

    def _apply_allocation(self, allocation: dict[str, int]) -> None:
        """Give each stochastic layer the probe count a checkpoint recorded (``sketch.n_probes=auto``)."""
        layers = dict(app.nn.stochastic_layers(_unwrap(self.model)))
        for name, n in allocation.items():
            if name in layers and hasattr(layers[name], "n_probes"):
                layers[name].n_probes = int(n)

    def _allocation(self) -> dict[str, int]:
        if self.allocator is None:
            return {}
        return {name: int(m.n_probes) for name, m in app.nn.stochastic_layers(_unwrap(self.model)) if hasattr(m, "n_probes")}

    # ----------------------------------------------------------------------------- loop

    def _batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The training batches of ``epoch``, from the run's loader iterator when it stands at the
        start of ``epoch`` (the previous epoch ran to its end), else from a new one begun there."""
        if self._stream is None or self._stream_at != (epoch, 0):
            self.batch_stream.set_epoch(epoch)
            self._stream = iter(self.train_loader)
            self._stream_at = (epoch, 0)
        augment = self.device_augmentation
        per_epoch = self.batch_stream.per_epoch
        while True:
            batch = next(self._stream)
            taken = self._stream_at[1] + 1
            self._stream_at = (epoch + 1, 0) if taken == per_epoch else (epoch, taken)
            if augment is not None:  # data.augment_on=device: augmented where the step runs
                image, label = augment.batch(*_to_device(batch, self.device), batch["seed"])
                batch = {"image": image, "label": label, "seed": batch["seed"]}
            yield batch

    def _batch_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``loss_fn(model, (image, label))`` as app.nn's fidelity tools call it (device tensors)."""
        image, label = batch
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = model(image)
        return self._loss(logits, label)

    def _reallocate_probes(self, batch: dict[str, torch.Tensor]) -> None:
        """``sketch.n_probes=auto``: let the allocator pick each layer's probes when it is due (on every
        rank, at the same steps); under DDP every rank then takes rank 0's choice."""
        allocation = self.allocator.maybe_reallocate(self.progress.global_step, _to_device(batch, self.device))
        if allocation is not None:
            if self.captured is not None:  # other probe counts: other sketch shapes, another graph
                self.captured.reset()
            if self.dist.enabled:
                allocation = self.allocator.allocation = broadcast_object(self.dist, allocation)
                self._apply_allocation(allocation)
            counts: dict[int, int] = {}
            for r in allocation.values():
                counts[r] = counts.get(r, 0) + 1
            log.info("step %d: probes per layer (n_probes: layers) %s", self.progress.global_step, dict(sorted(counts.items())))

    def _loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return deep_supervision_loss(self.loss_fn, logits, label)

    def _scaled_batch_loss(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the step's loss (what ``trainer.compile=cuda-graphs`` captures)."""
        return self._batch_loss(self.model, (image, label)) / int(self.cfg.trainer.grad_accum)

    def _next_batch(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        try:
            return next(batches)
        except (DataError, TrainingError):
            raise
        except Exception as exc:  # noqa: BLE001  MONAI and the DataLoader wrap the transforms' errors
            raise _loader_failure(exc, "training") from None

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch (or its rest, after a mid-epoch resume); its metrics.

        ``train/step_time_s`` is the wall time per optimizer step, data wait included;
        ``train/data_wait_s`` the part of it spent waiting for the loader, and
        ``train/data_wait_fraction`` that part's share of the epoch.
        """
        model, accum = self.model, int(self.cfg.trainer.grad_accum)
        model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batches = self._batches(epoch)
        state = _EpochState(epoch)
        if self._resume_epoch is not None and self._resume_epoch[0].epoch == epoch:
            state, rng = self._resume_epoch
            for _ in range(state.steps * accum):  # the loader's position in the epoch: redraw, drop
                self._next_batch(batches)
            restore_rank_rng(rng, int(self.cfg.trainer.seed), epoch, self.dist.rank, self.progress.global_step)
        self._resume_epoch = None
        n_steps = min(self.steps_per_epoch, state.steps + self.total_steps - self.progress.global_step)
        step_times: list[float] = []
        waits: list[float] = []
        every_log = int(self.cfg.logger.log_every)
        every_console = int(self.cfg.trainer.get("console_every") or 0)
        bar = tqdm(total=n_steps, initial=state.steps, desc=f"epoch {epoch + 1}/{self.max_epochs}", unit="step",
                   disable=not self.dist.is_main, leave=False, dynamic_ncols=True, file=sys.stderr)
        try:
            while state.steps < n_steps:
                t0 = time.perf_counter()
                micro = [self._next_batch(batches) for _ in range(accum)]
                t1 = time.perf_counter()
                try:
                    if self.allocator is not None:
                        self._reallocate_probes(micro[0])
                    loss, good = self._optimizer_step(micro)
                    self._previous_batch, self._last_batch = self._last_batch, micro[-1]
                except torch.OutOfMemoryError:
                    raise TrainingError(out_of_memory_message(self.cfg, "the training step")) from None
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t2 = time.perf_counter()
                if self._first_step_of_process:  # one-off set-up (allocator, autotuning, workers): not timed
                    self._first_step_of_process = False
                else:
                    step_times.append(t2 - t0)
                    waits.append(t1 - t0)
                self.progress.global_step += 1
                state.steps += 1
                step = self.progress.global_step
                if good:
                    state.losses.append(loss)
                    self._bad_in_row = 0
                else:
                    self._count_bad_step(state, loss)
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update()
                if self.tracker and step % every_log == 0:
                    self.tracker.log({"train/loss": loss, "train/lr": lr, "epoch": epoch + 1}, step)
                if self.dist.is_main and every_console and step % every_console == 0:
                    log.info("step %d/%d: loss %.4f, %.3f s/step (data wait %.3f s)", step, self.total_steps, loss,
                             t2 - t0, t1 - t0)
                if self.ddp_check_every and step % self.ddp_check_every == 0:
                    problem = check_replicas(self.dist, _unwrap(self.model), step,
                                             app.nn.probes.seed_state() if self.stochastic else None)
                    if problem is not None:
                        raise TrainingError(f"trainer.ddp_check_every: {problem}")
                if self._stop_agreed:
                    self._stop(state)
                if self._checkpoint_due(step):
                    self._save_last(state)
        finally:
            bar.close()
        timed = sum(step_times)
        metrics = {
            "train/epoch_loss": float(np.mean(state.losses)) if state.losses else math.nan,
            "train/step_time_s": timed / len(step_times) if step_times else math.nan,
            "train/data_wait_s": sum(waits) / len(waits) if waits else math.nan,
            "train/data_wait_fraction": sum(waits) / timed if timed > 0 else math.nan,
            "train/bad_steps": float(state.bad_steps),
            "train/lr": self.scheduler.get_last_lr()[0],
        }
        self._warn_data_wait(metrics["train/data_wait_fraction"])
        if self.device.type == "cuda":
            metrics["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _warn_data_wait(self, fraction: float) -> None:
        if self._warned_data_wait or not self.dist.is_main or not fraction > DATA_WAIT_WARN_FRACTION:
            return
        self._warned_data_wait = True
        t, d = self.cfg.trainer, self.cfg.data
        hint = f"raise trainer.num_workers (now {self.num_workers})"
        if str(d.cache) == "none":
            hint += " or keep the pre-processed volumes with data.cache=memory or disk (now none)"
        elif self.num_workers:
            hint += f" or trainer.prefetch_factor (now {t.get('prefetch_factor', 2)})"
        if self.device_augmentation is None and self.device.type == "cuda":
            hint += ", or augment on the GPU with data.augment_on=device (now workers)"
        log.warning("%.0f%% of this epoch's wall time waited for data: %s", 100 * fraction, hint)

    def _count_bad_step(self, state: _EpochState, loss: float) -> None:
        """A skipped step: count it, log it, stop after ``trainer.max_bad_steps`` in a row."""
        self._bad_in_row += 1
        state.bad_steps += 1
        self.progress.bad_steps += 1
        step = self.progress.global_step
        log.warning("step %d: non-finite loss or gradient (loss %s); optimizer step skipped (%d in a row, %d in all)",
                    step, loss, self._bad_in_row, self.progress.bad_steps)
        if self.max_bad_steps and self._bad_in_row >= self.max_bad_steps:
            if self.last_checkpoint is not None:
                good = f"the last good checkpoint is {self.last_checkpoint[0]} (step {self.last_checkpoint[1]})"
            else:
                good = "no checkpoint was written yet"
            raise TrainingError(
                f"{self._bad_in_row} optimizer steps in a row had a non-finite loss or gradient (steps "
                f"{step - self._bad_in_row + 1}..{step}, trainer.max_bad_steps={self.max_bad_steps}); {good}; "
                "lower optim.optimizer.lr, set optim.grad_clip, use trainer.amp=bf16 instead of fp16, or check the data"
            )

    def _checkpoint_due(self, step: int) -> bool:
        """Whether ``last.pt`` is written after this step; the same answer on every rank."""
        if self._bad_in_row:  # during a run of bad steps the last good one stays newest
            return False
        if self.every_steps and step % self.every_steps == 0:
            return True
        return self._time_due

    def _save_last(self, state: _EpochState | None) -> Path:
        """Write ``last.pt`` in the middle of an epoch: every rank hands in its RNG state, rank 0 writes."""
        started = time.perf_counter()
        rngs = gather_object(self.dist, rng_state())
        if not self.dist.is_main:
            path = self.ckpt_dir / LAST
            self.last_checkpoint = (path, self.progress.global_step)
            return path
        path = self.save(LAST, state, rng_by_rank=rngs)
        log.info("step %d: wrote %s (%.2f s)", self.progress.global_step, path, time.perf_counter() - started)
        return path

    def _stop(self, state: _EpochState | None) -> None:
        """Write ``last.pt`` (rank 0, with every rank's RNG state: a collective), raise :class:`Preempted`."""
        path = self._save_last(state)
        raise Preempted(signal.Signals(self._stop_signal or signal.SIGTERM).name, self.progress.global_step, path)

    def _agree(self, bad: bool) -> bool:
        """Whether this step is bad on any rank; also sets ``_stop_agreed`` when any rank got a signal,
        and ``_time_due`` when rank 0's ``trainer.checkpoint_every_minutes`` have passed."""
        stop = self._stop_signal is not None
        due = (self.dist.is_main and bool(self.every_seconds)
               and time.monotonic() - self._last_save_time >= self.every_seconds)
        if self.dist.enabled:
            flags = torch.tensor([float(bad), float(stop), float(due)], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            bad, stop, due = bool(flags[0] > 0), bool(flags[1] > 0), bool(flags[2] > 0)
            if stop and self._stop_signal is None:
                self._stop_signal = int(signal.SIGTERM)
        self._stop_agreed = stop
        self._time_due = due
        return bad

    def _optimizer_step(self, micro: list[dict[str, torch.Tensor]]) -> tuple[float, bool]:
        """Forward/backward over the micro-batches, then one optimizer and scheduler step.

        Returns:
            ``(loss, good)``: the mean loss, and False when the step was skipped because its loss
            or (outside fp16) its gradient was not finite. The scheduler steps either way, so the
            schedule stays aligned with the step count. Under fp16 the GradScaler skips the
            update of an overflowed gradient by itself and lowers its scale; that is not a bad step.
        """
        model, accum = self.model, len(micro)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro):
            image, label = _to_device(batch, self.device)
            if self.captured is not None:  # one process, no scaler (check_capturable)
                total += self.captured(image, label).float()
                continue
            ddp = uncompiled(model)
            sync = ddp.no_sync() if isinstance(ddp, DistributedDataParallel) and i < accum - 1 else nullcontext()
            if uses_cuda_graphs(self.compile_mode):
                torch.compiler.cudagraph_mark_step_begin()  # the previous micro-batch's graph outputs are done with
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = model(image)
                loss = self._loss(logits, label) / accum
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        value = float(total)
        bad = not math.isfinite(value)
        if not bad and not self.scaler.is_enabled():
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        bad = self._agree(bad)
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return value, False
        if self.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return value, True

    @property
    def score_key(self) -> str:
        """The validation metric that picks ``best.pt``: mean Dice, or PSNR for restoration."""
        return "val/mean_dice" if self.degradation is None else "val/psnr"

    def validate(self) -> tuple[dict[str, float], list[np.ndarray], list[np.ndarray]]:
        """Per-class and mean Dice (restoration: PSNR and SSIM, of the prediction and of the degraded
        input) over the validation volumes (of every rank, under DDP); overlays and clips to log."""
        t, w = self.cfg.trainer, self.cfg.logger.wandb
        logging_media = bool(self.tracker and self.tracker.active)
        n_images = int(w.n_images) if logging_media and self.degradation is None else 0
        n_clips = int(w.get("n_clips", 1)) if logging_media and self.val_fps > 0 else 0
        window = dict(roi_size=list(t.patch_size), device=self.device, amp_dtype=self.amp_dtype,
                      sw_batch_size=int(t.sw_batch_size), overlap=float(t.sw_overlap), n_clips=n_clips,
                      clip_frames=int(w.get("clip_frames", 32)))
        images: list[np.ndarray] = []
        try:
            if self.degradation is None:
                per_case, images, clips = validate(_unwrap(self.model), _checked(self.val_loader, "validation"),
                                                   n_classes=self.n_classes, n_images=n_images, **window)
            else:
                per_case, clips = validate_restoration(_unwrap(self.model), _checked(self.val_loader, "validation"), **window)
        except torch.OutOfMemoryError:
            raise TrainingError(out_of_memory_message(self.cfg, "validation")) from None
        if self.dist.enabled:  # the validation volumes are sharded over the ranks
            gathered: list[Any] = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, per_case)
            per_case = [row for rows in gathered for row in rows]
        if self.degradation is not None:
            means = np.mean(np.asarray(per_case, dtype=np.float64), axis=0)
            names = ("val/psnr", "val/ssim", "val/input_psnr", "val/input_ssim")
            return {name: float(v) for name, v in zip(names, means)}, images, clips
        dice = class_dice(per_case)
        metrics = {f"val/dice/{name}": d for name, d in zip(self.class_names[1:], dice)}
        metrics["val/mean_dice"] = mean_dice(dice)
        return metrics, images, clips

    def fidelity(self) -> dict[str, float]:
        """``app.nn.gradient_fidelity`` of the current state on the last training batch, against the
        SGD noise of the one before (``fidelity/...`` figures: cosine and relative error per layer
        and for the network)."""
        if not self.stochastic or self._previous_batch is None:
            return {}
        report = app.nn.gradient_fidelity(
            _unwrap(self.model), self._batch_loss, _to_device(self._last_batch, self.device),
            reference_batch=_to_device(self._previous_batch, self.device), n_draws=int(self.cfg.logger.fidelity_draws),
        )
        return app.nn.fidelity_figures(report)

    def save(self, name: str, partial: _EpochState | None = None, rng_by_rank: list[dict[str, Any]] | None = None) -> Path:
        """Write ``<output_dir>/checkpoints/<name>`` (rank 0) with the full training state.

        Args:
            name: ``last.pt`` or ``best.pt``.
            partial: the epoch in progress, for a checkpoint taken inside it (None at an epoch's end).
            rng_by_rank: every rank's RNG state, in rank order (a checkpoint taken inside an epoch
                under DDP); None: this process's (an epoch's end reseeds every stream anyway).
        """
        p = self.progress
        extra = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": p.epoch,
            "global_step": p.global_step,
            "partial_epoch": None if partial is None else partial.to_dict(),
            "best_metric": None if p.best_metric == -math.inf else p.best_metric,
            "best_epoch": p.best_epoch,
            "bad_steps": p.bad_steps,
            "history": p.history,
            "probe_allocation": self._allocation(),
            **({"rng_by_rank": rng_by_rank} if rng_by_rank and len(rng_by_rank) > 1 else {}),
            "rng": rng_by_rank[0] if rng_by_rank else rng_state(),
            "world_size": self.dist.world_size,
            "task": self.task,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }
        path = self.store.write(name, lambda target: save_checkpoint(
            target,
            model_state=_unwrap(self.model).state_dict(),
            model_config=self.model_config,
            preprocessing=self.preprocessing.to_dict(),
            class_names=self.class_names,
            extra=extra,
        ))
        if name == LAST:
            self.last_checkpoint = (path, p.global_step)
            self._last_save_time = time.monotonic()
        return path

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT set a flag checked after every step (a second SIGINT interrupts at once)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("%s: stopping after the current step, with a checkpoint (SIGINT again: stop at once)",
                        signal.Signals(signum).name)

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def fit(self) -> dict[str, float]:
        """Set up, train, validate, checkpoint; return the last epoch's metrics and the best Dice."""
        cfg, seed = self.cfg, int(self.cfg.trainer.seed)
        seed_everything(seed + self.dist.rank, deterministic=bool(cfg.trainer.deterministic))
        self.setup_data()
        self.setup_model()
        self.setup_loaders()
        self.setup_optim()
        self.maybe_resume()
        if self.dist.is_main:
            for stale in self.store.clean_temporaries():
                log.info("removed %s, left by an interrupted checkpoint write", stale)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, self.output_dir / "config_resolved.yaml", resolve=True)
            self.tracker = Tracker(cfg, self.output_dir)
        log.info(
            "training %s (%.2fM parameters) on %s%s: %d epochs x %d steps, patch %s, batch %d x %d, amp %s",
            self.model_config["name"], self.n_parameters / 1e6, self.device,
            f" x {self.dist.world_size} processes" if self.dist.enabled else "",
            self.max_epochs, self.steps_per_epoch, list(cfg.trainer.patch_size), cfg.trainer.batch_size,
            cfg.trainer.grad_accum, cfg.trainer.amp,
        )
        metrics: dict[str, float] = {}
        start = self.progress.epoch + 1
        self._last_save_time = time.monotonic()
        handlers = self._install_signal_handlers()
        try:
            for epoch in range(start, self.max_epochs):
                if self.progress.global_step >= self.total_steps:
                    break
                seed_epoch(seed, epoch, self.dist.rank, self.train_loader)
                metrics = {"epoch": float(epoch + 1), **self.train_epoch(epoch)}
                last = epoch == self.max_epochs - 1 or self.progress.global_step >= self.total_steps
                images: list[np.ndarray] = []
                clips: list[np.ndarray] = []
                improved = False
                if (epoch + 1) % int(cfg.trainer.val_every) == 0 or last:
                    val, images, clips = self.validate()  # every rank: each scores its shard of the volumes
                    metrics.update(val)
                    score = val[self.score_key]
                    improved = not math.isnan(score) and score > self.progress.best_metric
                    if improved:
                        self.progress.best_metric, self.progress.best_epoch = score, epoch
                if self.progress.best_metric > -math.inf:
                    metrics[self.score_key.replace("val/", "val/best_")] = self.progress.best_metric
                self.progress.epoch = epoch
                self.progress.history.append(metrics)
                if self.dist.is_main:
                    every = int(cfg.logger.fidelity_every)
                    if every > 0 and ((epoch + 1) % every == 0 or last):
                        metrics.update(self.fidelity())
                    if improved:
                        self.save(BEST)
                    if not self._bad_in_row:
                        self.save(LAST)
                    self.tracker.log(metrics, self.progress.global_step, images=images, clips=clips,
                                     fps=self.val_fps or 8.0)
                    log.info(_summary(metrics, self.max_epochs))
                elif not self._bad_in_row:  # rank 0 wrote it: the same name in every rank's messages
                    self.last_checkpoint = (self.ckpt_dir / LAST, self.progress.global_step)
                barrier(self.dist)
                self._agree(False)
                if self._stop_agreed:  # a signal during validation: the epoch's checkpoint is written
                    raise Preempted(signal.Signals(self._stop_signal or signal.SIGTERM).name, self.progress.global_step,
                                    self.last_checkpoint[0] if self.last_checkpoint else None)
        finally:
            for signum, previous in handlers.items():
                signal.signal(signum, previous)
            shutdown_workers(self.train_loader, self.val_loader)  # they ignore SIGTERM: stopped here, not at exit
            if self.tracker is not None:
                self.tracker.finish()
        metrics["global_step"] = float(self.progress.global_step)
        return metrics


def _summary(metrics: dict[str, float], max_epochs: int) -> str:
    parts = [f"epoch {int(metrics['epoch'])}/{max_epochs}", f"loss {metrics['train/epoch_loss']:.4f}",
             f"{metrics['train/step_time_s']:.3f} s/step ({100 * metrics['train/data_wait_fraction']:.0f}% data wait)"]
    if metrics.get("train/bad_steps"):
        parts.append(f"{int(metrics['train/bad_steps'])} steps skipped (non-finite)")
    if "train/peak_memory_gb" in metrics:
        parts.append(f"peak {metrics['train/peak_memory_gb']:.2f} GiB")
    if "val/mean_dice" in metrics:
        parts.append(f"val mean Dice {metrics['val/mean_dice']:.4f} (best {metrics.get('val/best_mean_dice', math.nan):.4f})")
    if "val/psnr" in metrics:
        parts.append(f"val PSNR {metrics['val/psnr']:.2f} dB (best {metrics.get('val/best_psnr', math.nan):.2f}, "
                     f"degraded input {metrics['val/input_psnr']:.2f}), SSIM {metrics['val/ssim']:.4f} "
                     f"(input {metrics['val/input_ssim']:.4f})")
    return ", ".join(parts)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train a segmentation (or, ``task=restoration``, restoration) network as configured; return the last epoch's metrics.

    Args:
        cfg: the composed ``conf/train.yaml`` (see ``python -m app.train --help``). Values derived
            from the data (``model.out_channels``, ``model.spacing``) are written back into it.

    Returns:
        ``{"epoch", "global_step", "train/epoch_loss", "train/step_time_s", "train/lr",
        "val/mean_dice", "val/dice/<class>", "val/best_mean_dice", ...}`` of the last epoch
        (validation keys when that epoch validated; ``train/peak_memory_gb`` on CUDA); for
        restoration ``"val/psnr", "val/ssim", "val/input_psnr", "val/input_ssim", "val/best_psnr"``
        instead of the Dice keys.

    Raises:
        app.data.DataError: bad data, before training starts (one line naming the file).
        TrainingError: the run cannot go on (CUDA out of memory, no batch, bad resume file,
            ``trainer.max_bad_steps`` non-finite steps in a row).
        Preempted: SIGTERM or SIGINT; the checkpoint written on the way out is named.
        ValueError: inconsistent settings (the message names the key).
    """
    dist_info = init_distributed(cfg.trainer.device)
    try:
        return Trainer(cfg, dist_info).fit()
    finally:
        cleanup(dist_info)
