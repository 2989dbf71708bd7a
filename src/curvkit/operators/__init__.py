"""Linear operators in the coordinates of the flattened parameters."""

from .base import DenseOperator, LinearOperator

__all__ = ["DenseOperator", "LinearOperator"]
