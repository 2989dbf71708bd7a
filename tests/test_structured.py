"""Structured curvatures (KFAC, EKFAC, exact diagonal, per-layer blocks, low rank) and the algebra
of the operators they return.

The truths are independent of curvkit: dense float64 GGN / empirical Fisher / Hessian from the
``torch.func`` references in ``helpers.py``, and KFAC written out from its definition (layer
inputs unfolded by hand, output-space Jacobians by plain autograd) in :func:`kfac_definition`.

KFAC of a rule layer (row-major vec W, bias appended as an input column of ones, (d_out, A) grid):
    expand: s * (sum_{n,r} J_nr^T M_n J_nr) kron (sum_{n,r} a_nr a_nr^T) / (N R)
    reduce: s * (sum_n Jb_n^T M_n Jb_n) kron (sum_n ab_n ab_n^T) / N,  Jb = sum_r J_r, ab = mean_r a
with J_nr = d f_n / d z_nr the output's Jacobian w.r.t. the layer output at position r and M_n the
output-space Hessian of the loss; sum_k g_k g_k^T over the columns g_k = J^T F_k of any factor
F F^T = M is J^T M J, so the definition does not depend on which square root the library uses.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from cases import DT, Case, attention_ce, bn_pool_dropout_ce, ce_sample, mse_sample
from cases import cnn_ce as cases_cnn_ce
from cases import mlp_ce_mean as cases_mlp_ce_mean
from cases import tied_embedding_ce as cases_tied_embedding_ce
from helpers import assert_close, ref_ef, ref_ggn, ref_hessian, ref_output_hessians, rel_error
from torch import nn
from torch.func import grad, vmap

import curvkit as ck

KFAC_MODES = ("expand", "reduce")


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def _finish(model: nn.Module) -> nn.Module:
    return model.to(DT).eval()


def _ce(name: str, model: nn.Module, x, n_classes: int, reduction: str = "mean") -> Case:
    n = x.shape[0]
    t = torch.randint(0, n_classes, (n,))
    scale = 1 / n if reduction == "mean" else 1.0
    loss = nn.CrossEntropyLoss(reduction=reduction)
    return Case(name, model, loss, (x, t), [(x, t)], ce_sample, scale)


def single_linear_mse_sum() -> Case:
    torch.manual_seed(20)
    model = _finish(nn.Linear(4, 3))
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    return Case(
        "single_linear_mse_sum",
        model,
        nn.MSELoss(reduction="sum"),
        (x, y),
        [(x, y)],
        mse_sample,
        1.0,
    )


def single_linear_mse_mean() -> Case:
    torch.manual_seed(21)
    model = _finish(nn.Linear(4, 3))
    x, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 3, dtype=DT)
    return Case(
        "single_linear_mse_mean", model, nn.MSELoss(), (x, y), [(x, y)], mse_sample, 1 / (7 * 3)
    )


def mlp_one_sample() -> Case:
    torch.manual_seed(22)
    model = _finish(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    return _ce("mlp_one_sample", model, torch.randn(1, 4, dtype=DT), 3)


def conv_single_position() -> Case:
    """3x3 kernel on a 3x3 image, no padding: the conv output has one spatial position."""
    torch.manual_seed(23)
    model = _finish(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3, 4)))
    return _ce("conv_single_position", model, torch.randn(1, 2, 3, 3, dtype=DT), 4)


def conv1d_single_position() -> Case:
    torch.manual_seed(24)
    model = _finish(nn.Sequential(nn.Conv1d(2, 3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(3, 3)))
    return _ce("conv1d_single_position", model, torch.randn(1, 2, 4, dtype=DT), 3)


def conv3d_single_position() -> Case:
    torch.manual_seed(25)
    model = _finish(nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2, 3)))
    return _ce("conv3d_single_position", model, torch.randn(1, 1, 2, 2, 2, dtype=DT), 3)


def _conv_mse_sum(name: str, conv: nn.Module, x: torch.Tensor) -> Case:
    torch.manual_seed(26)
    with torch.no_grad():
        out_numel = conv.to(DT)(x[:1]).numel()
    model = _finish(nn.Sequential(conv, nn.Flatten(), nn.Linear(out_numel, 2)))
    y = torch.randn(x.shape[0], 2, dtype=DT)
    return Case(name, model, nn.MSELoss(reduction="sum"), (x, y), [(x, y)], mse_sample, 1.0)


def _cos_sum(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cos(o - y).sum()


def conv2d_indefinite() -> Case:
    """A non-convex loss Σ cos(f − y): output Hessians −diag(cos) of both signs, so the factor
    carries signs σ that every reduction must apply."""
    torch.manual_seed(31)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(4, 2, 4, 4, dtype=DT)
    model = _finish(nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)))
    y = torch.randn(4, 3, dtype=DT)
    return Case("conv2d_indefinite", model, _cos_sum, (x, y), [(x, y)], _cos_sum, 1.0)


def conv2d_pad() -> Case:
    torch.manual_seed(27)
    return _conv_mse_sum(
        "conv2d_pad", nn.Conv2d(2, 3, 3, padding=1), torch.randn(4, 2, 4, 4, dtype=DT)
    )


def conv2d_stride_dilation() -> Case:
    torch.manual_seed(28)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2)
    return _conv_mse_sum("conv2d_stride_dilation", conv, torch.randn(3, 2, 5, 5, dtype=DT))


def conv1d_pad() -> Case:
    torch.manual_seed(29)
    return _conv_mse_sum(
        "conv1d_pad", nn.Conv1d(2, 3, 3, padding=1), torch.randn(4, 2, 5, dtype=DT)
    )


def conv3d_plain() -> Case:
    torch.manual_seed(30)
    return _conv_mse_sum("conv3d_plain", nn.Conv3d(2, 2, 2), torch.randn(3, 2, 3, 3, 3, dtype=DT))


class SequenceNet(nn.Module):
    """Linear applied to a (N, T, d) sequence (T positions share the weight), then mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.tok(x)).mean(dim=1))


def sequence_ce() -> Case:
    torch.manual_seed(31)
    return _ce("sequence_ce", _finish(SequenceNet()), torch.randn(4, 5, 3, dtype=DT), 3)


def layernorm_mlp() -> Case:
    torch.manual_seed(32)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(5))
        model[1].bias.add_(0.3 * torch.randn(5))
    return _ce("layernorm_mlp", _finish(model), torch.randn(6, 4, dtype=DT), 3)


class Residual(nn.Module):
    """Not a Sequential: a skip connection around a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.mid = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.mid(h))
        return self.out(h)


def residual_ce() -> Case:
    torch.manual_seed(33)
    return _ce("residual_ce", _finish(Residual()), torch.randn(6, 4, dtype=DT), 3)


def conv1d_ce() -> Case:
    torch.manual_seed(34)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3))
    return _ce("conv1d_ce", _finish(model), torch.randn(5, 2, 5, dtype=DT), 3)


def conv3d_ce() -> Case:
    torch.manual_seed(35)
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3))
    return _ce("conv3d_ce", _finish(model), torch.randn(4, 1, 3, 3, 3, dtype=DT), 3)


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens).mean(dim=1)))


def embedding_ce() -> Case:
    torch.manual_seed(36)
    model = _finish(EmbeddingNet())
    x = torch.randint(0, 6, (5, 4))
    t = torch.randint(0, 3, (5,))
    return Case("embedding_ce", model, nn.CrossEntropyLoss(), (x, t), [(x, t)], ce_sample, 1 / 5)


def tiny_mlp_ce() -> Case:
    """26 parameters: small enough for sample covariances with 20000 draws."""
    torch.manual_seed(37)
    model = _finish(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    return _ce("tiny_mlp_ce", model, torch.randn(6, 3, dtype=DT), 2)


FACTORIES = {
    f.__name__: f
    for f in (
        single_linear_mse_sum,
        single_linear_mse_mean,
        mlp_one_sample,
        conv_single_position,
        conv1d_single_position,
        conv3d_single_position,
        conv2d_pad,
        conv2d_indefinite,
        conv2d_stride_dilation,
        conv1d_pad,
        conv3d_plain,
        sequence_ce,
        layernorm_mlp,
        residual_ce,
        conv1d_ce,
        conv3d_ce,
        embedding_ce,
        tiny_mlp_ce,
    )
}
FACTORIES.update(
    mlp_ce_mean=cases_mlp_ce_mean,
    cnn_ce=cases_cnn_ce,
    bn_pool_dropout_ce=bn_pool_dropout_ce,
    tied_embedding_ce=cases_tied_embedding_ce,
    attention_ce=attention_ce,
)


@functools.cache
def case(name: str) -> Case:
    return FACTORIES[name]()


@functools.cache
def reference(name: str, kind: str = "ggn") -> torch.Tensor:
    c = case(name)
    if kind == "hessian":
        return ref_hessian(c.model, c.loss_fn, c.batches, c.params)
    fn = {"ggn": ref_ggn, "ef": ref_ef}[kind]
    return fn(c.model, c.sample_loss, c.scale, c.batches, c.params)


@functools.cache
def structured(name: str, kind: str, structure: str, kfac: str = "expand"):
    c = case(name)
    extra = {"kfac": kfac} if kind != "hessian" and structure in ("kron", "ekfac") else {}
    if structure == "lowrank":
        extra = {"rank": 5}
    return c.run(getattr(ck, kind), structure=structure, **extra)


def _sub(M: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return M[idx[:, None], idx[None, :]]


def _check_partition(op, P: int) -> None:
    """``op.index`` covers every coordinate exactly once; labels and blocks line up."""
    assert len(op.index) == len(op.labels) == len(op.blocks)
    assert all(isinstance(lab, str) and lab for lab in op.labels), op.labels
    allidx = torch.cat([i.reshape(-1) for i in op.index])
    assert allidx.dtype == torch.long
    assert torch.equal(allidx.sort().values, torch.arange(P)), (
        f"blocks do not partition the {P} coordinates: {op.labels}"
    )


def _layer_index(model: nn.Module, prefix: str, layer: nn.Module) -> torch.Tensor:
    """Global coordinates of a layer's (d_out, A) grid, row-major, bias as the last column."""
    slices = ck.parameter_slices(model)
    d = layer.weight.shape[0]
    pre = f"{prefix}." if prefix else ""
    w = slices[f"{pre}weight"]
    cols = [torch.arange(w.start, w.stop).reshape(d, -1)]
    if layer.bias is not None:
        b = slices[f"{pre}bias"]
        cols.append(torch.arange(b.start, b.stop).reshape(d, 1))
    return torch.cat(cols, dim=1).reshape(-1)


