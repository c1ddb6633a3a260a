"""Weights & Biases logging of a training run (rank 0 only), closed by :meth:`Tracker.finish`."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from app.data.video import write_video

__all__ = ["Tracker", "WANDB_MODES"]

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


class Tracker:
    """A W&B run under ``<output_dir>/wandb`` (``mode=disabled``: nothing is written).

    Offline runs land in ``<output_dir>/wandb/offline-run-*``; ``wandb sync <that folder>``
    uploads them later.

    Args:
        cfg: the run's config (``cfg.logger.wandb`` settings; the whole config, resolved, is
            stored as the W&B run config).
        output_dir: the run folder.
    """

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        w = cfg.logger.wandb
        mode = str(w.mode)
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb.mode must be one of {list(WANDB_MODES)}, but got logger.wandb.mode={mode!r}")
        self.active = mode != "disabled"
        self.run = None
        self.clip_dir = output_dir / "val_clips"
        if not self.active:
            return
        import wandb  # only runs that log pay for the import

        self._wandb = wandb
        self.run = wandb.init(
            mode=mode,
            dir=str(output_dir),
            project=str(w.project),
            name=str(w.name) if w.name else output_dir.name,
            group=w.group,
            tags=list(w.tags or []),
            config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(console="off", x_disable_stats=True, init_timeout=float(w.init_timeout)),
        )
        log.info("W&B %s run in %s", mode, self.run.dir)

    def log(
        self,
        metrics: dict[str, float],
        step: int,
        images: list[np.ndarray] | None = None,
        clips: list[np.ndarray] | None = None,
        fps: float = 8.0,
    ) -> None:
        """Log scalars (NaN skipped) at ``step``, validation overlays as ``val/overlay`` and
        validation clips as ``val/clip``.

        Args:
            metrics: scalars.
            step: the optimizer step.
            images: ``(H, W, 3)`` uint8 overlays.
            clips: ``(T, H, W, 3)`` uint8 clips (input | prediction | target side by side); each is
                also kept as ``<output_dir>/val_clips/step_<step>_case<i>.mp4`` (H.264, plays in browsers).
            fps: frame rate of the clips.
        """
        if self.run is None:
            return
        data: dict[str, Any] = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
        if images:
            data["val/overlay"] = [
                self._wandb.Image(img, caption=f"validation case {i}: image | label | prediction")
                for i, img in enumerate(images)
            ]
        if clips:
            videos = []
            for i, clip in enumerate(clips):
                path = write_video(self.clip_dir / f"step_{step:07d}_case{i}.mp4", np.moveaxis(clip, -1, 0), fps=fps,
                                   lossless=False)
                videos.append(self._wandb.Video(str(path), caption=f"validation clip {i}: input | prediction | target"))
            data["val/clip"] = videos
        self.run.log(data, step=step)

    def finish(self) -> None:
        """Close the run (flushes offline files); safe to call more than once."""
        if self.run is not None:
            self.run.finish()
            self.run = None
