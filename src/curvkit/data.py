"""Turning what users pass as ``data`` into validated batches, and calling the model on them.

``data`` is one batch ``(inputs, targets)`` or an iterable of such pairs (a ``DataLoader``).
``inputs`` is a tensor, a tuple (passed positionally) or a dict (passed as keyword arguments,
the HuggingFace convention).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .errors import CurvkitTypeError, CurvkitValueError

_PAIR_HELP = (
    "Pass data as one batch (inputs, targets) or as an iterable of such pairs "
    "(e.g. a DataLoader over a TensorDataset(inputs, targets))."
)


@dataclass
class Batch:
    inputs: Any  # Tensor | tuple[Tensor, ...] | dict[str, Tensor]
    targets: torch.Tensor
    size: int
    probe: Any = None  # set by the engine: (module calls, activation numel) on this batch
    index: int = -1  # position in the data stream, set by the engine
    given: Any = None  # (inputs, targets) as passed, if kept (see :meth:`tensors_given`)

    def tensors_given(self) -> list[torch.Tensor]:
        """The batch's tensors as the user holds them, which in-place edits change: a batch
        reused across passes (data given as one batch) keeps the originals of its moved or
        cast copies."""
        inputs, targets = (self.inputs, self.targets) if self.given is None else self.given
        return [*_tensors(inputs), targets]


def _is_inputs(x: Any) -> bool:
    if isinstance(x, torch.Tensor | Mapping):
        return True
    # a list of tensors too: positional arguments, as a DataLoader collates a tuple of inputs
    return isinstance(x, tuple | list) and all(isinstance(t, torch.Tensor) for t in x)


def _is_single_batch(data: Any) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[1], torch.Tensor)
        and _is_inputs(data[0])
    )


def _map_tensors(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return tuple(_map_tensors(v, fn) for v in x)
    return x


def _tensors(x: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map_tensors(x, lambda t: out.append(t) or t)
    return out


def _validate(
    raw: Any, index: int, device: torch.device, dtype: torch.dtype | None, keep: bool = False
) -> Batch:
    """The checked batch, its tensors moved to ``device``, floating targets cast to ``dtype``;
    ``keep``: it also keeps the tensors as given (``Batch.given``)."""
    where = "data" if index < 0 else f"batch {index} of data"
    if isinstance(raw, torch.Tensor):
        raise CurvkitTypeError(
            f"{where} is a single tensor of shape {tuple(raw.shape)}: inputs without targets. "
            + _PAIR_HELP
        )
    if not isinstance(raw, tuple | list) or len(raw) != 2:
        got = f"a {type(raw).__name__}" + (
            f" of length {len(raw)}" if isinstance(raw, tuple | list) else ""
        )
        raise CurvkitTypeError(
            f"{where} is {got}, expected an (inputs, targets) pair. " + _PAIR_HELP
        )
    inputs, targets = raw
    if not isinstance(targets, torch.Tensor):
        raise CurvkitTypeError(
            f"the targets of {where} are a {type(targets).__name__}, expected a tensor. "
            + _PAIR_HELP
        )
    if targets.dim() == 0:
        raise CurvkitValueError(
            f"the targets of {where} are a 0-d tensor; expected a sample dimension first (N, ...)."
        )
    n = targets.shape[0]
    if n == 0:
        raise CurvkitValueError(f"{where} is empty (0 samples). Remove empty batches.")
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if not _is_inputs(inputs):
        raise CurvkitTypeError(
            f"the inputs of {where} are a {type(inputs).__name__}; expected a tensor, a tuple of "
            "tensors (passed positionally) or a dict (passed as keyword arguments)."
        )
    for t in _tensors(inputs) + [targets]:
        # a finite sum is the common case and one pass; only then is every entry finite, unless
        # the sum itself overflowed, which the exact test below sorts out
        if (
            t.is_floating_point()
            and not bool(torch.isfinite(t.sum()))
            and not bool(torch.isfinite(t).all())
        ):
            bad = "inputs" if t is not targets else "targets"
            raise CurvkitValueError(
                f"the {bad} of {where} contain NaN or Inf; curvature at such points is undefined. "
                "Clean or mask the data first."
            )
    lead = [t.shape[0] for t in _tensors(inputs) if t.dim() > 0]
    if lead and n not in lead:
        raise CurvkitValueError(
            f"{where} has {n} targets but its inputs have leading sizes {lead}; "
            "inputs and targets must share the sample dimension."
        )
    move = lambda t: t.to(device)  # noqa: E731
    if dtype is not None and targets.is_floating_point():
        # the curvature is computed in the parameters' dtype; torch's losses promote float64
        # targets of a float32 model, curvkit's closed forms and products would mix them
        targets = targets.to(dtype)
    given = (inputs, raw[1]) if keep else None
    return Batch(_map_tensors(inputs, move), targets.to(device), n, given=given)


class DataSource:
    """A re-iterable stream of validated batches."""

    def __init__(self, data: Any, device: torch.device, dtype: torch.dtype | None = None):
        """``dtype``: the parameters' floating dtype, which floating targets are cast to."""
        self.device, self.dtype = device, dtype
        self._cached: Batch | None = None
        self._passes = 0  # complete passes over the data
        self._begun = 0  # passes started
        looks_like_one_batch = isinstance(data, torch.Tensor) or (
            isinstance(data, tuple | list) and data and isinstance(data[0], torch.Tensor)
        )
        if _is_single_batch(data) or looks_like_one_batch:
            if not _is_single_batch(data):
                _validate(data, -1, device, dtype)  # a malformed batch: the precise error
            self.single = True
            self._batches: Iterable[Any] = [data]
        elif isinstance(data, Iterable) and not isinstance(data, str | bytes | Mapping):
            self.single = False
            self._batches = data
        else:
            raise CurvkitTypeError(f"data is a {type(data).__name__}. " + _PAIR_HELP)

    @property
    def one_shot(self) -> bool:
        """Whether the data is an iterator that a pass uses up (a generator)."""
        return not self.single and iter(self._batches) is self._batches

    def __len__(self) -> int:
        return len(self._batches)  # type: ignore[arg-type]

    def __iter__(self):
        if self.single:  # validated once; the same Batch (and the engine's notes on it) reused
            if self._cached is None:
                self._cached = _validate(self._batches[0], -1, self.device, self.dtype, True)
            yield self._cached
            return
        one_shot = self.one_shot
        if one_shot and self._begun > self._passes:
            raise CurvkitValueError(
                f"data is a one-shot iterator ({type(self._batches).__name__}), and a pass over "
                "it stopped partway: curvkit retries such a pass another way (reverse-mode or "
                "first-derivative products, when an op of the model lacks forward-mode or "
                "second derivatives), but the retry would see only the batches the first try "
                "left. Pass something it can iterate again: a list of batches or a DataLoader."
            )
        self._begun += 1
        count = 0
        for i, raw in enumerate(self._batches):
            yield _validate(raw, i, self.device, self.dtype)
            count += 1
        if count == 0 and self._passes > 0 and one_shot:
            self._begun -= 1  # nothing was read: not a pass that stopped partway
            raise CurvkitValueError(
                f"data is a one-shot iterator ({type(self._batches).__name__}) that an earlier "
                "pass used up; curvkit makes several passes (structured fits, products, "
                "eigenvalues). Pass something it can iterate again: a list of batches or a "
                "DataLoader."
            )
        if count == 0:
            raise CurvkitValueError("data is empty: it yielded no batch. " + _PAIR_HELP)
        self._passes += 1


