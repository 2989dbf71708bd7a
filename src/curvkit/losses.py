"""Losses as curvkit sees them: L = s · Σₙ ℓₙ(fₙ, yₙ).

For every loss this module gives the per-sample sum Σₙ ℓₙ, the normaliser behind ``s`` (1 for a
sum, the number of averaged elements or the total class weight for a mean — exactly torch's
denominator on one concatenated batch), and the per-sample output-space matrices Mₙ that turn a
Jacobian into a curvature, C = s · Σₙ Jₙᵀ Mₙ Jₙ:

* ``ggn``:    Mₙ = ∂²ℓₙ/∂fₙ² (closed forms for the standard losses, autodiff otherwise);
* ``ef``:     Mₙ = ∇ℓₙ ∇ℓₙᵀ (empirical Fisher);
* ``fisher``: Mₙ = κₙ (1/S) Σₛ ∇ℓₙ(ỹₛ) ∇ℓₙ(ỹₛ)ᵀ, ỹₛ drawn from the model's predictive (MC),
  ℓ without the loss's weights and κₙ the weight of sample n's own target.

Outputs are handled flattened per sample, fₙ ∈ ℝᶜ with C = prod(output.shape[1:]).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from .autodiff import hessian_map, is_forward_ad_error, translated
from .errors import CurvkitTypeError, CurvkitValueError, CurvkitWarning


class Loss:
    """Base: a loss ``(output, target) -> Σₙ ℓₙ`` with a reduction of ``"sum"`` or ``"mean"``."""

    name = "loss"
    linear_in_output = False  # ∂²ℓ/∂f² = 0 (log-probability inputs): the GGN is zero
    one_batch = False  # set by the caller: the data is a single batch, not a loader

    def __init__(self, reduction: str):
        self.reduction = reduction

    # -- to override ---------------------------------------------------------------------------
    def sum_loss(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def normalizer(self, tgt: torch.Tensor) -> float:
        return float(tgt.shape[0])

    def check(self, out: torch.Tensor, tgt: torch.Tensor) -> None:  # noqa: B027
        """Raise a clear error when ``tgt`` does not fit ``out``."""

    def _closed_form_hessian(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor | None:
        return None

    def sample_targets(self, out: torch.Tensor, tgt: torch.Tensor, gen) -> torch.Tensor:
        raise CurvkitValueError(
            f"the Monte-Carlo Fisher needs the model's predictive distribution, and curvkit does "
            f"not know one for {self.name}. Use ck.ggn (the Fisher equals the GGN for "
            "exponential-family losses) or ck.ef, or pass a torch loss such as "
            "CrossEntropyLoss, MSELoss, BCEWithLogitsLoss or BCELoss."
        )

    # -- shared ----------------------------------------------------------------------------------
    def _flat_fn(self, out: torch.Tensor, tgt: torch.Tensor) -> Callable:
        shape = out.shape
        return lambda o: self.sum_loss(o.reshape(shape), tgt)

    def per_sample_grads(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """(N, C): row n is ∇ℓₙ w.r.t. the flattened output of sample n."""
        closed = self._closed_form_grad(out.detach(), tgt)
        if closed is not None:
            return closed.reshape(out.shape[0], -1)
        flat = out.detach().reshape(out.shape[0], -1)
        return grad(self._flat_fn(out, tgt))(flat)

    def _closed_form_grad(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor | None:
        return None

    def output_hessian(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        """(N, C, C): ∂²ℓₙ/∂fₙ², closed form where known, else C batched HVPs."""
        closed = self._closed_form_hessian(out.detach(), tgt)
        if closed is not None:
            return closed
        flat = out.detach().reshape(out.shape[0], -1)
        n, c = flat.shape
        g = grad(self._flat_fn(out, tgt))
        # Samples are independent, so one tangent e_c broadcast over all samples gives column c
        # of every sample's Hessian at once.
        eye = torch.eye(c, dtype=flat.dtype, device=flat.device)
        with translated():  # e.g. a loss without second derivatives, said plainly
            try:
                hv = hessian_map(g, flat, forward=True)
                cols = vmap(lambda e: hv(e.expand(n, c)))(eye)  # (C, N, C)
            except (NotImplementedError, RuntimeError) as e:
                if not is_forward_ad_error(e):
                    raise
                hv = hessian_map(g, flat, forward=False)
                cols = vmap(lambda e: hv(e.expand(n, c)))(eye)
        return cols.permute(1, 2, 0)

    def output_matrix(self, kind: str, out, tgt, mc_samples: int = 1, generator=None):
        """(N, C, C) per-sample Mₙ for ``kind`` in ('ggn', 'ef', 'fisher')."""
        if kind == "ggn":
            M = self.output_hessian(out, tgt)
            self._warn_if_zero_ggn(M)
            return M
        if kind == "ef":
            g = self.per_sample_grads(out, tgt)
            return g[:, :, None] * g[:, None, :]
        factors = self.fisher_factors(out, tgt, mc_samples, generator)  # (N, C, S)
        return factors @ factors.transpose(1, 2)

    def output_factor(self, kind: str, out, tgt, mc_samples: int = 1, generator=None):
        """Factor form of Mₙ: (F (N, C, K), signs (N, K) or None) with Mₙ = Fₙ diag(signsₙ) Fₙᵀ.

        Backpropagating the K columns of Fₙ instead of forming Mₙ is what structured
        approximations (KFAC, diagonals) reduce; signs are None when every Mₙ is PSD."""
        if kind == "ef":
            return self.per_sample_grads(out, tgt)[:, :, None], None
        if kind == "fisher":
            return self.fisher_factors(out, tgt, mc_samples, generator), None
        closed = self._closed_form_sqrt(out.detach(), tgt)
        if closed is not None:
            self._warn_if_zero_ggn(closed)
            return closed, None
        lam, U = torch.linalg.eigh(self.output_hessian(out, tgt))
        signs = torch.sign(lam)
        return U * lam.abs().sqrt()[:, None, :], (None if bool((signs >= 0).all()) else signs)

    def _closed_form_sqrt(self, out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor | None:
        return None

    def fisher_factors(self, out, tgt, mc_samples: int, generator) -> torch.Tensor:
        """(N, C, S): sampled gradients / √S, so that F̂ₙ = UₙUₙᵀ."""
        out = out.detach()
        Y = [self.sample_targets(out, tgt, generator) for _ in range(mc_samples)]
        # a loop, not vmap: torch losses such as label smoothing do not run under vmap
        cols = torch.stack([self._fisher_grads(out, tgt, y) for y in Y])  # (S, N, C)
        return cols.permute(1, 2, 0) / mc_samples**0.5

    def _fisher_grads(self, out, tgt, y) -> torch.Tensor:
        """(N, C): the gradient of ℓₙ at the drawn target yₙ (closed form where known).

        With elementwise weights w (BCE's ``weight``): √w times the gradient of the loss without
        them, so that the draws average to w times the unweighted Fisher, which is the GGN. The
        loss's own gradient at the draw would carry w², not w. (Cross-entropy's class weights
        are those of each sample's own target: ``CrossEntropy._fisher_grads``.)"""
        w = getattr(self, "weight", None)
        if w is None:
            return self.per_sample_grads(out, y)
        plain = copy.copy(self)
        plain.weight = None
        g = plain.per_sample_grads(out, y).reshape(out.shape)
        return (g * _root(w.expand_as(out), self.name)).reshape(out.shape[0], -1)

    def _warn_if_zero_ggn(self, M: torch.Tensor) -> None:
        if self.linear_in_output and M.numel() and not bool(M.any()):
            warnings.warn(
                f"the GGN of {self.name} is zero: the loss is linear in the model's output "
                "(log-probabilities), so ∂²ℓ/∂f² = 0 and every Jᵀ M J vanishes. For a "
                "classifier's GGN take the output before its log_softmax and use "
                "CrossEntropyLoss (which applies it), or use ck.fisher.",
                CurvkitWarning,
                stacklevel=2,
            )


def _root(k: torch.Tensor, name: str) -> torch.Tensor:
    """√κ of the loss weights κ, which the Monte-Carlo Fisher needs to be >= 0."""
    if bool((k < 0).any()):
        raise CurvkitValueError(
            f"the Monte-Carlo Fisher of {name} needs weights >= 0 (it is a weighted sum of "
            f"outer products); got a weight of {float(k.min()):.3g}. Use ck.ggn."
        )
    return k.sqrt()


def _categorical(p: torch.Tensor, gen) -> torch.Tensor:
    """One draw per row of the probabilities p (N, C), by inverting the CDF at a uniform u
    (a few elementwise ops; ``torch.multinomial`` costs ~5× more at these sizes)."""
    u = torch.rand(p.shape[0], 1, dtype=p.dtype, device=p.device, generator=gen)
    cdf = p.cumsum(-1)  # class c where cdf[c-1] ≤ u·Σp < cdf[c]: never one of probability 0
    return (cdf <= u * cdf[:, -1:]).sum(-1).clamp_(max=p.shape[-1] - 1)


def _rows(tgt: torch.Tensor) -> float:
    """The number of losses ℓ when each averages over dim 1 (the classes) of its targets: one
    per sample and position, one for unbatched targets."""
    return float(tgt.numel() // tgt.shape[1]) if tgt.dim() > 1 else 1.0


def _class_total(tgt: torch.Tensor, weight: torch.Tensor | None, ignore_index: int) -> float:
    """torch's mean denominator for class-index targets: the targets not ignored, or their
    total class weight."""
    valid = tgt != ignore_index
    if weight is None:
        return float(valid.sum())
    return float(weight[tgt[valid]].sum())


def _check_no_broadcast(name: str, out: torch.Tensor, tgt: torch.Tensor) -> None:
    """Refuse targets that torch would broadcast across samples: (N,) targets with (N, 1)
    outputs make an (N, N) loss that pairs every output with every target (torch only warns),
    which is neither the intended curvature nor separable over samples. Broadcasting within a
    sample ((N, 1) outputs against (N, 4) targets: four measurements each) is separable."""
    if tgt.shape == out.shape:
        return
    try:
        shape = torch.broadcast_shapes(out.shape, tgt.shape)
    except RuntimeError:
        return  # not broadcastable: the loss itself raises its own error
    if shape != out.shape and (tgt.dim() != out.dim() or shape[0] != out.shape[0]):
        raise CurvkitValueError(
            f"{name} got outputs of shape {tuple(out.shape)} and targets of shape "
            f"{tuple(tgt.shape)}, which torch broadcasts to {tuple(shape)}: every output would "
            f"meet every target. Give the targets the outputs' shape, e.g. "
            f"y.reshape({', '.join(['-1', *map(str, out.shape[1:])])})."
        )


def _check_weight(name: str, what: str, w, out: torch.Tensor, shape=None) -> None:
    """A loss's weight tensor: of ``shape`` (class weights, which torch's loss needs in the
    output's dtype, though some of its paths take a mismatch silently), or else broadcasting
    against one batch's output without changing its shape (elementwise weights, which torch
    type-promotes); on the output's device."""
    if w is None:
        return
    if shape is not None:
        fits = tuple(w.shape) == tuple(shape)
    else:
        try:
            fits = torch.broadcast_shapes(w.shape, out.shape) == out.shape
        except RuntimeError:
            fits = False
    if not fits:
        want = (
            f"shape {tuple(shape)}"
            if shape is not None
            else f"a shape that broadcasts to {tuple(out.shape)}"
        )
        raise CurvkitValueError(
            f"{name}'s {what} has shape {tuple(w.shape)}, but this batch's output "
            f"{tuple(out.shape)} needs {want}."
            + (
                ""
                if shape is not None
                else " A weight per sample of the whole data set does not follow a loader's "
                "batches: weight a callable loss by a weight carried in the targets instead."
            )
        )
    if w.device != out.device or (shape is not None and w.dtype != out.dtype):
        raise CurvkitValueError(
            f"{name}'s {what} is {w.dtype} on {w.device}, the model output {out.dtype} on "
            f"{out.device}; torch's loss needs them to match. Build the loss with "
            f"{what}={what}.to(output dtype and device)."
        )


def _check_same_shape(name: str, out: torch.Tensor, tgt: torch.Tensor) -> None:
    if out.shape != tgt.shape:
        raise CurvkitValueError(
            f"{name} needs targets shaped like the model output: output {tuple(out.shape)}, "
            f"targets {tuple(tgt.shape)}. Reshape the targets (e.g. y.view_as(output)); curvkit "
            "does not broadcast, since torch would silently average the wrong pairs."
        )


def _check_float_targets(name: str, tgt: torch.Tensor) -> None:
    if not tgt.is_floating_point():
        raise CurvkitValueError(
            f"{name} needs floating-point targets (probabilities in [0, 1]), as torch's loss "
            f"does; got {tgt.dtype}. Pass y.float()."
        )


class CrossEntropy(Loss):
    name = "CrossEntropyLoss"

    def __init__(self, module: nn.CrossEntropyLoss):
        super().__init__(module.reduction)
        self.weight = module.weight
        self.ignore_index = module.ignore_index
        self.label_smoothing = module.label_smoothing

    def sum_loss(self, out, tgt):
        return F.cross_entropy(
            out,
            tgt,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction="sum",
            label_smoothing=self.label_smoothing,
        )

    def _index_targets(self, tgt):
        return not tgt.is_floating_point()

    def normalizer(self, tgt):
        if not self._index_targets(tgt):
            return _rows(tgt)
        return _class_total(tgt, self.weight, self.ignore_index)

    def check(self, out, tgt):
        if out.dim() < 2:
            raise CurvkitValueError(
                f"CrossEntropyLoss needs outputs of shape (N, C, ...), got {tuple(out.shape)}."
            )
        _check_weight(self.name, "weight", self.weight, out, (out.shape[1],))
        if not self._index_targets(tgt):
            _check_same_shape(self.name + " with class-probability targets", out, tgt)
            return
        if tgt.dtype != torch.long:
            raise CurvkitValueError(
                f"{self.name} class-index targets must be int64 (torch.long), as torch's loss "
                f"requires; got {tgt.dtype}. Pass y.long()."
            )
        want = (out.shape[0], *out.shape[2:])
        if tuple(tgt.shape) != want:
            raise CurvkitValueError(
                f"CrossEntropyLoss with class-index targets needs targets of shape {want} for "
                f"output {tuple(out.shape)}, got {tuple(tgt.shape)}."
            )
        if tgt.numel() == 0:
            return
        # ignored entries set to 0 so they cannot move the range (one pass, no boolean index)
        lo, hi = torch.aminmax(tgt.masked_fill(tgt == self.ignore_index, 0))
        if int(lo) < 0 or int(hi) >= out.shape[1]:
            valid = tgt[tgt != self.ignore_index]  # the exact range, for the message
            lo, hi = valid.min(), valid.max()
            raise CurvkitValueError(
                f"CrossEntropyLoss targets must be class indices in [0, {out.shape[1] - 1}]"
                f" (or ignore_index={self.ignore_index}); got values in [{int(lo)}, {int(hi)}]."
            )

    def _kappa(self, out, tgt) -> torch.Tensor | None:
        """Per-sample weight κₙ with ∂²ℓₙ/∂fₙ² = κₙ (diag(p) − ppᵀ), where a closed form holds."""
        if out.dim() != 2 or not self._index_targets(tgt) or self.label_smoothing:
            return None
        valid = tgt != self.ignore_index
        k = valid.to(out.dtype)
        if self.weight is not None:
            k = k * self.weight[tgt.masked_fill(~valid, 0)]
        return k

    def _closed_form_hessian(self, out, tgt):
        k = self._kappa(out, tgt)
        if k is None:
            return None
        p = out.softmax(dim=1)
        return (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) * k[:, None, None]

    def _closed_form_sqrt(self, out, tgt):
        k = self._kappa(out, tgt)
        if k is None:
            return None
        # diag(p) − ppᵀ = R Rᵀ with R = diag(u) − p uᵀ, u = √p, since Σ p = 1. R u = 0, so R
        # keeps its product with an orthonormal basis of u's complement: C − 1 columns instead
        # of C. The basis is the Householder reflection Q = I − 2wwᵀ/‖w‖², w = u + e_C (never
        # small: u ≥ 0), which sends u to −e_C. With ‖w‖² = 2(1 + u_C) and R e_C = u_C (e_C − p),
        #   R Q = diag(u) − v wᵀ,  v = (p + u_C e_C) / (1 + u_C),
        # whose first C − 1 columns are diag(u)[:, :C−1] − v u[:C−1]ᵀ (w and u agree there).
        p = out.softmax(dim=1)
        u = p.sqrt()
        uc = u[:, -1:]
        v = p / (1 + uc)
        v[:, -1:] += uc / (1 + uc)
        ks = k.sqrt()[:, None]
        F = (v * -ks)[:, :, None] * u[:, None, :-1]
        F.diagonal(dim1=1, dim2=2).addcmul_(u[:, :-1], ks)
        return F

    def _closed_form_grad(self, out, tgt):
        k = self._kappa(out, tgt)
        if k is None:
            return None
        p = out.softmax(dim=1)
        onehot = F.one_hot(tgt.clamp(0, out.shape[1] - 1), out.shape[1]).to(out.dtype)
        return (p - onehot) * k[:, None]

    def fisher_factors(self, out, tgt, mc_samples, generator):
        c = out.shape[1] if out.dim() == 2 else -1
        plain = self.weight is None and not self.label_smoothing and not 0 <= self.ignore_index < c
        if c < 0 or not plain or not self._index_targets(tgt):
            return super().fisher_factors(out, tgt, mc_samples, generator)
        # The common case from one softmax: ∇ℓ(ỹ) = p − e_ỹ, zero where the target is ignored
        # (the general path's draws, in its order: one uniform per sample and draw)
        p = out.detach().softmax(1)
        keep = (tgt != self.ignore_index).to(p.dtype)[:, None]
        cols = []
        for _ in range(mc_samples):
            onehot = F.one_hot(_categorical(p, generator), c).to(p.dtype)
            cols.append((p - onehot).mul_(keep))
        if mc_samples == 1:
            return cols[0][:, :, None]
        return torch.stack(cols, dim=2) / mc_samples**0.5

    def _fisher_grads(self, out, tgt, y):
        c, eps = out.shape[1], self.label_smoothing
        if self.weight is None and not 0 <= self.ignore_index < c and not eps:
            return super()._fisher_grads(out, tgt, y)  # κ = 1, or 0 where the target is ignored
        # Class weights, label smoothing, or an ignore_index a draw can hit (then not ignored:
        # the draw is the model's): ∂²ℓ/∂f² = κ (diag p − ppᵀ) with κ = (1 − ε) w_t + ε/C Σ w
        # for a target t not ignored, so √κ times the plain gradient at the draw.
        valid = tgt != self.ignore_index
        w = (
            torch.ones(c, dtype=out.dtype, device=out.device)
            if self.weight is None
            else self.weight
        )
        k = valid.to(out.dtype) * ((1 - eps) * w[tgt.masked_fill(~valid, 0)] + eps / c * w.sum())
        plain = copy.copy(self)
        plain.weight, plain.ignore_index, plain.label_smoothing = None, -100, 0.0
        g = plain.per_sample_grads(out, y.masked_fill(~valid, 0))
        return (g.reshape(out.shape) * _root(k, self.name).unsqueeze(1)).reshape(out.shape[0], -1)

    def sample_targets(self, out, tgt, gen):
        if not self._index_targets(tgt):
            raise CurvkitValueError(
                "the Monte-Carlo Fisher of CrossEntropyLoss is defined for class-index targets; "
                "got class probabilities. Use ck.ggn (equal to the exact Fisher here)."
            )
        logits = out.movedim(1, -1).reshape(-1, out.shape[1])
        y = _categorical(logits.softmax(-1), gen).reshape(tgt.shape)
        return torch.where(tgt == self.ignore_index, tgt, y)


class NLL(CrossEntropy):
    """Outputs are log-probabilities log p. CrossEntropy's Monte-Carlo draw from the softmax of
    the output is a draw from p itself, since softmax(log p) = p."""

    name = "NLLLoss"
    linear_in_output = True

    def __init__(self, module: nn.NLLLoss):
        Loss.__init__(self, module.reduction)
        self.weight, self.ignore_index, self.label_smoothing = module.weight, module.ignore_index, 0

    # ∇ℓ(ỹ) w.r.t. log p is −e_ỹ, not CrossEntropy's p − e_ỹ: the general draws, never its
    # one-softmax shortcut
    fisher_factors = Loss.fisher_factors

    def sum_loss(self, out, tgt):
        return F.nll_loss(
            out, tgt, weight=self.weight, ignore_index=self.ignore_index, reduction="sum"
        )

    def _closed_form_hessian(self, out, tgt):
        return torch.zeros(
            out.shape[0], out[0].numel(), out[0].numel(), dtype=out.dtype, device=out.device
        )

    def _closed_form_sqrt(self, out, tgt):
        return torch.zeros(out.shape[0], out[0].numel(), 1, dtype=out.dtype, device=out.device)

    def _closed_form_grad(self, out, tgt):
        k = self._kappa(out, tgt)
        if k is None:
            return None
        c = out.shape[1]
        return -k[:, None] * F.one_hot(tgt.clamp(0, c - 1), c).to(out.dtype)


class MSE(Loss):
    name = "MSELoss"

    def sum_loss(self, out, tgt):
        return (out - tgt).square().sum()

    def normalizer(self, tgt):
        return float(tgt.numel())

    def check(self, out, tgt):
        _check_same_shape(self.name, out, tgt)

    def _closed_form_hessian(self, out, tgt):
        n, c = out.shape[0], out[0].numel()
        eye = torch.eye(c, dtype=out.dtype, device=out.device)
        return (2 * eye).expand(n, c, c)

    def _closed_form_sqrt(self, out, tgt):
        return self._closed_form_hessian(out, tgt) * 0.5**0.5

    def _closed_form_grad(self, out, tgt):
        return 2 * (out - tgt)

    def sample_targets(self, out, tgt, gen):
        # ℓ = ‖f − y‖² is −log N(y | f, ½ I) up to a constant.
        return (
            out
            + torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device) * 0.5**0.5
        )


class BCEWithLogits(Loss):
    name = "BCEWithLogitsLoss"

    def __init__(self, module: nn.BCEWithLogitsLoss):
        super().__init__(module.reduction)
        self.weight, self.pos_weight = module.weight, module.pos_weight

    def sum_loss(self, out, tgt):
        return F.binary_cross_entropy_with_logits(
            out, tgt, weight=self.weight, pos_weight=self.pos_weight, reduction="sum"
        )

    def normalizer(self, tgt):
        return float(tgt.numel())

    def check(self, out, tgt):
        _check_same_shape(self.name, out, tgt)
        _check_float_targets(self.name, tgt)
        _check_weight(self.name, "weight", self.weight, out)
        _check_weight(self.name, "pos_weight", self.pos_weight, out)

    def _closed_form_hessian(self, out, tgt):
        if self.pos_weight is not None:
            return None
        s = out.sigmoid()
        d = s * (1 - s)
        if self.weight is not None:
            d = d * self.weight.expand_as(d)
        return torch.diag_embed(d.reshape(out.shape[0], -1))

    def sample_targets(self, out, tgt, gen):
        return torch.bernoulli(out.sigmoid(), generator=gen)


class BCE(Loss):
    name = "BCELoss"

    def __init__(self, module: nn.BCELoss):
        super().__init__(module.reduction)
        self.weight = module.weight

    def sum_loss(self, out, tgt):
        return F.binary_cross_entropy(out, tgt, weight=self.weight, reduction="sum")

    def normalizer(self, tgt):
        return float(tgt.numel())

    def check(self, out, tgt):
        _check_same_shape(self.name, out, tgt)
        _check_float_targets(self.name, tgt)
        _check_weight(self.name, "weight", self.weight, out)

    def _closed_form_hessian(self, out, tgt):
        d = tgt / out.square() + (1 - tgt) / (1 - out).square()
        if self.weight is not None:
            d = d * self.weight.expand_as(d)
        return torch.diag_embed(d.reshape(out.shape[0], -1))

    def sample_targets(self, out, tgt, gen):
        return torch.bernoulli(out, generator=gen)


# torch losses whose ℓₙ already averages over the classes of sample n: the mean is over samples
_PER_SAMPLE = (nn.MultiLabelSoftMarginLoss, nn.MultiLabelMarginLoss)
# torch losses whose mean over class-index targets is weighted like CrossEntropyLoss's
_CLASS_INDEX = tuple(
    c
    for c in (nn.CrossEntropyLoss, nn.NLLLoss, getattr(nn, "LinearCrossEntropyLoss", None))
    if c is not None
)


class TorchLoss(Loss):
    """Any other torch loss module with a ``reduction``: evaluated with ``reduction='sum'``.

    Its mean divides by torch's denominator: the number of elements of the unreduced loss (the
    targets' elements, or one per sample for the multi-label losses, whose ℓₙ already averages
    over classes), the batch size for ``'batchmean'``, or for class-index targets of a
    cross-entropy-like loss their count or total class weight. The first batch with a nonzero
    mean checks that against the module's own mean (a module outside torch may differ)."""

    def __init__(self, module: nn.Module):
        red = module.reduction
        super().__init__("mean" if red in ("mean", "batchmean") else red)
        self.name = type(module).__name__
        self.linear_in_output = isinstance(module, nn.KLDivLoss)  # inputs are log-probabilities
        self._batchmean = red == "batchmean"
        self._spread: dict = {}  # target shape -> output elements per target element
        self._module = module
        self._summed = copy.copy(module)
        self._summed.reduction = "sum"
        self._checked = self.reduction == "sum"

    def sum_loss(self, out, tgt):
        return self._summed(out, tgt)

    def normalizer(self, tgt):
        m = self._summed
        if self._batchmean:
            return float(tgt.shape[0])
        if isinstance(m, _CLASS_INDEX) and not tgt.is_floating_point():
            return _class_total(tgt, m.weight, m.ignore_index)
        if isinstance(m, _PER_SAMPLE + _CLASS_INDEX):  # class probabilities: one ℓ per row
            return _rows(tgt)
        # torch's mean is over the elements of the broadcast loss: (N, 3) outputs against
        # (N, 1) targets average over 3N (``check`` records the spread per target shape)
        return float(tgt.numel() * self._spread.get(tuple(tgt.shape), 1))

    def check(self, out, tgt):
        if not (isinstance(self._summed, _CLASS_INDEX) and not tgt.is_floating_point()):
            _check_no_broadcast(self.name, out, tgt)  # class indices have their own shapes
            if tgt.dim() == out.dim() and tgt.shape != out.shape and tgt.numel():
                try:
                    n = math.prod(torch.broadcast_shapes(out.shape, tgt.shape))
                    self._spread[tuple(tgt.shape)] = n // tgt.numel()
                except RuntimeError:
                    pass  # not broadcastable: the loss raises its own error
        if self._checked:
            return
        with torch.no_grad():
            total, mean = float(self._summed(out, tgt)), float(self._module(out, tgt))
        if mean == 0 or not math.isfinite(total / mean):
            return  # nothing to compare on this batch
        self._checked = True
        norm = self.normalizer(tgt)
        if abs(total - mean * norm) > 1e-3 * abs(total):
            raise CurvkitValueError(
                f"{self.name}(reduction={self._module.reduction!r}) divides its sum by "
                f"{total / mean:.6g} on this batch, not by the {norm:g} curvkit takes for it, so "
                "curvkit cannot tell what its mean averages over. Build it with "
                "reduction='sum', or pass a callable (output, target) -> mean over samples with "
                "reduction='mean'."
            )


class CallableLoss(Loss):
    """A user callable ``(output, target) -> scalar``, separable over samples: a sum over
    samples, or with ``reduction='mean'`` a mean over the batch's samples."""

    def __init__(self, fn: Callable, reduction: str):
        super().__init__(reduction)
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)
        self._checked = False
        self._spares: dict = {}  # shapes -> a one-sample batch, to pair with a later one

    def sum_loss(self, out, tgt):
        value = self.fn(out, tgt)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CurvkitValueError(
                f"the loss callable must return a scalar tensor (the batch's loss), got {got}. "
                "Reduce it over samples, e.g. return per_sample.sum()."
            )
        value = value.reshape(())
        return value * out.shape[0] if self.reduction == "mean" else value

    def check(self, out, tgt):
        if not self._checked:
            self._check_reduction(out, tgt)
        if self._checked and not self.one_batch:
            self._check_few(out, tgt)

    def _check_reduction(self, out, tgt) -> None:
        """Sum or mean: the callable on a telling pair of samples against their own values."""
        with torch.no_grad():
            self.sum_loss(out, tgt)  # raises unless the callable returns a scalar
            # a loader of one-sample batches: the check pairs samples of two batches of the
            # same shapes (sequences of one length)
            key = (tuple(out.shape), tuple(tgt.shape))
            spare = self._spares.get(key) if out.shape[0] == 1 else None
            if spare is not None:
                out, tgt = torch.cat([spare[0], out]), torch.cat([spare[1], tgt])
            values = self._singles(out, tgt)
            if not self.one_batch and any(math.isnan(v) for v in values):
                self._checked = True  # the callable's mean is not over samples: _check_few says
                return
            pair = _telling_pair(values)
            if pair is None:
                if out.shape[0] == 1:
                    self._spares[key] = (out.detach(), tgt)
                return  # sum and mean agree here (one sample, zero losses): try the next batch
            (a, b), idx = pair
            two = float(self.fn(out[idx], tgt[idx]))
        self._checked = True
        tol = _rel(out) * (abs(a) + abs(b)) + 1e-12  # float16 rounds at 1e-3
        is_sum, is_mean = abs(two - (a + b)) <= tol, abs(two - (a + b) / 2) <= tol
        if self.reduction == "sum" and is_mean and not is_sum:
            raise CurvkitValueError(
                "the loss callable averages over samples (its value on two samples is the mean of "
                "their values), but a callable is taken as a sum. Pass reduction='mean' so the "
                "curvature has the scale of your loss, or make the callable return a sum."
            )
        if self.reduction == "mean" and is_sum and not is_mean:
            raise CurvkitValueError(
                "reduction='mean' was passed, but the loss callable sums over samples. Drop "
                "reduction='mean' (a callable is a sum by default) or make it return a mean."
            )
        if not (is_sum or is_mean):
            raise CurvkitValueError(
                "the loss callable is not separable over samples: its value on two samples is "
                f"{two:.6g}, their separate values are {a:.6g} and {b:.6g}. curvkit needs "
                "L = Σₙ ℓ(fₙ, yₙ) (or its mean)."
            )

    def _singles(self, out, tgt) -> list[float]:
        return [float(self.fn(out[i : i + 1], tgt[i : i + 1])) for i in range(min(8, len(out)))]

    def _check_few(self, out, tgt) -> None:
        """Two samples can agree with a mean that is not over samples (a mean over the targets
        not ignored, or weighted by class, when both are valid or of one class), and a batch
        whose first targets are all valid passes any check: so on every batch, its first few
        samples together must give the sum (or mean) of their own values. (On one batch any
        mean is exact: curvkit takes the callable's value times N, divided by N.)"""
        if out.shape[0] < 2:
            return
        with torch.no_grad():
            values = self._singles(out, tgt)
            few = float(self.fn(out[: len(values)], tgt[: len(values)]))
        total = math.fsum(values)
        mean = self.reduction == "mean"
        want = total / len(values) if mean else total
        tol = _rel(out) * math.fsum(abs(v) for v in values) + 1e-12
        if not abs(few - want) <= tol:
            what = "mean" if mean else "sum"
            raise CurvkitValueError(
                f"the loss callable is not a {what} over samples: on {len(values)} samples of a "
                f"batch it gives {few:.6g}, but the {what} of their separate values is "
                f"{want:.6g}"
                + (" (some are NaN: a mean over nothing)" if math.isnan(total) else "")
                + ". A mean over the targets not ignored, or weighted by class, depends on how "
                "the data is split into batches; return the sum (e.g. F.cross_entropy(..., "
                "reduction='sum')) and divide the curvature by the total yourself, or pass "
                "the data as one batch."
            )


