"""The fast route of the pairs: backpropagation through a chain of known modules, by hand.

NOTE [chains]. Many models are, from their first factorable layer on, a chain of leaf modules:
each leaf's input is the previous leaf's output, and the model returns the last one (an
``nn.Sequential`` of layers and activation modules, say). One recorded forward pass (no autograd)
shows whether a batch's computation is such a chain: a leaf's input is the very tensor object the
previous leaf returned, unchanged since, so any operation between two leaves (a residual sum,
``x.view``, a functional activation, an in-place ``F.relu(h, inplace=True)``) breaks it. A
chosen parameter that the forward pass also uses outside its module (``x @ layer.weight``) takes
its layer off every per-layer rule (``Forward.record`` watches for that while probing). When
every link has a rule below, the factor's K columns are backpropagated as plain batched GEMMs
and pointwise products — the columns are folded into the batch dimension, nothing is recomputed
and no graph is kept, about twice as fast as ``vmap`` over an autograd pullback. Anything else
takes the generic route (``pairs.backprop``), which is exact for every model;
``tests/test_chain.py`` holds both routes to each other.

Each rule maps the cotangent g (K, N, *out) at a module's output to (K, N, *in) at its input.
Rules that read a recorded tensor name it, and a chain whose recorded tensor was later changed in
place (``_version`` moved) is not used.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .scratch import buffer


@dataclass
class Call:
    """One leaf-module call of a recorded forward pass."""

    module: nn.Module
    input: torch.Tensor | None  # the first positional argument, when a tensor
    output: torch.Tensor | None
    single: bool  # called with exactly one positional tensor and no keyword arguments
    versions: tuple[int, int]  # ``_version`` of input and output right after the call
    input_version: int = -1  # ``_version`` of the input right before the call
    derivative: torch.Tensor | None = None  # a pointwise module's, once computed

    def unchanged(self, which: str) -> bool:
        t = self.input if which == "input" else self.output
        return t is not None and t._version == self.versions[which == "output"]


@dataclass
class Trace:
    calls: list[Call]
    out: torch.Tensor  # the picked model output


def _linear(c: Call, g: torch.Tensor) -> torch.Tensor:
    return g @ c.module.weight


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(c: Call, g: torch.Tensor) -> torch.Tensor:
    """The input gradient of a convolution is the transposed convolution; ``output_padding``
    restores input sizes a strided convolution rounded down. (``torch.nn.grad.conv2d_input``
    gives the same numbers, 4× slower on CPU: measured 1.9 against 0.5 ms for the digits CNN.)"""
    m, x, k = c.module, c.input, g.shape[0]
    out_sp, in_sp = g.shape[3:], x.shape[2:]
    extra = [
        i - ((o - 1) * s - 2 * p + d * (kk - 1) + 1)
        for i, o, s, p, d, kk in zip(in_sp, out_sp, m.stride, m.padding, m.dilation, m.kernel_size)
    ]
    gin = _CONV_T[x.dim() - 2](
        g.reshape(k * g.shape[1], *g.shape[2:]),
        m.weight,
        None,
        m.stride,
        m.padding,
        extra,
        m.groups,
        m.dilation,
    )
    return gin.view(k, *x.shape)


def _reshape(c: Call, g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], *c.input.shape)


def _pointwise(derivative: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
    """g times the derivative, in place (``backprop_chain`` hands these rules a tensor it owns);
    the derivative is computed once per call and kept for the next chunk of columns."""

    def rule(c: Call, g: torch.Tensor) -> torch.Tensor:
        if c.derivative is None:
            c.derivative = derivative(c.module, c.output)
        return g.mul_(c.derivative)

    return rule


def _maxpool(c: Call, g: torch.Tensor) -> torch.Tensor:
    m, x = c.module, c.input
    nd = x.dim() - 2
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    _, idx = pool(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
    k, n, ch = g.shape[0], x.shape[0], x.shape[1]
    gin = g.new_zeros(k, n, ch, math.prod(x.shape[2:]))
    flat = idx.reshape(1, n, ch, -1).expand(k, -1, -1, -1)
    return gin.scatter_add_(3, flat, g.reshape(k, n, ch, -1)).view(k, *x.shape)


def _leaky(m: nn.LeakyReLU, y: torch.Tensor) -> torch.Tensor:
    """LeakyReLU's derivative in y's dtype (Python-float ``where`` operands round the slope to
    float32)."""
    return torch.where(y > 0, y.new_ones(()), y.new_full((), m.negative_slope))


# Activation modules: σ'(z) in terms of their output y = σ(z) (also used by ``hvp.py``).
DERIVATIVES: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    nn.ReLU: lambda m, y: (y > 0).to(y.dtype),
    nn.Tanh: lambda m, y: torch.addcmul(y.new_ones(()), y, y, value=-1),  # 1 − y², one kernel
    nn.Sigmoid: lambda m, y: torch.addcmul(y, y, y, value=-1),  # y − y²
    nn.LeakyReLU: _leaky,
}


# Rules: type -> (backward, the recorded tensor it reads or None, applicability check). Layers
# "read" their input: the structured reductions take their inputs from the trace.
_OUT, _IN = "output", "input"
RULES: dict[type, tuple[Callable, str | None, Callable[[Call], bool]]] = {
    nn.Linear: (_linear, _IN, lambda c: True),
    nn.ReLU: (_pointwise(DERIVATIVES[nn.ReLU]), _OUT, lambda c: True),
    nn.Tanh: (_pointwise(DERIVATIVES[nn.Tanh]), _OUT, lambda c: True),
    nn.Sigmoid: (_pointwise(DERIVATIVES[nn.Sigmoid]), _OUT, lambda c: True),
    nn.LeakyReLU: (
        _pointwise(DERIVATIVES[nn.LeakyReLU]),
        _OUT,
        lambda c: c.module.negative_slope > 0,
    ),
    nn.Flatten: (_reshape, None, lambda c: True),
    nn.Unflatten: (_reshape, None, lambda c: True),
    nn.Identity: (_reshape, None, lambda c: True),
    nn.Dropout: (_reshape, None, lambda c: not c.module.training or c.module.p == 0),
}
for _conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    RULES[_conv_type] = (
        _conv,
        _IN,
        lambda c: (
            c.module.padding_mode == "zeros"
            and not isinstance(c.module.padding, str)
            and c.input.dim() == c.module.weight.dim()
        ),
    )
for _nd, _pool_type in enumerate((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), start=1):
    RULES[_pool_type] = (_maxpool, _IN, lambda c, nd=_nd: c.input.dim() == nd + 2)


def class_forward(module: nn.Module) -> bool:
    """Whether the module computes its class's ``forward``: rules know only that one, and an
    instance may carry its own (``lin.forward = lambda x: F.linear(x, lin.weight * mask)``)."""
    return "forward" not in vars(module)


def output_hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's own or a global one) may change the module's output:
    rules know only the module's ``forward``, so such modules take the generic path (curvkit's
    own recording hooks are removed by the time this is asked)."""
    return bool(module._forward_hooks) or bool(nn.modules.module._global_forward_hooks)


