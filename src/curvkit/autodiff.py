"""Second-order products with forward-over-reverse AD, falling back to reverse-over-reverse.

Forward mode is the faster way to differentiate a gradient, but not every torch op has a
forward-mode formula (e.g. ``huber_loss_backward``), and old-style ``autograd.Function``s have
none. Those errors are recognised here so the engine can retry in reverse mode, or say clearly
what the model needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch.func import jvp, vjp

from .errors import CurvkitTypeError, CurvkitValueError


class ForwardADUnsupported(Exception):
    """Raised inside the engine to switch a whole pass to reverse mode."""


def is_forward_ad_error(e: BaseException) -> bool:
    """A failure of forward mode that reverse mode does not share. "ZeroTensors are immutable"
    comes from jvp over the backward of F.mse_loss's default mean (torch 2.13)."""
    msg = str(e)
    return isinstance(e, NotImplementedError | RuntimeError) and (
        "forward AD" in msg
        or "forward-mode" in msg
        or "Forward AD" in msg
        or "ZeroTensors are immutable" in msg
    )


def missing_derivative(e: BaseException | None):
    """The match naming the op whose derivative torch lacks, if that is the error; else None."""
    if not isinstance(e, RuntimeError):
        return None
    return re.search(r"derivative for (\S+) is not implemented", str(e))


def translate(e: BaseException) -> BaseException | None:
    """A clear curvkit error for torch errors a user can act on, else None."""
    msg = str(e)
    if isinstance(e, RuntimeError) and "setup_context" in msg:
        return CurvkitTypeError(
            "the model uses a torch.autograd.Function without a setup_context staticmethod; "
            "curvkit differentiates with torch.func transforms, which need it (and a vmap rule "
            "or generate_vmap_rule = True). Rewrite the Function in that style: see 'Extending "
            "torch.func with autograd.Function' in the PyTorch docs."
        )
    if isinstance(e, RuntimeError) and "saved tensor hooks" in msg:
        return CurvkitTypeError(
            "the model uses saved-tensor hooks (activation checkpointing with "
            "torch.utils.checkpoint, or torch.autograd.graph.saved_tensors_hooks), which the "
            "torch.func transforms curvkit differentiates with do not support. Turn "
            "checkpointing off while computing curvature (e.g. a flag your forward() reads)."
        )
    inplace = re.search(r"attempted to call in-place operation \((\S+)\)", msg) or re.search(
        r"vmap: (\S+)\(self, \*extra_args\) is not possible", msg
    )
    if isinstance(e, RuntimeError) and inplace:
        op = inplace.group(1)
        hint = ""
        if "renorm" in op:
            hint = (
                " For nn.Embedding(max_norm=...), which renormalises its weight so: run the "
                "model once under torch.no_grad() (that renormalises the rows the data uses), "
                "then set the module's max_norm = None; the curvature is the same"
            )
        return CurvkitValueError(
            f"forward() changes a tensor in place with {op}, which the torch.func transforms "
            f"curvkit uses here cannot differentiate. Make the forward pass out of place.{hint}."
        )
    missing = missing_derivative(e)
    if missing:
        op = missing.group(1)
        return CurvkitValueError(
            f"torch implements no derivative of {op}, so curvkit cannot differentiate through "
            f"{op.removesuffix('_backward')} twice. That is needed by ck.hessian always, by "
            "ck.ggn for the loss's second derivative, and by the matrix-free products "
            "(structure='operator') of ck.ggn / ck.ef / ck.fisher, which differentiate the "
            "model's backward pass. Their dense and structured results (structure='dense', "
            "'diag', 'block', 'kron' or 'ekfac') need first derivatives of the model only. Or "
            "replace the op by a twice-differentiable one (CrossEntropyLoss for a "
            "margin loss; explicit softmax attention for F.scaled_dot_product_attention)."
        )
    unbatched = re.search(r"vmap: we do not yet support (\S+)", msg)
    if isinstance(e, RuntimeError) and unbatched:
        op = unbatched.group(1).rstrip(".")
        hint = (
            " An eval-mode nn.RReLU(lower, upper) is nn.LeakyReLU((lower + upper) / 2): swap it in"
            if "rrelu" in op
            else ""
        )
        return CurvkitValueError(
            f"torch's vmap does not support {op}, which this computation maps over samples or "
            "vectors. structure='diag', 'block', 'kron' or 'operator' may take another route "
            f"here; or replace the op.{hint}."
        )
    if isinstance(e, RuntimeError) and "randomness" in msg and "vmap" in msg:
        return CurvkitValueError(
            "forward() draws random numbers (F.dropout(..., training=True), torch.rand, ...): "
            "the curvature of a random function is undefined. Call model.eval(), or make "
            "forward() deterministic while computing curvature."
        )
    return None


@contextmanager
def translated() -> Iterator[None]:
    """Re-raise a torch error that :func:`translate` knows as its clear curvkit error."""
    try:
        yield
    except RuntimeError as e:
        nice = translate(e)
        if nice is None:
            raise
        raise nice from e


def linear_map(f: Callable, x, forward: bool) -> Callable:
    """``t -> J t`` for the Jacobian J of ``f`` at ``x`` (one pytree): jvp, or the double-vjp
    trick (u ↦ Jᵀu is linear, so its own vjp is t ↦ J t)."""
    if forward:
        return lambda t: jvp(f, (x,), (t,))[1]
    out, pull = vjp(f, x)
    _, pull_of_pull = vjp(lambda u: pull(u)[0], out.new_zeros(out.shape))
    return lambda t: pull_of_pull(t)[0]


def hessian_map(g: Callable, x, forward: bool) -> Callable:
    """``t -> H t`` where ``g`` is a gradient function at ``x`` (its Jacobian H is symmetric)."""
    if forward:
        return lambda t: jvp(g, (x,), (t,))[1]
    _, pull = vjp(g, x)
    return lambda t: pull(t)[0]
