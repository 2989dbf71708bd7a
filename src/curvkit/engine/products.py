"""Matrix-free curvature products on one batch, w.r.t. all chosen parameters.

Each factory returns ``prod(V) -> (P, k)`` for ``V`` of shape (P, k), the *unscaled* sum over
the batch's samples (the caller applies the reduction's scale s):

* Hessian:        H V      = ∇²(Σₙ ℓₙ) V           (forward-over-reverse, vmapped over columns)
* Gauss-Newton:   Jᵀ M J V  with per-sample Mₙ     (GGN: Mₙ = ∇²ℓₙ; EF: ∇ℓₙ∇ℓₙᵀ; MC Fisher)

These are also the generic path of the dense engine: exact for any module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.func import grad, vjp, vmap

from ..autodiff import hessian_map, linear_map
from ..data import Batch
from ..errors import CurvkitValueError
from .forward import Forward


def _flatten(tensors: dict, names) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def _flatten_grads(leaves: list[torch.Tensor], grads) -> torch.Tensor:
    """``autograd.grad(..., allow_unused=True)`` results as one flat vector, zeros for None."""
    return torch.cat(
        [
            torch.zeros_like(t).reshape(-1) if g is None else g.reshape(-1)
            for t, g in zip(leaves, grads)
        ]
    )


def _loss_of(fw: Forward, batch: Batch) -> Callable[[dict], torch.Tensor]:
    """params -> Σₙ ℓₙ of the batch."""
    return lambda params: fw.loss.sum_loss(fw.output(batch, params), batch.targets)


def batch_gradient(fw: Forward, batch: Batch) -> torch.Tensor:
    """(P,): Σₙ ∇ℓₙ of the batch, flat."""
    return _flatten(grad(_loss_of(fw, batch))(fw.params), fw.layout.names)


def hessian_product(
    fw: Forward, batch: Batch, chunk: int | None, forward_ad: bool = True
) -> Callable:
    names = fw.layout.names
    hv = hessian_map(grad(_loss_of(fw, batch)), fw.params, forward_ad)

    def column(v: torch.Tensor) -> torch.Tensor:
        return _flatten(hv(fw.layout.unflatten(v)), names)

    def prod(V: torch.Tensor) -> torch.Tensor:  # (P, k) -> (P, k)
        if V.shape[1] == 1:  # one column (Lanczos): no vmap overhead
            return column(V[:, 0])[:, None]
        return vmap(column, in_dims=1, out_dims=1, chunk_size=chunk)(V)

    return prod


def gauss_newton_product(
    fw: Forward, batch: Batch, M: torch.Tensor, chunk: int | None, forward_ad: bool = True
) -> Callable:
    """M: (N, C, C) output-space matrices of this batch."""
    names = fw.layout.names

    def f(params: dict) -> torch.Tensor:
        return fw.output(batch, params)

    out, pullback = vjp(f, fw.params)
    shape = out.shape
    jvp_ = linear_map(f, fw.params, forward_ad)

    def column(v: torch.Tensor) -> torch.Tensor:
        jv = jvp_(fw.layout.unflatten(v)).reshape(shape[0], -1, 1)
        (back,) = pullback((M @ jv).reshape(shape))
        return _flatten(back, names)

    def prod(V: torch.Tensor) -> torch.Tensor:
        return vmap(column, in_dims=1, out_dims=1, chunk_size=chunk)(V)

    return prod


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64 (the golden ratio)
# elements hashed per block: 64k int64 (512 KB) ran (256, 3, 64, 64) float32 inputs in about
# half the time of whole-tensor temporaries on 2 cores
_HASH_BLOCK = 2**16


def _mix(x: torch.Tensor) -> torch.Tensor:
    """An xor-shift-multiply hash of each int64 (products wrap around: arithmetic mod 2⁶⁴)."""
    return _mix_(x.clone())


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix` in place (a third less time on large tensors than fresh temporaries)."""
    x.bitwise_xor_(x >> 31).mul_(_MIX)
    x.bitwise_xor_(x >> 29).mul_(_MIX)
    return x.bitwise_xor_(x >> 32)


