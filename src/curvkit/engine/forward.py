"""Functional forward passes of a model, with per-layer output perturbations.

NOTE [the ε trick]. For a ``Linear`` layer called once on inputs aₙ ∈ ℝ^A (a 1 appended when
its bias is chosen), zₙ = W aₙ. Adding a zero perturbation εₙ to zₙ changes nothing, but makes
every derivative w.r.t. W a contraction of a derivative w.r.t. ε with aₙ:

    ∂L/∂W[i,j] = Σₙ δₙ[i] aₙ[j],              δₙ = ∂L/∂εₙ,
    ∂²L/∂W_l[i,j] ∂W_m[p,q] = Σₙ Hεₙ[(l,i),(m,p)] a_lₙ[j] a_mₙ[q] + Σₙ δ_mₙ[p] ∂a_mₙ[q]/∂ε_lₙ[i] a_lₙ[j].

The per-sample derivatives w.r.t. ε have D = Σ_l d_out,l coordinates, not P, so they cost D
batched forward(-over-reverse) passes, and each (l, m) block is one GEMM of N·P_l·P_m
multiply-adds. Layers that do not fit (called twice, inputs not (N, A), tied weights) and all
other modules' parameters go through plain products instead (``products.py``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import Batch, call_model, pick_output
from ..losses import Loss
from ..params import ParamLayout


@dataclass
class Segment:
    """Columns ``a`` of a unit's (d, A) layout live at ``offset`` as a row-major (d, len) block."""

    a: slice
    offset: int


@dataclass
class RuleLayer:
    """A Linear layer handled by the ε trick: outputs d, augmented inputs A."""

    module: nn.Linear
    d: int
    use_weight: bool
    use_bias: bool
    segments: list[Segment] = field(default_factory=list)

    @property
    def A(self) -> int:  # noqa: N802
        return self.module.in_features * self.use_weight + self.use_bias

    @property
    def numel(self) -> int:
        return self.d * self.A

    def augment(self, a: torch.Tensor) -> torch.Tensor:
        parts = [a] if self.use_weight else []
        if self.use_bias:
            parts.append(torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _owners(model: nn.Module) -> dict[int, int]:
    count: dict[int, int] = defaultdict(int)
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                count[id(p)] += 1
    return count


class Forward:
    """Calls the model functionally and knows which Linear layers take the ε trick."""

    def __init__(self, model: nn.Module, layout: ParamLayout, loss: Loss, output_fn):
        self.model, self.layout, self.loss, self.output_fn = model, layout, loss, output_fn
        self.params = {n: t.detach() for n, t in zip(layout.names, layout.tensors)}
        owners = _owners(model)
        self._candidates: list[RuleLayer] = []
        for mod in model.modules():
            if type(mod) is not nn.Linear:
                continue
            w, b = mod.weight, mod.bias
            iw, ib = layout.index_of(w), (layout.index_of(b) if b is not None else None)
            if iw is None and ib is None:
                continue
            if owners[id(w)] > 1 or (b is not None and owners[id(b)] > 1):
                continue  # tied weight: its curvature sums over uses, left to the products
            layer = RuleLayer(mod, mod.out_features, iw is not None, ib is not None)
            if iw is not None:
                layer.segments.append(Segment(slice(0, mod.in_features), layout.offsets[iw]))
            if ib is not None:
                start = mod.in_features * layer.use_weight
                layer.segments.append(Segment(slice(start, start + 1), layout.offsets[ib]))
            self._candidates.append(layer)

    # -- plain calls -----------------------------------------------------------------------------
    def output(self, batch: Batch, params: dict | None = None) -> torch.Tensor:
        raw = call_model(self.model, batch.inputs, self.params if params is None else params)
        out = pick_output(raw, self.output_fn)
        if out.dim() == 0 or out.shape[0] != batch.size:
            raise_output_mismatch(out, batch)
        return out

    # -- the ε trick -----------------------------------------------------------------------------
    def rule_layers(self, batch: Batch) -> list[RuleLayer]:
        """The candidate layers that, on this batch, are called once on an (N, in) input."""
        return self._probe(batch)[0]

    def activation_numel(self, batch: Batch) -> int:
        """Elements of all leaf modules' outputs in one forward pass of the batch."""
        return self._probe(batch)[1]

    def _probe(self, batch: Batch) -> tuple[list[RuleLayer], int]:
        if batch.probe is not None:
            return batch.probe
        calls: dict[int, list] = defaultdict(list)
        numel = [0]

        def record(mod, args, out):
            calls[id(mod)].append(tuple(args[0].shape) if args else None)
            if isinstance(out, torch.Tensor):
                numel[0] += out.numel()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(record) for m in leaves]
        try:
            with torch.no_grad():
                out = self.output(batch)
        finally:
            for h in handles:
                h.remove()
        keep = []
        for c in self._candidates:
            shapes = calls.get(id(c.module), [])
            if len(shapes) == 1 and shapes[0] == (batch.size, c.module.in_features):
                keep.append(c)
        batch.probe = (keep, numel[0] + out.numel())
        return batch.probe

    @contextmanager
    def _inject(self, layers: list[RuleLayer], holder: dict):
        def make_hook(i: int, layer: RuleLayer) -> Callable:
            def hook(mod, args, out):
                holder["acts"][i] = layer.augment(args[0])
                eps = holder["eps"]
                return out if eps is None else out + eps[i]

            return hook

        handles = [l.module.register_forward_hook(make_hook(i, l)) for i, l in enumerate(layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def perturbed(self, batch: Batch, layers: list[RuleLayer]):
        """``f(eps) -> (output (N, C), acts)``: the model with εₗ added to layer l's output, and
        the layers' augmented inputs. Parameters are held fixed."""
        holder: dict = {"eps": None, "acts": [None] * len(layers)}

        def f(eps: list[torch.Tensor]):
            holder["eps"], holder["acts"] = eps, [None] * len(layers)
            with self._inject(layers, holder):
                out = self.output(batch)
            return out.reshape(batch.size, -1), list(holder["acts"])

        return f


def raise_output_mismatch(out: torch.Tensor, batch: Batch) -> None:
    from ..errors import CurvkitValueError

    raise CurvkitValueError(
        f"the model output has shape {tuple(out.shape)}, but the batch has {batch.size} "
        "samples; curvkit needs an output whose first dimension is the sample dimension. "
        "Pass output_fn= to pick or reshape the prediction."
    )
