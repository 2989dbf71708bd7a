"""Which parameters a curvature is taken with respect to, and their flat coordinates.

Coordinates: the chosen parameters, each flattened row-major (``p.reshape(-1)``), concatenated
in ``model.named_parameters()`` order, or in the order given by ``params=``. Parameters with
``requires_grad=False`` are left out unless passed explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CurvkitTypeError, CurvkitValueError


@dataclass(frozen=True)
class ParamLayout:
    """The chosen parameters and where each one lives in the flat vector."""

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    offsets: tuple[int, ...]
    # every chosen name in order, those of parameters without elements too (no coordinates)
    chosen: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return self.offsets[-1] + self.tensors[-1].numel() if self.tensors else 0

    def slices(self) -> dict[str, slice]:
        """Each chosen parameter's slice of the flat coordinates; one without elements gets an
        empty slice where it would be."""
        own = {
            n: slice(o, o + t.numel()) for n, t, o in zip(self.names, self.tensors, self.offsets)
        }
        out, at = {}, 0
        for n in self.chosen or self.names:
            out[n] = own.get(n, slice(at, at))
            at = out[n].stop
        return out

    def index_of(self, tensor: torch.Tensor) -> int | None:
        for i, t in enumerate(self.tensors):
            if t is tensor:
                return i
        return None

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat ``(P, ...)`` tensor into parameter-shaped views ``(*shape, ...)``."""
        extra = vec.shape[1:]
        return {
            n: vec[o : o + t.numel()].reshape(tuple(t.shape) + tuple(extra))
            for n, t, o in zip(self.names, self.tensors, self.offsets)
        }


def unwrap_model(model):
    """The module to differentiate: ``torch.compile``'s wrapper and (Distributed)DataParallel
    hold the user's module, whose parameters they share; curvkit transforms the function
    itself (a compiled graph's second call, and DataParallel's replicas, reject that)."""
    for _ in range(4):
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
    return model


def resolve_params(model: nn.Module, params: Iterable[torch.Tensor] | None = None) -> ParamLayout:
    if not isinstance(model, nn.Module):
        raise CurvkitTypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Wrap a plain function in an nn.Module whose forward calls it."
        )
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise CurvkitValueError(
                "the model has no trainable parameters (all have requires_grad=False, or it has "
                "none). Unfreeze the parameters you want the curvature of, or pass them as params=."
            )
    else:
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, nn.Module):  # params=model.fc: that module's parameters
            params = list(params.parameters())
        by_id = {id(p): n for n, p in named}
        chosen, seen = [], set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise CurvkitTypeError(
                    f"params= must hold the model's parameter tensors; item {i} is a "
                    f"{type(p).__name__}. Pass e.g. params=[model.fc.weight, model.fc.bias]."
                )
            if id(p) not in by_id:
                raise CurvkitValueError(
                    f"params= item {i} (shape {tuple(p.shape)}) is not a parameter of the model. "
                    "Pass tensors taken from model.parameters(), not copies."
                )
            if id(p) in seen:
                raise CurvkitValueError(f"params= lists parameter {by_id[id(p)]!r} twice.")
            seen.add(id(p))
            chosen.append((by_id[id(p)], p))
        if not chosen:
            raise CurvkitValueError("params= is empty; pass at least one parameter tensor.")
    # a parameter with no elements has no coordinates: leaving it out changes no index (and
    # spares the engine tensors of size 0, which vmap and reductions reject)
    order = tuple(n for n, _ in chosen)
    chosen = [(n, p) for n, p in chosen if p.numel() > 0]
    if not chosen:
        raise CurvkitValueError(
            "the chosen parameters have no elements (every one has a dimension of size 0): "
            "the curvature would be a 0 x 0 matrix. Choose parameters with entries."
        )
    offsets, total = [], 0
    for _, p in chosen:
        offsets.append(total)
        total += p.numel()
    return ParamLayout(
        names=tuple(n for n, _ in chosen),
        tensors=tuple(p for _, p in chosen),
        offsets=tuple(offsets),
        chosen=order,
    )


def parameter_slices(
    model: nn.Module, params: Iterable[torch.Tensor] | None = None
) -> dict[str, slice]:
    """Map each chosen parameter's name to its slice of the flat coordinates.

    >>> import torch, curvkit as ck
    >>> ck.parameter_slices(torch.nn.Linear(3, 2))
    {'weight': slice(0, 6, None), 'bias': slice(6, 8, None)}
    """
    return resolve_params(unwrap_model(model), params).slices()