def _sample_hashes(t: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int64: a hash of each of t's n rows from every element's bits and its place in the
    row (a sum of element hashes alone misses a flip or a permutation within a row)."""
    flat = t.detach()
    if flat.is_complex():
        flat = torch.view_as_real(flat)
    flat = flat.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    x = flat.view(_INT_OF_SIZE[flat.element_size()]).view(n, -1)
    m = x.shape[1]
    place = torch.arange(m, device=x.device) * _MIX
    out = torch.zeros(n, dtype=torch.int64, device=x.device)
    step = max(1, _HASH_BLOCK // n)  # small blocks stay in cache (no fresh pages per call)
    for c in range(0, m, step):
        out += _mix_(x[:, c : c + step] + place[c : c + step]).sum(1)  # int64: bits and place
    return out


def batch_hashes(batch: Batch) -> tuple[torch.Tensor, int]:
    """(per-sample hashes (N,), the shared tensors' hash): each sample whole, every element
    with its place in the sample and which inputs go with which targets. Tensors without the
    batch's leading size (shared inputs) count whole; one with it counts as per-sample data,
    even if the model uses it whole (a (T, T) mask with T = N)."""
    n = batch.size
    per = torch.zeros(n, dtype=torch.int64, device=batch.targets.device)
    shared = 0
    for k, t in enumerate(batch.tensors_given(), start=1):
        if t.numel() == 0:
            continue
        if t.dim() >= 1 and t.shape[0] == n:
            per += _mix(_sample_hashes(t, n).to(per.device) + k)
        else:
            shared += int(_mix(_sample_hashes(t, 1) + k))  # mixed: swapped tensors differ
    return _mix(per), shared


def data_print(hashes: tuple[torch.Tensor, int], ordered: bool = False) -> int:
    """A batch as one integer mod 2⁶⁴ from its :func:`batch_hashes`: their sum over samples, so
    it moves with any edit, a flip within a sample or re-paired targets, yet not with the
    samples' order: the sum over a loader's batches is the same for the same samples in any
    order or split. ``ordered`` hashes each sample with its position too, for state kept per
    row."""
    rows, shared = hashes
    if ordered:
        rows = _mix(rows + torch.arange(rows.shape[0], device=rows.device) * _MIX)
    return (int(rows.sum()) + shared) % 2**64


class Kept(NamedTuple):
    """A batch's Hessian state kept across products: H V, the gradient, and what they read."""

    product: Callable[[torch.Tensor], torch.Tensor]
    gradient: torch.Tensor
    watch: Watch


class Watch:
    """The tensors kept product state read, as they are now. ``seen`` ones (the chosen
    parameters, the batch's inputs and targets: what users edit, also through ``.data``, which
    leaves ``_version`` alone) are kept as copies and compared exactly; ``internal`` ones (other
    parameters, recorded activations) only by their ``_version``."""

    def __init__(self, seen, internal=()):
        seen = [t for t in seen if t is not None]
        self.seen = [(t, t._version, t.detach().clone()) for t in seen]
        self.internal = [(t, t._version) for t in internal if t is not None]
        self.nbytes = sum(c.numel() * c.element_size() for _, _, c in self.seen)

    @classmethod
    def of(cls, fw: Forward, batch: Batch, internal=()) -> Watch:
        """What a batch's kept Hessian products read: copies of the chosen parameters, the
        batch and the model's floating buffers (BatchNorm's running statistics, which a
        training-mode call refreshes without touching any parameter; small), and the model's
        frozen parameters (which may be most of it) by version only."""
        chosen = {id(t) for t in fw.layout.tensors}
        frozen = [p for p in fw.model.parameters() if id(p) not in chosen]
        buffers = [b for b in fw.model.buffers() if b.is_floating_point()]
        seen = [*fw.layout.tensors, *batch.tensors_given(), *buffers]
        return cls(seen, [*frozen, *internal])

    def check(self) -> None:
        """An in-place change since (an optimiser step, an edited batch) makes the kept state
        stale: refuse rather than answer for a model that no longer exists."""
        stale = any(t._version != v for t, v in self.internal) or any(
            t._version != v or not torch.equal(t.detach(), copy) for t, v, copy in self.seen
        )
        if stale:
            raise CurvkitValueError(
                "the model's parameters, buffers (BatchNorm statistics) or the batch (inputs or "
                "targets) changed after this Hessian operator was built (an optimiser step, a "
                "call in training mode?); build a new operator with "
                "ck.hessian. If forward() itself changes them in place "
                "(nn.Embedding(max_norm=...) does), no operator can be kept: run the model once "
                "under torch.no_grad(), then set the module's max_norm = None."
            )


def cached_hessian_product(fw: Forward, batch: Batch) -> Kept:
    """(H V by reverse-over-reverse on a graph built once, the flat gradient Σₙ ∇ℓₙ (P,), what
    they read).

    The forward pass and the first backward pass (with ``create_graph``) are kept, so each
    product is one more backward pass. For repeated products on one batch (Lanczos, trace
    estimation) this costs about half of a fresh forward-over-reverse product; it holds the
    batch's graph in memory meanwhile. The gradient comes free with the graph."""
    names = fw.layout.names
    watched = Watch.of(fw, batch)
    leaves = [fw.params[n].detach().requires_grad_() for n in names]
    with torch.enable_grad():
        loss = _loss_of(fw, batch)(dict(zip(names, leaves)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        gradient = _flatten_grads(leaves, grads).detach()
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not used:  # the loss is linear in every parameter: H = 0
            return Kept(lambda V: torch.zeros_like(V), gradient, watched)
        flat_g = torch.cat([grads[i].reshape(-1) for i in used])
    sizes = [leaves[i].numel() for i in used]
    offsets = [fw.layout.offsets[i] for i in used]

    def gather(V: torch.Tensor) -> torch.Tensor:  # (P, k) -> rows of the used parameters
        return torch.cat([V[o : o + s] for o, s in zip(offsets, sizes)])

    def column(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            cols = torch.autograd.grad(flat_g, leaves, v, retain_graph=True, allow_unused=True)
        return _flatten_grads(leaves, cols)

    def prod(V: torch.Tensor) -> torch.Tensor:
        # One backward pass per column: batching them (is_grads_batched) was slower here
        # (28 ms vs 13 ms per column on the digits MLP).
        watched.check()
        G = gather(V)
        return torch.stack([column(G[:, j]) for j in range(V.shape[1])], dim=1)

    return Kept(prod, gradient, watched)
