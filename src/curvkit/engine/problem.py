"""One curvature request: model, loss, data, chosen parameters, kind — and the loop over data.

The loop lives here and only here. Each pass visits every batch once, adds the batch's unscaled
contribution (Σ over its samples), and at the end applies the reduction's scale
s = 1 (sum) or 1 / (total normaliser) (mean), so several batches give exactly the curvature of
one concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from ..autodiff import is_forward_ad_error, translate
from ..data import Batch, DataSource
from ..errors import CurvkitValueError
from ..losses import Loss
from ..memory import work_budget
from ..params import ParamLayout
from . import dense as _dense
from .forward import Forward
from .hvp import chain_hessian_product
from .products import Kept, batch_gradient, batch_hashes, cached_hessian_product, data_print


class _Lazy:
    """A tuple computed on first use (chunk sizes need a probe, which a body may not need, or
    may get from the forward pass it runs anyway)."""

    def __init__(self, make: Callable[[], tuple]):
        self._make, self._value = make, None

    def _get(self) -> tuple:
        if self._value is None:
            self._value = self._make()
        return self._value

    def __getitem__(self, i):
        return self._get()[i]

    def __iter__(self):
        return iter(self._get())


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
        self.layout, self.loss, self.source, self.kind = layout, loss, source, kind
        loss.one_batch = source.single  # a callable's mean then needs no per-sample form
        self.forward = Forward(model, layout, loss, output_fn)
        self.progress = (not source.single) if progress is None else progress
        self.mc_samples, self.generator = mc_samples, generator
        self.memory_limit = memory_limit
        ref = layout.tensors[0]
        self.dtype, self.device = ref.dtype, ref.device
        # batch index -> (its ordered data print, (device, generator state) before its draws,
        # or the draws themselves), drawn at ``_fisher_params``
        self._fisher_cache: dict[int, tuple[int, Any]] = {}
        self._fisher_params: list[torch.Tensor] | None = None
        self.repeated = False  # set by an operator, whose passes must agree with each other
        self.forward_ad = True  # set False once an op without forward-mode AD is met
        self._checked: set[int] = set()  # batches whose targets were checked against the loss
        self._kept: dict[int, Kept] = {}  # batch index -> its kept Hessian state
        self._kept_bytes, self._keep_none = 0, False
        self._first_print: int | None = None  # the first checked pass's data prints, summed
        self._params_checked = False  # the MC Fisher's parameters compared in this pass
        self._budget: int | None = None
        self._hashes: tuple[torch.Tensor, int] | None = None  # the visited batch's, see _print

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

    def output_side(self, i: int, batch: Batch, out: torch.Tensor, factor: bool):
        """Check ``out`` against the targets; return Mₙ, (Fₙ, σₙ) or None (Hessian)."""
        self.loss.check(out, batch.targets)
        if self.kind == "hessian":
            return None
        if self.kind == "fisher":
            F = self._fisher_factors(i, batch, out)
            return (F, None) if factor else F @ F.transpose(1, 2)
        if factor:
            return self.loss.output_factor(self.kind, out, batch.targets)
        return self.loss.output_matrix(self.kind, out, batch.targets)

    def _fisher_factors(self, i: int, batch: Batch, out: torch.Tensor) -> torch.Tensor:
        """The batch's sampled factors, the same draws on every pass (replayed from the
        generator's state before the first) so that the operator stays one matrix; new draws
        for new parameters (like every other curvature, the products follow the model);
        refused for other data at the same batch index (a reshuffling loader, an edit)."""
        if not self.repeated:  # one pass: nothing to keep consistent across passes
            return self.loss.fisher_factors(out, batch.targets, self.mc_samples, self.generator)
        if not self._params_checked:  # once per pass: parameters do not change within one
            self._params_checked = True
            now = self.layout.tensors
            if self._fisher_params is None or not all(
                torch.equal(t.detach(), c) for t, c in zip(now, self._fisher_params)
            ):
                self._fisher_cache.clear()  # new parameters: new draws, like every curvature
                self._fisher_params = [t.detach().clone() for t in now]
        data = self._print(batch, ordered=True)  # its factors belong to its rows, in order
        cached = self._fisher_cache.get(i)
        if cached is not None and cached[0] != data:
            raise CurvkitValueError(
                f"batch {i} holds other data than in this Fisher operator's first pass (a "
                "DataLoader with shuffle=True, or data edited in place). The operator draws its "
                "labels once per batch to stay one matrix: iterate the data in a fixed order, or "
                "build a new operator after editing it."
            )
        draw = partial(self.loss.fisher_factors, out, batch.targets, self.mc_samples)
        if cached is not None:
            if isinstance(cached[1], torch.Tensor):
                return cached[1]
            replay = torch.Generator(device=cached[1][0])  # the first draw's generator state
            replay.set_state(cached[1][1])
            return draw(replay)
        # Kept is the generator's state before the draw (5 KB on CPU), or the draws where
        # they are smaller: a Fisher over a large loader would otherwise keep (N, C, S)
        # factors of every batch
        gen = self.generator if self.generator is not None else _default_generator(out.device)
        state = None if gen is None else gen.get_state()  # None: no generator to replay
        F = draw(self.generator)
        small = state is None or F.numel() * F.element_size() <= state.numel()
        self._fisher_cache[i] = (data, F if small else (gen.device, state))
        return F

    def _print(self, batch: Batch, ordered: bool = False) -> int:
        """The batch's data print; its hashes made once per visit (``_run`` clears them)."""
        if self._hashes is None:
            self._hashes = batch_hashes(batch)
        return data_print(self._hashes, ordered)

    def _pass_print(self, batch: Batch) -> int:
        """What a pass of an operator records of a batch (after the batch): its data print;
        for a Hessian over one batch 0 while its kept products compare copies of that batch
        instead (or will: products keep their state from their first pass on)."""
        if self.kind == "hessian" and self.source.single and not self._keep_none:
            return 0
        return self._print(batch)

    def _check_same_data(self, prints: list[int]) -> None:
        """An operator answers for the data of its first pass (a Hessian's kept state was made
        from it; a GGN's products would mix matrices): any later pass must bring the same
        samples (in any order), else refuse. ``prints``: the data prints of this pass's
        batches."""
        if not prints:
            return
        total = sum(prints) % 2**64
        if self._first_print is None:
            self._first_print = total
        elif total != self._first_print:
            raise CurvkitValueError(
                "the data changed after this operator was built (its tensors edited in place, "
                "or a loader that draws other samples: shuffle=True with drop_last=True, random "
                "augmentation): its products would mix different matrices. Iterate the same "
                "samples on every pass, or build a new operator. (An input the model uses whole "
                "but with the batch's leading size, a (T, T) mask with T = batch size, counts as "
                "per-sample data, so reshuffling moves it too: keep it in the model as a buffer.)"
            )

    def check_kept(self) -> None:
        """Refuse if the parameters or batches the kept products read have changed since."""
        for kept in self._kept.values():
            kept.watch.check()

    def _scale(self, total_norm: float) -> float:
        if self.loss.reduction == "sum":
            return 1.0
        if total_norm <= 0:
            raise CurvkitValueError(
                f"the mean of {self.loss.name} over this data divides by {total_norm:g} "
                "(every target ignored, or zero class weights); the curvature is undefined."
            )
        return 1.0 / total_norm

    @property
    def budget(self) -> int:
        """Bytes for temporaries and kept state, read once per request (/proc/meminfo is not
        free)."""
        if self._budget is None:
            self._budget = work_budget(self.device, self.memory_limit)
        return self._budget

    def _pass_bytes(self, batch: Batch) -> int:
        """Memory of one pass's worth of the batch's activations with their tangents or graph:
        six times the activations."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return max(self.forward.activation_numel(batch), 1) * item * 6

    def _chunks(self, batch: Batch) -> tuple[int, int]:
        """(tangents per vmapped call, one-hot columns per product call) within the budget."""
        per_tangent = self._pass_bytes(batch)
        per_column = self.P * torch.empty((), dtype=self.dtype).element_size() * 4 + per_tangent
        return max(1, self.budget // per_tangent), max(1, min(4096, self.budget // per_column))

    def _run(self, desc: str, body: Callable, factor: bool = False, lazy: bool = False) -> float:
        """Visit every batch once: ``body(batch, side, chunk sizes (lazy))``; return the scale s.

        ``side`` is Mₙ (or (Fₙ, σₙ) with ``factor``) from a forward pass made here, or, with
        ``lazy``, a function ``out -> side`` for bodies that run the forward pass themselves."""
        total_norm = 0.0
        self._params_checked = False
        # every pass of an operator (products, gradient, diagonal, dense form) must see the
        # data of its first pass
        prints: list[int] | None = [] if self.repeated else None
        with torch.no_grad():
            for i, batch in self._batches(desc):
                batch.index, self._hashes = i, None
                if lazy:
                    side = partial(self.output_side, i, batch, factor=factor)
                else:
                    side = self.output_side(i, batch, self.forward.output(batch), factor)
                try:
                    body(batch, side, _Lazy(partial(self._chunks, batch)))
                except RuntimeError as e:  # torch errors a user can act on, said plainly
                    nice = translate(e)
                    if nice is not None:
                        raise nice from e
                    raise
                # after the batch: the loss has seen its output (a mean's denominator may
                # depend on how targets broadcast against it)
                total_norm += self.loss.normalizer(batch.targets)
                if prints is not None:
                    prints.append(self._pass_print(batch))
        if prints is not None:
            self._check_same_data(prints)
        return self._scale(total_norm)

    # -- reductions ------------------------------------------------------------------------------
    def _with_fallback(self, reduction: Callable):
        """Run a reduction; if an op lacks forward-mode AD, rerun it in reverse mode."""
        try:
            return reduction()
        except (NotImplementedError, RuntimeError) as e:
            if not (self.forward_ad and is_forward_ad_error(e)):
                raise
        self.forward_ad = False
        return reduction()

    def dense(self) -> torch.Tensor:
        return self._with_fallback(lambda: self._reduce(diag_only=False))

    def hessian_diagonal(self) -> torch.Tensor:
        """The exact Hessian diagonal (Gauss-Newton diagonals: ``build(problem, "diag")``)."""
        assert self.kind == "hessian", self.kind
        return self._with_fallback(lambda: self._reduce(diag_only=True))

    def _forward_mode(self, batch: Batch) -> bool:
        """Whether this batch's products may use forward-mode AD: not once an op lacked it, and
        not where it would disagree with autograd (``Forward.reverse_only``)."""
        if self.forward_ad and self.forward.reverse_only(batch):
            self.forward_ad = False
        return self.forward_ad

    def _reduce(self, diag_only: bool) -> torch.Tensor:
        shape = (self.P,) if diag_only else (self.P, self.P)
        out = torch.zeros(shape, dtype=self.dtype, device=self.device)

        def body(batch, M, chunks):
            # The ε rules use forward mode; without it every coordinate takes the generic path.
            layers = self.forward.rule_layers(batch) if self._forward_mode(batch) else []
            if layers and diag_only:
                _dense.rule_hessian_diag(out, self.forward, batch, layers, chunks[0])
            elif layers:
                _dense.rule_dense(out, self.forward, batch, layers, self.kind, M, chunks[0])
            covered = _dense.rule_mask(self.forward, layers)
            _dense.fallback_columns(
                out, self.forward, batch, self.kind, M, covered, chunks, diag_only, self.forward_ad
            )

        return out.mul_(self._run("diagonal" if diag_only else "dense", body))

    def _check_once(self, batch: Batch, side: Callable) -> None:
        """The Hessian needs no Mₙ; its targets are still checked, once per batch."""
        if batch.index not in self._checked:
            side(self.forward.output(batch))
            self._checked.add(batch.index)

    def _kept_product(self, batch: Batch) -> Kept | None:
        """(H V of the batch, its gradient, what they read) from state kept across products
        (Lanczos and trace estimates call many), or None once the kept state of all batches
        would pass the work budget (then nothing is kept).

        Kept per batch index from the first pass: H is a sum over all samples, so a loader that
        reshuffles still gives the same matrix. A chain of Linear layers and activations keeps
        what its R-operator needs (``hvp.py``), any other model its autograd graph."""
        i = batch.index
        if self._keep_none or i in self._kept:
            return None if self._keep_none else self._kept[i]
        size = self._pass_bytes(batch)
        kept = None
        if self._kept_bytes + size <= self.budget:
            kept = chain_hessian_product(self.forward, batch) or cached_hessian_product(
                self.forward, batch
            )
            size = getattr(kept.product, "nbytes", size)  # the chain route knows its own
            size += kept.watch.nbytes  # the copies its staleness check compares against
        if kept is None or self._kept_bytes + size > self.budget:
            # All batches or none: a loader that reshuffles would otherwise mix the kept
            # batches of the first pass with fresh ones of later passes.
            self._kept.clear()
            self._keep_none = True
            if self.source.single:  # its data print is the check from this pass on
                self._first_print = None
            return None
        self._kept_bytes += size
        self._kept[i] = kept
        return kept

    def gradient(self) -> torch.Tensor:
        """(P,): the gradient of the loss over the data, scaled like the curvature."""
        out = torch.zeros(self.P, dtype=self.dtype, device=self.device)

        def body(batch, side, chunks):
            self._check_once(batch, side)
            kept = self._kept_product(batch) if self.kind == "hessian" else None
            if kept is not None:
                kept.watch.check()
            out.add_(batch_gradient(self.forward, batch) if kept is None else kept.gradient)

        return out.mul_(self._run("gradient", body, lazy=True))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(P, k) -> (P, k): the curvature applied to V, matrix-free."""

        def run():
            out = torch.zeros_like(V)

            def body(batch, side, chunks):
                M = None
                if self.kind != "hessian":
                    M = side(self.forward.output(batch))
                else:
                    self._check_once(batch, side)
                kept = self._kept_product(batch) if self.kind == "hessian" else None
                if kept is not None:
                    out.add_(kept.product(V))
                    return
                fad = self._forward_mode(batch)
                prod = _dense.product(self.forward, batch, self.kind, M, chunks[0], fad)
                out.add_(prod(V))

            return out.mul_(self._run("product", body, lazy=True))

        return self._with_fallback(run)


def _default_generator(device: torch.device) -> torch.Generator | None:
    """The generator torch draws from on ``device`` when given none (None if unknown)."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return None
