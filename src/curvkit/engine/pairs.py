"""One pass, two sides: capture each rule layer's inputs aₙ and backpropagate the columns of
the output-space factor Fₙ (Mₙ = Fₙ diag(σₙ) Fₙᵀ) to its outputs, giving gₙₖ. Every structured
curvature of a rule layer is a reduction of these pairs (``structured.py``); parameters without a
rule get per-sample Jacobian rows Fₙᵀ Jₙ from ``fallback_rows``.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..data import Batch, pick_output
from ..errors import CurvkitValueError
from .chain import Trace, backprop_chain
from .forward import Forward, RuleLayer

# Columns backpropagated together on the fast route: the largest cotangent of a chunk stays
# within this many bytes. Fresh large temporaries are slow (page faults), and per-column GEMMs
# and convolutions at a batch's size are already efficient (digits CNN, 9 columns: the
# transposed convolutions took 41 ms one column at a time, 72 ms four at a time).
CHUNK_BYTES = 2**20


def backprop(fw: Forward, batch: Batch, layers: list[RuleLayer], side, trace: Trace | None = None):
    """One forward pass, then the factor's columns backpropagated to every rule layer.

    ``side(out) -> (F (N, C, K), σ)`` turns the output into the factor. Returns (acts, F, σ,
    parts): acts a list of (a, ones) as from ``RuleLayer.inputs``; ``parts`` yields (columns,
    grads) for chunks of the factor's columns: grads[l] (k, N, R, d) with grads[l][k, n] =
    ∂(Fₙ[:, k]ᵀ fₙ)/∂(layer l's output) for k in ``columns`` (a slice). With a recorded
    ``trace`` of a chain (NOTE [chains]) no further pass runs; otherwise autograd's pullback,
    vmapped over all columns."""
    calls = fw.chain(batch, trace, layers) if trace is not None else None
    if calls is not None:
        F, signs = side(trace.out)
        inputs = {id(c.module): c.input for c in calls}
        acts = [l.inputs(inputs[id(l.module)]) for l in layers]
        return acts, F, signs, _chain_parts(calls, layers, F, trace.out, fw.scratch)
    f = fw.perturbed(batch, layers)
    ref = fw.layout.tensors[0]
    eps0 = [
        torch.zeros(s, dtype=ref.dtype, device=ref.device) for s in fw.output_shapes(batch, layers)
    ]
    out, pullback, acts = vjp(f, eps0, has_aux=True)
    F, signs = side(out.detach())
    cots = _cotangents(F, out)
    if F.shape[2] == 1:  # one column (MC Fisher, EF): a plain backward pass
        grads = [g[None] for g in pullback(cots[0])[0]]
    else:
        (grads,) = vmap(pullback)(cots)
    grads = [l.positions_last(g) for l, g in zip(layers, grads)]
    acts = [l.inputs_of_acts(a) for l, a in zip(layers, acts)]
    return acts, F, signs, iter([(slice(0, F.shape[2]), grads)])


def _chain_parts(calls, layers: list[RuleLayer], F: torch.Tensor, out: torch.Tensor, scratch):
    cots = _cotangents(F, out).contiguous()  # small; contiguous columns make plain GEMMs
    K = cots.shape[0]
    widest = max(c.output.numel() for c in calls) * cots.element_size()
    parts = -(-K // max(1, CHUNK_BYTES // widest))  # as few chunks as fit, of even sizes
    step = -(-K // parts)
    wanted = {id(l.module) for l in layers}
    for start in range(0, K, step):
        cols = slice(start, min(K, start + step))
        got = backprop_chain(calls, wanted, cots[cols], scratch)
        yield cols, [l.positions_last(l.own_channels(got[id(l.module)])) for l in layers]


def _cotangents(F: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(N, C, K) factor -> (K, *out): one cotangent of the output per column."""
    return F.permute(2, 0, 1).reshape(F.shape[2], *out.shape)


def fallback_rows(fw: Forward, batch: Batch, F: torch.Tensor, names: list[str], chunk: int | None):
    """(N, K, P_f): per-sample Fₙᵀ Jₙ restricted to the parameters ``names`` (vmap over samples,
    or a loop where the model cannot run under vmap).

    Inputs with a leading dimension of the batch's size are split into samples; any other input
    (a shared tensor, a number) goes whole to every sample's call. Once per input shape, the
    samples' outputs are checked against the batched output: a model that mixes samples, or a
    shared input that happens to have the batch's leading size, would give wrong rows."""
    leaves, spec = tree_flatten(batch.inputs)
    dims = [
        0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch.size else None
        for t in leaves
    ]

    def one(sample, Fn):
        args = [t.unsqueeze(0) if d == 0 else t for t, d in zip(sample, dims)]
        return _pulled(fw, names, tree_unflatten(args, spec), Fn)

    def looped():
        done = [
            one([t[n] if d == 0 else t for t, d in zip(leaves, dims)], F[n])
            for n in range(batch.size)
        ]
        return torch.stack([r for r, _ in done]), torch.stack([o for _, o in done])

    key = ("per-sample", fw._key(batch))
    width = sum(fw.params[n].numel() for n in names)
    if key in fw.loop_rows:
        rows, outs = looped()
    else:
        try:
            rows, outs = vmap(one, in_dims=(dims, 0), chunk_size=chunk)(leaves, F)
        except RuntimeError:
            # Some modules cannot run under vmap over samples (nn.RNN/LSTM/GRU, control flow
            # on values): the same calls, one sample at a time, are exact and only slower.
            rows = None
        if rows is None or tuple(rows.shape) != (batch.size, F.shape[2], width):
            # torch's vmap of some modules' weight gradients returns wrong shapes (nn.PReLU:
            # (N, K, N) rows) that may even broadcast: the loop, for this batch shape on
            fw.loop_rows.add(key)
            rows, outs = looped()
    if key not in fw.checked:
        _check_per_sample(outs, fw.output(batch), names)
        if key not in fw.loop_rows and not _rows_add_up(fw, batch, F, names, rows):
            fw.loop_rows.add(key)  # right shapes, wrong values (nn.PReLU at some sizes)
            rows, _ = looped()
        fw.checked.add(key)
    return rows


def _pulled(fw: Forward, names: list[str], inputs, F: torch.Tensor):
    """(Fᵀ J (K, P_f), the output): J the Jacobian of the model's output on ``inputs`` w.r.t.
    the parameters ``names``, the output shaped like F without its last (column) axis."""
    fixed = {n: t for n, t in fw.params.items() if n not in names}

    def f(p):
        raw = functional_call(fw.model, {**fixed, **p}, *_as_call(inputs))
        return pick_output(raw, fw.output_fn).reshape(F.shape[:-1])

    out, pull = vjp(f, {n: fw.params[n] for n in names})
    (rows,) = vmap(pull, in_dims=-1)(F)  # dict of (K, *shape)
    return torch.cat([rows[n].reshape(F.shape[-1], -1) for n in names], dim=1), out


def _rows_add_up(fw: Forward, batch: Batch, F: torch.Tensor, names: list[str], rows) -> bool:
    """Whether the per-sample rows sum over the samples to the batch's own pullback of the
    factor's columns (one vmapped vjp of the batched model), up to √eps of their scale."""
    want, _ = _pulled(fw, names, batch.inputs, F)
    got = rows.sum(0)
    scale = float(rows.abs().sum(0).max().clamp(min=torch.finfo(got.dtype).tiny))
    return bool(((got - want).abs() <= torch.finfo(got.dtype).eps ** 0.5 * scale).all())


def _check_per_sample(outs: torch.Tensor, batched: torch.Tensor, names: list[str]) -> None:
    want = batched.reshape(outs.shape)
    tol = torch.finfo(want.dtype).eps ** 0.5 * float(want.abs().max().clamp(min=1))
    if not bool(((outs - want).abs() <= tol).all()):
        raise CurvkitValueError(
            f"structured curvature takes per-sample Jacobians of the parameters without a "
            f"per-layer rule ({', '.join(names[:4])}{', …' if len(names) > 4 else ''}) by "
            "calling the model on one sample at a time, but those calls do not reproduce the "
            "batched output. Either the model mixes samples (e.g. BatchNorm in training mode), "
            "or an input shared by all samples has the batch's leading size and was split. Put "
            "shared tensors in the model (a buffer) or give them another leading size, or use "
            "structure='dense' or 'operator'."
        )


def _as_call(inputs):
    if isinstance(inputs, dict):
        return (), inputs
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}