def _rel(out: torch.Tensor) -> float:
    """Relative tolerance of comparing a loss's values: rounding of the output's dtype."""
    return max(1e-4, 10 * torch.finfo(out.dtype).eps) if out.is_floating_point() else 1e-4


def _telling_pair(values: list[float]):
    """((ℓᵢ, ℓⱼ), [i, j]): two samples (of the first 8, whose losses are ``values``) whose
    losses do not cancel, so that their pair's value tells a sum (ℓᵢ + ℓⱼ) from a mean (half
    that); None if there is none (one sample, or zero losses, as for a satisfied hinge)."""
    finite = [i for i, v in enumerate(values) if math.isfinite(v)]  # NaN: a mean over nothing
    if len(finite) < 2:
        return None
    first, *rest = sorted(finite, key=lambda i: -abs(values[i]))
    for j in rest:
        a, b = values[first], values[j]
        if abs(a + b) > max(1e-3 * (abs(a) + abs(b)), 1e-12):
            return (a, b), [first, j]
    return None


_KNOWN = {
    nn.CrossEntropyLoss: CrossEntropy,
    nn.NLLLoss: NLL,
    nn.MSELoss: MSE,
    nn.BCEWithLogitsLoss: BCEWithLogits,
    nn.BCELoss: BCE,
}


