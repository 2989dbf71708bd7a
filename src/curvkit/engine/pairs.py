"""One pass, two sides: capture each rule layer's inputs aₙ and backpropagate the columns of
the output-space factor Fₙ (Mₙ = Fₙ diag(σₙ) Fₙᵀ) to its outputs, giving gₙₖ. Every structured
curvature of a rule layer is a reduction of these pairs (``structured.py``); parameters without a
rule get per-sample Jacobian rows Fₙᵀ Jₙ from ``fallback_rows``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vjp, vmap

from ..data import Batch, _map_tensors, pick_output
from .forward import Forward, RuleLayer


def backprop(fw: Forward, batch: Batch, layers: list[RuleLayer], side):
    """One forward pass, then the factor's columns backpropagated to every rule layer.

    ``side(out) -> (F (N, C, K), σ)`` turns the output into the factor. Returns
    (acts: list of (N, R, A), grads: list of (K, N, R, d), F, σ), where
    grads[l][k, n] = ∂(Fₙ[:, k]ᵀ fₙ)/∂(layer l's output)."""
    f = fw.perturbed(batch, layers)
    ref = fw.layout.tensors[0]
    eps0 = [
        torch.zeros(s, dtype=ref.dtype, device=ref.device) for s in fw.output_shapes(batch, layers)
    ]
    out, pullback, acts = vjp(f, eps0, has_aux=True)
    F, signs = side(out.detach())
    cots = F.permute(2, 0, 1).reshape(F.shape[2], *out.shape)  # (K, *out)
    if F.shape[2] == 1:  # one column (MC Fisher, EF): a plain backward pass
        grads = [g[None] for g in pullback(cots[0])[0]]
    else:
        (grads,) = vmap(pullback)(cots)
    return acts, [l.positions_last(g) for l, g in zip(layers, grads)], F, signs


def fallback_rows(fw: Forward, batch: Batch, F: torch.Tensor, names: list[str], chunk: int | None):
    """(N, K, P_f): per-sample Fₙᵀ Jₙ restricted to the parameters ``names`` (vmap over samples)."""
    fixed = {n: t for n, t in fw.params.items() if n not in names}
    sub = {n: fw.params[n] for n in names}

    def one(inputs, Fn):
        def f(p):
            raw = functional_call(
                fw.model, {**fixed, **p}, *_as_call(_map_tensors(inputs, lambda t: t.unsqueeze(0)))
            )
            return pick_output(raw, fw.output_fn).reshape(-1)

        _, pull = vjp(f, sub)
        (rows,) = vmap(pull, in_dims=1)(Fn)  # dict of (K, *shape)
        return torch.cat([rows[n].reshape(Fn.shape[1], -1) for n in names], dim=1)

    return vmap(one, chunk_size=chunk)(batch.inputs, F)


def _as_call(inputs):
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}
