"""Stochastic-backprop layers and their probes. Imports nothing else of ``app``.

Functional ops live in :mod:`app.nn.functional` (with the defaults :data:`DEFAULT_SKETCH` and
:data:`DEFAULT_N_PROBES`); modules, :func:`convert` and :func:`exact` here.
"""

from . import functional
from .convert import convert, exact, stochastic_layers
from .fidelity import (
    FidelityReport,
    ProbeAllocator,
    allocate_probes,
    compare_estimators,
    fidelity_figures,
    gradient_fidelity,
)
from .functional import (
    CONV_BLOCK,
    DEFAULT_N_PROBES,
    DEFAULT_SKETCH,
    SKETCHES,
    resolve_sketch,
    stochastic_conv1d,
    stochastic_conv2d,
    stochastic_conv3d,
    stochastic_conv_transpose1d,
    stochastic_conv_transpose2d,
    stochastic_conv_transpose3d,
)
from .lean import (
    LeanBatchNorm1d,
    LeanBatchNorm2d,
    LeanBatchNorm3d,
    LeanGELU,
    LeanGroupNorm,
    LeanInstanceNorm1d,
    LeanInstanceNorm2d,
    LeanInstanceNorm3d,
    LeanLeakyReLU,
    LeanPReLU,
    LeanReLU,
    lean_gelu,
    lean_group_norm,
    lean_leaky_relu,
    lean_prelu,
)
from .memory import PeakMemory, SavedTensorCounter
from .modules import (
    StochasticConv1d,
    StochasticConv2d,
    StochasticConv3d,
    StochasticConvMixin,
    StochasticConvTranspose1d,
    StochasticConvTranspose2d,
    StochasticConvTranspose3d,
)
from .probes import PROBE_FAMILIES, manual_seed
from .storage import StorageError, storage_errors

__all__ = [
    "functional",
    "convert",
    "exact",
    "stochastic_layers",
    "gradient_fidelity",
    "compare_estimators",
    "allocate_probes",
    "ProbeAllocator",
    "FidelityReport",
    "fidelity_figures",
    "manual_seed",
    "DEFAULT_N_PROBES",
    "DEFAULT_SKETCH",
    "CONV_BLOCK",
    "SKETCHES",
    "resolve_sketch",
    "PROBE_FAMILIES",
    "SavedTensorCounter",
    "PeakMemory",
    "StorageError",
    "storage_errors",
    "LeanBatchNorm1d",
    "LeanBatchNorm2d",
    "LeanBatchNorm3d",
    "LeanGELU",
    "LeanGroupNorm",
    "LeanInstanceNorm1d",
    "LeanInstanceNorm2d",
    "LeanInstanceNorm3d",
    "LeanLeakyReLU",
    "LeanPReLU",
    "LeanReLU",
    "lean_gelu",
    "lean_group_norm",
    "lean_leaky_relu",
    "lean_prelu",
    "StochasticConvMixin",
    "StochasticConv1d",
    "StochasticConv2d",
    "StochasticConv3d",
    "StochasticConvTranspose1d",
    "StochasticConvTranspose2d",
    "StochasticConvTranspose3d",
    "stochastic_conv1d",
    "stochastic_conv2d",
    "stochastic_conv3d",
    "stochastic_conv_transpose1d",
    "stochastic_conv_transpose2d",
    "stochastic_conv_transpose3d",
]
