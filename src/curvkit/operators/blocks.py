"""Blocks of a block-diagonal curvature, each in its own local coordinates.

Every block knows its algebra from its structure: a Kronecker block (U_B ⊗ U_A) diag(λ)
(U_B ⊗ U_A)ᵀ works in its eigenbasis (KFAC: λ = λ_B λ_Aᵀ; EKFAC: corrected λ; damping: λ + δ),
a dense block through a cached ``eigh``, a diagonal block elementwise. Local coordinates of a
Kronecker block are its (d, A) grid, row-major.
"""

from __future__ import annotations

import torch


class Block:
    size: int

    def matmat(self, X: torch.Tensor) -> torch.Tensor: ...
    def diagonal(self) -> torch.Tensor: ...
    def to_dense(self) -> torch.Tensor: ...
    def eigenvalues(self) -> torch.Tensor: ...
    def shifted(self, delta: float) -> Block: ...
    def power(self, p: float) -> Block:
        """The block's matrix power Aᵖ (p = -1: inverse; p = -1/2: inverse square root)."""
        ...

    def logdet(self) -> torch.Tensor:
        return self.eigenvalues().log().sum()

    def trace(self) -> torch.Tensor:
        return self.diagonal().sum()


def _pow(lam: torch.Tensor, p: float) -> torch.Tensor:
    if p == 1:
        return lam
    if p < 0 and bool((lam <= 0).any()):
        from ..errors import CurvkitValueError

        raise CurvkitValueError(
            "the operator is singular or indefinite (an eigenvalue is <= 0), so its inverse "
            "or inverse square root does not exist. Add damping first: op.add_identity(delta)."
        )
    return lam.pow(p)


class KronBlock(Block):
    """(U_B ⊗ U_A) diag(vec λ) (U_B ⊗ U_A)ᵀ with U_B (d, d), U_A (A, A), λ (d, A)."""

    def __init__(self, UB: torch.Tensor, UA: torch.Tensor, lam: torch.Tensor):
        self.UB, self.UA, self.lam = UB, UA, lam
        self.size = lam.numel()

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor) -> KronBlock:
        lb, UB = torch.linalg.eigh(B)
        la, UA = torch.linalg.eigh(A)
        return cls(UB, UA, lb[:, None] * la[None, :])

    def matmat(self, X):
        d, A = self.lam.shape
        k = X.shape[1]
        Y = X.T.reshape(k, d, A)
        Y = self.UB.T @ Y @ self.UA
        Y = self.UB @ (Y * self.lam) @ self.UA.T
        return Y.reshape(k, -1).T

    def diagonal(self):
        return (self.UB.square() @ self.lam @ self.UA.square().T).reshape(-1)

    def to_dense(self):
        U = torch.kron(self.UB, self.UA)
        return (U * self.lam.reshape(-1)) @ U.T

    def eigenvalues(self):
        return self.lam.reshape(-1)

    def trace(self):
        return self.lam.sum()

    def shifted(self, delta):
        return KronBlock(self.UB, self.UA, self.lam + delta)

    def power(self, p):
        return KronBlock(self.UB, self.UA, _pow(self.lam, p))


class DenseBlock(Block):
    def __init__(self, M: torch.Tensor):
        self.M = M
        self.size = M.shape[0]
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None

    def _eigh(self):
        if self._eig is None:
            self._eig = torch.linalg.eigh(self.M)
        return self._eig

    def matmat(self, X):
        return self.M @ X

    def diagonal(self):
        return self.M.diagonal()

    def to_dense(self):
        return self.M

    def eigenvalues(self):
        return self._eigh()[0]

    def shifted(self, delta):
        out = DenseBlock(
            self.M + delta * torch.eye(self.size, dtype=self.M.dtype, device=self.M.device)
        )
        if self._eig is not None:
            out._eig = (self._eig[0] + delta, self._eig[1])
        return out

    def power(self, p):
        lam, U = self._eigh()
        out = DenseBlock((U * _pow(lam, p)) @ U.T)
        out._eig = (_pow(lam, p), U)
        return out


class DiagBlock(Block):
    def __init__(self, v: torch.Tensor):
        self.v = v
        self.size = v.numel()

    def matmat(self, X):
        return self.v[:, None] * X

    def diagonal(self):
        return self.v

    def to_dense(self):
        return torch.diag(self.v)

    def eigenvalues(self):
        return self.v

    def shifted(self, delta):
        return DiagBlock(self.v + delta)

    def power(self, p):
        return DiagBlock(_pow(self.v, p))
