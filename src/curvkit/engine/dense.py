"""Dense and diagonal reductions of one batch, added in place into the result.

Rule layers (see NOTE [the ε trick] in ``forward.py``) get their blocks from per-sample
derivatives w.r.t. ε, one GEMM per pair of layers; every other coordinate ("fallback") gets its
full column from the generic products of ``products.py`` and, by symmetry, its row.
"""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vmap

from ..data import Batch
from .forward import Forward, RuleLayer
from .products import gauss_newton_product, hessian_product


def _kron_gemm(Q: torch.Tensor, a_u: torch.Tensor, a_v: torch.Tensor) -> torch.Tensor:
    """Σₙ Qₙ ⊗ (a_uₙ a_vₙᵀ) as a (d_u, A_u, d_v, A_v) view: one GEMM with inner size N."""
    n, du, dv = Q.shape
    aa = (a_u[:, :, None] * a_v[:, None, :]).reshape(n, -1)
    R = Q.reshape(n, du * dv).T @ aa
    return R.view(du, dv, a_u.shape[1], a_v.shape[1]).permute(0, 2, 1, 3)


def _scatter(out: torch.Tensor, lu: RuleLayer, lv: RuleLayer, blk: torch.Tensor) -> None:
    """Add blk (d_u, A_u, d_v, A_v) at (u, v) and, for u ≠ v, its transpose at (v, u)."""
    for su in lu.segments:
        nu = su.a.stop - su.a.start
        for sv in lv.segments:
            nv = sv.a.stop - sv.a.start
            part = blk[:, su.a, :, sv.a]
            rows, cols = (
                slice(su.offset, su.offset + lu.d * nu),
                slice(sv.offset, sv.offset + lv.d * nv),
            )
            out[rows, cols].view(lu.d, nu, lv.d, nv).add_(part)
            if lu is not lv:
                out[cols, rows].view(lv.d, nv, lu.d, nu).add_(part.permute(2, 3, 0, 1))


def _scatter_diag(out: torch.Tensor, layer: RuleLayer, d: torch.Tensor) -> None:
    for s in layer.segments:
        n = s.a.stop - s.a.start
        out[s.offset : s.offset + layer.d * n].view(layer.d, n).add_(d[:, s.a])


def _onehots(D: int, sizes: list[int], n: int, dtype, device):
    """idx -> [(n, d_l)]: the tangent e_idx of the concatenated ε, broadcast over samples."""
    ar = torch.arange(D, device=device)

    def make(idx):
        e = (ar == idx).to(dtype)
        return [p.expand(n, -1) for p in torch.split(e, sizes)]

    return make


def _eps_setup(fw: Forward, batch: Batch, layers: list[RuleLayer]):
    """(f, ε₀, one-hot tangent maker, tangent indices) shared by both ε derivatives."""
    sizes = [l.d for l in layers]
    D, n = sum(sizes), batch.size
    ref = fw.layout.tensors[0]
    eps0 = [torch.zeros(n, d, dtype=ref.dtype, device=ref.device) for d in sizes]
    onehot = _onehots(D, sizes, n, ref.dtype, ref.device)
    return fw.perturbed(batch, layers), eps0, onehot, torch.arange(D, device=ref.device)


def _eps_jacobian(fw: Forward, batch: Batch, layers: list[RuleLayer], chunk):
    """(acts: list of (N, A_l), J (N, C, D)): per-sample Jacobians of the output w.r.t. ε."""
    f, eps0, onehot, idx = _eps_setup(fw, batch, layers)
    n = batch.size
    acts = [a[:, 0] for a in f(eps0)[1]]

    def jcol(i):
        return jvp(lambda e: f(e)[0].reshape(n, -1), (eps0,), (onehot(i),))[1]

    J = vmap(jcol, chunk_size=chunk)(idx)  # (D, N, C)
    return acts, J.permute(1, 2, 0)


def _eps_hessian(fw: Forward, batch: Batch, layers: list[RuleLayer], chunk):
    """(acts, δ (N, D), Hε (N, D, D), Jacts: list of (N, A_l, D)): per-sample gradient and
    Hessian of the loss w.r.t. ε, and the Jacobians of the layers' inputs w.r.t. ε."""
    f, eps0, onehot, idx = _eps_setup(fw, batch, layers)

    def loss_and_acts(eps):
        out, acts = f(eps)
        return fw.loss.sum_loss(out, batch.targets), [a[:, 0] for a in acts]

    g = grad(loss_and_acts, has_aux=True)  # eps -> (δ list, acts)
    delta, acts = g(eps0)

    def hcol(i):
        return jvp(g, (eps0,), (onehot(i),))[1]

    t_delta, t_acts = vmap(hcol, chunk_size=chunk)(idx)  # lists of (D, N, d_l) / (D, N, A_l)
    H = torch.cat(t_delta, dim=2).permute(1, 2, 0)  # (N, D, D): column t = ∂δₙ/∂εₙ[t]
    Ja = [t.permute(1, 2, 0) for t in t_acts]
    return acts, torch.cat(delta, dim=1), H, Ja