def _check_two_arguments(module: nn.Module) -> None:
    """curvkit calls a loss as ``loss_fn(output, target)``; a module whose forward needs more
    tensors (``GaussianNLLLoss(input, target, var)``, the margin-ranking and triplet losses)
    cannot be called so, and is refused with a way out."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p.name
        for p in sig.parameters.values()
        if p.kind in kinds and p.default is inspect.Parameter.empty
    ]
    if len(required) > 2:
        name = type(module).__name__
        example = (
            " (for a model that outputs mean and log-variance: lambda out, t: "
            "F.gaussian_nll_loss(out[:, :1], t, out[:, 1:].exp(), reduction='sum'))"
            if isinstance(module, nn.GaussianNLLLoss)
            else ""
        )
        raise CurvkitValueError(
            f"{name}.forward takes {len(required)} tensors ({', '.join(required)}), but curvkit "
            "calls the loss as loss_fn(output, target). Pass a callable (output, target) -> "
            f"scalar that builds the others from the model's output{example}."
        )


def as_loss(loss_fn, reduction: str | None) -> Loss:
    if isinstance(loss_fn, type) and issubclass(loss_fn, nn.Module):
        raise CurvkitTypeError(
            f"loss_fn is the class {loss_fn.__name__}, not a loss: pass an instance, "
            f"e.g. loss_fn={loss_fn.__name__}()."
        )
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        if reduction is not None and reduction != loss_fn.reduction:
            raise CurvkitValueError(
                f"reduction={reduction!r} was passed, but the {type(loss_fn).__name__} module "
                f"has reduction={loss_fn.reduction!r}; the module's own reduction decides. Drop "
                "the keyword or build the loss with the reduction you want."
            )
        if loss_fn.reduction == "none":
            raise CurvkitValueError(
                f"{type(loss_fn).__name__}(reduction='none') returns one loss per element; "
                "curvature is taken of a scalar. Use reduction='sum' or 'mean'."
            )
        _check_two_arguments(loss_fn)
        cls = _KNOWN.get(type(loss_fn))
        return MSE(loss_fn.reduction) if cls is MSE else (cls or TorchLoss)(loss_fn)
    if not callable(loss_fn):
        raise CurvkitTypeError(
            f"loss_fn must be a torch loss module or a callable (output, target) -> scalar, got "
            f"{type(loss_fn).__name__}."
        )
    reduction = "sum" if reduction is None else reduction
    if reduction not in ("sum", "mean"):
        raise CurvkitValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    return CallableLoss(loss_fn, reduction)
