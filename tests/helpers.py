"""Shared test helpers: one comparison function and dense float64 reference curvatures.

The references never look at curvkit. They work on a flat parameter vector ``theta`` (the
trainable parameters, or those given in ``params=``, flattened and concatenated in that order)
through ``torch.func.functional_call``, and use ``torch.func`` for every derivative.

Conventions shared with ``cases.py``:

* ``batches`` is a list of ``(inputs, targets)`` pairs; ``inputs`` is a tensor, a tuple of tensors
  (passed positionally) or a dict of tensors (passed as keyword arguments). Every tensor has the
  sample dimension first.
* ``loss_total_fn(output, targets)`` is the loss of a whole batch, applied to the *concatenated*
  batch (this is what the contract says the curvature is of).
* ``loss_sample_fn(output_1, target_1)`` is the loss ``l_n`` of ONE sample, written "batched of
  one": ``output_1`` and ``target_1`` keep a leading dimension of size 1.
* ``scale`` is the ``s`` in ``L = s * sum_n l_n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

_TINY = 1e-300


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------
def _as_f64(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    return torch.as_tensor(x, dtype=torch.float64)


def rel_error(actual: Any, expected: Any) -> float:
    """Relative Frobenius error ``||a - e|| / max(||e||, tiny)`` (shapes must match)."""
    a, e = _as_f64(actual), _as_f64(expected)
    err = torch.linalg.vector_norm(a - e).item()
    return err / max(torch.linalg.vector_norm(e).item(), _TINY)


def assert_close(
    actual: Any,
    expected: Any,
    rtol: float = 1e-8,
    atol_scale: float = 1e-10,
    what: str = "",
) -> None:
    """Assert ``||a - e||_F <= rtol * ||e||_F + atol_scale * sqrt(numel)``.

    The comparison is relative in the Frobenius norm; ``atol_scale`` is an absolute per-entry
    floor (scaled by ``sqrt(numel)`` so it is comparable to a Frobenius norm) that only matters
    when ``expected`` is (nearly) zero. Accepts tensors, numpy arrays and scalars; everything is
    compared in float64 on the CPU.
    """
    a, e = _as_f64(actual), _as_f64(expected)
    label = f"{what}: " if what else ""
    assert a.shape == e.shape, (
        f"{label}shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}"
    )
    assert bool(torch.isfinite(a).all()), (
        f"{label}actual has non-finite entries (shape {tuple(a.shape)})"
    )
    err = torch.linalg.vector_norm(a - e).item()
    ref = torch.linalg.vector_norm(e).item()
    tol = rtol * ref + atol_scale * math.sqrt(max(e.numel(), 1))
    if not err <= tol:
        rel = err / max(ref, _TINY)
        worst = ""
        if a.numel():
            flat = int(torch.argmax((a - e).abs()).item())
            where = tuple(int(i) for i in np.unravel_index(flat, tuple(a.shape)))
            worst = (
                f"; worst entry {where}: actual {a.reshape(-1)[flat].item():.6g} "
                f"vs expected {e.reshape(-1)[flat].item():.6g}"
            )
        raise AssertionError(
            f"{label}relative Frobenius error {rel:.3e} > rtol {rtol:.1e} "
            f"(abs error {err:.3e}, ||expected|| {ref:.3e}, shape {tuple(a.shape)}){worst}"
        )


# --------------------------------------------------------------------------------------------
# inputs, outputs, flat parameters
# --------------------------------------------------------------------------------------------
def map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], inputs: Any) -> Any:
    """Apply ``fn`` to every tensor of a tensor / tuple / list / dict input."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: map_tensors(fn, v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(fn, v) for v in inputs)
    raise TypeError(f"unsupported input type {type(inputs).__name__}")