def pick_output(raw: Any, output_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
    """The tensor the loss sees: ``output_fn(raw)`` if given; else a tensor as is, a mapping's
    ``"logits"`` entry, or an object's ``.logits`` attribute (the HuggingFace convention)."""
    if output_fn is not None:
        out = output_fn(raw)
    elif isinstance(raw, torch.Tensor):
        out = raw
    elif isinstance(raw, Mapping) and "logits" in raw:
        out = raw["logits"]
    elif hasattr(raw, "logits"):
        out = raw.logits
    else:
        raise CurvkitTypeError(
            f"the model returned a {type(raw).__name__}, and curvkit does not know which part is "
            "the prediction (it looks for a tensor, a mapping with 'logits', or an object with "
            "'.logits'). Pass output_fn=, e.g. output_fn=lambda out: out[0]."
        )
    if not isinstance(out, torch.Tensor):
        raise CurvkitTypeError(
            f"the picked model output is a {type(out).__name__}, expected a tensor; "
            "fix output_fn= so it returns the tensor the loss takes."
        )
    return out


_MHA = getattr(torch.backends, "mha", None)


@contextmanager
def _slow_path():
    """Transformer layers' inference fast path off: under no_grad it returns 0 at padded
    positions where autograd's path (the function curvkit differentiates) returns values, so
    outputs and per-sample rows would disagree (torch >= 2.2 has the switch)."""
    if _MHA is None or not hasattr(_MHA, "get_fastpath_enabled"):
        yield
        return
    was = _MHA.get_fastpath_enabled()
    _MHA.set_fastpath_enabled(False)
    try:
        yield
    finally:
        _MHA.set_fastpath_enabled(was)


def call_model(
    model: nn.Module,
    inputs: Any,
    params: Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """``model(inputs)`` with tuple → positional and dict → keyword arguments, optionally with
    some parameters replaced (``torch.func.functional_call``)."""
    args: tuple = ()
    kwargs: dict = {}
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
    elif isinstance(inputs, tuple | list):
        args = tuple(inputs)
    else:
        args = (inputs,)
    try:
        with _slow_path():
            if params is None:
                return model(*args, **kwargs)
            return functional_call(model, dict(params), args, kwargs)
    except (RuntimeError, NotImplementedError) as e:  # kernels without integer dtypes raise
        mismatch = _dtype_mismatch(model, inputs, e)  # NotImplementedError ("... for 'Byte'")
        if mismatch is None:
            raise
        raise mismatch from e


def _is_plain_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _dtype_mismatch(model: nn.Module, inputs: Any, e: Exception) -> Exception | None:
    """A clear error for the common failure of float64 data (``torch.from_numpy``) fed to a
    float32 model, which torch reports deep inside the first layer; None for anything else."""
    if not re.search(r"dtype|scalar type|Input type|implemented for|Double|Float|Half", str(e)):
        return None  # another error: torch's own message says more than a guess would
    theirs = {t.dtype for t in _tensors(inputs) if t.is_floating_point()}
    ours = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not theirs and ours and any(_is_plain_int(t) for t in _tensors(inputs)):
        # (convolutions say "Input type (unsigned char) and bias type (float)")
        pattern = r"mat1 and mat2|same dtype|expected .*Float|Long|Input type|implemented for"
        if re.search(pattern, str(e)):
            theirs = {t.dtype for t in _tensors(inputs)}  # integer features, not token ids
    if not theirs or not ours or theirs <= ours:
        return None
    short = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    ours_s, theirs_s = sorted(map(short, ours)), sorted(map(short, theirs))
    if "indices" in str(e):  # an embedding's lookup: token ids must be int64 or int32
        advice = "Pass token ids as int64: x.long()."
    elif not any(d.is_floating_point for d in theirs):  # integer features, or ids
        advice = (
            f"Cast integer features to the model's dtype (x.to(torch.{ours_s[0]})); token ids "
            "for an embedding as int64 (x.long())."
        )
    else:
        advice = (
            f"Cast the inputs (x.to(torch.{ours_s[0]})) or the model "
            f"(model.to(torch.{theirs_s[0]})) so they match."
        )
    return CurvkitValueError(
        f"the model's parameters are {', '.join(ours_s)} but the data's inputs are "
        f"{', '.join(theirs_s)}, and the forward pass failed ({str(e).splitlines()[0]}). " + advice
    )
