"""Functional forward passes of a model, with per-layer output perturbations.

NOTE [the ε trick]. For a ``Linear`` layer called once on inputs aₙ ∈ ℝ^A (a 1 appended when
its bias is chosen), zₙ = W aₙ. Adding a zero perturbation εₙ to zₙ changes nothing, but makes
every derivative w.r.t. W a contraction of a derivative w.r.t. ε with aₙ:

    ∂L/∂W[i,j] = Σₙ δₙ[i] aₙ[j],              δₙ = ∂L/∂εₙ,
    ∂²L/∂W_l[i,j] ∂W_m[p,q] = Σₙ Hεₙ[(l,i),(m,p)] a_lₙ[j] a_mₙ[q]
                            + Σₙ δ_mₙ[p] ∂a_mₙ[q]/∂ε_lₙ[i] a_lₙ[j].

The per-sample derivatives w.r.t. ε have D = Σ_l d_out,l coordinates, not P, so they cost D
batched forward(-over-reverse) passes, and each (l, m) block is one GEMM of N·P_l·P_m
multiply-adds. Layers that do not fit (called twice, inputs not (N, A), tied weights) and all
other modules' parameters go through plain products instead (``products.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..data import Batch, _map_tensors, _tensors, call_model, pick_output
from ..errors import CurvkitValueError
from ..losses import Loss
from ..params import ParamLayout
from .chain import Call, Trace, chain_of, class_forward, output_hooked


@dataclass
class Segment:
    """Columns ``a`` of a unit's (d, A) layout live at ``offset`` as a row-major (d, len) block."""

    a: slice
    offset: int


