"""The front doors: ``hessian``, ``ggn``, ``fisher``, ``ef``.

Every function computes C = ∂²L/∂θ² or a Gauss-Newton form C = s·Σₙ Jₙᵀ Mₙ Jₙ of the loss
L = s·Σₙ ℓ(f(xₙ; θ), yₙ) over all of ``data``, w.r.t. the chosen parameters θ (see
``parameter_slices`` for the coordinates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .autodiff import missing_derivative
from .curvature import _NAMES, CurvatureOperator
from .data import DataSource
from .engine.build import build, first_order_dense
from .engine.problem import Problem
from .errors import CurvkitTypeError, CurvkitValueError, check_count, check_generator
from .losses import as_loss
from .memory import check_dense
from .operators.lowrank import LowRankOperator
from .params import resolve_params, unwrap_model
from .spectral import top_eigenvalues

STRUCTURES = ("dense", "operator", "diag", "kron", "ekfac", "block", "lowrank")


def _check_weight_norm(model: nn.Module, layout) -> None:
    """torch's double backward through ``parametrizations.weight_norm`` (its fused
    ``_weight_norm_interface``) is wrong in torch 2.13-2.14: the Hessian's block of the
    direction parameter came out 0.64 off (finite differences agree with the plain-ops
    formula). The GGN and EF need first derivatives of the model only and are right."""
    for name, mod in model.named_modules():
        plist = getattr(getattr(mod, "parametrizations", None), "weight", None)
        if plist is not None and any(type(f).__name__ == "_WeightNorm" for f in plist):
            params, which = list(plist.parameters()), "parametrizations.weight_norm"
        else:  # the legacy hook (torch.nn.utils.weight_norm): the same fused kernel
            hooks = [h for h in mod._forward_pre_hooks.values() if type(h).__name__ == "WeightNorm"]
            if not hooks:
                continue
            names = [f"{h.name}{end}" for h in hooks for end in ("_g", "_v")]
            params, which = [getattr(mod, n) for n in names], "weight_norm"
        if any(layout.index_of(p) is not None for p in params):
            raise CurvkitValueError(
                f"{name or 'the model'} uses torch.nn.utils.{which}, whose "
                "second derivative torch computes wrongly (its fused kernel's double backward), "
                "so its Hessian would be off. Use ck.ggn / ck.ef (first derivatives only, "
                "exact), or write the norm out in forward(): w = g * v / v.norm(dim=1, "
                "keepdim=True)."
            )


def _changes_each_call(mod: nn.Module) -> bool:
    """RReLU draws random slopes and spectral norms (legacy hook or parametrization) take a
    power-iteration step on every training-mode call."""
    plists = getattr(mod, "parametrizations", None)
    return (
        isinstance(mod, nn.RReLU)
        or any(type(h).__name__ == "SpectralNorm" for h in mod._forward_pre_hooks.values())
        or any(
            type(f).__name__ == "_SpectralNorm" for plist in (plists or {}).values() for f in plist
        )
    )


def _check_mode(model: nn.Module, layout) -> None:
    for name, mod in model.named_modules():
        rate = mod.p if isinstance(mod, nn.modules.dropout._DropoutNd) else None
        if isinstance(getattr(mod, "dropout", None), float):  # nn.MultiheadAttention's own
            rate = mod.dropout
        if rate is not None and mod.training and rate > 0:
            raise CurvkitValueError(
                f"{name or 'the model'} ({type(mod).__name__}) is in training mode: every pass "
                "would draw a new mask, so the curvature is of a random function. Call "
                "model.eval() first."
            )
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.training or not mod.track_running_stats:
                raise CurvkitValueError(
                    f"{name or 'the model'} ({type(mod).__name__}) normalises with batch "
                    "statistics, which couples the samples of a batch and changes with the "
                    "batch split. Call model.eval() (it needs track_running_stats=True)."
                )
        if mod.training and _changes_each_call(mod):
            raise CurvkitValueError(
                f"{name or 'the model'} ({type(mod).__name__}) changes its function on every "
                "call in training mode (RReLU draws random slopes; spectral_norm takes a "
                "power-iteration step and updates the model). Call model.eval() first."
            )
        chosen = isinstance(mod, nn.Embedding | nn.EmbeddingBag) and (
            layout.index_of(mod.weight) is not None
        )
        if chosen and (mod.scale_grad_by_freq or mod.sparse):
            flag = "scale_grad_by_freq" if mod.scale_grad_by_freq else "sparse"
            why = {
                "scale_grad_by_freq": "rescales torch's gradient by token counts within a batch, "
                "so derivatives that follow it disagree with the function's",
                "sparse": "makes torch's gradient a sparse tensor, which the torch.func "
                "transforms curvkit uses cannot take",
            }[flag]
            raise CurvkitValueError(
                f"{name or 'the model'} ({type(mod).__name__}) has {flag}=True, which {why}; "
                f"the function itself is the same without it. Set {name or 'model'}.{flag} = "
                "False while computing curvature."
            )


def _curvature(
    kind,
    model,
    loss_fn,
    data,
    *,
    params,
    structure,
    reduction,
    output_fn,
    memory_limit,
    progress,
    mc_samples=1,
    generator=None,
    kfac="expand",
    rank=20,
):
    if structure not in STRUCTURES:
        raise CurvkitValueError(
            f"unknown structure={structure!r}; choose one of {', '.join(map(repr, STRUCTURES))}."
        )
    if memory_limit is not None and (
        isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 1
    ):
        raise CurvkitValueError(
            f"memory_limit must be a positive int (bytes) or None (80% of available memory), "
            f"got {memory_limit!r}; e.g. memory_limit=8 * 2**30 for 8 GiB."
        )
    model = unwrap_model(model)
    layout = resolve_params(model, params)
    dtypes = {t.dtype for t in layout.tensors}
    devices = {t.device for t in layout.tensors}
    if len(dtypes) > 1 or len(devices) > 1:
        raise CurvkitValueError(
            f"the chosen parameters mix dtypes {sorted(map(str, dtypes))} or devices "
            f"{sorted(map(str, devices))}; move the model to one dtype and device (model.to(...))."
        )
    ref = layout.tensors[0]
    if structure == "dense":  # before anything touches memory: refuse within a second
        check_dense(
            _NAMES[kind],
            (layout.numel, layout.numel),
            ref.dtype,
            ref.device,
            memory_limit,
            "Use structure='kron', 'diag' or 'lowrank' (structured), 'operator' "
            "(matrix-free products), or fewer parameters with params= (e.g. the last layer).",
        )
    # one reduction per tensor and a single sync: the largest |entry| is finite iff all are
    peaks = torch.stack(
        [t.detach().abs().amax() if t.numel() else t.new_zeros(()) for t in layout.tensors]
    )
    if not bool(torch.isfinite(peaks).all()):
        bad = int((~torch.isfinite(peaks)).nonzero()[0])
        raise CurvkitValueError(
            f"parameter {layout.names[bad]!r} contains NaN or Inf; curvature there is undefined. "
            "Check the training run that produced it."
        )
    _check_mode(model, layout)
    if kind == "hessian":
        _check_weight_norm(model, layout)
    check_count(
        "mc_samples", mc_samples, "label draws per sample", "e.g. mc_samples=1 (the default)."
    )
    check_generator(generator)
    if structure == "lowrank":
        check_count("rank", rank, "eigenpairs kept", "e.g. rank=20 (the default).")
    if output_fn is not None and not callable(output_fn):
        raise CurvkitTypeError("output_fn must be a callable taking the model's raw output.")
    loss = as_loss(loss_fn, reduction)
    source = DataSource(data, ref.device, ref.dtype if ref.is_floating_point() else None)
    problem = Problem(
        model,
        layout,
        loss,
        source,
        kind,
        output_fn=output_fn,
        progress=progress,
        mc_samples=mc_samples,
        generator=generator,
        memory_limit=memory_limit,
    )
    if structure == "operator":
        if source.one_shot:
            raise CurvkitValueError(
                f"data is a one-shot iterator ({type(data).__name__}), but structure='operator' "
                "makes a pass over the data for every product. Pass something it can iterate "
                "again: a list of batches or a DataLoader."
            )
        return CurvatureOperator(problem, kind)
    if structure == "lowrank":
        # Lanczos draws its start vectors from a copy of the generator: the MC Fisher's labels,
        # drawn by the first product, then come from the generator's own stream, as they do
        # for the dense and operator forms with the same seed
        lanczos = None
        if generator is not None:
            lanczos = torch.Generator(device=generator.device)
            lanczos.set_state(generator.get_state())
        lam, U = top_eigenvalues(
            CurvatureOperator(problem, kind),
            k=min(rank, layout.numel),
            eigenvectors=True,
            generator=lanczos,
        )
        return LowRankOperator(U, lam)
    if structure != "dense":
        return build(problem, structure, kfac)
    drawn = generator.get_state() if generator is not None else None
    try:
        return problem.dense()
    except CurvkitValueError as e:
        if kind == "hessian" or not missing_derivative(e.__cause__):
            raise
    if drawn is not None:  # the Fisher's labels as the failed attempt drew them
        generator.set_state(drawn)
    return first_order_dense(problem)  # an op without a second derivative in the model


_DOC_ARGS = """
    Args:
        model: any ``nn.Module`` in eval mode. Its output is the tensor it returns, a mapping's
            ``"logits"`` entry, or an object's ``.logits``; override with ``output_fn``.
        loss_fn: a torch loss module (its ``reduction`` decides sum vs mean) or a callable
            ``(output, target) -> scalar`` separable over samples, taken as a sum unless
            ``reduction="mean"``.
        data: one batch ``(inputs, targets)`` or an iterable of them; ``inputs`` a tensor, a
            tuple (positional) or a dict (keyword arguments). Several batches give the
            curvature of the loss on their concatenation.
        params: parameters to differentiate w.r.t. (default: all with ``requires_grad``);
            coordinates follow their order, see ``parameter_slices``.
        structure: ``"dense"`` (a (P, P) tensor), ``"operator"`` (matrix-free, exact), or a
            block-diagonal operator: ``"diag"`` (exact diagonal), ``"block"`` (exact dense
            block per layer/module), ``"kron"`` (KFAC) or ``"ekfac"`` (Gauss-Newton kinds only),
            or ``"lowrank"`` (top-20 eigenpairs by Lanczos; the 20 is the ``rank=`` keyword).
        kfac: weight sharing in KFAC (``"expand"`` or ``"reduce"``, Eschenhagen et al. 2023).
        memory_limit: bytes a dense result may take (default: 80% of available memory).
        progress: show a progress bar over batches (default: only for several batches).
