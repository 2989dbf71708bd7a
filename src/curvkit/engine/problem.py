"""One curvature request: model, loss, data, chosen parameters, kind — and the loop over data.

The loop lives here and only here. Each pass visits every batch once, adds the batch's unscaled
contribution (Σ over its samples), and at the end applies the reduction's scale
s = 1 (sum) or 1 / (total normaliser) (mean), so several batches give exactly the curvature of
one concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..data import Batch, DataSource
from ..errors import CurvkitValueError
from ..losses import Loss
from ..memory import work_budget
from ..params import ParamLayout
from . import dense as _dense
from .forward import Forward


class Problem:
    def __init__(
        self,
        model,
        layout: ParamLayout,
        loss: Loss,
        source: DataSource,
        kind: str,
        *,
        output_fn=None,
        progress: bool | None = None,
        mc_samples: int = 1,
        generator=None,
        memory_limit: int | None = None,
    ):
        self.model, self.layout, self.loss, self.source, self.kind = (
            model,
            layout,
            loss,
            source,
            kind,
        )
        self.forward = Forward(model, layout, loss, output_fn)
        self.progress = (not source.single) if progress is None else progress
        self.mc_samples, self.generator = mc_samples, generator
        self.memory_limit = memory_limit
        ref = layout.tensors[0]
        self.dtype, self.device = ref.dtype, ref.device
        self._fisher_cache: dict[int, torch.Tensor] = {}

    @property
    def P(self) -> int:  # noqa: N802
        return self.layout.numel

    # -- the loop --------------------------------------------------------------------------------
    def _batches(self, desc: str):
        it = iter(self.source)
        if self.progress:
            total = None
            try:
                total = len(self.source)
            except TypeError:
                pass
            it = tqdm(it, total=total, desc=f"curvkit {desc}", leave=False)
        return enumerate(it)

    def _prepare(self, i: int, batch: Batch, factor: bool):
        """Check the batch against the loss; return (Mₙ or (Fₙ, σₙ) or None, normaliser)."""
        with torch.no_grad():
            out = self.forward.output(batch)
        self.loss.check(out, batch.targets)
        norm = self.loss.normalizer(batch.targets)
        if self.kind == "hessian":
            return None, norm
        if self.kind == "fisher":
            if i not in self._fisher_cache:  # drawn once, so the matrix stays fixed
                self._fisher_cache[i] = self.loss.fisher_factors(
                    out, batch.targets, self.mc_samples, self.generator
                )
            F = self._fisher_cache[i]
            return ((F, None) if factor else F @ F.transpose(1, 2)), norm
        if factor:
            return self.loss.output_factor(self.kind, out, batch.targets), norm
        return self.loss.output_matrix(self.kind, out, batch.targets), norm

    def _scale(self, total_norm: float) -> float:
        if self.loss.reduction == "sum":
            return 1.0
        if total_norm <= 0:
            raise CurvkitValueError(
                f"the mean of {self.loss.name} over this data divides by {total_norm:g} "
                "(every target ignored, or zero class weights); the curvature is undefined."
            )
        return 1.0 / total_norm

    def _chunks(self, batch: Batch) -> tuple[int, int]:
        """(tangents per vmapped call, one-hot columns per product call) within the budget."""
        budget = work_budget(self.device, self.memory_limit)
        item = torch.empty((), dtype=self.dtype).element_size()
        per_tangent = max(self.forward.activation_numel(batch), 1) * item * 6
        per_column = self.P * item * 4 + per_tangent
        return max(1, budget // per_tangent), max(1, min(4096, budget // per_column))

    def _run(
        self, desc: str, body: Callable[[Batch, object, tuple], None], factor: bool = False
    ) -> float:
        """Visit every batch: body(batch, Mₙ or (Fₙ, σₙ), chunk sizes); return the scale s."""
        total_norm = 0.0
        with torch.no_grad():
            for i, batch in self._batches(desc):
                M, norm = self._prepare(i, batch, factor)
                total_norm += norm
                body(batch, M, self._chunks(batch))
        return self._scale(total_norm)

    # -- reductions ------------------------------------------------------------------------------
    def dense(self) -> torch.Tensor:
        out = torch.zeros(self.P, self.P, dtype=self.dtype, device=self.device)

        def body(batch, M, chunks):
            layers = self.forward.rule_layers(batch)
            if layers:
                _dense.rule_dense(out, self.forward, batch, layers, self.kind, M, chunks[0])
            covered = _dense.rule_mask(self.forward, layers)
            _dense.fallback_columns(
                out, self.forward, batch, self.kind, M, covered, chunks, diag_only=False
            )

        return out.mul_(self._run("dense", body))

    def diagonal(self) -> torch.Tensor:
        out = torch.zeros(self.P, dtype=self.dtype, device=self.device)

        def body(batch, M, chunks):
            layers = self.forward.rule_layers(batch)
            if layers:
                _dense.rule_diag(out, self.forward, batch, layers, self.kind, M, chunks[0])
            covered = _dense.rule_mask(self.forward, layers)
            _dense.fallback_columns(
                out, self.forward, batch, self.kind, M, covered, chunks, diag_only=True
            )

        return out.mul_(self._run("diagonal", body))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(P, k) -> (P, k): the curvature applied to V, matrix-free."""
        out = torch.zeros_like(V)

        def body(batch, M, chunks):
            out.add_(_dense.product(self.forward, batch, self.kind, M, chunks[0])(V))

        return out.mul_(self._run("product", body))
