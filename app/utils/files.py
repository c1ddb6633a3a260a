"""Atomic file writes: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path"]


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside ``path``; when the block succeeds the file written there is
    flushed to disk and renamed onto ``path`` (``os.replace``, atomic on POSIX and Windows).

    An exception (or a kill) inside the block never leaves a half-written file under ``path``:
    the previous file, if any, stays, and the temporary file is removed. Concurrent writers of the
    same content (DDP ranks) each write their own temporary file. The file gets the permissions
    of any new file (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``; its hidden
    temporary name starts with a dot.

    Args:
        path: the destination; its folder is created if missing.
        suffix: the temporary file's suffix. Writers that choose the format from the name
            (nibabel: ``.nii.gz``) need the destination's own suffix.

    Example:
        >>> with atomic_path(out / "summary.json") as tmp:
        ...     tmp.write_text(json.dumps(summary))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