"""


def hessian(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    params: Iterable | None = None,
    structure: str = "dense",
    reduction: str | None = None,
    output_fn=None,
    memory_limit: int | None = None,
    progress: bool | None = None,
    rank: int = 20,
):
    """The exact Hessian H = ∂²L/∂θ² of the loss over ``data``.

    >>> import torch, curvkit as ck
    >>> torch.manual_seed(0); model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> ck.hessian(model, torch.nn.MSELoss(), (x, y)).shape
    torch.Size([8, 8])
    """
    return _curvature("hessian", **locals())


def ggn(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    params: Iterable | None = None,
    structure: str = "dense",
    reduction: str | None = None,
    output_fn=None,
    memory_limit: int | None = None,
    progress: bool | None = None,
    kfac: str = "expand",
    rank: int = 20,
):
    """The generalized Gauss-Newton G = s·Σₙ Jₙᵀ (∂²ℓₙ/∂fₙ²) Jₙ, with Jₙ = ∂f(xₙ)/∂θ."""
    return _curvature("ggn", **locals())


def fisher(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    params: Iterable | None = None,
    structure: str = "dense",
    reduction: str | None = None,
    output_fn=None,
    memory_limit: int | None = None,
    progress: bool | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    kfac: str = "expand",
    rank: int = 20,
):
    """The Monte-Carlo Fisher F = s·Σₙ κₙ (1/S) Σₛ gₙₛ gₙₛᵀ, gₙₛ = ∇θ ℓ(f(xₙ), ỹₙₛ), with the
    targets ỹ drawn from the model's predictive (``mc_samples`` = S per sample; pass a
    ``generator`` for reproducible draws), ℓ without the loss's weights and κₙ the weight of
    sample n's own target (class weight, with label smoothing's share; 0 if ignored). It
    averages to the GGN for cross-entropy, MSE and BCE with logits (not with ``pos_weight``,
    whose curvature depends on the target; not for NLLLoss on log-probabilities, whose GGN is
    zero, nor for BCELoss on probabilities, where it is the expected Hessian)."""
    return _curvature("fisher", **locals())


def ef(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    params: Iterable | None = None,
    structure: str = "dense",
    reduction: str | None = None,
    output_fn=None,
    memory_limit: int | None = None,
    progress: bool | None = None,
    kfac: str = "expand",
    rank: int = 20,
):
    """The empirical Fisher E = s·Σₙ ∇ℓₙ ∇ℓₙᵀ with L = s·Σₙ ℓₙ — the same scale as the
    Hessian it stands in for. Unlike the Hessian and GGN, it depends on how L splits into
    per-sample terms: for a torch loss module's mean, ℓₙ is sample n's sum over its elements
    and s = 1/(number of elements); for a callable with ``reduction='mean'``, ℓₙ is the
    callable's value on sample n alone and s = 1/N. Over T elements per sample the two
    differ by a factor T."""
    return _curvature("ef", **locals())


for _f in (hessian, ggn, fisher, ef):
    _f.__doc__ += _DOC_ARGS