@dataclass
class RuleLayer:
    """A Linear or ConvNd layer handled by the ε trick: d outputs (channels), A augmented
    inputs per position (input features or patch size, plus 1 for a chosen bias)."""

    module: nn.Module
    d: int
    in_size: int
    use_weight: bool
    use_bias: bool
    segments: list[Segment] = field(default_factory=list)
    group: int = 0  # a grouped convolution is one RuleLayer per group (group j of groups)
    groups: int = 1

    @property
    def A(self) -> int:  # noqa: N802
        return self.in_size * self.use_weight + self.use_bias

    @property
    def numel(self) -> int:
        return self.d * self.A

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.module, nn.Embedding)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.modules.conv._ConvNd)

    def acts(self, x: torch.Tensor) -> torch.Tensor:
        """(N, R, A): the layer's augmented inputs at each of its R output positions, written
        once into one buffer (the bias's column of ones included)."""
        n = x.shape[0]
        if self.is_embedding:
            a = F.one_hot(x.reshape(n, -1).long(), self.in_size).to(self.module.weight.dtype)
            if self.module.padding_idx is not None:  # its row gets no gradient
                a[..., self.module.padding_idx] = 0
            return a
        if self.is_conv:
            c = self.module.in_channels // self.groups
            view = _patch_view(self.module, x[:, self.group * c : (self.group + 1) * c])
            inner = view.shape[view.dim() // 2 :]  # (*kernel, C)
        else:
            view, inner = x, (x.shape[-1],)
        rows = view.shape[1 : view.dim() - len(inner)]  # output positions
        out = x.new_empty(n, math.prod(rows), self.A)
        if self.use_weight:
            out[:, :, : self.in_size].view(n, *rows, *inner).copy_(view)
        if self.use_bias:
            out[:, :, -1] = 1
        return out

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(a, ones): the layer's inputs for the structured reductions, and whether a column of
        ones (the bias's) is implied after a's columns. A Linear layer's input rows are taken as
        they are, without the copy :meth:`acts` makes to append that column (about 1 ms of a
        14 ms Monte-Carlo KFAC of the digits MLP); any other layer gives its :meth:`acts`."""
        if not self._plain_rows:
            return self.acts(x), False
        return x.reshape(x.shape[0], -1, self.in_size), self.use_bias

    def inputs_of_acts(self, acts: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """:meth:`inputs` from :meth:`acts`' result, as the generic route captures it: one
        form for both routes (a loader's batches may take either)."""
        if self._plain_rows and self.use_bias:
            return acts[..., :-1], True
        return acts, False

    @property
    def _plain_rows(self) -> bool:
        return not (self.is_conv or self.is_embedding or not self.use_weight)

    def natural_order(self) -> torch.Tensor | None:
        """The permutation p of the A columns of :meth:`acts` into the parameters' order
        (``acts(x)[..., p]`` is ordered like ``weight[o]`` then the bias), or None if they
        already are. Convolution patches come channels last (see ``_patch_view``)."""
        if not self.is_conv or not self.use_weight:
            return None
        c, kernel = self.module.in_channels // self.groups, math.prod(self.module.kernel_size)
        p = torch.arange(self.in_size).view(kernel, c).T.reshape(-1)  # (C, k) <- (k, C)
        return torch.cat([p, torch.tensor([self.in_size])]) if self.use_bias else p

    def eps_shape(self, out_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of this layer's ε for a module output of ``out_shape``."""
        if self.groups == 1:
            return out_shape
        return (out_shape[0], self.d, *out_shape[2:])

    def add_eps(self, out: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return out + eps
        n, c, *rest = out.shape
        before = out.new_zeros(n, self.group * self.d, *rest)
        after = out.new_zeros(n, c - (self.group + 1) * self.d, *rest)
        return out + torch.cat([before, eps, after], dim=1)

    def own_channels(self, g: torch.Tensor) -> torch.Tensor:
        """(K, N, C, ...) cotangent at the module output -> this group's channels."""
        if self.groups == 1:
            return g
        return g[:, :, self.group * self.d : (self.group + 1) * self.d]

    def positions_last(self, g: torch.Tensor) -> torch.Tensor:
        """(K, N, *out) gradient w.r.t. the layer output -> (K, N, R, d)."""
        if self.is_conv:
            return g.flatten(3).transpose(2, 3)
        return g.reshape(g.shape[0], g.shape[1], -1, self.d)


def _patch_view(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """(N, *out positions, *kernel, C_in): a strided view of the (padded) input, channels last,
    whose entry [n, *p] is the patch output position p sees. Copying it out is im2col for any
    dimension, stride, dilation and padding in one pass, and with channels last its innermost
    runs are contiguous: 0.36 ms for the digits CNN's second layer against 3.1 ms with channels
    first and 2.1 ms for ``F.unfold``. The columns are ordered (*kernel, C), not like ``weight[o]``
    (C, *kernel): :meth:`RuleLayer.natural_order` maps them."""
    k, stride, dil = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":  # torch pads dilation·(k−1) in total, the odd one on the right
        pads = [(d * (s - 1) // 2, d * (s - 1) - d * (s - 1) // 2) for s, d in zip(k, dil)]
    elif conv.padding == "valid":
        pads = [(0, 0)] * len(k)
    else:
        pads = [(p, p) for p in conv.padding]
    if any(l or r for l, r in pads):
        x = F.pad(x, [v for pair in reversed(pads) for v in pair])
    x = x.movedim(1, -1).contiguous()  # (N, *spatial, C)
    spatial = x.shape[1:-1]
    out = [(spatial[i] - dil[i] * (k[i] - 1) - 1) // stride[i] + 1 for i in range(len(k))]
    s_n, *s_sp, s_c = x.stride()
    return x.as_strided(
        (x.shape[0], *out, *k, x.shape[-1]),
        (s_n, *[s * t for s, t in zip(s_sp, stride)], *[s * d for s, d in zip(s_sp, dil)], s_c),
    )


def _owners(model: nn.Module) -> dict[int, int]:
    count: dict[int, int] = defaultdict(int)
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                count[id(p)] += 1
    return count


def _candidate(mod: nn.Module) -> tuple[int, int] | None:
    """(d, in_size) for a module type with a rule, else None."""
    if not class_forward(mod):
        return None
    if type(mod) is nn.Linear:
        return mod.out_features, mod.in_features
    if type(mod) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and mod.padding_mode == "zeros":
        g = mod.groups  # per group: out_channels/g outputs, in_channels/g · prod(k) inputs
        return mod.out_channels // g, mod.in_channels // g * math.prod(mod.kernel_size)
    if type(mod) is nn.Embedding and mod.max_norm is None and mod.num_embeddings <= MAX_VOCAB:
        # a Linear on one-hot inputs; its weight is stored (vocab, dim), i.e. transposed
        return mod.embedding_dim, mod.num_embeddings
    return None


MAX_VOCAB = 4096  # one-hot inputs and a dense (vocab × vocab) factor beyond that cost too much


# Tensor attributes that hand out a parameter's values; reading any other attribute (``shape``,
# ``dtype``, ``grad`` — which ``torch.profiler`` reads while recording stacks) is not a use.
_VALUE_ATTRIBUTES = frozenset({"T", "H", "mT", "mH", "data", "real", "imag", "_base"})


class _Watch(TorchFunctionMode):
    """What the probing forward pass sees of every torch call. ``found``: the ids in
    ``tracked`` of tensors passed to a torch function other than by their own module (while
    no leaf module runs, or inside another leaf's call: a head that keeps an unregistered
    reference to a layer); ``running`` is kept by the recording hooks. ``reasons`` (for
    reverse mode): see below."""

    def __init__(self, tracked: set[int]):
        super().__init__()
        self.tracked, self.found = tracked, set()
        self.running: list[set[int]] = []  # ids of each running leaf's own parameters
        # Forward-mode AD (jvp) disagrees with reverse mode where torch's own gradient is a
        # convention: ``no_grad`` sections (jvp still differentiates them) and an embedding's
        # frozen ``padding_idx`` row (jvp moves it). Such models use reverse mode only; a
        # ``no_grad`` section also keeps the hand-written chain rules off (they cannot see it).
        self.reasons: set[str] = set()

    def enter(self, module: nn.Module) -> None:
        self.running.append({id(p) for p in module._parameters.values() if p is not None})

    def exit(self) -> None:
        self.running.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        padded = func is F.embedding and _padding_idx(args, kwargs) is not None
        if padded:
            self.reasons.add("padding_idx")
        if not torch.is_grad_enabled():
            self.reasons.add("no_grad")
        if _uses_values(func):
            own = self.running[-1] if self.running else ()
            for a in tree_flatten((args, kwargs))[0]:
                if isinstance(a, torch.Tensor) and id(a) in self.tracked and id(a) not in own:
                    self.found.add(id(a))
        return func(*args, **kwargs)


def _padding_idx(args, kwargs):
    return kwargs["padding_idx"] if "padding_idx" in kwargs else (args[2:3] or [None])[0]


def _uses_values(func) -> bool:
    """Whether a torch function reads its tensors' values: everything but metadata getters."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and owner is not None:
        return getattr(owner, "__name__", None) in _VALUE_ATTRIBUTES
    return True


class Forward:
    """Calls the model functionally and knows which layers take the ε trick."""

    def __init__(self, model: nn.Module, layout: ParamLayout, loss: Loss, output_fn):
        self.model, self.layout, self.loss, self.output_fn = model, layout, loss, output_fn
        self.params = {n: t.detach() for n, t in zip(layout.names, layout.tensors)}
        self._probe_cache: dict = {}
        self._families: dict = {}  # _family(batch) -> the findings of its first probe
        self._chains: dict[tuple, bool] = {}  # input shapes -> whether the fast route applies
        self.scratch: dict = {}  # buffers the chain route reuses across chunks and batches
        self.checked: set = set()  # one-time checks done, by (what, input shapes)
        self.loop_rows: set = set()  # batch shapes whose per-sample rows vmap gets wrong
        owners = _owners(model)
        self._candidates: list[RuleLayer] = []
        for mod in model.modules():
            sizes = _candidate(mod)
            if sizes is None:
                continue
            w, b = mod.weight, getattr(mod, "bias", None)
            iw, ib = layout.index_of(w), (layout.index_of(b) if b is not None else None)
            if iw is None and ib is None:
                continue
            if owners[id(w)] > 1 or (b is not None and owners[id(b)] > 1):
                continue  # tied weight: its curvature sums over uses, left to the products
            if output_hooked(mod):
                continue  # a hook may change the output: the rule would not see it
            groups = getattr(mod, "groups", 1)
            for j in range(groups):  # a grouped conv: one block-diagonal piece per group
                layer = RuleLayer(
                    mod, *sizes, iw is not None, ib is not None, group=j, groups=groups
                )
                if iw is not None:
                    off = layout.offsets[iw] + j * layer.d * layer.in_size
                    layer.segments.append(Segment(slice(0, layer.in_size), off))
                if ib is not None:
                    start = layer.in_size * layer.use_weight
                    off = layout.offsets[ib] + j * layer.d
                    layer.segments.append(Segment(slice(start, start + 1), off))
                self._candidates.append(layer)

    # -- plain calls -----------------------------------------------------------------------------
    def output(self, batch: Batch, params: dict | None = None) -> torch.Tensor:
        raw = call_model(self.model, batch.inputs, self.params if params is None else params)
        out = pick_output(raw, self.output_fn)
        if out.dim() == 0 or out.shape[0] != batch.size:
            raise_output_mismatch(out, batch)
        return out

    # -- the ε trick -----------------------------------------------------------------------------
    def rule_layers(self, batch: Batch, structured: bool = False) -> list[RuleLayer]:
        """Layers with a rule on this batch, each called once on batched input. Dense blocks
        need Linear layers on (N, in) inputs; structured reductions take any positions."""
        calls, _, escaped, _, batched = self._probe(batch)
        keep = []
        for c in self._candidates:
            if any(id(p) in escaped for p in (c.module.weight, getattr(c.module, "bias", None))):
                continue  # used outside the module too: the generic path sees every use
            shapes = calls.get(id(c.module), [])
            if len(shapes) != 1 or (batched is not None and id(c.module) not in batched):
                continue
            (ins, outs) = shapes[0]
            if not ins:
                continue  # called without a positional tensor (lin(input=x)): generic path
            if structured:
                if c.is_conv:
                    ok = ins[0] == batch.size and len(ins) == c.module.weight.dim()
                elif c.is_embedding:
                    ok = len(ins) >= 1 and ins[0] == batch.size
                else:
                    ok = ins[0] == batch.size and ins[-1] == c.in_size
            else:
                ok = not c.is_conv and not c.is_embedding and ins == (batch.size, c.in_size)
            if ok:
                keep.append(c)
        return keep

    def output_shapes(self, batch: Batch, layers: list[RuleLayer]) -> list[tuple[int, ...]]:
        calls = self._probe(batch)[0]
        return [l.eps_shape(calls[id(l.module)][0][1]) for l in layers]

    def activation_numel(self, batch: Batch) -> int:
        """Elements of all leaf modules' outputs in one forward pass of the batch."""
        return self._probe(batch)[1]

    def _key(self, batch: Batch) -> tuple:
        return tuple((tuple(t.shape), t.dtype) for t in _tensors(batch.inputs))

    def _probe(self, batch: Batch) -> tuple[dict, int]:
        """Which modules ran on which shapes (and how many activations) for this batch.

        Cached by the batch's input shapes: forward() is assumed to take the same path for
        inputs of the same shapes; the ε hooks check each layer still runs once."""
        if batch.probe is None:
            batch.probe = self._probe_cache.get(self._key(batch))
        if batch.probe is None:
            self.record(batch)
        return batch.probe

    def record(self, batch: Batch) -> Trace:
        """One forward pass without autograd, every leaf module's calls recorded in order
        (see NOTE [chains] in chain.py); it also serves as the batch's probe."""
        calls: list[Call] = []
        key = self._key(batch)
        probing = key not in self._probe_cache
        # Probing also watches for chosen parameters used outside their own module's call
        # (``x @ layer.weight`` in a parent's forward): rules that see a parameter only
        # through its module would miss that use, so such layers take the generic path.
        # It calls the model on detached parameters with grad mode on (no graph is built), so
        # that grad mode switched off inside forward() shows. A batch that differs from a
        # probed one only in its size (a loader's last batch) takes those findings over.
        kin = self._families.get(self._family(batch)) if probing else None
        watch = _Watch({id(t) for t in self.params.values()}) if probing and not kin else None
        before: list[int] = []

        def pre_hook(mod, args, kwargs):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            before.append(-1 if x is None else x._version)
            if watch is not None:
                watch.enter(mod)

        def hook(mod, args, kwargs, out):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            y = out if isinstance(out, torch.Tensor) else None
            versions = (-1 if x is None else x._version, -1 if y is None else y._version)
            single = x is not None and len(args) == 1 and not kwargs
            calls.append(Call(mod, x, y, single, versions, before.pop()))
            if watch is not None:
                watch.exit()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in leaves]
        handles += [m.register_forward_hook(hook, with_kwargs=True) for m in leaves]
        try:
            if watch is not None:
                with torch.enable_grad(), watch:
                    raw = call_model(self.model, batch.inputs, self._probe_params())
            else:
                with torch.no_grad():  # the module's own parameters
                    raw = call_model(self.model, batch.inputs)
            out = pick_output(raw, self.output_fn)
        finally:
            for h in handles:
                h.remove()
        if out.dim() == 0 or out.shape[0] != batch.size:
            raise_output_mismatch(out, batch)
        if probing and self.output_fn is not None:
            _check_output_fn(raw, self.output_fn)
        if not probing:  # the chain route records every batch; probe once
            batch.probe = self._probe_cache[key]
            return Trace(calls, out)
        shapes: dict[int, list] = defaultdict(list)
        numel = out.numel()
        for c in calls:
            ok = c.input is not None and c.output is not None
            shapes[id(c.module)].append(
                (tuple(c.input.shape), tuple(c.output.shape)) if ok else ((), ())
            )
            numel += 0 if c.output is None else c.output.numel()
        if kin is not None:
            found, reasons, batched = kin
            if batched is None or batch.size <= 2:
                # kin had one sample, or this batch is as small as _batched's own sub-batch
                # (m = 1 or 2), where a (2, F) table's leading size would pass for N. A batch
                # of one sample cannot tell (None): it keeps kin's findings, so a learned
                # (1, F) token stays off the rules as on the loader's other batches.
                own = self._batched(batch)
                batched = own if own is not None or batched is None else batched
        else:
            real = {id(t): id(p) for t, p in zip(self.params.values(), self.layout.tensors)}
            found = frozenset(real[i] for i in watch.found)
            reasons, batched = frozenset(watch.reasons), self._batched(batch, out)
            self._families[self._family(batch)] = (found, reasons, batched)
        probe = (dict(shapes), numel, found, reasons, batched)
        batch.probe = self._probe_cache[key] = probe
        return Trace(calls, out)

    def _family(self, batch: Batch) -> tuple:
        """The input shapes with the sample dimension blanked: batches that differ only in
        their number of samples."""
        n = batch.size
        return tuple(
            ((-1, *t.shape[1:]) if t.dim() and t.shape[0] == n else tuple(t.shape), t.dtype)
            for t in _tensors(batch.inputs)
        )

    def _batched(self, batch: Batch, out: torch.Tensor | None = None) -> frozenset[int] | None:
        """ids of the candidate modules whose input has the sample dimension first, or None for
        a batch of one sample (where any leading size 1 is that sample's).

        The rules read a layer's input rows as the samples whenever its leading size is N; a
        tensor that is not batched can have that size too (a learned (T, F) table with T = N,
        a sequence-first (T, N, F) input with T = N) and then every per-sample quantity is
        wrong. So the model also runs on m < N of the samples (the first and the last, or the
        last when N = 2): a sample dimension shrinks to m, any other dimension keeps its size.
        A model that fails on the smaller batch gets no rules (the generic path is exact for any
        model).

        Given the full batch's output ``out`` (a new family's first probe), that run also checks
        that the samples do not see each other (see :func:`_check_samples_apart`); the last
        sample is among them because a coupling can run one way only (``h.cumsum(0)``)."""
        n = batch.size
        if n == 1:
            return None
        if not self._candidates and out is None:
            return frozenset()  # no rule to confirm, no output to compare: no second pass
        rows = [n - 1] if n == 2 else [0, n - 1]
        m = len(rows)
        pick = torch.tensor(rows)
        leading = [t for t in _tensors(batch.inputs) if t.dim() and t.shape[0] == n]
        sub = _map_tensors(
            batch.inputs, lambda t: t[pick.to(t.device)] if t.dim() and t.shape[0] == n else t
        )
        seen: dict[int, list] = defaultdict(list)

        def hook(mod, args, out):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            seen[id(mod)].append(None if x is None or x.dim() == 0 else x.shape[0])

        modules = {id(c.module): c.module for c in self._candidates}
        handles = [mod.register_forward_hook(hook) for mod in modules.values()]
        try:
            with torch.no_grad():
                raw = call_model(self.model, sub)
                alone = pick_output(raw, self.output_fn) if out is not None else None
        except Exception:
            return frozenset()
        finally:
            for h in handles:
                h.remove()
        if alone is not None and len(leading) == 1:
            # one input with the batch's leading size: it is the samples. With several, one may
            # be shared (a memory bank, a (T, T) mask with T = N) and slicing it changes the
            # function itself, not a coupling: nothing to conclude.
            _check_samples_apart(alone, out[pick.to(out.device)], m)
        return frozenset(i for i, lead in seen.items() if lead == [m])

    def _probe_params(self) -> dict[str, torch.Tensor]:
        """Every parameter detached, the chosen ones as ``self.params`` (the tracked tensors)."""
        every = {n: p.detach() for n, p in self.model.named_parameters()}
        return {**every, **self.params}

    def reverse_only(self, batch: Batch) -> bool:
        """Whether jvp would disagree with autograd on this model (see ``_Watch``)."""
        return bool(self._probe(batch)[3])

    def grad_off(self, batch: Batch) -> bool:
        """Whether forward() switches grad mode off somewhere: autograd sees no derivative
        through that section, and the chain rules, which see modules only, would."""
        return "no_grad" in self._probe(batch)[3]

    def escaped(self, batch: Batch) -> frozenset[int]:
        """ids of chosen parameters that this batch's forward pass uses outside their own
        module's call (see :meth:`record`)."""
        return self._probe(batch)[2]

    # -- chains ----------------------------------------------------------------------------------
    def chain_trace(self, batch: Batch) -> Trace | None:
        """A recorded forward pass of the batch, unless batches of its shapes do not chain."""
        if self._chains.get(self._key(batch)) is False:
            return None
        return self.record(batch)

    def chain(self, batch: Batch, trace: Trace, layers: list[RuleLayer]) -> list[Call] | None:
        """The chain of calls from the first rule layer to the output, or None (remembered for
        batches of the same shapes)."""
        order = {id(c.module): i for i, c in enumerate(trace.calls)}
        calls = None
        if layers and all(id(l.module) in order for l in layers) and not self.grad_off(batch):
            first = min(layers, key=lambda l: order[id(l.module)])
            calls = chain_of(trace, first.module)
        self._chains[self._key(batch)] = calls is not None
        return calls

    @contextmanager
    def _inject(self, layers: list[RuleLayer], holder: dict):
        def make_hook(i: int, layer: RuleLayer) -> Callable:
            def hook(mod, args, out):
                if holder["acts"][i] is not None:
                    raise CurvkitValueError(
                        f"{type(mod).__name__} layer was called twice in one forward pass on "
                        "inputs of shapes it was first seen with once; curvkit assumes "
                        "forward() takes the same path for inputs of the same shapes."
                    )
                holder["acts"][i] = layer.acts(args[0])
                eps = holder["eps"]
                return out if eps is None else layer.add_eps(out, eps[i])

            return hook

        handles = [l.module.register_forward_hook(make_hook(i, l)) for i, l in enumerate(layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def perturbed(self, batch: Batch, layers: list[RuleLayer]):
        """``f(eps) -> (output, acts)``: the model with εₗ added to layer l's output, and the
        layers' augmented inputs (N, R, A). Parameters are held fixed."""
        holder: dict = {"eps": None, "acts": [None] * len(layers)}

        def f(eps: list[torch.Tensor]):
            holder["eps"], holder["acts"] = eps, [None] * len(layers)
            with self._inject(layers, holder):
                out = self.output(batch)
            return out, list(holder["acts"])

        return f


def _check_output_fn(raw, output_fn) -> None:
    """Refuse an ``output_fn`` whose result does not depend on the model's output (a
    ``.detach()`` in it): every derivative would be zero, silently. Tried on a copy of the raw
    output whose floating tensors are made differentiable (``_tracked``); an output that cannot
    be copied so is not checked."""
    try:
        tracked = _tracked(raw)
        if tracked is None:
            return
        with torch.enable_grad():
            picked = output_fn(tracked)
    except Exception:
        return
    if isinstance(picked, torch.Tensor) and picked.is_floating_point() and not picked.requires_grad:
        raise CurvkitValueError(
            "output_fn returned a tensor that does not depend on the model's output (a "
            ".detach(), .item() or torch.no_grad() inside it?): every curvature would be zero. "
            "Return a differentiable function of the raw output, e.g. "
            "output_fn=lambda out: out['logits']."
        )


def _tracked(x, depth: int = 0):
    """x with every floating tensor replaced by a detached copy that requires grad, rebuilt as
    the same type: tensors, tuples, lists and namedtuples, mappings (a dict, a transformers
    ``ModelOutput``), dataclasses; None where something else holds a tensor (or the nesting
    is deeper than a model output's), so that the check is skipped, not misled."""
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_() if x.is_floating_point() else x
    if depth > 8:
        return None
    if isinstance(x, tuple | list):
        items = [_tracked(v, depth + 1) for v in x]
        if any(n is None and v is not None for n, v in zip(items, x)):
            return None
        if type(x) in (tuple, list):
            return type(x)(items)
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple
            return type(x)(*items)
        return None
    if isinstance(x, Mapping):
        y = copy.copy(x)  # same type; a ModelOutput keeps its attributes in step with its items
        for k, v in x.items():
            t = _tracked(v, depth + 1)
            if t is None and v is not None:
                return None
            y[k] = t
        return y
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        changes = {}
        for f in dataclasses.fields(x):
            v = getattr(x, f.name)
            t = _tracked(v, depth + 1)
            if t is None and v is not None:
                return None
            if t is not v:
                if not f.init:
                    return None
                changes[f.name] = t
        return dataclasses.replace(x, **changes)
    if _holds_no_tensor(x):
        return x
    return None


def _holds_no_tensor(x) -> bool:
    """Plain values an output may carry next to its tensors (a loss of None, a string)."""
    return x is None or isinstance(x, bool | int | float | complex | str | bytes)


def _check_samples_apart(alone: torch.Tensor, full: torch.Tensor, m: int) -> None:
    """Refuse a model whose output for a sample depends on the other samples of its batch
    (``h - h.mean(0)``, ``F.batch_norm(..., training=True)``): curvature per sample, and a
    loader's sum over batches, assume it does not (the Hessian came out 99% off). The m
    samples' outputs, run as their own batch, must equal theirs in the full batch (``full``)
    up to rounding: GEMM blocking differs between batch sizes, so √eps of the outputs' scale."""
    if alone.shape != full.shape or not alone.is_floating_point():
        return  # no sample dimension to compare along (or nothing smooth to compare)
    full = full.detach()
    scale = float(full.abs().max()) if full.numel() else 0.0
    diff = float((alone - full).abs().max()) if full.numel() else 0.0
    eps = torch.finfo(full.dtype).eps
    if diff > eps**0.5 * max(scale, 1e-6) + 100 * eps:
        raise CurvkitValueError(
            f"the model's output for a sample depends on the other samples of its batch: "
            f"{m} of its samples run on their own give outputs {diff:.3g} away from theirs in the "
            f"full batch (scale {scale:.3g}). Curvature per sample assumes samples that do not "
            "see each other, and a deterministic forward(). Usual causes: batch statistics "
            "(BatchNorm in training mode, F.batch_norm(..., training=True), x - x.mean(0)), "
            "attention across the batch dimension, or randomness (F.dropout(..., "
            "training=True)); use eval mode, per-sample normalisation, no random draws."
        )


def raise_output_mismatch(out: torch.Tensor, batch: Batch) -> None:
    raise CurvkitValueError(
        f"the model output has shape {tuple(out.shape)}, but the batch has {batch.size} "
        "samples; curvkit needs an output whose first dimension is the sample dimension. "
        "Pass output_fn= to pick or reshape the prediction."
    )
