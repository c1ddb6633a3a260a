"""Small helpers every layer above :mod:`app.nn` shares: device and autocast resolution, atomic
file writes, ``KEY=VALUE`` command-line options, work staggered over ``torch.distributed``
processes. Imports nothing else of ``app``."""

from app.utils.cli import dataclass_from_mapping, parse_key_values
from app.utils.files import atomic_path
from app.utils.ranks import staggered
from app.utils.runtime import AMP_DTYPES, amp_dtype, resolve_amp, resolve_device

__all__ = ["AMP_DTYPES", "amp_dtype", "dataclass_from_mapping", "atomic_path", "parse_key_values", "resolve_amp", "resolve_device", "staggered"]
