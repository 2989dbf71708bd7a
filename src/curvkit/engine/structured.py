"""Structured reductions of the pairs (aₙ, gₙₖ): KFAC, EKFAC, exact diagonals, per-layer blocks.

With Gₙₖ = Σᵣ gₖₙᵣ aₙᵣᵀ the per-sample, per-column gradient of a rule layer (d, A) — inputs a
(N, R, A), backpropagated columns g (K, N, R, d) — and σₙₖ the signs of the factor columns:

    diag     Σₙₖ σ Gₙₖ ⊙ Gₙₖ
    block    Σₙₖ σ vec Gₙₖ vec Gₙₖᵀ
    KFAC     expand: (Σₙₖᵣ σ g gᵀ) ⊗ (Σₙᵣ a aᵀ) / (N R);   reduce: (Σₙₖ σ ḡ ḡᵀ) ⊗ (Σₙ ā āᵀ) / N
             with ḡ = Σᵣ g, ā = meanᵣ a  (Eschenhagen et al., 2023)
    EKFAC    Σₙₖ σ (U_Bᵀ Gₙₖ U_A)⊙²  in the KFAC eigenbasis (a second pass)

Each is an accumulator: ``add_inputs(a, ones)`` once per batch (``ones``: a column of ones, the
bias's, is implied after a's, see ``RuleLayer.inputs``), ``add_columns(g, σ)`` for each chunk
of the factor's columns (every reduction is a sum over columns k), ``end_batch()`` when the
batch is done (no reference to its tensors is kept past it: a loader may refill them in place),
``result()`` at the end. All are unscaled sums over the data; the caller applies the loss
scale s.
"""

from __future__ import annotations

import torch

from .dense import _kron_gemm
from .forward import RuleLayer
from .scratch import buffer


