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


def _times(alpha, x: torch.Tensor) -> torch.Tensor:
    """α·x, skipping the copy for a plain 1 (a tensor α stays in the graph)."""
    return x if not isinstance(alpha, torch.Tensor) and alpha == 1 else alpha * x


class KronBlock(Block):
    """α (B ⊗ A) from factors, or (U_B ⊗ U_A) diag(vec λ) (U_B ⊗ U_A)ᵀ with U_B (d, d), U_A
    (A, A), λ (d, A).

    Built from factors (KFAC: B ⊗ A), the eigendecomposition waits until an operation needs
    it (logdet, solve, inverse, sampling, damping): products, diagonal and trace use B and A.
    Scaled copies share the factors and their eigendecomposition (``eig``, computed once for
    all of them: damping a scaled operator over a grid of δ decomposes once), never a
    reference to the block they came from."""

    def __init__(self, UB=None, UA=None, lam=None, *, factors=None, alpha=1.0, eig=None):
        # contiguous: torch.kron fails on a mix of row- and column-major (eigh's) inputs
        UB, UA = (None if U is None else U.contiguous() for U in (UB, UA))
        self.UB, self.UA, self.lam, self.factors = UB, UA, lam, factors
        self.alpha = alpha  # with factors: the block is α (B ⊗ A)
        self.eig = {} if eig is None else eig  # the factors' eigendecompositions, shared
        d, A = (factors[0].shape[0], factors[1].shape[0]) if factors is not None else lam.shape
        self.shape2 = (d, A)
        self.size = d * A

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor) -> KronBlock:
        return cls(factors=(B, A))

    def _eig(self) -> KronBlock:
        if self.lam is None:
            e = self.eig
            if not e:
                B, A = self.factors
                (lb, UB), (la, UA) = eigh(B), eigh(A)
                e.update(lb=lb, UB=UB.contiguous(), la=la, UA=UA.contiguous())
            self.UB, self.UA = e["UB"], e["UA"]
            self.lam = _times(self.alpha, e["lb"][:, None] * e["la"][None, :])
        return self

    def matmat(self, X):
        d, A = self.shape2
        k = X.shape[1]
        Y = X.T.reshape(k, d, A)
        if self.factors is not None:
            B, Af = self.factors
            return _times(self.alpha, B @ Y @ Af).reshape(k, -1).T
        Y = self.UB.T @ Y @ self.UA
        Y = self.UB @ (Y * self.lam) @ self.UA.T
        return Y.reshape(k, -1).T

    def diagonal(self):
        if self.factors is not None:
            B, A = self.factors
            return _times(self.alpha, torch.outer(B.diagonal(), A.diagonal()).reshape(-1))
        return (self.UB.square() @ self.lam @ self.UA.square().T).reshape(-1)

    def to_dense(self):
        if self.factors is not None:
            return _times(self.alpha, torch.kron(*self.factors))
        U = torch.kron(self.UB, self.UA)
        return (U * self.lam.reshape(-1)) @ U.T

    def eigenvalues(self):
        return self._eig().lam.reshape(-1)

    def trace(self):
        if self.factors is not None:
            return _times(self.alpha, self.factors[0].trace() * self.factors[1].trace())
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
            return KronBlock(factors=self.factors, alpha=alpha * self.alpha, eig=self.eig)
        return KronBlock(self.UB, self.UA, alpha * self.lam)

    def power(self, p):
        e = self._eig()
        return KronBlock(e.UB, e.UA, e.lam.pow(p))


class DenseBlock(Block):
    """α M + δ I. Scaled and damped copies share M and its eigendecomposition (``eig``,
    computed once for all of them), never a reference to the block they came from."""

    def __init__(self, M: torch.Tensor, alpha=1.0, delta=0.0, eig=None):
        self.M, self.alpha, self.delta = M, alpha, delta
        self.size = M.shape[0]
        self.eig = {} if eig is None else eig  # M's eigh: (λ ascending, U)

    @property
    def _plain(self) -> bool:
        a, d = self.alpha, self.delta
        return (
            not isinstance(a, torch.Tensor) and not isinstance(d, torch.Tensor) and (a, d) == (1, 0)
        )

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        return x if not isinstance(self.delta, torch.Tensor) and self.delta == 0 else x + self.delta

    def _eigh(self):
        if not self.eig:
            self.eig["lam"], self.eig["U"] = eigh(self.M)
        lam, U = self.eig["lam"], self.eig["U"]
        if self._plain:
            return lam, U
        if self.alpha < 0:  # keep eigh's ascending order
            lam, U = lam.flip(0), U.flip(1)
        return self._shift(_times(self.alpha, lam)), U

    def matmat(self, X):
        out = _times(self.alpha, self.M @ X)
        zero = not isinstance(self.delta, torch.Tensor) and self.delta == 0
        return out if zero else out + self.delta * X

    def diagonal(self):
        return self._shift(_times(self.alpha, self.M.diagonal()))

    def to_dense(self):
        if self._plain:
            return self.M
        eye = torch.eye(self.size, dtype=self.M.dtype, device=self.M.device)
        return _times(self.alpha, self.M) + self.delta * eye

    def eigenvalues(self):
        return self._eigh()[0]

    def top_eigenpairs(self, k):
        lam, U = self._eigh()
        m = min(k, self.size)
        return lam[-m:].flip(0), U[:, -m:].flip(1)

    def shifted(self, delta):
        return DenseBlock(self.M, self.alpha, self.delta + delta, self.eig)

    def scaled(self, alpha):
        return DenseBlock(self.M, alpha * self.alpha, alpha * self.delta, self.eig)

    def power(self, p):
        lam, U = self._eigh()
        lp = lam.pow(p)
        if p < 0:  # λᵖ descends where λ ascends: keep eigh's ascending order for top_eigenpairs
            lp, U = lp.flip(0), U.flip(1)
        return DenseBlock((U * lp) @ U.T, eig={"lam": lp, "U": U})


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
