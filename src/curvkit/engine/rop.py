"""Hessian-vector products through a chain of Linear layers and pointwise functions, by hand.

For models that are chains (NOTE [chains] in ``chain.py``) whose chosen parameters all belong to
``Linear`` layers, H V is Pearlmutter's R-operator applied to the backward pass, with everything
that does not depend on V computed once per batch: the forward pass, the first-order cotangents
δ at every module's output, the derivatives σ', σ'' of pointwise modules, and the loss's
per-sample output gradients and Hessians Mₙ. Per product, for columns V (the K dimension):

    forward   ȧ_out = ȧ_in Wᵀ + a V_Wᵀ + V_b            (Linear)
              ȧ_out = σ' ⊙ ȧ_in                         (pointwise)
    output    δ̇ = Mₙ ȧ                                 (per sample)
    backward  H_W = δ̇ᵀ a + δᵀ ȧ_in,  H_b = Σ δ̇,  δ̇_in = δ̇ W + δ V_W   (Linear)
              δ̇_in = σ' ⊙ δ̇ + σ'' ⊙ ȧ_in ⊙ δ            (pointwise)

Six GEMMs of a layer's size per column (two for the first layer), against roughly ten for
autograd's double backward on a kept graph (12-15 ms per product on the digits MLP, 1437
samples; this route: see ``benchmarks/bench_spectral.py``). Anything else returns None, and the
caller uses the generic products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data import Batch
from .chain import Call, chain_of
from .forward import Forward

# pointwise module -> (σ'(y), σ''(y)) in terms of its output y
_SECOND: dict[type, Callable] = {
    nn.Tanh: lambda m, y: (1 - y * y, -2 * y * (1 - y * y)),
    nn.Sigmoid: lambda m, y: (y * (1 - y), y * (1 - y) * (1 - 2 * y)),
    nn.ReLU: lambda m, y: ((y > 0).to(y.dtype), None),
    nn.LeakyReLU: lambda m, y: (torch.where(y > 0, 1.0, m.negative_slope).to(y.dtype), None),
}
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def chain_hessian_product(fw: Forward, batch: Batch) -> Callable | None:
    """``prod(V) -> (P, k)``, the unscaled H V of the batch, or None if the route does not
    apply (see the module docstring)."""
    layout = fw.layout
    where = {}  # id(parameter) -> its index in the layout
    for i, t in enumerate(layout.tensors):
        where[id(t)] = i
    trace = fw.record(batch)
    owners: list[Call] = []
    for c in trace.calls:
        if type(c.module) is nn.Linear:
            ps = [p for p in (c.module.weight, c.module.bias) if p is not None and id(p) in where]
            if ps:
                owners.append(c)
    used = [id(p) for c in owners for p in (c.module.weight, c.module.bias) if p is not None]
    if not owners or len(set(used)) != len(used) or any(id(t) not in used for t in layout.tensors):
        return None  # a chosen parameter outside Linear layers, a tied one, or a layer used twice
    calls = chain_of(trace, owners[0].module)
    if calls is None or any(
        type(c.module) not in _SECOND
        and not isinstance(c.module, _RESHAPES)
        and type(c.module) is not nn.Linear
        for c in calls
    ):
        return None
    return _ChainHVP(fw, batch, calls, trace.out, where)


class _ChainHVP:
    def __init__(self, fw: Forward, batch: Batch, calls: list[Call], out, where: dict):
        self.calls, self.layout, self.where = calls, fw.layout, where
        n = out.shape[0]
        self.out_shape = out.shape
        self.M = fw.loss.output_hessian(out, batch.targets)  # (N, C, C)
        delta = fw.loss.per_sample_grads(out, batch.targets).reshape(1, *out.shape)
        self.delta: list[torch.Tensor] = [None] * len(calls)  # δ at each call's output
        self.derivs: list = [None] * len(calls)
        for i in range(len(calls) - 1, 0, -1):  # first-order backward, every δ kept
            c = calls[i]
            self.delta[i] = delta
            if type(c.module) in _SECOND:
                self.derivs[i] = _SECOND[type(c.module)](c.module, c.output)
                delta = delta * self.derivs[i][0]
            elif type(c.module) is nn.Linear:
                delta = delta @ c.module.weight
            else:
                delta = delta.reshape(1, *c.input.shape)
        self.delta[0] = delta
        self.n = n

    def _param(self, V: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of V (P, K) for parameter p, as (K, *p.shape); None if p is not chosen."""
        if p is None or id(p) not in self.where:
            return None
        i = self.where[id(p)]
        o = self.layout.offsets[i]
        return V[o : o + p.numel()].T.reshape(V.shape[1], *p.shape)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        K = V.shape[1]
        calls = self.calls
        tangents: list = [None] * len(calls)  # ȧ at each call's input
        t = None
        for i, c in enumerate(calls):
            tangents[i] = t
            m = c.module
            if type(m) is nn.Linear:
                vw, vb = self._param(V, m.weight), self._param(V, m.bias)
                z = None if t is None else t @ m.weight.T
                if vw is not None:
                    a = c.input.reshape(1, -1, m.in_features)
                    zw = torch.matmul(a, vw.transpose(1, 2)).reshape(K, *c.output.shape)
                    z = zw if z is None else z.add_(zw)
                if vb is not None:
                    zb = vb.reshape(K, *([1] * (c.output.dim() - 1)), -1)
                    z = zb.expand(K, *c.output.shape).clone() if z is None else z.add_(zb)
                t = z
            elif type(m) in _SECOND:
                t = None if t is None else t * self.derivs[i][0]
            else:
                t = None if t is None else t.reshape(K, *c.output.shape)
        out = torch.zeros_like(V)
        if t is None:  # the output does not depend on the chosen parameters
            return out
        tf = t.reshape(K, self.n, -1)
        dd = torch.einsum("nij,knj->kni", self.M, tf).reshape(K, *self.out_shape)  # δ̇
        for i in range(len(calls) - 1, -1, -1):
            c, m, ti = calls[i], calls[i].module, tangents[i]
            delta = self.delta[i]
            if type(m) is nn.Linear:
                rows_dd = dd.reshape(K, -1, m.out_features)
                rows_d = delta.reshape(-1, m.out_features)
                vw = self._param(V, m.weight)
                if vw is not None:
                    hw = torch.matmul(rows_dd.transpose(1, 2), c.input.reshape(-1, m.in_features))
                    if ti is not None:
                        hw += torch.matmul(rows_d.T, ti.reshape(K, -1, m.in_features))
                    self._put(out, m.weight, hw)
                if self._param(V, m.bias) is not None:
                    self._put(out, m.bias, rows_dd.sum(1))
                if i == 0:
                    break
                nd = rows_dd @ m.weight
                if vw is not None:
                    nd += torch.matmul(rows_d, vw)
                dd = nd.reshape(K, *c.input.shape)
            elif type(m) in _SECOND:
                d1, d2 = self.derivs[i]
                dd = dd * d1
                if d2 is not None and ti is not None:
                    dd += ti * d2 * delta
            else:
                dd = dd.reshape(K, *c.input.shape)
        return out

    def _put(self, out: torch.Tensor, p: torch.Tensor, h: torch.Tensor) -> None:
        o = self.layout.offsets[self.where[id(p)]]
        out[o : o + p.numel()] = h.reshape(h.shape[0], -1).T
