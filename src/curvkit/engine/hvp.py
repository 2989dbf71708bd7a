"""Hessian products through a chain of Linear layers and pointwise functions, by hand.

For a batch whose model is a chain (NOTE [chains] in ``chain.py``) of ``Linear`` layers on
(N, features) tensors and pointwise activations, and whose chosen parameters all belong to
those layers, H v is Pearlmutter's R-operator applied to the backward pass. Everything that does
not depend on v is computed once: the recorded forward pass, the loss's per-sample output
gradients and Hessians Mₙ, the cotangent δ at every module's output, σ' and δ ⊙ σ'' of every
activation, and the gradient itself. Per product (one column v):

    forward   ż = ȧ Wᵀ + a V_Wᵀ + V_b             (Linear, a its input, ȧ the input's tangent)
              ȧ' = σ' ⊙ ż                         (activation)
    output    δ̇ = Mₙ ż                            (per sample)
    backward  H_W = δ̇ᵀ a + δᵀ ȧ,  H_b = Σₙ δ̇,  δ̇_in = δ̇ W + δ V_W      (Linear)
              δ̇_in = σ' ⊙ δ̇ + (δ ⊙ σ'') ⊙ ż                             (activation)

The same six GEMMs per layer as autograd's double backward on a kept graph, but every result
is written into a buffer made once (H_W straight into the output vector; no fresh N×width
temporaries, see ``scratch.py``) and the pointwise work is one fused product per activation:
10.3 against 12.5 ms per product on the digits MLP with 1437 samples (``docs/architecture.md``,
"Performance notes"). Any other model returns None and the caller keeps the graph
(``products.cached_hessian_product``), which is exact for every model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data import Batch
from .chain import DERIVATIVES, Call, chain_of
from .forward import Forward, _owners
from .products import Kept, Watch

# activation -> σ''(z) from its output y = σ(z) and σ'(z) (``chain.DERIVATIVES``); None: 0 a.e.
_SECOND: dict[type, Callable | None] = {
    nn.Tanh: lambda y, d1: -2 * y * d1,
    nn.Sigmoid: lambda y, d1: d1 * (1 - 2 * y),
    nn.ReLU: None,
    nn.LeakyReLU: None,
}
_NO_OPS = (nn.Identity, nn.Dropout, nn.Flatten)  # on (N, features) tensors: the identity


class _Linear:
    def __init__(self, call: Call, w: slice | None, b: slice | None):
        self.W, self.a, self.w, self.b = call.module.weight.detach(), call.input, w, b
        self.bias = call.module.bias  # watched only: the recorded pass already used it
        self.dot: torch.Tensor | None = None  # ż, buffer (N, out)
        self.delta: torch.Tensor | None = None  # δ at the output (N, out)
        self.a_dot: torch.Tensor | None = None  # ȧ: the previous stage's tangent, or None


class _Pointwise:
    def __init__(self, d1: torch.Tensor, d2: torch.Tensor | None):
        self.d1, self.d2 = d1, d2  # σ', then δ ⊙ σ'' once δ is known
        self.dot: torch.Tensor | None = None  # ȧ' = σ' ⊙ ż, buffer
        self.z_dot: torch.Tensor | None = None  # ż: the previous stage's tangent


def chain_hessian_product(fw: Forward, batch: Batch) -> Kept | None:
    """(``prod(V) -> (P, k)`` the unscaled H V of the batch, the flat gradient Σₙ ∇ℓₙ, what
    they read), or None where the route does not apply (module docstring)."""
    trace = fw.chain_trace(batch)
    out = None if trace is None else trace.out
    if out is None or out.dim() != 2 or out.dtype != fw.layout.tensors[0].dtype:
        return None
    if fw.escaped(batch) or fw.grad_off(batch):
        return None  # a chosen parameter used outside its module's call; a no_grad section
    if out.shape[0] * out.shape[1] ** 2 > 4 * fw.activation_numel(batch):
        return None  # the output Hessians Mₙ would outweigh the kept graph: keep that
    layout = fw.layout
    first = next(
        (c for c in trace.calls if type(c.module) is nn.Linear and _chosen(layout, c.module)),
        None,
    )
    calls = None if first is None else chain_of(trace, first.module)
    if calls is None:
        return None
    stages: list = []
    seen: set[int] = set()
    owners = _owners(fw.model)
    for c in calls:
        m = c.module
        if c.input.dim() != 2 or c.output.dim() != 2:
            return None
        if type(m) is nn.Linear:
            mine = [id(p) for p in (m.weight, m.bias) if p is not None]
            if any(i in seen or owners[i] > 1 for i in mine):
                return None  # called twice or tied: its Hessian blocks couple across uses
            seen.update(mine)
            stages.append(_Linear(c, *_slices(layout, m)))
        elif type(m) in _SECOND:
            d1 = DERIVATIVES[type(m)](m, c.output)
            second = _SECOND[type(m)]
            stages.append(_Pointwise(d1, None if second is None else second(c.output, d1)))
        elif not isinstance(m, _NO_OPS):
            return None
    covered = sum(
        (s.w.stop - s.w.start if s.w else 0) + (s.b.stop - s.b.start if s.b else 0)
        for s in stages
        if isinstance(s, _Linear)
    )
    if covered != layout.numel:
        return None  # a chosen parameter outside the chain's Linear layers
    product = _ChainHessian(fw, batch, stages, out)
    return Kept(product, product.gradient, product.watch)


def _chosen(layout, m: nn.Linear) -> bool:
    return layout.index_of(m.weight) is not None or (
        m.bias is not None and layout.index_of(m.bias) is not None
    )


def _slices(layout, m: nn.Linear) -> tuple[slice | None, slice | None]:
    def where(p):
        i = None if p is None else layout.index_of(p)
        if i is None:
            return None
        o = layout.offsets[i]
        return slice(o, o + p.numel())

    return where(m.weight), where(m.bias)


class _ChainHessian:
    @torch.no_grad()
    def __init__(self, fw: Forward, batch: Batch, stages: list, out: torch.Tensor):
        self.stages, self.P = stages, fw.layout.numel
        self.M = fw.loss.output_hessian(out, batch.targets)  # (N, C, C)
        # What this product reads, as it is now: a later change (an optimiser step, an edited
        # batch) makes the products stale.
        linears = [s for s in stages if isinstance(s, _Linear)]
        self.watch = Watch.of(fw, batch, [s.a for s in linears])
        new = lambda n: torch.empty(out.shape[0], n, dtype=out.dtype, device=out.device)  # noqa: E731
        tangent = None
        for s in stages:  # tangent buffers, forward order
            if isinstance(s, _Linear):
                s.a_dot, s.dot = tangent, new(s.W.shape[0])
            else:  # the chain starts at a Linear layer: activations always get a tangent
                s.z_dot, s.dot = tangent, new(tangent.shape[1])
            tangent = s.dot
        self.out_dot = tangent
        self.gradient = torch.zeros(self.P, dtype=out.dtype, device=out.device)
        delta = fw.loss.per_sample_grads(out, batch.targets).reshape(out.shape)
        self.back: list[torch.Tensor | None] = []  # δ̇ buffers at each stage's input
        for s in reversed(stages):  # first-order backward: δ everywhere, once
            if isinstance(s, _Linear):
                s.delta = delta
                if s.w is not None:
                    self.gradient[s.w].view_as(s.W).copy_(delta.T @ s.a)
                if s.b is not None:
                    self.gradient[s.b] = delta.sum(0)
                delta = delta @ s.W
            else:
                if s.d2 is not None:
                    s.d2 = s.d2.mul_(delta)  # δ ⊙ σ''
                delta = delta * s.d1
            self.back.append(None if s is stages[0] else new(delta.shape[1]))

    @property
    def nbytes(self) -> int:
        """Memory this product keeps (the recorded inputs, δ, σ′, δ⊙σ″, Mₙ and buffers)."""
        held = [self.M, self.gradient, *self.back]
        for s in self.stages:
            held += [s.a, s.delta, s.dot] if isinstance(s, _Linear) else [s.d1, s.d2, s.dot]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    @torch.no_grad()
    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.watch.check()
        if V.shape[1] == 1 and V.is_contiguous():
            out = torch.empty_like(V)
            self._column(V[:, 0], out[:, 0])
            return out
        out = torch.empty_like(V)
        col = torch.empty(self.P, dtype=V.dtype, device=V.device)
        for j in range(V.shape[1]):
            self._column(V[:, j].contiguous(), col)
            out[:, j] = col
        return out

    def _column(self, v: torch.Tensor, hv: torch.Tensor) -> None:
        """hv (P,) = H v, every intermediate in a buffer."""
        for s in self.stages:  # tangents forward
            if isinstance(s, _Linear):
                vw = None if s.w is None else v[s.w].view_as(s.W)
                if vw is not None:
                    torch.mm(s.a, vw.T, out=s.dot)
                    if s.a_dot is not None:
                        s.dot.addmm_(s.a_dot, s.W.T)
                elif s.a_dot is not None:
                    torch.mm(s.a_dot, s.W.T, out=s.dot)
                else:
                    s.dot.zero_()
                if s.b is not None:
                    s.dot.add_(v[s.b])
            else:
                torch.mul(s.z_dot, s.d1, out=s.dot)
        dd = torch.bmm(self.M, self.out_dot[:, :, None])[:, :, 0]  # δ̇ = Mₙ ż
        for s, buf in zip(reversed(self.stages), self.back):  # cotangents backward
            if isinstance(s, _Linear):
                if s.w is not None:
                    hw = hv[s.w].view_as(s.W)
                    torch.mm(dd.T, s.a, out=hw)
                    if s.a_dot is not None:
                        hw.addmm_(s.delta.T, s.a_dot)
                if s.b is not None:
                    torch.sum(dd, 0, out=hv[s.b])
                if buf is None:
                    continue
                torch.mm(dd, s.W, out=buf)
                if s.w is not None:
                    buf.addmm_(s.delta, v[s.w].view_as(s.W))
            else:
                if buf is None:
                    continue
                torch.mul(dd, s.d1, out=buf)
                if s.d2 is not None:
                    buf.addcmul_(s.d2, s.z_dot)
            dd = buf
