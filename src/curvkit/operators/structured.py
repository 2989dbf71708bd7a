"""A block-diagonal operator: each block acts on its own set of the flat coordinates.

KFAC, EKFAC, the diagonal and per-module dense blocks are all this operator with different
blocks; damping, logdet, solve, inverse and sampling come from the blocks, never by densifying.
"""

from __future__ import annotations

import torch

from ..errors import CurvkitValueError, check_count, check_generator
from .base import LinearOperator, check_damping, check_positive_definite
from .blocks import Block


class BlockDiagonalOperator(LinearOperator):
    """Σ_b E_b B_b E_bᵀ, where E_b picks coordinates ``index[b]`` (the blocks cover all P)."""

    has_spectrum = True

    def __init__(
        self,
        blocks: list[Block],
        index: list[torch.Tensor],
        P: int,
        *,
        labels: list[str] | None = None,
        check: bool = True,
    ):
        if check:  # off where curvkit built the cover itself (the engine, derived operators)
            _check_cover(blocks, index, P)
        self.blocks, self.index = blocks, index
        self.labels = labels or [type(b).__name__ for b in blocks]
        ref = index[0]
        first = _first_tensor(blocks[0])
        self.shape, self.dtype, self.device = (P, P), first.dtype, ref.device

    def _map(self, blocks: list[Block]) -> BlockDiagonalOperator:
        return BlockDiagonalOperator(
            blocks, self.index, self.shape[0], labels=self.labels, check=False
        )

    def _matmat(self, V):
        out = torch.zeros_like(V)
        for b, idx in zip(self.blocks, self.index):
            out[idx] = b.matmat(V[idx])
        return out

    def diagonal(self):
        out = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for b, idx in zip(self.blocks, self.index):
            out[idx] = b.diagonal()
        return out

    def _scaled(self, alpha: float) -> BlockDiagonalOperator:
        return self._map([b.scaled(alpha) for b in self.blocks])

    def to_dense(self):
        self._check_dense()
        out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for b, idx in zip(self.blocks, self.index):
            out[idx[:, None], idx[None, :]] = b.to_dense()
        return out

    def trace(self):
        return sum(b.trace() for b in self.blocks)

    def eigenvalues(self) -> torch.Tensor:
        """All P eigenvalues, descending (from the blocks)."""
        return torch.cat([b.eigenvalues() for b in self.blocks]).sort(descending=True).values

    def top_eigenpairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The min(k, P) largest eigenvalues (descending) and eigenvectors (P, ·), exact, from
        the blocks: a Kronecker block's eigenvectors are U_B[:, i] ⊗ U_A[:, j]."""
        check_count("top_eigenpairs(k)", k, "how many eigenpairs", "e.g. op.top_eigenpairs(10).")
        vals, owners = [], []
        for b, blk in enumerate(self.blocks):
            v, vecs = blk.top_eigenpairs(k)
            vals.append(v)
            owners += [(b, vecs, c) for c in range(v.numel())]
        top = torch.cat(vals).topk(min(k, self.shape[0]))
        V = torch.zeros(self.shape[0], top.values.numel(), dtype=self.dtype, device=self.device)
        for col, pos in enumerate(top.indices.tolist()):
            b, vecs, c = owners[pos]
            V[self.index[b], col] = vecs[:, c]
        return top.values, V

    def _check_positive_definite(self, what: str) -> None:
        """Each block on its own scale (its eigenvalues' rounding is relative to its largest)."""
        for blk, label in zip(self.blocks, self.labels):
            check_positive_definite(
                blk.eigenvalues(), f"{what} (block {label})", blk.exact_eigenvalues
            )

    def _power(self, p: float, what: str) -> BlockDiagonalOperator:
        """A^p block by block (p < 0: inverse, inverse square root), once A is checked."""
        self._check_positive_definite(what)
        return self._map([b.power(p) for b in self.blocks])

    def logdet(self) -> torch.Tensor:
        self._check_positive_definite("logdet")
        return sum(b.eigenvalues().log().sum() for b in self.blocks)

    def add_identity(self, delta: float) -> BlockDiagonalOperator:
        """A + δI, same structure (damping, or an isotropic Gaussian prior's precision)."""
        delta = check_damping(delta)
        return self._map([b.shifted(delta) for b in self.blocks])

    def inverse(self) -> BlockDiagonalOperator:
        return self._power(-1.0, "inverse")

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """A⁻¹ b for b of shape (P,) or (P, k)."""
        b = self._operand(b, "solve(b)")
        return self._power(-1.0, "solve") @ b

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, P) samples of N(0, A⁻¹), A⁻¹ᐟ² applied block by block to standard normals."""
        check_count("sample(n)", n, "the number of samples", "e.g. op.sample(100).")
        check_generator(generator)
        root = self._power(-0.5, "sample")
        Z = torch.randn(self.shape[0], n, generator=generator, dtype=self.dtype, device=self.device)
        return root._matmat(Z).T


def _check_cover(blocks: list[Block], index: list[torch.Tensor], P: int) -> None:
    """The blocks' coordinates must be integer, match each block's size, and cover 0..P-1
    exactly once: a gap or an overlap would make logdet, solve and eigenvalues wrong."""
    if not blocks or len(blocks) != len(index):
        raise CurvkitValueError(
            f"BlockDiagonalOperator needs one index tensor per block and at least one block; "
            f"got {len(blocks)} blocks and {len(index)} index tensors."
        )
    for i, (b, idx) in enumerate(zip(blocks, index)):
        integer = isinstance(idx, torch.Tensor) and not idx.is_floating_point()
        if not integer or idx.dtype == torch.bool or idx.is_complex() or idx.dim() != 1:
            got = f"{idx.dtype}, shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else idx
            raise CurvkitValueError(
                f"BlockDiagonalOperator: index {i} must be a 1-D integer tensor, got {got}."
            )
        if idx.numel() != b.size:
            raise CurvkitValueError(
                f"BlockDiagonalOperator: block {i} has size {b.size} but index {i} names "
                f"{idx.numel()} coordinates."
            )
    flat = torch.cat(index)
    seen = torch.bincount(flat.clamp(0, max(P - 1, 0)), minlength=P) if flat.numel() else None
    ok = flat.numel() == P and bool(((flat >= 0) & (flat < P)).all()) and bool((seen == 1).all())
    if not ok:
        raise CurvkitValueError(
            f"BlockDiagonalOperator: the blocks' indices must cover the coordinates 0..{P - 1} "
            f"exactly once; they name {flat.numel()} coordinates"
            + ("" if flat.numel() == 0 else f" in [{int(flat.min())}, {int(flat.max())}]")
            + " with gaps or repeats."
        )


def _first_tensor(b: Block) -> torch.Tensor:
    if getattr(b, "factors", None) is not None:
        return b.factors[0]
    for name in ("lam", "M", "v"):
        if getattr(b, name, None) is not None:
            return getattr(b, name)
    raise TypeError(type(b))  # pragma: no cover
