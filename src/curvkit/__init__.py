"""curvkit: exact and structured curvature of any PyTorch model's loss.

>>> import torch, curvkit as ck
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
>>> x, y = torch.randn(4, 2), torch.randn(4, 1)
>>> H = ck.hessian(model, torch.nn.MSELoss(), (x, y))     # (13, 13)
"""

from .api import ef, fisher, ggn, hessian
from .curvature import CurvatureOperator
from .errors import (
    CurvkitError,
    CurvkitMemoryError,
    CurvkitTypeError,
    CurvkitValueError,
    CurvkitWarning,
)
from .operators import DenseOperator, LinearOperator
from .operators.lowrank import LowRankOperator
from .operators.structured import BlockDiagonalOperator
from .params import parameter_slices
from .spectral import (
    estimate_diagonal,
    estimate_trace,
    plot_spectral_density,
    spectral_density,
    top_eigenvalues,
)

__version__ = "0.1.0"

__all__ = [
    "BlockDiagonalOperator",
    "CurvatureOperator",
    "CurvkitError",
    "CurvkitMemoryError",
    "CurvkitTypeError",
    "CurvkitValueError",
    "CurvkitWarning",
    "DenseOperator",
    "LinearOperator",
    "LowRankOperator",
    "ef",
    "estimate_diagonal",
    "estimate_trace",
    "fisher",
    "ggn",
    "hessian",
    "parameter_slices",
    "plot_spectral_density",
    "spectral_density",
    "top_eigenvalues",
]
