"""Where a run keeps its checkpoints, and how a resume finds the newest good one.

``<output_dir>/checkpoints`` holds ``last.pt`` (the newest training state: written every
``trainer.checkpoint_every_steps`` steps or ``trainer.checkpoint_every_minutes`` minutes, at the
end of every epoch and when the run is stopped by a signal), ``previous.pt`` (the ``last.pt``
before it) and ``best.pt`` (the best validation Dice). Every file is written atomically
(:func:`app.utils.atomic_path`): a kill at any moment leaves each name holding either its old
complete content or the new one, never a part. Before ``last.pt`` is replaced, its current
content is kept as ``previous.pt`` (a hard link, or a copy where links are not supported), so
that a ``last.pt`` damaged later on disk still leaves one good state to go back to.

A checkpoint is checked when it is loaded (:func:`app.models.load_checkpoint`: torch's own errors
and the stored sha256 of its data); a resume that finds ``last.pt`` damaged takes the newest good
one of the others and says so.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.models import CheckpointError, load_checkpoint
from app.train.distributed import DistInfo, broadcast_object
from app.utils import atomic_path

__all__ = ["BEST", "LAST", "PREVIOUS", "CheckpointStore", "find_resume", "find_resume_on_rank0"]

log = logging.getLogger(__name__)

LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"
_NAMES = (LAST, PREVIOUS, BEST)
AUTO = "auto"


class CheckpointStore:
    """The checkpoint folder of one run (rank 0 writes it).

    Args:
        folder: ``<output_dir>/checkpoints``.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def write(self, name: str, save: Callable[[Path], None]) -> Path:
        """Write ``<folder>/<name>`` with ``save(path)``; a replaced ``last.pt`` is kept as ``previous.pt``.

        Args:
            name: ``last.pt`` or ``best.pt``.
            save: writes the checkpoint to the path it is given, atomically
                (:func:`app.models.save_checkpoint` does).

        Returns:
            The path written.
        """
        path = self.folder / name
        if name == LAST and path.is_file():
            with atomic_path(self.folder / PREVIOUS) as tmp:
                tmp.unlink()
                try:
                    os.link(path, tmp)
                except OSError:  # file systems without hard links
                    shutil.copyfile(path, tmp)
        save(path)
        return path

    def clean_temporaries(self) -> list[Path]:
        """Remove the hidden temporary files that a killed write left behind; returns them."""
        if not self.folder.is_dir():
            return []
        stale = [p for name in _NAMES for p in self.folder.glob(f".{name}.*")]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale


def _try_load(path: Path) -> tuple[dict[str, Any] | None, str]:
    """``(checkpoint, "")`` or ``(None, reason)``."""
    try:
        return load_checkpoint(path, map_location="cpu"), ""
    except CheckpointError as exc:
        return None, str(exc)


def _newest_good(paths: list[Path]) -> tuple[Path, dict[str, Any]] | None:
    """The loadable checkpoint with the most optimizer steps among ``paths`` (the first on ties)."""
    best: tuple[Path, dict[str, Any]] | None = None
    for p in paths:
        if not p.is_file():
            continue
        ckpt, reason = _try_load(p)
        if ckpt is None:
            log.warning("%s", reason)
            continue
        if best is None or int(ckpt.get("global_step", -1)) > int(best[1].get("global_step", -1)):
            best = (p, ckpt)
    return best


def find_resume(setting: Any, folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a run resumes from, loaded, or None to start afresh.

    Args:
        setting: ``trainer.resume``: null (start afresh), ``auto`` (the newest good checkpoint in
            ``folder``; none there: start afresh) or a checkpoint path. A path that cannot be
            loaded falls back to the newest good ``last.pt`` / ``previous.pt`` / ``best.pt``
            beside it, with a warning naming both files.
        folder: this run's checkpoint folder.

    Raises:
        CheckpointError: checkpoints exist but none of them loads (one line per the first
            failure), or the given path is missing with nothing to fall back to.
    """
    if setting is None or setting is False or str(setting).strip() in ("", "null", "None"):
        return None
    if str(setting) == AUTO:
        present = [folder / n for n in _NAMES if (folder / n).is_file()]
        if not present:
            log.info("trainer.resume=auto: no checkpoint in %s, starting a new run", folder)
            return None
        first, reason = _try_load(present[0])
        if first is not None and present[0].name == LAST:
            return present[0], first
        found = _newest_good(present)
        if found is None:
            raise CheckpointError(f"{folder}: no checkpoint there loads ({reason or 'see the warnings above'})")
        if reason:
            log.warning("%s; resuming from %s (step %d) instead", reason, found[0], int(found[1].get("global_step", 0)))
        return found
    path = Path(str(setting)).expanduser()
    ckpt, reason = _try_load(path)
    if ckpt is not None:
        return path, ckpt
    others = [path.parent / n for n in _NAMES if (path.parent / n) != path]
    found = _newest_good(others)
    if found is None:
        raise CheckpointError(reason)
    log.warning("%s; resuming from %s (step %d) instead", reason, found[0], int(found[1].get("global_step", 0)))
    return found


def find_resume_on_rank0(setting: Any, folder: Path, info: DistInfo) -> tuple[Path, dict[str, Any]] | None:
    """:func:`find_resume` run by rank 0 alone, its answer (or its error) given to every rank.

    The other ranks never read ``folder``: on several machines it need not exist on theirs, and
    every rank must resume from the same state.

    Raises:
        CheckpointError: on every rank, when rank 0's :func:`find_resume` raised it.
    """
    found, error = None, None
    if info.is_main:
        try:
            found = find_resume(setting, folder)
        except CheckpointError as exc:
            error = str(exc)
    found, error = broadcast_object(info, (found, error))
    if error is not None:
        raise CheckpointError(error)
    return found