def _starts(layers: list[RuleLayer]) -> list[slice]:
    out, s = [], 0
    for l in layers:
        out.append(slice(s, s + l.d))
        s += l.d
    return out


def rule_dense(out, fw, batch, layers, kind, M, chunk) -> None:
    sl = _starts(layers)
    if kind != "hessian":
        acts, J = _eps_jacobian(fw, batch, layers, chunk)
        W = M @ J
        for u, lu in enumerate(layers):
            for v in range(u, len(layers)):
                Q = J[:, :, sl[u]].transpose(1, 2) @ W[:, :, sl[v]]
                _scatter(out, lu, layers[v], _kron_gemm(Q, acts[u], acts[v]))
        return
    acts, delta, H, Ja = _eps_hessian(fw, batch, layers, chunk)
    n = batch.size
    for u, lu in enumerate(layers):
        for v in range(u, len(layers)):
            lv = layers[v]
            blk = _kron_gemm(H[:, sl[u], sl[v]], acts[u], acts[v])  # a view of a fresh GEMM result
            # v's input depends on u's output: Σₙ δ_v[p] ∂a_v[q]/∂ε_u[i] a_u[j]
            Jvu = Ja[v][:, :, sl[u]]
            if u != v and bool(Jvu.any()):
                m1 = (acts[u][:, :, None] * delta[:, None, sl[v]]).reshape(n, -1)
                R = (m1.T @ Jvu.reshape(n, -1)).view(lu.A, lv.d, lv.A, lu.d)
                blk += R.permute(3, 0, 1, 2)
            # u's input depends on v's output (v earlier in the graph than in module order)
            Juv = Ja[u][:, :, sl[v]]
            if u != v and bool(Juv.any()):
                m1 = (delta[:, sl[u], None] * acts[v][:, None, :]).reshape(n, -1)
                R = (m1.T @ Juv.reshape(n, -1)).view(lu.d, lv.A, lu.A, lv.d)
                blk += R.permute(0, 2, 3, 1)
            _scatter(out, lu, lv, blk)


def rule_hessian_diag(out, fw, batch, layers, chunk) -> None:
    """Σₙ Hεₙ[(l,i),(l,i)] a_lₙ[j]² — the exact Hessian diagonal of the rule layers. (Gauss-Newton
    diagonals come from the backpropagated pairs instead: ``structured.diag``.)"""
    sl = _starts(layers)
    acts, _, H, _ = _eps_hessian(fw, batch, layers, chunk)
    q = H.diagonal(dim1=1, dim2=2)
    for u, lu in enumerate(layers):
        _scatter_diag(out, lu, q[:, sl[u]].T @ acts[u].square())


def rule_mask(fw: Forward, layers: list[RuleLayer]) -> torch.Tensor:
    """Boolean (P,): True at coordinates covered by the rule layers."""
    ref = fw.layout.tensors[0]
    mask = torch.zeros(fw.layout.numel, dtype=torch.bool, device=ref.device)
    for l in layers:
        for s in l.segments:
            mask[s.offset : s.offset + l.d * (s.a.stop - s.a.start)] = True
    return mask


def product(fw: Forward, batch: Batch, kind: str, M, chunk, forward_ad: bool = True):
    if kind == "hessian":
        return hessian_product(fw, batch, chunk, forward_ad)
    return gauss_newton_product(fw, batch, M, chunk, forward_ad)


def fallback_columns(
    out, fw, batch, kind, M, covered, chunks, diag_only: bool, forward_ad: bool = True
) -> None:
    """Columns (and rows) of the coordinates not covered by rules, from one-hot products."""
    idx = torch.nonzero(~covered).flatten()
    if idx.numel() == 0:
        return
    vchunk, step = chunks
    prod = product(fw, batch, kind, M, vchunk, forward_ad)
    P = fw.layout.numel
    ref = fw.layout.tensors[0]
    for start in range(0, idx.numel(), step):
        cols = idx[start : start + step]
        V = torch.zeros(P, cols.numel(), dtype=ref.dtype, device=ref.device)
        V[cols, torch.arange(cols.numel(), device=ref.device)] = 1
        C = prod(V)  # (P, c)
        if diag_only:
            out.index_add_(0, cols, C[cols, torch.arange(cols.numel(), device=ref.device)])
            continue
        out.index_add_(1, cols, C)
        out.index_add_(0, cols, (C * covered[:, None]).T)
