"""Matrix-free curvature products on one batch, w.r.t. all chosen parameters.

Each factory returns ``prod(V) -> (P, k)`` for ``V`` of shape (P, k), the *unscaled* sum over
the batch's samples (the caller applies the reduction's scale s):

* Hessian:        H V      = ∇²(Σₙ ℓₙ) V           (forward-over-reverse, vmapped over columns)
* Gauss-Newton:   Jᵀ M J V  with per-sample Mₙ     (GGN: Mₙ = ∇²ℓₙ; EF: ∇ℓₙ∇ℓₙᵀ; MC Fisher)

These are also the generic path of the dense engine: exact for any module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, vjp, vmap

from ..autodiff import hessian_map, linear_map
from ..data import Batch
from .forward import Forward


def _flatten(tensors: dict, names) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def hessian_product(
    fw: Forward, batch: Batch, chunk: int | None, forward_ad: bool = True
) -> Callable:
    names = fw.layout.names

    def loss_of(params: dict) -> torch.Tensor:
        return fw.loss.sum_loss(fw.output(batch, params), batch.targets)

    hv = hessian_map(grad(loss_of), fw.params, forward_ad)

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