def _cat(items: Sequence[Any]) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(items), dim=0)
    if isinstance(first, Mapping):
        return {k: _cat([it[k] for it in items]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([it[i] for it in items]) for i in range(len(first)))
    raise TypeError(f"unsupported input type {type(first).__name__}")


def concat_batches(batches: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
    """Concatenate ``(inputs, targets)`` pairs along the sample dimension."""
    return _cat([b[0] for b in batches]), _cat([b[1] for b in batches])


def num_samples(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    if isinstance(inputs, Mapping):
        return num_samples(next(iter(inputs.values())))
    return num_samples(inputs[0])


def pick_output(raw: Any, output_fn: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The contract rule: ``output_fn`` if given, else tensor / ``["logits"]`` / ``.logits``."""
    if output_fn is not None:
        return output_fn(raw)
    if isinstance(raw, torch.Tensor):
        return raw
    if isinstance(raw, Mapping):
        return raw["logits"]
    if hasattr(raw, "logits"):
        return raw.logits
    raise TypeError(f"cannot pick an output tensor from {type(raw).__name__}")


def named_coordinates(
    model: nn.Module, params: Sequence[torch.Tensor] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) in coordinate order: trainable ``named_parameters()`` or ``params``."""
    if params is None:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for p in params]


class FlatModel:
    """The model as a function of one flat parameter vector (via ``functional_call``)."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[torch.Tensor] | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.output_fn = output_fn
        named = named_coordinates(model, params)
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.theta0 = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()

    @property
    def num_params(self) -> int:
        return self.theta0.numel()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(theta, self.numels)
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def __call__(self, theta: torch.Tensor, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            args, kwargs = (inputs,), {}
        elif isinstance(inputs, Mapping):
            args, kwargs = (), dict(inputs)
        else:
            args, kwargs = tuple(inputs), {}
        raw = functional_call(self.model, self.unflatten(theta), args, kwargs)
        return pick_output(raw, self.output_fn)


def _unsqueeze(x: Any) -> Any:
    return map_tensors(lambda t: t.unsqueeze(0), x)


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------
def total_loss_fn(
    model: nn.Module,
    loss_total_fn: Callable,
    batches: Sequence[tuple[Any, Any]],
    params: Sequence[torch.Tensor] | None = None,
    *,
    output_fn: Callable | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``(theta -> total loss on the concatenated batch, theta0)``."""
    fm = FlatModel(model, params, output_fn)
    x, y = concat_batches(batches)

    def total(theta: torch.Tensor) -> torch.Tensor:
        return loss_total_fn(fm(theta, x), y)

    return total, fm.theta0


def ref_hessian(
    model: nn.Module,
    loss_total_fn: Callable,
    batches: Sequence[tuple[Any, Any]],
    params: Sequence[torch.Tensor] | None = None,
    *,
    output_fn: Callable | None = None,
) -> torch.Tensor:
    """Dense Hessian of the total loss on the concatenated batch, ``jacrev(grad(total))``.

    Not ``torch.func.hessian`` (= ``jacfwd(jacrev)``): in torch 2.13 both ``jacfwd(jacrev(f))``
    and ``jacrev(jacrev(f))`` of a scalar ``f`` give a WRONG (even non-symmetric) Hessian as soon
    as ``F.layer_norm`` with an affine weight is involved (the attention case shows a 7 % error),
    while ``jacrev(grad(f))`` matches plain double-backward autograd; ``test_references.py``
    checks this for every case.
    """
    total, theta0 = total_loss_fn(model, loss_total_fn, batches, params, output_fn=output_fn)
    return jacrev(grad(total))(theta0).detach()


def per_sample_jacobians(
    model: nn.Module,
    batches: Sequence[tuple[Any, Any]],
    params: Sequence[torch.Tensor] | None = None,
    *,
    output_fn: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``(outputs (N, 1, *out), J (N, O, P), targets)`` with ``vmap(jacrev)``."""
    fm = FlatModel(model, params, output_fn)
    x, y = concat_batches(batches)

    def out_n(theta: torch.Tensor, x_n: Any) -> torch.Tensor:
        return fm(theta, _unsqueeze(x_n))

    outs = vmap(out_n, in_dims=(None, 0))(fm.theta0, x).detach()
    jac = vmap(jacrev(out_n), in_dims=(None, 0))(fm.theta0, x).detach()
    n = outs.shape[0]
    return outs, jac.reshape(n, -1, fm.num_params), y


def ref_output_hessians(loss_sample_fn: Callable, outs: torch.Tensor, targets: Any) -> torch.Tensor:
    """Per-sample ``d2 l_n / d out^2`` of shape (N, O, O), by autodiff (``jacrev(grad)``, see
    :func:`ref_hessian` for why not ``torch.func.hessian``)."""
    out_shape = outs.shape[1:]

    def l_flat(o_flat: torch.Tensor, t_n: Any) -> torch.Tensor:
        return loss_sample_fn(o_flat.reshape(out_shape), _unsqueeze(t_n))

    flat = outs.reshape(outs.shape[0], -1)
    return vmap(jacrev(grad(l_flat)))(flat, targets).detach()


def ref_ggn(
    model: nn.Module,
    loss_sample_fn: Callable,
    scale: float,
    batches: Sequence[tuple[Any, Any]],
    params: Sequence[torch.Tensor] | None = None,
    *,
    output_fn: Callable | None = None,
) -> torch.Tensor:
    """``s * sum_n J_n^T (d2 l_n / d out^2) J_n``."""
    outs, jac, y = per_sample_jacobians(model, batches, params, output_fn=output_fn)
    h_out = ref_output_hessians(loss_sample_fn, outs, y)
    return scale * torch.einsum("nop,noq,nqr->pr", jac, h_out, jac)


def ref_ef(
    model: nn.Module,
    loss_sample_fn: Callable,
    scale: float,
    batches: Sequence[tuple[Any, Any]],
    params: Sequence[torch.Tensor] | None = None,
    *,
    output_fn: Callable | None = None,
) -> torch.Tensor:
    """``s * sum_n g_n g_n^T`` with per-sample gradients ``g_n`` from ``vmap(grad)``."""
    fm = FlatModel(model, params, output_fn)
    x, y = concat_batches(batches)

    def l_n(theta: torch.Tensor, x_n: Any, y_n: Any) -> torch.Tensor:
        return loss_sample_fn(fm(theta, _unsqueeze(x_n)), _unsqueeze(y_n))

    g = vmap(grad(l_n), in_dims=(None, 0, 0))(fm.theta0, x, y).detach()
    return scale * g.T @ g


def per_sample_losses(
    model: nn.Module,
    loss_sample_fn: Callable,
    batches: Sequence[tuple[Any, Any]],
    *,
    output_fn: Callable | None = None,
) -> torch.Tensor:
    """``l_n`` for every sample of the concatenated batch (a plain loop, no ``vmap``)."""
    fm = FlatModel(model, None, output_fn)
    x, y = concat_batches(batches)
    vals = []
    with torch.no_grad():
        for i in range(num_samples(x)):
            x_i = map_tensors(lambda t, i=i: t[i : i + 1], x)
            y_i = map_tensors(lambda t, i=i: t[i : i + 1], y)
            vals.append(loss_sample_fn(fm(fm.theta0, x_i), y_i))
    return torch.stack(vals)


def finite_difference_hessian(
    loss_of_theta: Callable[[torch.Tensor], torch.Tensor], theta0: torch.Tensor, step: float = 1e-5
) -> torch.Tensor:
    """Central differences of the autograd gradient: ``H[:, i] = (g(+h e_i) - g(-h e_i)) / 2h``."""

    def gradient(theta: torch.Tensor) -> torch.Tensor:
        theta = theta.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of_theta(theta), theta)
        return g.detach()

    cols = []
    for i in range(theta0.numel()):
        e = torch.zeros_like(theta0)
        e[i] = step
        cols.append((gradient(theta0 + e) - gradient(theta0 - e)) / (2 * step))
    h = torch.stack(cols, dim=1)
    return 0.5 * (h + h.T)
