"""Building block-diagonal operators (KFAC, EKFAC, diagonal, per-layer blocks) from the pairs.

Rule layers (Linear, ConvNd) get Kronecker, diagonal or dense blocks from ``structured.py``;
parameters of any other module get an exact per-module dense block (or, past ``MAX_FALLBACK``
coordinates, an exact diagonal) from per-sample rows — never an error. ``op.labels`` says which.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..errors import CurvkitValueError
from ..memory import check_bytes
from ..operators.blocks import DenseBlock, DiagBlock, KronBlock, eigh
from ..operators.structured import BlockDiagonalOperator
from . import structured as red
from .pairs import backprop, fallback_rows
from .problem import Problem

MAX_FALLBACK = 4096  # largest per-module dense block kept exact for kron / ekfac


def _fallback_groups(problem: Problem, covered_names: set[str]) -> OrderedDict:
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for name in problem.layout.names:
        if name not in covered_names:
            groups.setdefault(_module_of(name), []).append(name)
    return groups


def _module_of(name: str) -> str:
    """The module a parameter belongs to: its path, or "" for the model's own parameters. A
    parametrization's originals (``2.parametrizations.weight.original0``) belong to the
    parametrized module (``2``), beside its other parameters."""
    head, sep, _ = ("." + name).partition(".parametrizations.")
    return head[1:] if sep else name.rpartition(".")[0]


def _group_label(problem: Problem, gname: str, kind: str) -> str:
    """'LayerNorm 'enc.norm' (exact dense block)': the module's type and path, as for layers."""
    module = problem.forward.model.get_submodule(gname)
    return f"{type(module).__name__} {gname!r} ({kind})"


def _whole(layer, layout) -> bool:
    """Whether the layer's rule covers every chosen parameter of its module. The legacy
    ``weight_norm`` leaves a computed ``weight`` and adds ``weight_g``/``weight_v``: the rule
    would take the bias alone, and the module's parameters would split over two blocks."""
    own = {id(layer.module.weight), id(getattr(layer.module, "bias", None))}
    return all(
        id(p) in own or layout.index_of(p) is None for p in layer.module.parameters(recurse=False)
    )


def _names_of(layers, layout) -> set[str]:
    out = set()
    for l in layers:
        for t in (l.module.weight, getattr(l.module, "bias", None)):
            i = layout.index_of(t) if t is not None else None
            if i is not None:
                out.add(layout.names[i])
    return out


