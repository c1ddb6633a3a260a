"""The one exception type of the data package."""

from __future__ import annotations

from os import PathLike

__all__ = ["DataError", "data_error"]


class DataError(ValueError):
    """Bad input data: a missing, corrupt or inconsistent file or folder.

    The message is one line that starts with the offending path, then says what is
    wrong and, where it helps, how to fix it, e.g.
    ``"/x/labelsTr/case_003.nii.gz: label shape (64, 64, 40) does not match image shape (64, 64, 41)"``.
    """


def data_error(path: str | PathLike[str], problem: str) -> DataError:
    """Builds a :class:`DataError` whose message is ``"<path>: <problem>"`` on one line.

    Args:
        path: the file or folder at fault.
        problem: what is wrong with it; newlines are folded into spaces.

    Returns:
        The exception, for the caller to ``raise``.
    """
    return DataError(f"{path}: {' '.join(str(problem).split())}")
