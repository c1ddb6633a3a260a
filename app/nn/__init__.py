"""Stochastic-backprop layers and their probes. Imports nothing else of ``app``.

Functional ops live in :mod:`app.nn.functional`; modules, :func:`convert` and :func:`exact` here.
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
from .memory import SavedTensorCounter
from .modules import (
    DEFAULT_N_PROBES,
    StochasticConv1d,
    StochasticConv2d,
    StochasticConv3d,
    StochasticConvMixin,
    StochasticConvTranspose1d,
    StochasticConvTranspose2d,
    StochasticConvTranspose3d,
)
from .probes import PROBE_FAMILIES, manual_seed

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
    "PROBE_FAMILIES",
    "SavedTensorCounter",
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