def build(problem: Problem, structure: str, kfac_mode: str = "expand") -> BlockDiagonalOperator:
    if problem.kind == "hessian" and structure in ("kron", "ekfac"):
        raise CurvkitValueError(
            f"structure={structure!r} factors a Gauss-Newton matrix (Σ Jᵀ M J); the Hessian has "
            "no such factorisation. Use ck.ggn(..., structure='kron') (or ck.fisher / ck.ef), "
            "or structure='diag' / 'block' / 'operator' for the Hessian."
        )
    if kfac_mode not in ("expand", "reduce"):
        raise CurvkitValueError(f"kfac= must be 'expand' or 'reduce', got {kfac_mode!r}.")
    _check_memory(problem, structure)
    if problem.kind == "hessian":
        return _hessian_structure(problem, structure)
    if structure == "ekfac":
        # two passes, one matrix: the eigenvalues must come from the data (and, for the MC
        # Fisher, the label draws) the eigenbasis came from, not from a second draw
        problem.repeated = True
    fw, layout = problem.forward, problem.layout
    state: dict = {"layers": None, "stats": {}, "fb": {}, "groups": None}
    per_layer = {
        "kron": lambda: red.Kron(kfac_mode),
        "ekfac": lambda: red.Kron(kfac_mode),
        "diag": red.Diag,
        "block": red.Block,
    }[structure]

    def body(batch, side, chunks):
        trace = fw.chain_trace(batch)  # also the probe rule_layers reads
        layers = [l for l in fw.rule_layers(batch, structured=True) if _whole(l, layout)]
        if structure == "block":  # a grouped conv's block spans its groups: the exact rows
            layers = [l for l in layers if l.groups == 1]
        if state["layers"] is None:
            state["layers"] = layers
            state["groups"] = _fallback_groups(problem, _names_of(layers, layout))
            state["stats"] = {id(l): per_layer() for l in layers}
        elif [id(l) for l in layers] != [id(l) for l in state["layers"]]:
            raise CurvkitValueError(
                "the layers curvkit can factor changed between batches (a layer was called a "
                "different number of times or on differently shaped inputs). Keep forward() "
                "the same for every batch."
            )
        if layers:
            F, signs = _reduce_pairs(fw, batch, layers, side, trace, state["stats"])
        else:
            F, signs = side(fw.output(batch) if trace is None else trace.out)
        for gname, names in state["groups"].items():
            rows = _signed_rows(fallback_rows(fw, batch, F, names, chunks[0]), signs)
            _accumulate(state["fb"], gname, _fallback_stat(structure, rows))

    scale = problem._run(structure, body, factor=True, lazy=True)
    layers = state["layers"] or []
    stats = {k: v.result() for k, v in state["stats"].items()}
    if structure == "ekfac":
        bases = {}
        for l in layers:
            B, A, count = stats[id(l)]
            bases[id(l)] = (eigh(B)[1], eigh(A)[1])
        lam = {id(l): red.Ekfac(*bases[id(l)]) for l in layers}

        def second(batch, side, chunks):
            _reduce_pairs(fw, batch, layers, side, fw.chain_trace(batch), lam)

        if layers:
            problem._run("ekfac eigenvalues", second, factor=True, lazy=True)
    blocks, index, labels = [], [], []
    for l in layers:
        st, p = stats[id(l)], l.natural_order()  # A axis: the order of acts -> of parameters
        if p is not None:
            p = p.to(problem.device)
        if structure == "kron":
            B, A, count = st
            A = A if p is None else A[p][:, p]
            blocks.append(KronBlock.from_factors(B * (scale / count), A))
        elif structure == "ekfac":
            UB, UA = bases[id(l)]
            UA = UA if p is None else UA[p]
            blocks.append(KronBlock(UB, UA, lam[id(l)].result() * scale))
        elif structure == "diag":
            blocks.append(DiagBlock((st if p is None else st[:, p]).reshape(-1) * scale))
        else:
            if p is not None:
                q = (torch.arange(l.d, device=p.device)[:, None] * l.A + p).reshape(-1)
                st = st[q][:, q]
            blocks.append(DenseBlock(st * scale))
        index.append(red.layer_index(l, problem.device))
        group = f" group {l.group + 1}/{l.groups}" if l.groups > 1 else ""
        name = _module_of(min(_names_of([l], layout)))
        labels.append(f"{type(l.module).__name__}{group} {name!r} ({structure})")
    for gname, names in (state["groups"] or {}).items():
        st = state["fb"][gname][0]
        blocks.append(DenseBlock(st * scale) if st.dim() == 2 else DiagBlock(st * scale))
        index.append(_group_index(layout, names, problem.device))
        kind = "exact dense block" if st.dim() == 2 else "exact diagonal"
        labels.append(_group_label(problem, gname, kind))
    return BlockDiagonalOperator(blocks, index, problem.P, labels=labels, check=False)


def _reduce_pairs(fw, batch, layers, side, trace, stats: dict):
    """Backpropagate the factor's columns to the rule layers and feed each layer's accumulator;
    return the factor (F, σ)."""
    acts, F, signs, parts = backprop(fw, batch, layers, side, trace)
    for l, a in zip(layers, acts):
        stats[id(l)].add_inputs(*a)
    for cols, grads in parts:
        s = None if signs is None else signs[:, cols]
        for l, g in zip(layers, grads):
            stats[id(l)].add_columns(g, s)
    for l in layers:
        stats[id(l)].end_batch()
    return F, signs