_IN_PLACE = {r[0] for t, r in RULES.items() if t in DERIVATIVES}
_VIEWS = {_reshape}


def chain_of(trace: Trace, first: nn.Module) -> list[Call] | None:
    """The calls from ``first``'s (single) call to the output, if they form a chain of modules
    with rules whose recorded tensors are intact; else None."""
    start = [i for i, c in enumerate(trace.calls) if c.module is first]
    if len(start) != 1:
        return None
    calls = trace.calls[start[0] :]
    if calls[-1].output is not trace.out or not calls[0].unchanged(_IN):
        return None
    if not calls[-1].unchanged(_OUT):  # edited after the model returned it (output_fn's mul_)
        return None
    if output_hooked(calls[0].module) or not class_forward(calls[0].module):
        return None
    for prev, c in zip(calls, calls[1:]):
        rule = RULES.get(type(c.module))
        if rule is None or not c.single or c.input is not prev.output or c.output is None:
            return None
        if output_hooked(c.module) or not class_forward(c.module):
            return None
        if c.input_version != prev.versions[1]:
            return None  # changed in place between the two calls (``F.relu(h, inplace=True)``)
        _, reads, applies = rule
        if not applies(c) or (reads is not None and not c.unchanged(reads)):
            return None
    return calls


def backprop_chain(
    calls: list[Call], wanted: set[int], cots: torch.Tensor, scratch: dict | None = None
) -> dict:
    """{id(module): cotangent at its output (K, N, *out)} for the modules in ``wanted``, from
    the cotangent ``cots`` (K, N, *out) at the chain's end.

    With ``scratch`` (a dict kept by the caller, see ``scratch.py``), Linear layers write their
    input cotangents into buffers kept there, one per position in the chain, reused by the next
    chunk of columns and the next batch; the results are then only valid until the next call
    with the same ``scratch``."""
    got = {}
    g, owned = cots, False  # pointwise rules work in place, on tensors made here only
    for i in range(len(calls) - 1, -1, -1):
        c = calls[i]
        if id(c.module) in wanted:
            got[id(c.module)] = g
            if len(got) == len(wanted):
                break
        rule = RULES[type(c.module)][0]
        if rule in _IN_PLACE and not owned:
            g = g.clone()
        if rule is _linear and scratch is not None and g.is_contiguous():
            out = buffer(scratch, i, (*g.shape[:-1], c.module.in_features), g)
            g = torch.matmul(g, c.module.weight, out=out)
        else:
            g = rule(c, g)
        owned = owned or rule not in _VIEWS  # kept as a view of what was owned, or not
    return got
