"""U diag(λ) Uᵀ + δ I with orthonormal U (P, k): the top-k eigenpairs of a curvature, plus an
optional isotropic shift (damping / prior). Algebra in closed form (Woodbury)."""

from __future__ import annotations

import math

import torch

from ..errors import CurvkitValueError
from .base import LinearOperator, check_positive_definite


class LowRankOperator(LinearOperator):
    def __init__(self, U: torch.Tensor, lam: torch.Tensor, shift: float = 0.0):
        self.U, self.lam, self.shift = U, lam, float(shift)
        P = U.shape[0]
        self.shape, self.dtype, self.device = (P, P), U.dtype, U.device

    def _matmat(self, V):
        return self.U @ (self.lam[:, None] * (self.U.T @ V)) + self.shift * V

    def diagonal(self):
        return (self.U.square() * self.lam).sum(1) + self.shift

    def to_dense(self):
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return (self.U * self.lam) @ self.U.T + self.shift * eye

    def trace(self):
        return self.lam.sum() + self.shift * self.shape[0]

    def eigenvalues(self) -> torch.Tensor:
        rest = torch.full(
            (self.shape[0] - self.lam.numel(),), self.shift, dtype=self.dtype, device=self.device
        )
        return torch.cat([self.lam + self.shift, rest]).sort(descending=True).values

    def top_eigenpairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored eigenpairs (k ≤ rank), shifted; descending."""
        if k > self.lam.numel():
            raise CurvkitValueError(
                f"this low-rank operator holds {self.lam.numel()} eigenpairs; asked for {k}. "
                "Build it with a larger rank=."
            )
        order = self.lam.argsort(descending=True)[:k]
        return self.lam[order] + self.shift, self.U[:, order]

    def add_identity(self, delta: float) -> LowRankOperator:
        return LowRankOperator(self.U, self.lam, self.shift + float(delta))

    def _check_invertible(self, what: str):
        """Off its top-k subspace the operator is shift·I, so the shift counts as an eigenvalue
        (the closed forms divide by it): undamped (shift 0), the operator is singular."""
        check_positive_definite(
            torch.cat([self.lam + self.shift, self.lam.new_full((1,), self.shift)]), what
        )

    def logdet(self):
        self._check_invertible("logdet")
        P, k = self.shape[0], self.lam.numel()
        return (self.lam + self.shift).log().sum() + (P - k) * math.log(self.shift)

    def _power(self, p: float, V: torch.Tensor) -> torch.Tensor:
        self._check_invertible("solve / sample")
        s = self.shift**p
        coef = (self.lam + self.shift).pow(p) - s
        return self.U @ (coef[:, None] * (self.U.T @ V)) + s * V

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        B = b[:, None] if b.dim() == 1 else b
        X = self._power(-1.0, B.to(self.dtype))
        return X[:, 0] if b.dim() == 1 else X

    def inverse(self) -> LowRankOperator:
        self._check_invertible("inverse")
        s = 1.0 / self.shift
        return LowRankOperator(self.U, 1.0 / (self.lam + self.shift) - s, s)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, P) samples of N(0, A⁻¹)."""
        Z = torch.randn(self.shape[0], n, generator=generator, dtype=self.dtype, device=self.device)
        return self._power(-0.5, Z).T