def _block_of(op, idx: torch.Tensor) -> int:
    hits = [b for b, i in enumerate(op.index) if torch.equal(i.reshape(-1), idx)]
    assert len(hits) == 1, f"expected one block with coordinates {idx.tolist()}, labels {op.labels}"
    return hits[0]


def _rule_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    ]


# --------------------------------------------------------------------------------------------
# KFAC from its definition
# --------------------------------------------------------------------------------------------
def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, R, C_in * prod(k)) layer inputs at each output position, ordered like weight[o]."""
    n = x.shape[0]
    if isinstance(layer, nn.Linear):
        return x.reshape(n, -1, x.shape[-1])
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2)
    if isinstance(layer, nn.Conv1d):  # a 1-d conv is a 2-d conv with a height-1 kernel
        cols = F.unfold(
            x.unsqueeze(2),
            (1, layer.kernel_size[0]),
            (1, layer.dilation[0]),
            (0, layer.padding[0]),
            (1, layer.stride[0]),
        )
        return cols.transpose(1, 2)
    assert isinstance(layer, nn.Conv3d)
    assert layer.stride == (1, 1, 1) and layer.dilation == (1, 1, 1)
    xp = F.pad(x, [p for p in reversed(layer.padding) for _ in range(2)])
    k = layer.kernel_size
    out = [s - kk + 1 for s, kk in zip(xp.shape[2:], k)]
    rows = []
    for i in range(out[0]):  # positions in the conv's (D, H, W) row-major output order
        for j in range(out[1]):
            for m in range(out[2]):
                patch = xp[:, :, i : i + k[0], j : j + k[1], m : m + k[2]]
                rows.append(patch.reshape(n, -1))
    return torch.stack(rows, dim=1)


def _pairs(model: nn.Module, layer: nn.Module, x: torch.Tensor):
    """(outputs (N, C), acts (N, R, A), J (N, C, R, d)) with J = d f_n / d z_n per position."""
    store = {}

    def hook(mod, args, out):
        store["in"], store["out"] = args[0], out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            f = model(x)
            z = store["out"]
            rows = [
                torch.autograd.grad(f[:, c].sum(), z, retain_graph=True)[0]
                for c in range(f.shape[1])
            ]
    finally:
        handle.remove()
    n, d = x.shape[0], layer.weight.shape[0]
    J = torch.stack(rows, dim=1)  # (N, C, *z.shape[1:])
    if isinstance(layer, nn.Linear):
        J = J.reshape(n, J.shape[1], -1, d)
    else:
        J = J.flatten(3).transpose(2, 3)
    a = _patches(layer, store["in"].detach())
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=2)
    return f.detach(), a, J.detach()


def _output_matrices(c: Case, f: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, C, C) M_n: the loss Hessian w.r.t. f_n (GGN) or u_n u_n^T, u_n = d l_n / d f_n (EF)."""
    if kind == "ggn":
        return ref_output_hessians(c.sample_loss, f.unsqueeze(1), t)

    def l_n(f_n, t_n):
        return c.sample_loss(f_n.unsqueeze(0), t_n.unsqueeze(0))

    u = vmap(grad(l_n))(f, t)
    return u[:, :, None] * u[:, None, :]


def kfac_definition(c: Case, layer: nn.Module, mode: str, kind: str = "ggn") -> torch.Tensor:
    x, t = c.batches[0]
    f, a, J = _pairs(c.model, layer, x)
    M = _output_matrices(c, f, t, kind)  # (N, C, C)
    n, r = a.shape[:2]
    if mode == "expand":
        B = torch.einsum("ncrd,nce,nerf->df", J, M, J)
        A = torch.einsum("nri,nrj->ij", a, a)
        return c.scale * torch.kron(B, A) / (n * r)
    Jb, ab = J.sum(2), a.mean(1)
    B = torch.einsum("ncd,nce,nef->df", Jb, M, Jb)
    return c.scale * torch.kron(B, ab.T @ ab) / n


# --------------------------------------------------------------------------------------------
# 1. KFAC is exact where it should be
# --------------------------------------------------------------------------------------------
EXACT_KFAC = (
    "single_linear_mse_sum",
    "single_linear_mse_mean",
    "mlp_one_sample",
    "conv_single_position",
    "conv1d_single_position",
    "conv3d_single_position",
)


@pytest.mark.parametrize(
    "structure,mode",
    [("kron", "expand"), ("kron", "reduce"), ("ekfac", "expand"), ("ekfac", "reduce")],
)
@pytest.mark.parametrize("name", EXACT_KFAC)
def test_kfac_is_exact_where_the_ggn_factorises(name, structure, mode):
    """One Linear under MSE (any N), or any net with one sample and one position per layer:
    every KFAC (and EKFAC) block equals the exact GGN block."""
    c = case(name)
    G = reference(name)
    op = structured(name, "ggn", structure, mode)
    assert isinstance(op, ck.BlockDiagonalOperator)
    _check_partition(op, c.num_params)
    for prefix, layer in _rule_layers(c.model):
        idx = _layer_index(c.model, prefix, layer)
        b = _block_of(op, idx)
        assert op.labels[b].startswith(type(layer).__name__), op.labels[b]
    D = op.to_dense()
    for b, idx in enumerate(op.index):
        assert_close(_sub(D, idx), _sub(G, idx), what=f"{name} {structure}/{mode} {op.labels[b]}")
    # every block is a rule layer here, so the whole operator is the block-diagonal of G
    mask = torch.zeros_like(G)
    for idx in op.index:
        mask[idx[:, None], idx[None, :]] = 1
    assert_close(D, G * mask, what=f"{name} {structure}/{mode} whole")


# --------------------------------------------------------------------------------------------
# 2. KFAC equals its definition with weight sharing (conv positions, sequence positions)
# --------------------------------------------------------------------------------------------
DEFINITION_CASES = (
    "conv2d_pad",
    "conv2d_indefinite",
    "conv2d_stride_dilation",
    "conv1d_pad",
    "conv3d_plain",
    "sequence_ce",
    "mlp_ce_mean",
    "cnn_ce",
)


@pytest.mark.parametrize("mode", KFAC_MODES)
@pytest.mark.parametrize("name", DEFINITION_CASES)
def test_kfac_matches_its_definition(name, mode):
    c = case(name)
    op = structured(name, "ggn", "kron", mode)
    _check_partition(op, c.num_params)
    D = op.to_dense()
    layers = _rule_layers(c.model)
    assert len(op.index) == len(layers), op.labels  # all parameters sit in rule layers
    for prefix, layer in layers:
        idx = _layer_index(c.model, prefix, layer)
        b = _block_of(op, idx)
        assert op.labels[b].startswith(type(layer).__name__), op.labels[b]
        assert_close(_sub(D, idx), kfac_definition(c, layer, mode), what=f"{name} {mode} {prefix}")


@pytest.mark.parametrize("mode", KFAC_MODES)
@pytest.mark.parametrize("name", EXACT_KFAC)
def test_the_kfac_definition_is_exact_where_the_ggn_factorises(name, mode):
    """Checks the test's own reference: where KFAC is exact, the definition is the GGN block."""
    c = case(name)
    G = reference(name)
    for prefix, layer in _rule_layers(c.model):
        idx = _layer_index(c.model, prefix, layer)
        assert_close(kfac_definition(c, layer, mode), _sub(G, idx), what=f"{name} {prefix}")


def test_expand_and_reduce_differ_with_weight_sharing():
    """Guard against a definition test that passes trivially: with R > 1 the two differ."""
    for name in ("conv2d_pad", "sequence_ce"):
        e = structured(name, "ggn", "kron", "expand").to_dense()
        r = structured(name, "ggn", "kron", "reduce").to_dense()
        assert rel_error(e, r) > 1e-3, name