class Gram:
    """A running Σ Xᵀ Y over row blocks X, Y (Xᵀ Y symmetric: a Gram matrix, possibly weighted),
    of which only the upper block triangle is multiplied and accumulated in place; the lower
    blocks are filled once, by :meth:`result`.

    Column blocks: one per 128 columns, or per 64 when the first block of rows is tall (at least
    twice as many rows as columns), at most 8 (measured on 2 cores: (256 × 1153) 3.6 ms in 8
    blocks against 6.9 ms whole, (768 × 256) 0.44 ms in 4 against 0.61 ms)."""

    def __init__(self):
        self.acc: torch.Tensor | None = None
        self.edges: list[int] = []

    def add(self, X: torch.Tensor, Y: torch.Tensor | None = None) -> None:
        Y = X if Y is None else Y
        n = X.shape[1]
        if self.acc is None:
            self.acc = torch.zeros(n, n, dtype=X.dtype, device=X.device)
            b = min(8, max(1, n // (64 if X.shape[0] >= 2 * n else 128)))
            self.edges = [n * i // b for i in range(b + 1)]
        e = self.edges
        for i in range(len(e) - 1):
            self.acc[e[i] : e[i + 1], e[i] :].addmm_(X[:, e[i] : e[i + 1]].T, Y[:, e[i] :])

    def add_full(self, M: torch.Tensor) -> None:
        """acc += M, a full symmetric matrix (its lower blocks are overwritten by the mirror)."""
        if self.acc is None:
            self.acc = torch.zeros_like(M)
            self.edges = [0, M.shape[0]]
        self.acc += M

    def result(self) -> torch.Tensor:
        acc, e = self.acc, self.edges
        for i in range(len(e) - 2):
            acc[e[i + 1] :, e[i] : e[i + 1]] = acc[e[i] : e[i + 1], e[i + 1] :].T
        return acc


def _sample_chunks(n: int, per_sample: int, budget: int = 2**19):
    """Sample ranges whose per-sample temporaries of ``per_sample`` elements fit ``budget``.

    Small chunks (about 2 MB in float32) stay in cache; large temporaries cost more in fresh
    memory than the batched GEMM saves (measured on the digits CNN: 0.41 s at 128 MB chunks,
    0.25 s at 2-4 MB)."""
    step = max(1, budget // max(per_sample, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _augmented(a: torch.Tensor, ones: bool) -> torch.Tensor:
    """a with its implied column of ones appended (see ``RuleLayer.inputs``)."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1) if ones else a


def _weights(signs: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """signs (N, K) as (K, N, 1, ...) broadcasting against a tensor of ``shape`` (K, N, ...)."""
    if signs is None:
        return None
    return signs.T.reshape(*signs.T.shape, *([1] * (len(shape) - 2)))


def _per_sample_sq_sum(out, a, g, signs, scratch: dict) -> None:
    """out += Σₙₖ σ Gₙₖ⊙² with Gₙₖ = Σᵣ gₖₙᵣ aₙᵣᵀ: per column, batched GEMMs gₙₖᵀ aₙ over
    chunks of samples, into one kept buffer (``scratch.py``; 11.4 against 21.8 ms for the 9
    columns of a batch of the digits CNN's second layer). A convolution's cotangent arrives
    channels first, so gₙₖᵀ (d, R) is contiguous (9.6 ms against 11.4 ms with strided
    operands)."""
    K, N, R, d = g.shape
    A = a.shape[-1]
    for sl in _sample_chunks(N, d * A):
        G = buffer(scratch, "G", (sl.stop - sl.start, d, A), g)
        for k in range(K):
            torch.bmm(g[k, sl].transpose(1, 2), a[sl], out=G)  # (n, d, A)
            G.square_()
            if signs is not None:
                G.mul_(signs[sl, k][:, None, None])
            out += G.sum(0)


class Reduction:
    a: torch.Tensor | None = None

    def end_batch(self) -> None:
        self.a = None


class Kron(Reduction):
    """KFAC factors: B = Σ σ g gᵀ over (k, n[, r]) and A = Σ a aᵀ over (n[, r]), with the shared
    dimension r (R > 1) treated as batch (expand) or summed / averaged first (reduce)."""

    def __init__(self, mode: str):
        self.mode, self.A, self.B, self.count = mode, Gram(), Gram(), 0
        self.a_sum: torch.Tensor | None = None  # Σ a over rows, with an implied ones column
        self.scratch: dict = {}

    def add_inputs(self, a: torch.Tensor, ones: bool = False) -> None:  # (N, R, A)
        N, R, _ = a.shape
        if R == 1:
            a2 = a[:, 0]
        elif self.mode == "reduce":
            a2 = a.mean(1)
        else:
            a2 = a.reshape(N * R, -1)
        self.A.add(a2)
        if ones:  # A = [[Σ a aᵀ, Σ a], [Σ aᵀ, rows]]: the border, without the column itself
            s = a2.sum(0)
            self.a_sum = s if self.a_sum is None else self.a_sum.add_(s)
        self.count += a2.shape[0]

    def add_columns(self, g: torch.Tensor, signs: torch.Tensor | None) -> None:  # (K, N, R, d)
        K, N, R, d = g.shape
        if R > 1 and self.mode == "expand" and g.stride(-1) != 1 and d <= R:
            # A convolution's cotangent, channels first: Σ over (k, n) of (d × R)(R × d)
            # products is about twice as fast as copying it to (positions × channels) rows
            # (digits CNN, d = 32, R = 36: 0.19 against 0.31 ms per column and batch).
            x = g.transpose(-1, -2).reshape(K * N, d, R)
            y = x if signs is None else x * signs.T.reshape(K * N, 1, 1)
            xx = buffer(self.scratch, "xx", (K * N, d, d), x)
            self.B.add_full(torch.bmm(y, x.transpose(1, 2), out=xx).sum(0))
            return
        if g.shape[2] == 1:
            g = g[:, :, 0]
        elif self.mode == "reduce":
            g = g.sum(2)
        w = _weights(signs, g.shape)
        g2 = g.reshape(-1, g.shape[-1])
        self.B.add(g2 if w is None else (g * w).reshape(g2.shape), g2)

    def result(self):
        A = self.A.result()
        if self.a_sum is not None:
            n = A.shape[0]
            full = A.new_empty(n + 1, n + 1)
            full[:n, :n] = A
            full[:n, n] = full[n, :n] = self.a_sum
            full[n, n] = self.count
            A = full
        return self.B.result(), A, self.count


class Diag(Reduction):
    """Σₙₖ σ Gₙₖ⊙², (d, A), Gₙₖ the per-sample, per-column gradient of the layer.

    With one position (R = 1) Gₙₖ = gₙₖ aₙᵀ, so the sum is (Σₖ σ gₙₖ⊙²)ᵀ (aₙ⊙²): the column
    sums are gathered over the batch's chunks of columns and meet aₙ⊙² in one GEMM per batch."""

    def __init__(self):
        self.out, self.a, self.s, self.ones = None, None, None, False
        self.scratch: dict = {}

    def add_inputs(self, a: torch.Tensor, ones: bool = False) -> None:
        if ones and a.shape[1] > 1:  # per-sample products over positions take the column
            a, ones = _augmented(a, ones), False
        self.a, self.ones = a, ones

    def add_columns(self, g: torch.Tensor, signs: torch.Tensor | None) -> None:
        a = self.a
        if self.out is None:
            A = a.shape[-1] + self.ones
            self.out = torch.zeros(g.shape[-1], A, dtype=a.dtype, device=a.device)
        if a.shape[1] > 1:
            _per_sample_sq_sum(self.out, a, g, signs, self.scratch)
            return
        if self.s is None:
            self.s = torch.zeros(g.shape[1], g.shape[-1], dtype=g.dtype, device=g.device)
        for k in range(g.shape[0]):  # Σₖ σ gₖ⊙², without a (K, N, d) temporary
            gk = g[k, :, 0]
            self.s.addcmul_(gk, gk if signs is None else gk * signs[:, k, None])

    def end_batch(self) -> None:
        if self.s is not None:
            if self.ones:  # the ones column's squares are ones: its entries are Σₙ sₙ
                self.out[:, :-1].addmm_(self.s.T, self.a[:, 0].square())
                self.out[:, -1] += self.s.sum(0)
            else:
                self.out.addmm_(self.s.T, self.a[:, 0].square())
            self.s = None
        super().end_batch()

    def result(self):
        self.end_batch()
        return self.out


class Ekfac(Diag):
    """Σₙₖ σ (U_Bᵀ Gₙₖ U_A)⊙²: the diagonal in the KFAC eigenbasis (a second pass)."""

    def __init__(self, UB: torch.Tensor, UA: torch.Tensor):
        super().__init__()
        self.UB, self.UA = UB, UA

    def add_inputs(self, a: torch.Tensor, ones: bool = False) -> None:
        UA = self.UA
        super().add_inputs(a @ UA[:-1] + UA[-1] if ones else a @ UA)

    def add_columns(self, g: torch.Tensor, signs: torch.Tensor | None) -> None:
        super().add_columns(g @ self.UB, signs)


class Block(Reduction):
    """Σₙₖ σ vec Gₙₖ vec Gₙₖᵀ, (d·A, d·A), row-major vec over (d, A)."""

    def __init__(self):
        self.out, self.a = None, None

    def add_inputs(self, a: torch.Tensor, ones: bool = False) -> None:
        self.a = _augmented(a, ones)

    def add_columns(self, g: torch.Tensor, signs: torch.Tensor | None) -> None:
        a = self.a
        K, N, R, d = g.shape
        A = a.shape[-1]
        if R == 1:
            g1 = g[:, :, 0].transpose(0, 1)  # (N, K, d)
            s1 = g1 if signs is None else g1 * signs[:, :, None]
            Q = s1.transpose(1, 2) @ g1
            term = _kron_gemm(Q, a[:, 0], a[:, 0]).reshape(d * A, d * A)
            self.out = term if self.out is None else self.out.add_(term)
            return
        if self.out is None:
            self.out = torch.zeros(d * A, d * A, dtype=a.dtype, device=a.device)
        for sl in _sample_chunks(N, K * d * A):
            G = torch.matmul(g[:, sl].transpose(-1, -2), a[sl]).reshape(-1, d * A)
            S = G if signs is None else G * signs[sl].T.reshape(-1, 1)
            self.out.addmm_(S.T, G)

    def result(self):
        return self.out


def layer_index(layer: RuleLayer, device) -> torch.Tensor:
    """(d·A,) global coordinates of the layer's (d, A) grid, row-major."""
    idx = torch.empty(layer.d, layer.A, dtype=torch.long, device=device)
    if layer.is_embedding:  # weight stored (vocab, dim): grid entry (j, i) is row i, column j
        (s,) = layer.segments
        grid = torch.arange(layer.A * layer.d, device=device).view(layer.A, layer.d).T
        return (s.offset + grid).reshape(-1)
    for s in layer.segments:
        n = s.a.stop - s.a.start
        idx[:, s.a] = s.offset + torch.arange(layer.d * n, device=device).view(layer.d, n)
    return idx.reshape(-1)