def first_order_dense(problem: Problem) -> torch.Tensor:
    """The dense GGN / EF / Fisher as Σₙ (Fₙᵀ Jₙ)ᵀ (Fₙᵀ Jₙ) from per-sample rows of every chosen
    parameter: first derivatives of the model only. The route for a model with an op that torch
    cannot differentiate twice (F.scaled_dot_product_attention's CPU kernel), where the
    products' jvp and double backward both fail."""
    fw, names, P = problem.forward, list(problem.layout.names), problem.P
    out = torch.zeros(P, P, dtype=problem.dtype, device=problem.device)

    def body(batch, side, chunks):
        F, signs = side(fw.output(batch))
        rows, srows = _signed_rows(fallback_rows(fw, batch, F, names, chunks[0]), signs)
        out.addmm_(srows.reshape(-1, P).T, rows.reshape(-1, P))

    return out.mul_(problem._run("dense (first derivatives)", body, factor=True, lazy=True))


def _signed_rows(rows, signs):
    return rows, (rows if signs is None else rows * signs[:, :, None])


def _fallback_stat(structure, rows_pair):
    rows, srows = rows_pair
    P = rows.shape[-1]
    if structure == "diag" or (structure != "block" and P > MAX_FALLBACK):
        return ((rows * srows).sum((0, 1)),)
    return (srows.reshape(-1, P).T @ rows.reshape(-1, P),)


def _accumulate(store: dict, key, stat: tuple) -> None:
    if key not in store:
        store[key] = list(stat)
        return
    acc = store[key]
    for i, v in enumerate(stat):
        if isinstance(v, torch.Tensor):
            acc[i].add_(v)
        else:
            acc[i] += v


def _group_index(layout, names, device) -> torch.Tensor:
    sl = layout.slices()
    return torch.cat([torch.arange(sl[n].start, sl[n].stop, device=device) for n in names])


def _hessian_structure(problem: Problem, structure: str) -> BlockDiagonalOperator:
    """Hessian 'diag' (exact, engine reduction) and 'block' (exact per-module blocks)."""
    layout, device = problem.layout, problem.device
    if structure == "diag":
        return BlockDiagonalOperator(
            [DiagBlock(problem.hessian_diagonal())],
            [torch.arange(problem.P, device=device)],
            problem.P,
            labels=["Hessian (exact diagonal)"],
            check=False,
        )
    groups = _fallback_groups(problem, set())
    blocks, index, labels = [], [], []
    for gname, names in groups.items():
        idx = _group_index(layout, names, device)
        M = torch.empty(idx.numel(), idx.numel(), dtype=problem.dtype, device=device)
        for start in range(0, idx.numel(), 256):  # columns by one-hot products, in chunks
            cols = idx[start : start + 256]
            E = torch.zeros(problem.P, cols.numel(), dtype=problem.dtype, device=device)
            E[cols, torch.arange(cols.numel(), device=device)] = 1
            M[:, start : start + cols.numel()] = problem.matmat(E)[idx]
        blocks.append(DenseBlock(M))
        index.append(idx)
        labels.append(_group_label(problem, gname, "exact dense block"))
    return BlockDiagonalOperator(blocks, index, problem.P, labels=labels, check=False)


def _check_memory(problem: Problem, structure: str) -> None:
    """Refuse, before any pass, a structured result that cannot fit: per-module dense blocks
    (block), or Kronecker factors d² + A² per layer (kron, ekfac)."""
    layers = problem.forward._candidates
    ruled = {id(t) for l in layers for t in (l.module.weight, getattr(l.module, "bias", None))}
    sizes: dict[str, int] = {}  # per module; for kron, only modules without a rule
    for name, t in zip(problem.layout.names, problem.layout.tensors):
        if structure == "block" or id(t) not in ruled:
            module = _module_of(name)
            sizes[module] = sizes.get(module, 0) + t.numel()
    if structure == "block":
        need, what = sum(n * n for n in sizes.values()), f"{len(sizes)} dense blocks"
    elif structure in ("kron", "ekfac"):
        need = sum(l.d * l.d + l.A * l.A for l in layers)
        need += sum(n if n > MAX_FALLBACK else n * n for n in sizes.values())
        what = f"Kronecker factors of {len(layers)} layers"
    else:
        return
    item = torch.empty((), dtype=problem.dtype).element_size()
    check_bytes(
        f"structure={structure!r} ({what})",
        need * item,
        problem.device,
        problem.memory_limit,
        "Use structure='diag', or fewer parameters with params=.",
    )