@pytest.mark.parametrize(
    "structure,mode",
    [(s, m) for s in ("kron", "ekfac") for m in KFAC_MODES] + [("diag", None), ("block", None)],
)
@pytest.mark.parametrize("name", ["sequence_ce", "mlp_ce_mean"])
def test_structures_over_several_batches_equal_one_concatenated_batch(name, structure, mode):
    """Accumulators carry state between batches (Gram blocks, per-batch column sums): uneven
    batches must give exactly the result of one concatenated batch."""
    c = case(name)
    x, t = c.batches[0]
    n = x.shape[0]
    cuts = [0, 1, max(2, n // 2), n]
    batches = [(x[a:b], t[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]
    extra = {"kfac": mode} if structure in ("kron", "ekfac") else {}
    split = ck.ggn(c.model, c.loss_fn, batches, structure=structure, progress=False, **extra)
    one = structured(name, "ggn", structure, mode or "expand")
    assert_close(split.to_dense(), one.to_dense(), what=f"{name} {structure} {mode} batches")


@pytest.mark.parametrize("structure", ["kron", "ekfac", "diag", "block"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_a_loader_refilling_one_input_buffer_in_place(structure, kind):
    """Loaders with pinned staging buffers yield the same tensor object each batch, refilled in
    place: no accumulator may read a batch's inputs after the batch (the diagonal kept them to
    the next batch and paired them with its gradients: 0.08-0.2 off)."""
    c = case("mlp_ce_mean")
    x, t = c.batches[0]
    cuts = [0, 3, 6, x.shape[0]]
    batches = [(x[a:b], t[a:b]) for a, b in zip(cuts, cuts[1:])]

    class Refill:
        def __iter__(self):
            buf = torch.empty_like(x)
            for xb, tb in batches:
                view = buf[: xb.shape[0]]
                view.copy_(xb)
                yield view, tb

    fn = getattr(ck, kind)
    got = fn(c.model, c.loss_fn, Refill(), structure=structure, progress=False)
    want = fn(c.model, c.loss_fn, batches, structure=structure, progress=False)
    assert_close(got.to_dense(), want.to_dense(), what=f"{kind} {structure} refilled buffer")


@pytest.mark.parametrize("structure", ["kron", "ekfac", "diag", "block"])
def test_batches_of_one_loader_may_take_either_route(structure):
    """A forward with a data-dependent extra op is a chain for some batches and takes the
    generic route for others; both routes must hand the reductions one form of the inputs
    (the generic route's augmented rows met the chain's implied ones column: a raw size
    mismatch)."""

    class Guarded(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.act, self.l2 = nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)

        def forward(self, x):
            h = self.l1(x)
            if bool(x[0, 0] > 100):  # an op outside any chain, for this batch only
                h = h * 1.0
            return self.l2(self.act(h))

    torch.manual_seed(0)
    guarded = Guarded().to(DT)
    plain = nn.Sequential(guarded.l1, guarded.act, guarded.l2)
    x, t = torch.randn(3, 8, 6, dtype=DT), torch.randint(0, 3, (3, 8))
    for first in (0, 1):  # the generic route first, then in between
        xs = x.clone()
        xs[first, 0, 0] = 200.0
        data = list(zip(xs, t))
        loss = nn.CrossEntropyLoss()
        got = ck.ggn(guarded, loss, data, structure=structure, progress=False)
        want = ck.ggn(plain, loss, data, structure=structure, progress=False)
        assert_close(got.to_dense(), want.to_dense(), what=f"{structure}, generic batch {first}")


def test_structures_under_a_stack_recording_profiler():
    """``torch.profiler`` with stacks reads every parameter's ``.grad`` while the model runs:
    metadata reads are not uses of a weight, so the rule layers must not change."""
    c = case("mlp_ce_mean")
    x, t = c.batches[0]
    batches = [(x[:3], t[:3]), (x[3:], t[3:])]
    plain = ck.ggn(c.model, c.loss_fn, batches, structure="kron", progress=False)
    with torch.profiler.profile(with_stack=True):
        seen = ck.ggn(c.model, c.loss_fn, batches, structure="kron", progress=False)
    assert_close(seen.to_dense(), plain.to_dense(), what="KFAC under the profiler")


class SharedShift(nn.Module):  # a second input shared by every sample, and a float keyword
    def __init__(self):
        super().__init__()
        self.a, self.ln, self.c = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, u, shift, gain=1.0):
        return self.c(torch.tanh(self.ln(self.a(u) * shift) * gain))


def test_block_of_a_model_that_is_one_layer():
    """A model's own parameters (``nn.Linear`` as the model) form one module, one block."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    loss = nn.MSELoss()
    for kind in (ck.hessian, ck.ggn):
        got = kind(model, loss, (x, y), structure="block", progress=False)
        assert len(got.labels) == 1 and got.labels[0].startswith("Linear"), got.labels
        assert_close(got.to_dense(), ref_hessian(model, loss, [(x, y)]), what=kind.__name__)


def test_fallback_rows_keep_shared_inputs_whole():
    torch.manual_seed(0)
    model = SharedShift().to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    for inputs in (
        (x, torch.randn(4, dtype=DT)),
        {"u": x, "shift": torch.randn(4, dtype=DT), "gain": 0.7},
    ):
        dense = ck.ggn(model, loss, (inputs, y))
        for structure in ("diag", "block"):
            got = ck.ggn(model, loss, (inputs, y), structure=structure, progress=False)
            want = dense.diagonal() if structure == "diag" else None
            if want is not None:
                assert_close(got.diagonal(), want, what=f"{type(inputs).__name__} {structure}")
            else:
                mask = got.to_dense() != 0
                assert_close(
                    got.to_dense()[mask], dense[mask], what=f"{type(inputs).__name__} block"
                )
    # a shared input whose leading size equals the batch's cannot be told from a batched one:
    # the per-sample calls are checked against the batched output
    inputs = (x[:4], torch.randn(4, dtype=DT))
    with pytest.raises(ck.CurvkitError, match="do not reproduce the batched output"):
        ck.ggn(model, loss, (inputs, y[:4]), structure="diag", progress=False)


def _factor_losses():
    w = torch.tensor([0.5, 2.0, 1.0, 1.5], dtype=DT)
    n, c = 7, 4
    logits = torch.randn(n, c, dtype=DT) * 3
    idx = torch.randint(0, c, (n,))
    idx[2] = -100
    probs = torch.rand(n, c, dtype=DT)
    return {
        "ce": (nn.CrossEntropyLoss(reduction="sum"), logits, idx % c, c - 1),
        "ce_weight_ignore": (nn.CrossEntropyLoss(weight=w, reduction="sum"), logits, idx, c - 1),
        "ce_one_class_certain": (
            nn.CrossEntropyLoss(reduction="sum"),
            torch.tensor([[40.0, 0.0, -40.0, 1.0]], dtype=DT),
            torch.tensor([0]),
            c - 1,
        ),
        "mse": (nn.MSELoss(reduction="sum"), logits, probs, None),
        "bce_logits": (nn.BCEWithLogitsLoss(reduction="sum"), logits, probs, None),
        "bce": (nn.BCELoss(reduction="sum"), probs.clamp(0.05, 0.95), probs.round(), None),
        "custom": (lambda o, t: torch.cos(o - t).sum(), logits, probs, None),
    }


@pytest.mark.parametrize("name", list(_factor_losses()))
def test_output_factor_reproduces_the_output_hessian(name):
    """Every structure backpropagates the columns of Fₙ with Fₙ diag(σₙ) Fₙᵀ = Mₙ."""
    from curvkit.losses import as_loss

    torch.manual_seed(0)
    loss_fn, out, tgt, columns = _factor_losses()[name]
    F, signs = as_loss(loss_fn, None).output_factor("ggn", out, tgt)
    if columns is not None:
        assert F.shape[2] == columns, f"{name}: {F.shape[2]} columns, want {columns}"
    SF = F if signs is None else F * signs[:, None, :]
    want = ref_output_hessians(lambda o, t: loss_fn(o[None], t), out, tgt)
    assert_close(SF @ F.transpose(1, 2), want, rtol=1e-12, what=name)


# --------------------------------------------------------------------------------------------
# 3. exact diagonals
# --------------------------------------------------------------------------------------------
DIAG_CASES = [
    ("mlp_ce_mean", "ggn"),
    ("cnn_ce", "ggn"),
    ("layernorm_mlp", "ggn"),
    ("sequence_ce", "ggn"),
    ("mlp_ce_mean", "ef"),
    ("cnn_ce", "ef"),
    ("layernorm_mlp", "ef"),
    ("mlp_ce_mean", "hessian"),
    ("cnn_ce", "hessian"),
    ("layernorm_mlp", "hessian"),
]


@pytest.mark.parametrize("name,kind", DIAG_CASES)
def test_exact_diagonal(name, kind):
    c = case(name)
    ref = reference(name, kind)
    op = structured(name, kind, "diag")
    assert isinstance(op, ck.BlockDiagonalOperator)
    _check_partition(op, c.num_params)
    assert_close(op.diagonal(), ref.diagonal(), what=f"{name} {kind} diagonal()")
    assert_close(op.to_dense(), torch.diag(ref.diagonal()), what=f"{name} {kind} to_dense()")
    assert_close(op.trace(), ref.trace(), what=f"{name} {kind} trace")


def test_layernorm_parameters_get_an_exact_fallback():
    c = case("layernorm_mlp")
    slices = ck.parameter_slices(c.model)
    ln = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in ("1.weight", "1.bias")])
    G = reference("layernorm_mlp")
    for structure in ("kron", "ekfac", "diag", "block"):
        op = structured("layernorm_mlp", "ggn", structure)
        b = _block_of(op, ln)
        assert "exact" in op.labels[b], (structure, op.labels)
        want = _sub(G, ln) if structure != "diag" else torch.diag(_sub(G, ln).diagonal())
        assert_close(_sub(op.to_dense(), ln), want, what=f"LayerNorm block under {structure}")


# --------------------------------------------------------------------------------------------
# 4. exact per-layer / per-module blocks
# --------------------------------------------------------------------------------------------
BLOCK_CASES = [
    ("mlp_ce_mean", "ggn"),
    ("cnn_ce", "ggn"),
    ("sequence_ce", "ggn"),
    ("layernorm_mlp", "ggn"),
    ("embedding_ce", "ggn"),
    ("mlp_ce_mean", "ef"),
    ("cnn_ce", "ef"),
    ("mlp_ce_mean", "hessian"),
    ("layernorm_mlp", "hessian"),
]


@pytest.mark.parametrize("name,kind", BLOCK_CASES)
def test_exact_blocks(name, kind):
    c = case(name)
    ref = reference(name, kind)
    op = structured(name, kind, "block")
    _check_partition(op, c.num_params)
    D = op.to_dense()
    mask = torch.zeros_like(ref)
    for b, idx in enumerate(op.index):
        assert_close(_sub(D, idx), _sub(ref, idx), what=f"{name} {kind} {op.labels[b]}")
        mask[idx[:, None], idx[None, :]] = 1
    assert_close(D, ref * mask, what=f"{name} {kind} off-block zeros")
    # a Linear / Conv layer's block holds its weight and bias together
    blocks = [set(i.tolist()) for i in op.index]
    for prefix, layer in _rule_layers(c.model):
        assert set(_layer_index(c.model, prefix, layer).tolist()) in blocks, (prefix, op.labels)


# --------------------------------------------------------------------------------------------
# 5. algebra of damped operators against their dense matrices
# --------------------------------------------------------------------------------------------
STRUCTURES = ("kron", "ekfac", "diag", "block", "lowrank")
DAMPING = 0.3


def _vectors(p: int, k: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*((p,) if k is None else (p, k)), generator=g, dtype=DT)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("name", ["layernorm_mlp", "cnn_ce"])
def test_damped_operator_algebra(name, structure):
    c = case(name)
    n = c.num_params
    op = structured(name, "ggn", structure)
    assert tuple(op.shape) == (n, n)
    A = op.to_dense()
    assert A.dtype == DT
    assert_close(A, A.T, rtol=1e-12, what="symmetry")
    lam = torch.linalg.eigvalsh(A)
    assert lam.min() >= -1e-10 * lam.max(), f"{structure}: not PSD (min eig {lam.min():.3g})"

    P = op.add_identity(DAMPING)
    D = P.to_dense()
    eye = torch.eye(n, dtype=DT)
    what = f"{name} {structure}"
    assert_close(D, A + DAMPING * eye, what=f"{what} add_identity")
    assert_close(op.to_dense(), A, rtol=0, atol_scale=0, what=f"{what} add_identity mutated op")
    assert_close(P.trace(), D.trace(), what=f"{what} trace")
    assert_close(P.logdet(), torch.logdet(D), what=f"{what} logdet")
    assert_close(P.diagonal(), D.diagonal(), what=f"{what} diagonal")
    v, V = _vectors(n), _vectors(n, 3, seed=2)
    assert_close(P @ v, D @ v, what=f"{what} matvec")
    assert_close(P @ V, D @ V, what=f"{what} matmat")
    assert_close(op @ V, A @ V, what=f"{what} undamped matmat")
    assert_close(P.solve(v), torch.linalg.solve(D, v), what=f"{what} solve (P,)")
    assert_close(P.solve(V), torch.linalg.solve(D, V), what=f"{what} solve (P, k)")
    inv = P.inverse()
    assert_close(inv.to_dense(), torch.linalg.inv(D), what=f"{what} inverse")
    assert_close(inv @ (P @ V), V, what=f"{what} inverse @ P")
    assert_close(P.eigenvalues(), torch.linalg.eigvalsh(D).flip(0), what=f"{what} eigenvalues")


def test_lowrank_holds_the_top_eigenpairs():
    c = case("layernorm_mlp")
    G = reference("layernorm_mlp")
    op = structured("layernorm_mlp", "ggn", "lowrank")
    assert isinstance(op, ck.LowRankOperator)
    lam, U = torch.linalg.eigh(G)
    top = lam.flip(0)[:5]
    assert_close(
        torch.linalg.eigvalsh(op.to_dense()).flip(0)[:5],
        top,
        rtol=1e-6,
        what="low-rank eigenvalues",
    )
    assert torch.linalg.matrix_rank(op.to_dense()) == 5
    # the operator is G's top-5 part. ck.ggn runs Lanczos at top_eigenvalues' default tol=1e-4,
    # a bound r <= tol * theta on the Ritz residuals; the vectors are only accurate to
    # sin(angle) <= r/gap <= tol * theta / gap (~1e-1 at worst for these gaps; far less in
    # practice), hence rtol 1e-2.
    assert bool((top[:-1] - top[1:] > 1e-3 * top[0]).all()) and top[4] - lam.flip(0)[5] > 1e-3
    Uk = U.flip(1)[:, :5]
    assert_close(op.to_dense(), Uk @ torch.diag(top) @ Uk.T, rtol=1e-2, what="low-rank matrix")
    assert c.num_params > 5


# --------------------------------------------------------------------------------------------
# 6. sampling from N(0, P^-1)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", STRUCTURES)
def test_samples_have_the_inverse_covariance(structure):
    """X (n, P) with rows ~ N(0, S), S = inv(P). The known-mean estimate C = X^T X / n has
    E ||C - S||_F^2 = (||S||_F^2 + tr(S)^2) / n (Wishart: Var C_ij = (S_ij^2 + S_ii S_jj) / n).
    ``||C - S||_F`` concentrates around its RMS, so 4 RMS is a >10-sigma-safe bound for a
    correct sampler while A^-1 (instead of A^-1/2) or a missing damping lands far outside.
    The mean: n m^T P m ~ chi^2(P); P + 8 sqrt(2P) is far beyond its 99.99 % quantile.
    """
    name = "tiny_mlp_ce"
    n_par = case(name).num_params
    assert n_par <= 30
    P = structured(name, "ggn", structure).add_identity(DAMPING)
    D = P.to_dense()
    S = torch.linalg.inv(D)
    n = 20000
    X = P.sample(n, generator=torch.Generator().manual_seed(0))
    assert tuple(X.shape) == (n, n_par) and X.dtype == DT
    C = X.T @ X / n
    rms = math.sqrt((torch.linalg.norm(S) ** 2 + S.trace() ** 2).item() / n)
    err = torch.linalg.norm(C - S).item()
    assert err <= 4 * rms, f"{structure}: ||cov - P^-1||_F = {err:.3g} > 4 * {rms:.3g}"
    assert rel_error(C, S) < 0.25
    m = X.mean(0)
    chi2 = n * (m @ D @ m).item()
    assert chi2 <= n_par + 8 * math.sqrt(2 * n_par), f"{structure}: mean chi2 {chi2:.3g}"
    again = P.sample(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, P.sample(5, generator=torch.Generator().manual_seed(0)))


# --------------------------------------------------------------------------------------------
# 7. Monte-Carlo Fisher converges to the GGN, structure by structure
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["kron", "diag", "block"])
def test_mc_fisher_structure_converges_to_ggn(structure):
    name = "mlp_ce_mean"
    c = case(name)
    G = structured(name, "ggn", structure).to_dense()
    errs = {}
    for s in (1, 500):
        Fm = c.run(
            ck.fisher, structure=structure, mc_samples=s, generator=torch.Generator().manual_seed(0)
        )
        assert isinstance(Fm, ck.BlockDiagonalOperator)
        errs[s] = rel_error(Fm.to_dense(), G)
    # the error of a mean of S i.i.d. draws scales like 1/sqrt(S): 1/22 from S=1 to S=500
    assert errs[500] < errs[1] / 5, errs
    assert errs[500] < 0.1, errs


# --------------------------------------------------------------------------------------------
# 8. EKFAC: KFAC's eigenbasis, with the optimal diagonal in it
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", KFAC_MODES)
@pytest.mark.parametrize("name", ["mlp_ce_mean", "cnn_ce", "sequence_ce", "conv2d_pad"])
def test_ekfac_is_the_best_diagonal_in_the_kfac_eigenbasis(name, mode):
    """With K = U diag(l) U^T (KFAC) and G the exact block, EKFAC is E = U diag(diag(U^T G U)) U^T,
    the Frobenius projection of G onto the matrices diagonal in U. Basis-free consequences
    (they hold for any eigenbasis U of K, so degenerate KFAC eigenvalues do not matter):
    E K = K E;  tr(K^j E) = tr(K^j G) for j = 0, 1, 2;  tr(E G) = tr(E E) (orthogonal projection);
    and hence ||E - G||_F <= ||K - G||_F.
    """
    G = reference(name)
    K_op = structured(name, "ggn", "kron", mode)
    E_op = structured(name, "ggn", "ekfac", mode)
    assert [i.tolist() for i in K_op.index] == [i.tolist() for i in E_op.index]
    K_all, E_all = K_op.to_dense(), E_op.to_dense()
    rules = [b for b, lab in enumerate(E_op.labels) if "exact" not in lab]
    assert rules, E_op.labels
    for b in rules:
        idx = E_op.index[b]
        K, E, Gb = _sub(K_all, idx), _sub(E_all, idx), _sub(G, idx)
        what = f"{name} {mode} {E_op.labels[b]}"
        scale = (torch.linalg.norm(E) * torch.linalg.norm(K)).item()
        assert torch.linalg.norm(E @ K - K @ E).item() <= 1e-10 * scale, f"{what}: E K != K E"
        Kj = torch.eye(idx.numel(), dtype=DT)
        for j in range(3):
            assert_close((Kj @ E).trace(), (Kj @ Gb).trace(), what=f"{what}: tr(K^{j} E)")
            Kj = Kj @ K
        assert_close((E @ Gb).trace(), (E @ E).trace(), what=f"{what}: tr(E G) = tr(E E)")
        err_e, err_k = torch.linalg.norm(E - Gb).item(), torch.linalg.norm(K - Gb).item()
        assert err_e <= err_k + 1e-12 * torch.linalg.norm(Gb).item(), (
            f"{what}: EKFAC {err_e:.3g} > KFAC {err_k:.3g}"
        )
    for b, lab in enumerate(E_op.labels):
        if b not in rules:  # fallback blocks are exact in both
            assert_close(_sub(E_all, E_op.index[b]), _sub(K_all, K_op.index[b]), what=lab)


def test_mc_fisher_ekfac_takes_its_eigenvalues_from_the_same_draws():
    """EKFAC's second pass drew new labels: its eigenvalues were those of another MC Fisher than
    its eigenbasis (0.41-0.45 off diag(U^T F U) for the dense Fisher of the same seed)."""
    c = case("mlp_ce_mean")
    run = lambda s: c.run(ck.fisher, structure=s, generator=torch.Generator().manual_seed(4))  # noqa: E731
    F_all, K_op, E_op = run("dense"), run("kron"), run("ekfac")
    K_all, E_all = K_op.to_dense(), E_op.to_dense()
    for b, lab in enumerate(E_op.labels):
        idx = E_op.index[b]
        K, E, Fb = _sub(K_all, idx), _sub(E_all, idx), _sub(F_all, idx)
        Kj = torch.eye(idx.numel(), dtype=DT)
        for j in range(3):  # E is F's projection onto K's eigenbasis: basis-free checks
            assert_close((Kj @ E).trace(), (Kj @ Fb).trace(), what=f"{lab}: tr(K^{j} E)")
            Kj = Kj @ K


def test_ekfac_refuses_a_loader_that_brings_other_samples_to_its_second_pass():
    c = case("mlp_ce_mean")
    (x, y), n = c.data if isinstance(c.data, tuple) else c.data[0], 0

    class Drifting:  # each pass draws other samples (random augmentation, say)
        def __iter__(self):
            nonlocal n
            n += 1
            yield x + 0.1 * n, y

    with pytest.raises(ck.CurvkitValueError, match="data changed"):
        ck.ggn(c.model, c.loss_fn, Drifting(), structure="ekfac")


# --------------------------------------------------------------------------------------------
# 9. models that are not a plain stack of Linear / Conv2d layers
# --------------------------------------------------------------------------------------------
ODD_MODELS = (
    "residual_ce",
    "layernorm_mlp",
    "bn_pool_dropout_ce",
    "conv1d_ce",
    "conv3d_ce",
    "embedding_ce",
    "tied_embedding_ce",
    "attention_ce",
)


@pytest.mark.parametrize("name", ODD_MODELS)
def test_odd_models_diag_and_kron(name):
    c = case(name)
    G = reference(name)
    diag = structured(name, "ggn", "diag")
    _check_partition(diag, c.num_params)
    assert_close(diag.to_dense().diagonal(), G.diagonal(), what=f"{name} diag")

    kron = structured(name, "ggn", "kron")
    _check_partition(kron, c.num_params)
    D = kron.to_dense()
    assert_close(D, D.T, rtol=1e-12, what=f"{name} kron symmetry")
    assert torch.isfinite(D).all()
    for lab, idx in zip(kron.labels, kron.index):
        if "exact dense block" in lab:
            assert_close(_sub(D, idx), _sub(G, idx), what=f"{name} {lab}")
        elif "exact diagonal" in lab:
            assert_close(_sub(D, idx), torch.diag(_sub(G, idx).diagonal()), what=f"{name} {lab}")
        else:
            assert "kron" in lab, lab
    # every Linear / Conv whose weight is not shared gets a Kronecker block labelled by its type
    uses: dict[int, int] = {}
    for mod in c.model.modules():
        for p in mod._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    rules = 0
    for prefix, layer in _rule_layers(c.model):
        if uses[id(layer.weight)] > 1:
            continue
        rules += 1
        b = _block_of(kron, _layer_index(c.model, prefix, layer))
        lab = kron.labels[b]
        assert lab.startswith(type(layer).__name__) and "kron" in lab, lab
    assert rules >= 1


def test_tied_weight_falls_back_to_an_exact_block():
    c = case("tied_embedding_ce")
    G = reference("tied_embedding_ce")
    slices = ck.parameter_slices(c.model)
    emb = torch.arange(slices["emb.weight"].start, slices["emb.weight"].stop)
    for structure in ("kron", "ekfac", "block"):
        op = structured("tied_embedding_ce", "ggn", structure)
        hits = [b for b, i in enumerate(op.index) if set(emb.tolist()) <= set(i.tolist())]
        assert len(hits) == 1, op.labels
        b = hits[0]
        assert "exact" in op.labels[b], op.labels[b]
        assert_close(
            _sub(op.to_dense(), op.index[b]),
            _sub(G, op.index[b]),
            what=f"tied weight block under {structure}",
        )


def test_hessian_refuses_kfac():
    c = case("mlp_ce_mean")
    for structure in ("kron", "ekfac"):
        with pytest.raises(ck.CurvkitValueError):
            c.run(ck.hessian, structure=structure)


@pytest.mark.parametrize("structure", ["kron", "diag", "block"])
@pytest.mark.parametrize("name", ["mlp_ce_mean", "sequence_ce"])
def test_ef_structures_match_the_empirical_fisher(name, structure):
    """The EF's output-space factor is the per-sample gradient u_n (M_n = u_n u_n^T): its block and
    diagonal are exact, and its KFAC is the definition with that M_n."""
    E = reference(name, "ef")
    op = structured(name, "ef", structure)
    _check_partition(op, case(name).num_params)
    D = op.to_dense()
    if structure == "kron":
        for prefix, layer in _rule_layers(case(name).model):
            idx = _layer_index(case(name).model, prefix, layer)
            _block_of(op, idx)
            want = kfac_definition(case(name), layer, "expand", kind="ef")
            assert_close(_sub(D, idx), want, what=f"{name} ef kron {prefix}")
        return
    for b, idx in enumerate(op.index):
        want = _sub(E, idx) if structure == "block" else torch.diag(_sub(E, idx).diagonal())
        assert_close(_sub(D, idx), want, what=f"{name} ef {structure} {op.labels[b]}")


def test_embedding_kfac_is_a_linear_on_one_hot_inputs():
    """Embedding KFAC = (Σ g gᵀ) ⊗ (Σ onehot onehotᵀ)/(N·R) in the (dim, vocab) grid, with the
    weight stored (vocab, dim); exact for one sample at one position."""
    torch.manual_seed(3)
    model = _finish(EmbeddingNet())
    x = torch.randint(0, 6, (1, 1))
    t = torch.randint(0, 3, (1,))
    loss = nn.CrossEntropyLoss()
    G = ck.ggn(model, loss, (x, t))
    op = ck.ggn(model, loss, (x, t), structure="kron")
    assert op.labels[0].startswith("Embedding"), op.labels
    i = op.index[0]
    sl = ck.parameter_slices(model)["emb.weight"]
    assert sorted(i.tolist()) == list(range(sl.start, sl.stop))
    assert_close(op.to_dense()[i][:, i], G[i][:, i])


def test_grouped_conv_gets_one_kronecker_block_per_group():
    """groups=g makes the layer's Jacobian block-diagonal over groups; each group's KFAC block
    is exact for one sample at one position, and the exact diagonal matches everywhere."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6, 3))
    model = _finish(model)
    loss = nn.CrossEntropyLoss()
    x, t = torch.randn(1, 4, 3, 3, dtype=torch.float64), torch.randint(0, 3, (1,))
    G = ck.ggn(model, loss, (x, t))
    op = ck.ggn(model, loss, (x, t), structure="kron")
    want = ["Conv2d group 1/2 '0' (kron)", "Conv2d group 2/2 '0' (kron)"]
    assert op.labels[:2] == want, op.labels
    for i in op.index[:2]:
        assert_close(op.to_dense()[i][:, i], G[i][:, i])
    xs, ts = torch.randn(5, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    model2 = _finish(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(54, 3)))
    D = ck.ggn(model2, loss, (xs, ts), structure="diag")
    assert_close(D.diagonal(), ck.ggn(model2, loss, (xs, ts)).diagonal())


def test_grouped_conv_block_is_the_whole_module_block():
    """structure='block' promises one exact dense block per module: a grouped conv gave one per
    group, dropping the cross-group entries (0.66 off the dense GGN's module block), while the
    Hessian's block kept them."""
    torch.manual_seed(6)
    model = _finish(
        nn.Sequential(
            nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(54, 3)
        )
    )
    loss = nn.CrossEntropyLoss()
    x, t = torch.randn(5, 4, 7, 7, dtype=DT), torch.randint(0, 3, (5,))
    G = ck.ggn(model, loss, (x, t))
    op = ck.ggn(model, loss, (x, t), structure="block")
    sl = ck.parameter_slices(model)
    i = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in ("0.weight", "0.bias")])
    assert_close(op.to_dense()[i][:, i], G[i][:, i], what="grouped conv module block")


@pytest.mark.parametrize("structure", ["kron", "ekfac", "diag", "block", "lowrank"])
def test_top_eigenpairs_come_exactly_from_the_structure(structure):
    torch.manual_seed(7)
    model = _finish(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.LayerNorm(48),
            nn.Linear(48, 4),
        )
    )
    x, t = torch.randn(9, 1, 4, 4, dtype=DT), torch.randint(0, 4, (9,))
    op = ck.ggn(model, nn.CrossEntropyLoss(), (x, t), structure=structure).add_identity(0.1)
    D = op.to_dense()
    vals, V = ck.top_eigenvalues(op, 4, eigenvectors=True)
    assert_close(vals, torch.linalg.eigvalsh(D).flip(0)[:4], rtol=1e-6)
    assert_close(D @ V, V * vals, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# singular operators, inverses' top eigenpairs, argument checks (an adversarial review's finds)
# --------------------------------------------------------------------------------------------
def _singular_ce_case():
    """A cross-entropy GGN is singular (the softmax Hessian's null vector 1): so is the last
    layer's KFAC factor, whose eigendecomposition leaves rounding-level values of either sign
    (9e-21 for kron, 7e-36 for ekfac here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()
    x, y = torch.randn(10, 3, dtype=DT), torch.randint(0, 3, (10,))
    return model, nn.CrossEntropyLoss(), (x, y)


@pytest.mark.parametrize("structure", ["kron", "ekfac", "block"])
def test_an_undamped_singular_operator_is_refused_then_exact_once_damped(structure):
    """Undamped, kron's solve returned entries of 1e20 with a residual 700× ‖b‖ and ekfac's
    1e35: a positive eigenvalue of 9e-21 passed a `> 0` check. Now every structure calls it
    singular; damped, each result equals its own to_dense()'s."""
    model, loss, data = _singular_ce_case()
    op = ck.ggn(model, loss, data, structure=structure)
    b = torch.ones(op.shape[0], dtype=DT)
    for call in (op.logdet, lambda: op.solve(b), op.inverse, lambda: op.sample(2)):
        with pytest.raises(ck.CurvkitValueError, match="singular.*add_identity"):
            call()
    P = op.add_identity(1e-3)
    D = P.to_dense()
    assert_close(P.logdet(), torch.linalg.slogdet(D)[1], what=f"{structure} logdet")
    assert_close(P.solve(b), torch.linalg.solve(D, b), what=f"{structure} solve")


@pytest.mark.parametrize("structure", ["block", "kron", "diag", "lowrank"])
def test_an_inverse_reports_its_own_top_eigenpairs(structure):
    """A dense block's inverse kept eigh's order reversed, and a low-rank inverse returned its
    stored pairs: both reported their smallest eigenvalues as the top ones (3.2 and 2.2 against
    10 and 10)."""
    model, loss, data = _singular_ce_case()
    op = ck.ggn(model, loss, data, structure=structure, rank=5).add_identity(0.1).inverse()
    D = op.to_dense()
    want = torch.linalg.eigvalsh(D).flip(0)[:3]
    vals, vecs = op.top_eigenpairs(3)
    assert_close(vals, want, what=f"{structure} top eigenvalues of the inverse")
    assert_close(D @ vecs, vecs * vals, what=f"{structure} eigenvectors of the inverse")
    assert_close(vecs.T @ vecs, torch.eye(3, dtype=DT), what="orthonormal")
    assert_close(ck.top_eigenvalues(op, 3), want, what="ck.top_eigenvalues")


def test_a_lowrank_hessian_ranks_its_complement_above_negative_stored_values():
    """An undamped low-rank Hessian is 0 off its stored pairs' span: once the stored values turn
    negative, the complement's 0 is larger, and top_eigenpairs must say so (it returned the
    stored -0.40 where the operator's value is 0)."""
    c = cases_mlp_ce_mean()
    P = sum(p.numel() for p in c.model.parameters())
    H = ck.hessian(c.model, c.loss_fn, c.data, structure="lowrank", rank=P - 3)
    assert float(H.lam.min()) < 0
    D = H.to_dense()
    vals, vecs = H.top_eigenpairs(P - 1)
    assert_close(vals, H.eigenvalues()[: P - 1], what="values")
    assert_close(vals, torch.linalg.eigvalsh(D).flip(0)[: P - 1], what="against eigvalsh")
    assert_close(D @ vecs, vecs * vals, what="eigenvectors")
    assert_close(vecs.T @ vecs, torch.eye(P - 1, dtype=DT), what="orthonormal")


def test_a_full_rank_lowrank_operator_is_invertible_without_damping():
    """rank >= P keeps every eigenpair: no shift·I complement, so an undamped positive definite
    operator has a logdet and a solve (it was called singular, 'delta > -0')."""
    torch.manual_seed(1)
    model = nn.Linear(3, 2).to(DT)
    data = (torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT))
    op = ck.ggn(model, nn.MSELoss(), data, structure="lowrank", rank=100)
    D = op.to_dense()
    assert float(torch.linalg.eigvalsh(D).min()) > 0.1
    b = torch.arange(8, dtype=DT)
    assert_close(op.logdet(), torch.linalg.slogdet(D)[1], what="logdet")
    assert_close(op.solve(b), torch.linalg.solve(D, b), what="solve")
    assert_close(op.inverse().to_dense(), torch.linalg.inv(D), what="inverse")


@pytest.mark.parametrize("structure", ["kron", "lowrank"])
def test_operator_arguments_are_checked_with_clear_errors(structure):
    """Raw torch errors (a shape mismatch, randn's overload list), or silent acceptance (a NaN
    damping gave an all-NaN operator; a (P, P, P) right-hand side a batched product)."""
    c = cases_mlp_ce_mean()
    op = ck.ggn(c.model, c.loss_fn, c.data, structure=structure, rank=4).add_identity(0.5)
    P = op.shape[0]
    bad_b = [torch.ones(P + 1), torch.ones(P, 2, 2), torch.ones(()), torch.ones(P, P, P)]
    for b in bad_b:
        with pytest.raises(ck.CurvkitValueError, match=rf"solve\(b\) takes a vector \({P},\)"):
            op.solve(b)
    with pytest.raises(ck.CurvkitTypeError, match="needs a tensor"):
        op.solve([1.0] * P)
    with pytest.raises(ck.CurvkitTypeError, match="real tensor"):
        op.solve(torch.ones(P, dtype=torch.complex128))
    for n in (0, -1, 2.0, True):
        with pytest.raises(ck.CurvkitValueError, match=r"sample\(n\) must be an int"):
            op.sample(n)
    with pytest.raises(ck.CurvkitTypeError, match="torch.Generator"):
        op.sample(2, generator=0)
    for k in (0, -1, 2.0):
        with pytest.raises(ck.CurvkitValueError, match=r"top_eigenpairs\(k\) must be an int"):
            op.top_eigenpairs(k)
    for delta in (float("nan"), float("inf"), "a", torch.ones(P), True):
        with pytest.raises(ck.CurvkitValueError, match="one finite real number"):
            op.add_identity(delta)
    assert_close(op.add_identity(torch.tensor(0.25)).to_dense(), op.add_identity(0.25).to_dense())


def test_a_lowrank_operator_takes_one_shift():
    """A per-coordinate shift given by mistake was kept: products used its first entry,
    to_dense() all of them, trace() returned a vector and logdet() raised a raw size error."""
    U = torch.linalg.qr(torch.randn(6, 2, dtype=DT)).Q
    lam = torch.tensor([2.0, 1.0], dtype=DT)
    with pytest.raises(ck.CurvkitValueError, match="one number"):
        ck.LowRankOperator(U, lam, shift=torch.linspace(0.1, 0.6, 6, dtype=DT))
    op = ck.LowRankOperator(U, lam, shift=torch.tensor(0.5, dtype=DT))
    D = (U * lam) @ U.T + 0.5 * torch.eye(6, dtype=DT)
    assert_close(op.logdet(), torch.logdet(D), what="0-d tensor shift")
    assert op.trace().dim() == 0


def test_rank_is_checked_by_name():
    c = cases_mlp_ce_mean()
    for rank in (None, 0, 2.5):
        with pytest.raises(ck.CurvkitValueError, match=r"rank must be an int >= 1"):
            ck.ggn(c.model, c.loss_fn, c.data, structure="lowrank", rank=rank)


def test_block_labels_name_the_module_for_every_kind():
    """hessian(structure="block") named modules by path, ggn's by type only ('Linear (block)'
    twice, which could not tell the layers apart): both now give type and path."""
    model, loss, data = _singular_ce_case()
    want = ["Linear '0' (block)", "Linear '2' (block)"]
    assert ck.ggn(model, loss, data, structure="block").labels == want
    got = ck.hessian(model, loss, data, structure="block").labels
    assert got == ["Linear '0' (exact dense block)", "Linear '2' (exact dense block)"], got


class _Keywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(input=torch.tanh(self.a(input=x)))


class _Token(nn.Module):
    """A learned (1, F) token through a Linear, added to every sample (ViT's CLS token)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Parameter(torch.randn(1, 3))
        self.proj, self.a = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(torch.tanh(x + self.proj(self.tok)))


def _legacy_weight_norm():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    torch.nn.utils.weight_norm(model[0])
    return model


@pytest.mark.parametrize(
    "make", [_Keywords, _Token, _legacy_weight_norm], ids=["keywords", "token", "weight_norm"]
)
@pytest.mark.parametrize("structure", ["diag", "block"])
def test_loaders_with_a_one_sample_batch_and_odd_layers_are_exact(make, structure):
    """Three models an adversarial review broke, each over a loader of 4 + 1 samples:
    a Linear called as lin(input=x) raised a raw IndexError on the 1-sample batch; a learned
    (1, F) token looked batched there and was refused ("the layers ... changed between
    batches"); the legacy weight_norm split its module over two blocks and dropped their
    cross terms (0.04 off the module's block)."""
    torch.manual_seed(0)
    model = make().to(DT).eval()
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    loss = nn.CrossEntropyLoss(reduction="sum")
    G = ck.ggn(model, loss, (x, y))
    op = ck.ggn(model, loss, [(x[:4], y[:4]), (x[4:], y[4:])], structure=structure)
    for idx in op.index:
        want = G[idx][:, idx] if structure == "block" else G.diagonal()[idx]
        got = op.to_dense()[idx][:, idx] if structure == "block" else op.diagonal()[idx]
        assert_close(got, want, what=f"{make.__name__} {structure}")
    if structure == "block":  # every module's parameters in one block
        owners = [{n.rpartition(".")[0].split(".")[0] for n in _names(model, i)} for i in op.index]
        assert all(len(o) == 1 for o in owners), (op.labels, owners)
        assert len({next(iter(o)) for o in owners}) == len(owners), op.labels


def _names(model: nn.Module, idx: torch.Tensor) -> list[str]:
    sl = ck.parameter_slices(model)
    return [n for n, s in sl.items() if any(s.start <= int(i) < s.stop for i in idx)]


def test_a_full_rank_lowrank_operator_with_a_null_direction_is_singular():
    """Linear(2, 1) under MSE with 2 samples: the GGN has rank 2 of P = 3. With rank >= P the
    null direction is stored as Lanczos' rounding noise, +1e-17 in 9 of 20 seeds, which the
    exact check accepted: solve returned entries of 1e16 and logdet -36."""
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Linear(2, 1).to(DT)
        data = (torch.randn(2, 2, dtype=DT), torch.randn(2, 1, dtype=DT))
        op = ck.ggn(model, nn.MSELoss(), data, structure="lowrank", rank=3)
        with pytest.raises(ck.CurvkitValueError, match="singular"):
            op.solve(torch.ones(3, dtype=DT))
        assert_close(
            op.add_identity(0.1).logdet(),
            torch.logdet(op.to_dense() + 0.1 * torch.eye(3, dtype=DT)),
            what="damped",
        )


@pytest.mark.parametrize("structure", ["kron", "ekfac", "diag", "block", "lowrank"])
def test_scaled_structures_keep_their_algebra(structure):
    """alpha * A, A / alpha and -A of a structure are that structure (a temperature, a dataset
    size): logdet, solve and sampling work on them, and match their dense forms. They were a
    generic scaled operator, whose add_identity raised a bare AttributeError."""
    c = cases_mlp_ce_mean()
    op = ck.ggn(c.model, c.loss_fn, c.data, structure=structure, rank=5)
    D, eye = op.to_dense(), torch.eye(op.shape[0], dtype=DT)
    b = torch.linspace(-1, 1, op.shape[0], dtype=DT)
    for scaled, alpha in ((6.0 * op, 6.0), (op / 4, 0.25), (op * torch.tensor(2.0), 2.0)):
        assert type(scaled) is type(op)
        assert_close(scaled.to_dense(), alpha * D, what=f"{alpha} * A")
        P = scaled.add_identity(0.3)
        assert_close(P.logdet(), torch.logdet(alpha * D + 0.3 * eye), what="logdet")
        assert_close(P.solve(b), torch.linalg.solve(alpha * D + 0.3 * eye, b), what="solve")
    neg = (-op).add_identity(1.0)  # -A + I: positive definite only if ||A|| < 1
    assert_close(neg.to_dense(), eye - D, what="-A + I")
    if structure != "lowrank":  # its stored pairs: the top of A, the bottom of -A
        assert_close(
            neg.top_eigenpairs(2)[0], torch.linalg.eigvalsh(eye - D).flip(0)[:2], what="top"
        )


@pytest.mark.parametrize("structure", ["kron", "ekfac", "diag", "block", "lowrank"])
def test_damping_and_scale_given_as_tensors_carry_their_gradients(structure):
    """Marginal-likelihood tuning of a prior precision and a temperature differentiates
    logdet(A / T + exp(p) I) with respect to them: the 0-d tensors were taken as floats and the
    gradients silently missing (or 2-7x off where part of the expression stayed a tensor)."""
    c = cases_mlp_ce_mean()
    op = ck.ggn(c.model, c.loss_fn, c.data, structure=structure, rank=5)
    D, eye = op.to_dense(), torch.eye(op.shape[0], dtype=DT)
    b = torch.linspace(-1, 1, op.shape[0], dtype=DT)

    def value(log_prec, temp, dense):
        if dense:
            P = D / temp + log_prec.exp() * eye
            return torch.logdet(P) + b @ torch.linalg.solve(P, b)
        P = (op / temp).add_identity(log_prec.exp())
        return P.logdet() + b @ P.solve(b)

    grads = []
    for dense in (False, True):
        log_prec = torch.tensor(-0.5, dtype=DT, requires_grad=True)
        temp = torch.tensor(2.0, dtype=DT, requires_grad=True)
        grads.append(torch.autograd.grad(value(log_prec, temp, dense), (log_prec, temp)))
    for got, want, what in zip(grads[0], grads[1], ("d/d log precision", "d/d temperature")):
        assert_close(got, want, what=f"{structure} {what}")


@pytest.mark.parametrize("structure", ["kron", "block"])
def test_a_scaled_operator_damped_in_a_loop_decomposes_once(structure, monkeypatch):
    """(N * K).add_identity(delta) over a grid of delta (prior tuning) reused nothing: each
    damped copy ran eigh on its factors again."""
    import curvkit.operators.blocks as blocks

    c = cases_mlp_ce_mean()
    op = ck.ggn(c.model, c.loss_fn, c.data, structure=structure)
    calls = []
    real = blocks.eigh
    monkeypatch.setattr(blocks, "eigh", lambda M: calls.append(1) or real(M))
    D, eye = op.to_dense(), torch.eye(op.shape[0], dtype=DT)
    for alpha, delta in ((3.0, 0.1), (-1.0, 100.0), (0.5, 1.0)):
        got = (op * alpha).add_identity(delta).logdet()
        assert_close(got, torch.logdet(alpha * D + delta * eye), what=f"{alpha} A + {delta} I")
    first = len(calls)
    for delta in (0.2, 2.0):
        (op * 3.0).add_identity(delta).logdet()
    assert len(calls) == first > 0, (first, len(calls))
    # copies share the eigendecomposition, not their parents: a long chain is no recursion
    # (a RecursionError at 1500 steps) and keeps no intermediate alive
    chained, alpha, delta = op, 1.0, 0.0
    for _ in range(1500):
        chained = chained * 1.001 if structure == "kron" else chained.add_identity(1e-4)
        alpha, delta = (alpha * 1.001, delta) if structure == "kron" else (alpha, delta + 1e-4)
    got = chained.add_identity(1.0).logdet()
    assert_close(got, torch.logdet(alpha * D + (delta + 1.0) * eye), what="chain")


@pytest.mark.parametrize("method", ["eigenvalues", "top_eigenpairs"])
def test_operators_without_a_spectrum_say_how_to_get_one(method):
    c = cases_mlp_ce_mean()
    K = ck.ggn(c.model, c.loss_fn, c.data, structure="kron")
    for op in (K + K, 2 * ck.ggn(c.model, c.loss_fn, c.data, structure="operator")):
        args = (3,) if method == "top_eigenpairs" else ()
        with pytest.raises(ck.CurvkitTypeError, match="ck.top_eigenvalues"):
            getattr(op, method)(*args)


def test_operator_arithmetic_checks_its_operands():
    c = cases_mlp_ce_mean()
    K = ck.ggn(c.model, c.loss_fn, c.data, structure="kron")
    D = ck.ggn(c.model, c.loss_fn, c.data, structure="diag")
    S = K + D
    assert_close((K - D).to_dense(), K.to_dense() - D.to_dense(), what="K - D")
    assert_close(sum([K, D]).to_dense(), S.to_dense(), what="sum([K, D])")
    with pytest.raises(ck.CurvkitTypeError, match="only applies products"):
        S.logdet()
    with pytest.raises(ck.CurvkitTypeError, match="only applies products"):
        ck.ggn(c.model, c.loss_fn, c.data, structure="operator").add_identity(1.0)
    with pytest.raises(ck.CurvkitTypeError, match="apply them in turn"):
        K * D
    with pytest.raises(ck.CurvkitValueError, match="one finite real number"):
        K * torch.ones(K.shape[0])
    with pytest.raises(ck.CurvkitValueError, match="one finite real number"):
        K * float("nan")
    with pytest.raises(ck.CurvkitValueError, match="alpha is 0"):
        K / 0
    with pytest.raises(ck.CurvkitTypeError, match="add_identity"):
        K + 1.0
    K32 = ck.ggn(c.model.float(), c.loss_fn, (c.data[0].float(), c.data[1]), structure="kron")
    c.model.double()
    with pytest.raises(ck.CurvkitValueError, match="cannot be added"):
        K + K32


def test_block_diagonal_operator_checks_its_cover():
    """Built by hand, blocks over coordinates 0-2 of P = 5 gave a logdet of 2.08 for a singular
    matrix and 3 eigenvalues for a 5 x 5 operator."""
    from curvkit.operators.blocks import DiagBlock

    v = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    with pytest.raises(ck.CurvkitValueError, match=r"cover the coordinates 0\.\.4 exactly once"):
        ck.BlockDiagonalOperator([DiagBlock(v)], [torch.arange(3)], 5)
    with pytest.raises(ck.CurvkitValueError, match="exactly once"):
        ck.BlockDiagonalOperator(
            [DiagBlock(v), DiagBlock(v)], [torch.arange(3), torch.arange(3)], 6
        )
    with pytest.raises(ck.CurvkitValueError, match="has size 3 but index 0 names 2"):
        ck.BlockDiagonalOperator([DiagBlock(v)], [torch.arange(2)], 2)
    with pytest.raises(ck.CurvkitValueError, match="1-D integer"):
        ck.BlockDiagonalOperator([DiagBlock(v)], [torch.arange(3.0)], 3)
    op = ck.BlockDiagonalOperator([DiagBlock(v)], [torch.tensor([2, 0, 1], dtype=torch.int32)], 3)
    assert_close(op.to_dense(), torch.diag(torch.tensor([2.0, 4.0, 1.0], dtype=DT)), what="perm")
    # the engine skips the check for the covers it builds: they pass it
    from curvkit.operators.structured import _check_cover

    for name in ("layernorm_mlp", "conv3d_ce", "embedding_ce", "residual_ce"):
        c = case(name)
        for structure in ("kron", "ekfac", "diag", "block"):
            op = ck.ggn(c.model, c.loss_fn, c.data, structure=structure)
            _check_cover(op.blocks, op.index, op.shape[0])
            _check_cover(op.add_identity(1.0).blocks, op.index, op.shape[0])


def test_dense_forms_of_structures_check_memory_first():
    """A LowRankOperator of P = 2e6 (U: 16 MB) asked for its 32 TB dense form: a raw allocator
    error (or paging) before, a CurvkitMemoryError now."""
    from curvkit.operators.blocks import DiagBlock

    P = 2_000_000
    big = [
        ck.LowRankOperator(torch.zeros(P, 1, dtype=DT), torch.ones(1, dtype=DT)),
        ck.BlockDiagonalOperator([DiagBlock(torch.ones(P, dtype=DT))], [torch.arange(P)], P),
    ]
    for op in big + [2.0 * big[0], big[0] + big[0]]:
        with pytest.raises(ck.CurvkitMemoryError, match="needs 32.0 TB"):
            op.to_dense()


def test_indefinite_is_not_called_singular_at_large_sizes():
    """float32, 2e5 exact entries, one of them -0.01 of the largest: 'zero up to rounding' with
    a delta of 5e-7 that did not help (the band grew with the entry count)."""
    from curvkit.operators.blocks import DiagBlock

    v = torch.ones(200_000)
    v[7] = -0.01
    op = ck.BlockDiagonalOperator([DiagBlock(v)], [torch.arange(v.numel())], v.numel())
    with pytest.raises(ck.CurvkitValueError, match=r"indefinite.*delta > 0\.01"):
        op.logdet()


@pytest.mark.parametrize("n", [2, 5])
def test_prelu_per_sample_rows_are_exact(n):
    """torch's vmap of PReLU's weight gradient returns (N, K, N) rows that can broadcast: the
    GGN diagonal at PReLU's weight came out 0.0223 for 0.0138 (N = 2), and the EF's raised a
    raw shape error (N = 5). Such rows now go through the per-sample loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(n, 3, dtype=DT), torch.randint(0, 3, (n,))
    for fn in (ck.ggn, ck.ef):
        want = fn(model, nn.CrossEntropyLoss(), (x, y))
        for structure in ("diag", "block"):
            got = fn(model, nn.CrossEntropyLoss(), (x, y), structure=structure)
            assert_close(got.diagonal(), want.diagonal(), what=f"{fn.__name__} {structure}")
        op = fn(model, nn.CrossEntropyLoss(), (x, y), structure="operator")
        assert_close(op.diagonal(), want.diagonal(), what=f"{fn.__name__} operator diagonal")


def test_lowrank_fisher_is_the_same_draw_as_the_dense_one():
    """Lanczos drew its start vector from the generator before the first product drew the
    labels: with the same seed the low-rank Fisher (rank = P) was 0.15 off the dense one."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    data = (torch.randn(6, 3, dtype=DT), torch.randint(0, 3, (6,)))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    D = ck.fisher(model, nn.CrossEntropyLoss(), data, generator=g())
    L = ck.fisher(model, nn.CrossEntropyLoss(), data, generator=g(), structure="lowrank", rank=99)
    assert_close(L.to_dense(), D, rtol=1e-8, what="lowrank vs dense, same seed")


@pytest.mark.parametrize("structure", ["block", "kron"])
def test_a_parametrized_module_is_one_block(structure):
    """A parametrization's originals (2.parametrizations.weight.original0/1) were grouped apart
    from the module's bias: two blocks, the weight-bias terms dropped (0.59 off the module's
    exact block), labelled ParametrizationList."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(DT).eval()
    parametrizations.weight_norm(model[2])
    x, y = torch.randn(6, 3, dtype=DT), torch.randint(0, 4, (6,))
    ce = nn.CrossEntropyLoss()
    op = ck.ggn(model, ce, (x, y), params=model[2], structure=structure)
    assert op.labels == ["ParametrizedLinear '2' (exact dense block)"], op.labels
    assert_close(op.to_dense(), ck.ggn(model, ce, (x, y), params=model[2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("structure", ["kron", "ekfac", "block"])
def test_half_precision_structures_have_their_algebra(structure, dtype):
    """torch has no half eigh kernel: ekfac, and solve / logdet / eigenvalues of half blocks,
    raised a raw NotImplementedError. Their eigendecompositions run in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    ce = nn.CrossEntropyLoss()
    half = ck.ggn(model.to(dtype), ce, (x.to(dtype), y), structure=structure).add_identity(0.1)
    full = ck.ggn(model.float(), ce, (x, y), structure=structure).add_identity(0.1)
    b = torch.randn(full.shape[0])
    assert half.solve(b.to(dtype)).dtype == dtype
    tol = 0.05  # half precision: 3-4 significant digits, and eigenvectors of close pairs
    assert rel_error(half.solve(b.to(dtype)), full.solve(b)) < tol
    assert abs(float(half.logdet()) - float(full.logdet())) < tol * abs(float(full.logdet()))
    assert rel_error(half.eigenvalues().sort().values, full.eigenvalues().sort().values) < tol
