"""Blocks of a block-diagonal curvature, each in its own local coordinates.

Every block knows its algebra from its structure: a Kronecker block (U_B ⊗ U_A) diag(λ)
(U_B ⊗ U_A)ᵀ works in its eigenbasis (KFAC: λ = λ_B λ_Aᵀ; EKFAC: corrected λ; damping: λ + δ),
a dense block through a cached ``eigh``, a diagonal block elementwise. Local coordinates of a
Kronecker block are its (d, A) grid, row-major.
"""

from __future__ import annotations

import torch


def eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``, for float16 / bfloat16 through float32 (torch has no half
    kernel), the results in M's dtype."""
    if M.dtype in (torch.float16, torch.bfloat16):
        vals, vecs = torch.linalg.eigh(M.float())
        return vals.to(M.dtype), vecs.to(M.dtype)
    return torch.linalg.eigh(M)


class Block:
    size: int
    exact_eigenvalues = False  # computed by eigh, so exact only to rounding of the largest

    def matmat(self, X: torch.Tensor) -> torch.Tensor: ...
    def diagonal(self) -> torch.Tensor: ...
    def to_dense(self) -> torch.Tensor: ...
    def eigenvalues(self) -> torch.Tensor: ...
    def shifted(self, delta: float) -> Block: ...
    def scaled(self, alpha: float) -> Block: ...
    def power(self, p: float) -> Block:
        """The block's matrix power Aᵖ (p = -1: inverse; p = -1/2: inverse square root); the
        operator checks the block is positive definite first (``check_positive_definite``)."""
        ...

    def top_eigenpairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The min(k, size) largest eigenvalues and their eigenvectors (size, ·)."""
        ...

    def trace(self) -> torch.Tensor:
        return self.diagonal().sum()


class KronBlock(Block):
    """(U_B ⊗ U_A) diag(vec λ) (U_B ⊗ U_A)ᵀ with U_B (d, d), U_A (A, A), λ (d, A).

    Built from factors (KFAC: B ⊗ A), the eigendecomposition waits until an operation needs
    it (logdet, solve, inverse, sampling, damping): products, diagonal and trace use B and A."""

    def __init__(self, UB=None, UA=None, lam=None, *, factors=None, scale_of=None):
        # contiguous: torch.kron fails on a mix of row- and column-major (eigh's) inputs
        UB, UA = (None if U is None else U.contiguous() for U in (UB, UA))
        self.UB, self.UA, self.lam, self.factors = UB, UA, lam, factors
        d, A = (factors[0].shape[0], factors[1].shape[0]) if factors is not None else lam.shape
        self.shape2 = (d, A)
        self.size = d * A
        # (block, α): this block is α times that one, whose eigendecomposition it shares (a
        # scaled operator damped in a loop decomposes its factors once)
        self.scale_of = scale_of

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor) -> KronBlock:
        return cls(factors=(B, A))

    def _eig(self) -> KronBlock:
        if self.lam is None and self.scale_of is not None:
            block, alpha = self.scale_of
            e = block._eig()
            self.UB, self.UA, self.lam = e.UB, e.UA, alpha * e.lam
        elif self.lam is None:
            B, A = self.factors
            lb, UB = eigh(B)
            la, UA = eigh(A)
            self.UB, self.UA = UB.contiguous(), UA.contiguous()
            self.lam = lb[:, None] * la[None, :]
        return self

    def matmat(self, X):
        d, A = self.shape2
        k = X.shape[1]
        Y = X.T.reshape(k, d, A)
        if self.factors is not None:
            B, Af = self.factors
            return (B @ Y @ Af).reshape(k, -1).T
        Y = self.UB.T @ Y @ self.UA
        Y = self.UB @ (Y * self.lam) @ self.UA.T
        return Y.reshape(k, -1).T

    def diagonal(self):
        if self.factors is not None:
            B, A = self.factors
            return torch.outer(B.diagonal(), A.diagonal()).reshape(-1)
        return (self.UB.square() @ self.lam @ self.UA.square().T).reshape(-1)

    def to_dense(self):
        if self.factors is not None:
            return torch.kron(*self.factors)
        U = torch.kron(self.UB, self.UA)
        return (U * self.lam.reshape(-1)) @ U.T

    def eigenvalues(self):
        return self._eig().lam.reshape(-1)

    def trace(self):
        if self.factors is not None:
            return self.factors[0].trace() * self.factors[1].trace()
        return self.lam.sum()

    def top_eigenpairs(self, k):
        e = self._eig()
        vals, flat = e.lam.reshape(-1).topk(min(k, self.size))
        i, j = flat // e.lam.shape[1], flat % e.lam.shape[1]
        vecs = (e.UB[:, i][:, None, :] * e.UA[:, j][None, :, :]).reshape(self.size, -1)
        return vals, vecs

    def shifted(self, delta):
        e = self._eig()
        return KronBlock(e.UB, e.UA, e.lam + delta)

    def scaled(self, alpha):
        if self.factors is not None:
            B, A = self.factors
            return KronBlock(factors=(alpha * B, A), scale_of=(self, alpha))
        return KronBlock(self.UB, self.UA, alpha * self.lam)

    def power(self, p):
        e = self._eig()
        return KronBlock(e.UB, e.UA, e.lam.pow(p))


class DenseBlock(Block):
    def __init__(self, M: torch.Tensor, of=None):
        self.M = M
        self.size = M.shape[0]
        self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        # (block, α, δ): M = α·block.M + δI, whose eigendecomposition follows from the block's
        # (a scaled or damped operator in a loop decomposes once)
        self.of = of

    def _eigh(self):
        if self._eig is None and self.of is not None:
            block, alpha, delta = self.of
            lam, U = block._eigh()
            if alpha < 0:  # eigh's ascending order
                lam, U = lam.flip(0), U.flip(1)
            self._eig = (alpha * lam + delta, U)
        elif self._eig is None:
            self._eig = eigh(self.M)
        return self._eig

    def matmat(self, X):
        return self.M @ X

    def diagonal(self):
        return self.M.diagonal()

    def to_dense(self):
        return self.M

    def eigenvalues(self):
        return self._eigh()[0]

    def top_eigenpairs(self, k):
        lam, U = self._eigh()
        m = min(k, self.size)
        return lam[-m:].flip(0), U[:, -m:].flip(1)

    def shifted(self, delta):
        eye = torch.eye(self.size, dtype=self.M.dtype, device=self.M.device)
        return DenseBlock(self.M + delta * eye, of=(self, 1.0, delta))

    def scaled(self, alpha):
        return DenseBlock(alpha * self.M, of=(self, alpha, 0.0))

    def power(self, p):
        lam, U = self._eigh()
        lp = lam.pow(p)
        if p < 0:  # λᵖ descends where λ ascends: keep eigh's ascending order for top_eigenpairs
            lp, U = lp.flip(0), U.flip(1)
        out = DenseBlock((U * lp) @ U.T)
        out._eig = (lp, U)
        return out


class DiagBlock(Block):
    exact_eigenvalues = True  # the entries themselves, each computed directly

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

    def top_eigenpairs(self, k):
        vals, i = self.v.topk(min(k, self.size))
        vecs = torch.zeros(self.size, vals.numel(), dtype=self.v.dtype, device=self.v.device)
        vecs[i, torch.arange(vals.numel(), device=self.v.device)] = 1
        return vals, vecs

    def shifted(self, delta):
        return DiagBlock(self.v + delta)

    def scaled(self, alpha):
        return DiagBlock(alpha * self.v)

    def power(self, p):
        return DiagBlock(self.v.pow(p))
