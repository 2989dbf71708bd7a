"""The operator contract every curvature structure implements.

A subclass gives ``shape``, ``dtype``, ``device`` and ``_matmat(V)`` for ``V`` of shape (n, k);
everything else has a correct default built on ``_matmat`` and is overridden where the structure
knows better (a diagonal's ``logdet``, a curvature's exact ``diagonal`` from its engine). Tags
such as ``is_symmetric`` describe the operator; algorithms dispatch on them.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import CurvkitTypeError, CurvkitValueError
from ..memory import check_dense


def check_positive_definite(eigenvalues: torch.Tensor, what: str, exact: bool = False) -> None:
    """Raise a clear error unless every eigenvalue is clearly > 0: the one check behind every
    structure's ``logdet``, ``solve``, ``inverse`` and ``sample`` (log, 1/λ or 1/√λ of an
    eigenvalue <= 0 is NaN or inf, never an answer).

    ``eigenvalues`` are those of one block, computed together: eigh of a matrix M, or products
    of two factors' eigenvalues, are exact only to about eps·‖M‖. An eigenvalue below
    4·eps·max|λ| is zero up to rounding, whatever its sign, and 1/λ of it is noise (an
    undamped cross-entropy KFAC block left 9e-21 where the exact value is 0; its ``solve``
    returned entries of 1e20 that did not solve anything). ``exact`` eigenvalues (a diagonal's
    entries, a low-rank operator's shift) carry no such error: any value > 0 is accepted. A
    negative eigenvalue within rounding of zero is called singular, not indefinite: the fix is
    damping either way, but the advice differs."""
    if eigenvalues.numel() == 0:
        return
    eigenvalues = eigenvalues.detach()  # a check, not part of any result
    low = float(eigenvalues.min())
    high = float(eigenvalues.abs().max())
    eps = torch.finfo(eigenvalues.dtype).eps
    if math.isnan(low) or math.isnan(high):
        raise CurvkitValueError(f"{what}: the operator's eigenvalues contain NaN.")
    if low > (0.0 if exact else 4 * eps * high):
        return
    # within rounding of zero (which grows with the block's size): singular, not indefinite
    if low >= -4 * eps * high * math.sqrt(eigenvalues.numel()):
        got = f"singular: its smallest eigenvalue {low:.3g} is zero up to rounding"
        fix = f"delta well above rounding (about {4 * eps * high:.2g} here)"
    else:
        got = f"indefinite (smallest eigenvalue {low:.3g})"
        fix = (
            f"delta > {-low:.3g}. A Hessian, or a GGN or Fisher of a loss that is not convex in "
            "the model's output, can be indefinite; those of convex losses (cross-entropy, "
            "MSE, ...) are positive semidefinite by construction"
        )
    raise CurvkitValueError(
        f"{what} needs a positive definite operator, but this one is {got}. Add damping "
        f"first: op.add_identity(delta) with {fix}."
    )


def _finite_real(x) -> float | torch.Tensor | None:
    """x as a float when it is one finite real number (or a 0-d real tensor), else None; a 0-d
    tensor that requires grad stays itself, so that what is computed from it (a logdet, a
    solve) differentiates with respect to it (a prior precision tuned by the marginal
    likelihood)."""
    tensor = x if isinstance(x, torch.Tensor) and x.requires_grad else None
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.is_complex():
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        return None
    return float(x) if tensor is None else tensor


def _described(x) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)


def check_damping(delta) -> float | torch.Tensor:
    """δ of ``add_identity(δ)`` as a float: a finite real number (or a 0-d real tensor, kept
    as it is when it requires grad)."""
    value = _finite_real(delta)
    if value is None:
        raise CurvkitValueError(
            f"add_identity(delta) takes one finite real number (the same damping or isotropic "
            f"prior precision on every coordinate), got {_described(delta)}. Per-coordinate "
            "values do not keep the structure; add a scalar, e.g. op.add_identity(1e-3)."
        )
    return value


def check_scale(alpha, what: str = "op * alpha") -> float | torch.Tensor:
    """The number of ``op * alpha`` (or ``alpha * op``, ``op / alpha``) as a float (a 0-d
    tensor that requires grad: itself)."""
    if isinstance(alpha, LinearOperator):
        raise CurvkitTypeError(
            f"{what}: the product of two operators is not one curvkit keeps (it is not "
            "symmetric in general); apply them in turn, A @ (B @ v)."
        )
    value = _finite_real(alpha)
    if value is None:
        raise CurvkitValueError(
            f"{what} scales an operator by one finite real number, got {_described(alpha)}. A "
            "per-coordinate scaling D A D does not keep the structure; apply it to vectors "
            "instead."
        )
    return value


class LinearOperator:
    """A square ``(n, n)`` linear map applied by ``op @ v`` with ``v`` of shape (n,) or (n, k)."""

    is_symmetric: bool = True
    # its eigenvalues and top eigenpairs come from its structure (exact, no iteration)
    has_spectrum: bool = False

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- products --------------------------------------------------------------------------------
    def _operand(self, v, what: str = "@ v") -> torch.Tensor:
        """v checked ((n,) or (n, k), a real tensor) and moved to the operator's dtype/device."""
        name = type(self).__name__
        if not isinstance(v, torch.Tensor):
            raise CurvkitTypeError(f"{name} {what} needs a tensor, got {type(v).__name__}.")
        n = self.shape[1]
        if v.dim() not in (1, 2) or v.shape[0] != n:
            raise CurvkitValueError(
                f"{name} of shape {self.shape}: {what} takes a vector ({n},) or a matrix "
                f"({n}, k); got {tuple(v.shape)}."
            )
        if v.is_complex():
            raise CurvkitTypeError(
                f"{name} {what} takes a real tensor, got {v.dtype}; curvature operators are real "
                "symmetric, so apply them to the real and imaginary parts separately."
            )
        return v.to(dtype=self.dtype, device=self.device)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        V = self._operand(v)
        if V.numel() == 0:  # (n, 0): nothing to multiply, and no pass over the data
            return torch.zeros_like(V)
        out = self._matmat(V[:, None] if v.dim() == 1 else V)
        return out[:, 0] if v.dim() == 1 else out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self @ v

    def _start_direction(self) -> torch.Tensor | None:
        """A vector likely rich in the top eigenvectors, for Krylov starts; None if unknown."""
        return None

    # -- arithmetic: A * α, α * A, A / α, -A, A + B, A - B ----------------------------------------
    def __mul__(self, alpha) -> LinearOperator:
        return self._scaled(check_scale(alpha))

    __rmul__ = __mul__

    def __truediv__(self, alpha) -> LinearOperator:
        alpha = check_scale(alpha, "op / alpha")
        if alpha == 0:
            raise CurvkitValueError("op / alpha: alpha is 0.")
        return self._scaled(1.0 / alpha)

    def __neg__(self) -> LinearOperator:
        return self._scaled(-1.0)

    def _scaled(self, alpha: float) -> LinearOperator:
        """α·A; structures that keep their algebra under scaling override this."""
        return ScaledOperator(self, alpha)

    def __add__(self, other) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            raise CurvkitTypeError(
                f"operators add to operators, got {type(other).__name__}. For A + δI use "
                "op.add_identity(delta)."
            )
        mine = (self.shape, self.dtype, self.device)
        theirs = (other.shape, other.dtype, other.device)
        if mine != theirs:
            raise CurvkitValueError(
                f"operators of shape, dtype and device {mine} and {theirs} cannot be added; "
                "they must agree (build both from the same model, dtype and device)."
            )
        return SumOperator(self, other)

    def __radd__(self, other) -> LinearOperator:
        if isinstance(other, numbers.Number) and other == 0:  # sum([A, B]) starts from 0
            return self
        return self.__add__(other)

    def __sub__(self, other) -> LinearOperator:
        if isinstance(other, LinearOperator):
            other = -other
        return self + other

    # -- what only some structures can do ---------------------------------------------------------
    def _cannot(self, what: str, spectral: bool = False):
        hint = (
            " Its top eigenvalues from products: ck.top_eigenvalues(op, k) (and vectors with "
            "eigenvectors=True)."
            if spectral
            else ""
        )
        raise CurvkitTypeError(
            f"{type(self).__name__} has no {what}: it only applies products (op @ v). The "
            "structures of ck.hessian/ggn/fisher/ef (structure='kron', 'ekfac', 'diag', "
            "'block', 'lowrank') have it, computed from the structure, and a dense matrix "
            "(structure='dense') has torch.linalg; the sum of two operators, or a scaled "
            "matrix-free one, keeps only products." + hint
        )

    def add_identity(self, delta: float) -> LinearOperator:
        self._cannot("add_identity")

    def eigenvalues(self) -> torch.Tensor:
        self._cannot("eigenvalues", spectral=True)

    def top_eigenpairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._cannot("top_eigenpairs", spectral=True)

    def logdet(self) -> torch.Tensor:
        self._cannot("logdet")

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        self._cannot("solve")

    def inverse(self) -> LinearOperator:
        self._cannot("inverse")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        self._cannot("sample")

    # -- derived quantities (exact) --------------------------------------------------------------
    def _columns(self, block: int = 256):
        n = self.shape[1]
        for start in range(0, n, block):
            stop = min(n, start + block)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            yield start, stop, self._matmat(E)

    def to_dense(self) -> torch.Tensor:
        self._check_dense()
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for start, stop, cols in self._columns():
            out[:, start:stop] = cols
        return out

    def _check_dense(self) -> None:
        """Refuse, before allocating, a dense form that cannot fit (CurvkitMemoryError)."""
        check_dense(
            f"form of this {type(self).__name__}",
            self.shape,
            self.dtype,
            self.device,
            None,
            "Use the operator itself: products, diagonal(), trace(), and for structures "
            "logdet(), solve(), inverse().",
        )

    def diagonal(self) -> torch.Tensor:
        out = torch.empty(self.shape[0], dtype=self.dtype, device=self.device)
        for start, stop, cols in self._columns():
            out[start:stop] = cols[torch.arange(start, stop), torch.arange(stop - start)]
        return out

    def trace(self) -> torch.Tensor:
        return self.diagonal().sum()

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out)."""
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator as ScipyOp
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_scipy() needs scipy: pip install 'curvkit[scipy]'.") from e

        def mm(x):
            X = torch.as_tensor(np.asarray(x), dtype=self.dtype, device=self.device)
            Y = self @ (X.reshape(self.shape[1], -1))
            Y = Y.reshape(x.shape) if np.ndim(x) == 1 else Y
            return Y.detach().cpu().double().numpy()

        return ScipyOp(self.shape, matvec=mm, rmatvec=mm, matmat=mm, dtype=np.float64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


class DenseOperator(LinearOperator):
    """A materialised (n, n) matrix as an operator."""

    def __init__(self, A: torch.Tensor, symmetric: bool = True):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise CurvkitValueError(f"DenseOperator needs a square matrix, got {tuple(A.shape)}.")
        self.A, self.is_symmetric = A, symmetric
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device

    def _matmat(self, V):
        return self.A @ V

    def to_dense(self):
        return self.A.clone()

    def diagonal(self):
        return self.A.diagonal().clone()


class ScaledOperator(LinearOperator):
    def __init__(self, op: LinearOperator, alpha: float):
        self.op, self.alpha = op, alpha
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.is_symmetric = op.is_symmetric

    def _matmat(self, V):
        return self.alpha * self.op._matmat(V)

    def _start_direction(self):
        return self.op._start_direction() if self.alpha > 0 else None

    def to_dense(self):
        self._check_dense()
        return self.alpha * self.op.to_dense()

    def diagonal(self):
        return self.alpha * self.op.diagonal()


class SumOperator(LinearOperator):
    def __init__(self, a: LinearOperator, b: LinearOperator):
        self.a, self.b = a, b
        self.shape, self.dtype, self.device = a.shape, a.dtype, a.device
        self.is_symmetric = a.is_symmetric and b.is_symmetric

    def _matmat(self, V):
        return self.a._matmat(V) + self.b._matmat(V)

    def to_dense(self):
        self._check_dense()
        return self.a.to_dense() + self.b.to_dense()

    def diagonal(self):
        return self.a.diagonal() + self.b.diagonal()
