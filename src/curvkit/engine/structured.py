"""Structured reductions of the pairs (aₙ, gₙₖ): KFAC, EKFAC, exact diagonals, per-layer blocks.

With Gₙₖ = Σᵣ gₙₖᵣ aₙᵣᵀ the per-sample, per-column gradient of a rule layer (d, A), and σₙₖ the
signs of the factor columns:

    diag     Σₙₖ σ Gₙₖ ⊙ Gₙₖ
    block    Σₙₖ σ vec Gₙₖ vec Gₙₖᵀ
    KFAC     expand: (Σₙₖᵣ σ g gᵀ) ⊗ (Σₙᵣ a aᵀ) / (N R);   reduce: (Σₙₖ σ ḡ ḡᵀ) ⊗ (Σₙ ā āᵀ) / N
             with ḡ = Σᵣ g, ā = meanᵣ a  (Eschenhagen et al., 2023)
    EKFAC    Σₙₖ σ (U_Bᵀ Gₙₖ U_A)⊙²  in the KFAC eigenbasis (a second pass)

All reductions are unscaled sums over the batch; the caller applies the loss scale s.
"""

from __future__ import annotations

import torch

from .dense import _kron_gemm
from .forward import RuleLayer


def _signed(g: torch.Tensor, signs: torch.Tensor | None) -> torch.Tensor:
    """g (N, K, ...) times signs (N, K)."""
    if signs is None:
        return g
    return g * signs.reshape(*signs.shape, *([1] * (g.dim() - 2)))


def per_sample_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(N, K, d, A): Gₙₖ = Σᵣ gₙₖᵣ aₙᵣᵀ."""
    return torch.einsum("nkrd,nra->nkda", g, a)


def kfac_factors(a, g, signs, mode: str):
    """(B (d,d), A (A,A), count) of one batch for ``mode`` in ('expand', 'reduce')."""
    if a.shape[1] == 1:  # one position: both modes agree; views, no copies
        a2, g2, count = a[:, 0], g[:, :, 0], a.shape[0]
    elif mode == "reduce":
        a2, g2, count = a.mean(1), g.sum(2), a.shape[0]  # (N, A), (N, K, d)
    else:
        a2, g2 = a.reshape(-1, a.shape[-1]), g.transpose(1, 2).reshape(-1, g.shape[1], g.shape[-1])
        signs = None if signs is None else signs.repeat_interleave(a.shape[1], dim=0)
        count = a2.shape[0]
    g2 = g2.reshape(-1, g2.shape[-1])
    gs = g2 if signs is None else _signed(g2.view(-1, signs.shape[1], g2.shape[-1]), signs)
    return gs.reshape(-1, g2.shape[-1]).T @ g2, a2.T @ a2, count


def ekfac_eigenvalues(a, g, signs, UB, UA) -> torch.Tensor:
    """(d, A): Σₙₖ σ (U_Bᵀ Gₙₖ U_A)⊙²."""
    gp, ap = g @ UB, a @ UA
    if a.shape[1] == 1:
        return (_signed(gp[:, :, 0].square(), signs).sum(1)).T @ ap[:, 0].square()
    return _signed(per_sample_grads(ap, gp).square(), signs).sum((0, 1))


def diag(a, g, signs) -> torch.Tensor:
    """(d, A): Σₙₖ σ Gₙₖ⊙²."""
    if a.shape[1] == 1:
        return _signed(g[:, :, 0].square(), signs).sum(1).T @ a[:, 0].square()
    return _signed(per_sample_grads(a, g).square(), signs).sum((0, 1))


def block(a, g, signs) -> torch.Tensor:
    """(d·A, d·A): Σₙₖ σ vec Gₙₖ vec Gₙₖᵀ (row-major vec over (d, A))."""
    n, k = g.shape[:2]
    d, A = g.shape[-1], a.shape[-1]
    if a.shape[1] == 1:
        g1 = g[:, :, 0]  # (N, K, d)
        Q = _signed(g1, signs).transpose(1, 2) @ g1
        return _kron_gemm(Q, a[:, 0], a[:, 0]).reshape(d * A, d * A)
    G = per_sample_grads(a, g).reshape(n, k, d * A)
    return (_signed(G, signs).reshape(-1, d * A)).T @ G.reshape(-1, d * A)


def layer_index(layer: RuleLayer, device) -> torch.Tensor:
    """(d·A,) global coordinates of the layer's (d, A) grid, row-major."""
    idx = torch.empty(layer.d, layer.A, dtype=torch.long, device=device)
    for s in layer.segments:
        n = s.a.stop - s.a.start
        idx[:, s.a] = s.offset + torch.arange(layer.d * n, device=device).view(layer.d, n)
    return idx.reshape(-1)
