"""U diag(λ) Uᵀ + δ I with orthonormal U (P, k): the top-k eigenpairs of a curvature, plus an
optional isotropic shift (damping / prior). Algebra in closed form (Woodbury)."""

from __future__ import annotations

import math

import torch

from ..errors import CurvkitValueError, check_count, check_generator
from .base import LinearOperator, check_damping, check_positive_definite


class LowRankOperator(LinearOperator):
    has_spectrum = True

    def __init__(self, U: torch.Tensor, lam: torch.Tensor, shift: float = 0.0):
        self.U, self.lam = U, lam
        if isinstance(shift, torch.Tensor) and shift.dim() != 0:
            raise CurvkitValueError(
                f"LowRankOperator's shift is one number, the same on every coordinate (damping "
                f"or an isotropic prior precision), got a tensor of shape {tuple(shift.shape)}. "
                "A per-coordinate shift does not keep the structure."
            )
        # a 0-d tensor that requires grad stays one (see check_damping)
        keep = isinstance(shift, torch.Tensor) and shift.requires_grad
        self.shift = shift if keep else float(shift)
        P = U.shape[0]
        self.shape, self.dtype, self.device = (P, P), U.dtype, U.device

    def _matmat(self, V):
        return self.U @ (self.lam[:, None] * (self.U.T @ V)) + self.shift * V

    def diagonal(self):
        return (self.U.square() * self.lam).sum(1) + self.shift

    def _scaled(self, alpha: float) -> LowRankOperator:
        return LowRankOperator(self.U, alpha * self.lam, alpha * self.shift)

    def to_dense(self):
        self._check_dense()
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return (self.U * self.lam) @ self.U.T + self.shift * eye

    def trace(self):
        return self.lam.sum() + self.shift * self.shape[0]

    @property
    def _full(self) -> bool:
        """The stored pairs span every coordinate (rank ≥ P): no shift·I complement."""
        return self.lam.numel() == self.shape[0]

    def eigenvalues(self) -> torch.Tensor:
        rest = self.lam.new_ones(self.shape[0] - self.lam.numel()) * self.shift
        return torch.cat([self.lam + self.shift, rest]).sort(descending=True).values

    def top_eigenpairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The min(k, P) largest eigenvalues of the operator, descending, and eigenvectors.

        Off the stored pairs' span the operator is shift·I, so that eigenvalue (the shift, with
        multiplicity P − rank) outranks the stored values below it: an inverse's top pairs lie
        there, and so do an undamped Hessian's once its stored values turn negative. Its
        eigenvectors are an orthonormal basis of span(U)'s complement (fixed-seed random
        vectors projected out of U twice, then QR: deterministic and full rank)."""
        check_count("top_eigenpairs(k)", k, "how many eigenpairs", "e.g. op.top_eigenpairs(10).")
        P, r = self.shape[0], self.lam.numel()
        k = min(k, P)
        order = self.lam.argsort(descending=True)
        stored, U = self.lam[order] + self.shift, self.U[:, order]
        above = int((stored >= self.shift).sum())
        n_top = min(k, above)  # stored values >= the shift, then the complement, then the rest
        n_rest = min(k - n_top, P - r)
        n_low = k - n_top - n_rest
        vals = [stored[:n_top], stored.new_ones(n_rest) * self.shift]
        vecs = [U[:, :n_top], self._complement(n_rest)]
        vals.append(stored[above : above + n_low])
        vecs.append(U[:, above : above + n_low])
        return torch.cat(vals), torch.cat(vecs, dim=1)

    def _complement(self, m: int) -> torch.Tensor:
        """(P, m) orthonormal columns orthogonal to U."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        E = torch.randn(self.shape[0], m, generator=gen, dtype=self.dtype, device=self.device)
        for _ in range(2):  # twice is enough (Kahan): orthogonal to U to rounding
            E = E - self.U @ (self.U.T @ E)
        return torch.linalg.qr(E).Q

    def add_identity(self, delta: float) -> LowRankOperator:
        return LowRankOperator(self.U, self.lam, self.shift + check_damping(delta))

    def _check_invertible(self, what: str):
        """Off its top-k subspace the operator is shift·I, so the shift counts as an eigenvalue
        (the closed forms divide by it) unless the pairs span everything: undamped (shift 0)
        and k < P, the operator is singular."""
        # The stored values come from Lanczos: a zero eigenvalue (a GGN of rank below P, its
        # pairs spanning everything) is stored as rounding noise of either sign, so they are
        # checked like eigh's values; the shift of the complement is exact.
        check_positive_definite(self.lam + self.shift, what)
        if not self._full:
            check_positive_definite(self.lam.new_ones(1) * self.shift, what, exact=True)

    def logdet(self):
        self._check_invertible("logdet")
        P, k = self.shape[0], self.lam.numel()
        shift, rest = self.shift, 0.0
        if not self._full:
            rest = (P - k) * (shift.log() if isinstance(shift, torch.Tensor) else math.log(shift))
        return (self.lam + self.shift).log().sum() + rest

    def _power(self, p: float, V: torch.Tensor, what: str) -> torch.Tensor:
        self._check_invertible(what)
        s = 0.0 if self._full else self.shift**p
        coef = (self.lam + self.shift).pow(p) - s
        return self.U @ (coef[:, None] * (self.U.T @ V)) + s * V

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        B = self._operand(b, "solve(b)")
        X = self._power(-1.0, B[:, None] if B.dim() == 1 else B, "solve")
        return X[:, 0] if B.dim() == 1 else X

    def inverse(self) -> LowRankOperator:
        self._check_invertible("inverse")
        s = 0.0 if self._full else 1.0 / self.shift
        return LowRankOperator(self.U, 1.0 / (self.lam + self.shift) - s, s)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, P) samples of N(0, A⁻¹)."""
        check_count("sample(n)", n, "the number of samples", "e.g. op.sample(100).")
        check_generator(generator)
        Z = torch.randn(self.shape[0], n, generator=generator, dtype=self.dtype, device=self.device)
        return self._power(-0.5, Z, "sample").T
