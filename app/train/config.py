"""Where the Hydra configs of the training app live.

From an installed wheel they are the package ``app.conf`` (pyproject maps the repository's
``conf/`` there); from a source checkout they are ``<repo>/conf``. Hydra gets the absolute
folder, so the app runs from any working directory.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_NAME", "config_dir"]

CONFIG_NAME = "train"


def config_dir() -> Path:
    """The absolute folder holding ``train.yaml`` and the config groups.

    Raises:
        FileNotFoundError: neither ``app/conf`` (installed) nor ``<repo>/conf`` (checkout)
            holds ``train.yaml``.
    """
    package = Path(__file__).resolve().parents[1]  # the installed app/ (or the checkout's)
    candidates = [package / "conf", package.parent / "conf"]
    for folder in candidates:
        if (folder / f"{CONFIG_NAME}.yaml").is_file():
            return folder
    raise FileNotFoundError(
        f"{CONFIG_NAME}.yaml not found in {' or '.join(str(c) for c in candidates)}; reinstall stochprop"
    )
