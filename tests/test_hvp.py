"""Hessian products on one batch: the hand R-operator through chains (``engine/hvp.py``) and the
kept autograd graph for everything else, both against the dense float64 ``torch.func`` Hessian;
the operator's gradient; and the start vector ``top_eigenvalues`` takes from it."""

from __future__ import annotations

import pytest
import torch
from cases import DT, Residual
from helpers import assert_close, ref_ggn, ref_hessian, total_loss_fn
from torch import nn
from torch.func import grad

import curvkit as ck
from curvkit.engine.hvp import _ChainHessian


class Twice(nn.Module):  # one layer called twice: its Hessian blocks couple across the calls
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(self.a(torch.tanh(self.a(x))))


class InPlaceBetween(nn.Module):  # an in-place op between two modules: not a chain
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        torch.nn.functional.relu(h, inplace=True)
        return self.b(h)


class TiedAutoencoder(nn.Module):  # the decoder's weight also used outside its module
    def __init__(self):
        super().__init__()
        self.dec = nn.Linear(3, 4)

    def forward(self, x):
        return self.dec(torch.tanh(x @ self.dec.weight))


class TransposedReuse(TiedAutoencoder):  # the weight escapes through ``.T``, a view
    def forward(self, x):
        return self.dec(torch.tanh(x @ self.dec.weight.T.T))


class ReadsShapes(nn.Module):  # a parent reading a weight's metadata: not a use of its values
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        w = self.net[0].weight
        if x.shape[-1] != w.shape[1] or x.dtype != w.dtype or w.device != x.device:
            raise ValueError("unexpected input")
        return self.net(x)


class OtherLeafUsesWeight(nn.Module):  # a head (a leaf) using layer a's weight, unregistered
    class Head(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = [lin]

        def forward(self, h):
            return h @ self.lin[0].weight

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.head = self.Head(self.a)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


class NoGradInside(nn.Module):  # a no_grad section: a constant to autograd, not to jvp
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            scale = h.norm(dim=1, keepdim=True)  # per sample
        return self.b(h / scale)


class PaddedEmbedding(nn.Module):  # the padding row is frozen in reverse mode, moved by jvp
    def __init__(self):
        super().__init__()
        self.e, self.l = nn.Embedding(6, 3, padding_idx=0), nn.Linear(3, 3)

    def forward(self, t):
        return self.l(torch.tanh(self.e(t)).sum(1))


def _hooked(which: int) -> nn.Module:  # a user's forward hook changes a module's output
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[which].register_forward_hook(lambda mod, args, out: 2.0 * out)
    return model


def _labels(n: int, c: int) -> torch.Tensor:
    return torch.randint(0, c, (n,))


def _cases():
    """name -> (model, (x, y), loss, params or None, takes the chain route)."""
    torch.manual_seed(0)
    out = {}
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    out["tanh_ce_mean"] = (mlp, (torch.randn(9, 4), _labels(9, 3)), nn.CrossEntropyLoss(), None, 1)
    mixed = nn.Sequential(
        nn.Flatten(),  # before the first layer: not part of the chain
        nn.Linear(6, 5),
        nn.Sigmoid(),
        nn.Dropout(0.4),  # eval mode: the identity
        nn.Linear(5, 4, bias=False),
        nn.LeakyReLU(0.2),
        nn.Identity(),
        nn.Linear(4, 2),
    )
    out["mixed_mse_sum"] = (
        mixed,
        (torch.randn(7, 2, 3), torch.randn(7, 2)),
        nn.MSELoss(reduction="sum"),
        None,
        1,
    )
    relu = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    out["relu_bce_logits"] = (
        relu,
        (torch.randn(8, 3), torch.randint(0, 2, (8, 1)).float()),
        nn.BCEWithLogitsLoss(),
        None,
        1,
    )
    sub = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, 3))
    out["param_subset"] = (  # a bias alone, then a weight alone; the last layer frozen
        sub,
        (torch.randn(6, 4), _labels(6, 3)),
        nn.CrossEntropyLoss(reduction="sum"),
        [sub[0].bias, sub[2].weight],
        1,
    )
    frozen = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    frozen[0].requires_grad_(False)
    ce = nn.CrossEntropyLoss()
    out["frozen_first"] = (frozen, (torch.randn(6, 4), _labels(6, 3)), ce, None, 1)
    out["residual"] = (Residual(), (torch.randn(6, 4), _labels(6, 3)), ce, None, 0)
    out["layer_twice"] = (Twice(), (torch.randn(6, 4), _labels(6, 3)), ce, None, 0)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    tied[2].weight = tied[0].weight  # one parameter, two layers
    out["tied_weight"] = (tied, (torch.randn(6, 4), _labels(6, 3)), ce, None, 0)
    emb = nn.Sequential(nn.Embedding(5, 4), nn.Tanh(), nn.Linear(4, 5))
    emb[2].weight = emb[0].weight  # tied with a module before the chain starts
    out["tied_embedding"] = (emb, (torch.randint(0, 5, (7,)), _labels(7, 5)), ce, None, 0)
    out["in_place_between"] = (InPlaceBetween(), (torch.randn(6, 4), _labels(6, 3)), ce, None, 0)
    out["functional_reuse"] = (
        TiedAutoencoder(),
        (torch.randn(6, 4), torch.randn(6, 4)),
        nn.MSELoss(),
        None,
        0,
    )
    out["transposed_reuse"] = (
        TransposedReuse(),
        (torch.randn(6, 4), torch.randn(6, 4)),
        nn.MSELoss(),
        None,
        0,
    )
    out["reads_shapes"] = (ReadsShapes(), (torch.randn(6, 4), _labels(6, 3)), ce, None, 1)
    sse = nn.MSELoss(reduction="sum")
    out["hook_on_layer"] = (_hooked(0), (torch.randn(5, 3), torch.randn(5, 2)), sse, None, 0)
    out["hook_on_activation"] = (_hooked(1), (torch.randn(5, 3), torch.randn(5, 2)), sse, None, 0)
    out["other_leaf_uses_weight"] = (
        OtherLeafUsesWeight(),
        (torch.randn(6, 3), _labels(6, 3)),
        nn.CrossEntropyLoss(reduction="sum"),
        None,
        0,
    )
    out["no_grad_inside"] = (NoGradInside(), (torch.randn(5, 3), torch.randn(5, 2)), sse, None, 0)
    tokens = torch.randint(1, 6, (6, 5))
    tokens[0, :2] = 0  # padding
    out["padded_embedding"] = (
        PaddedEmbedding(),
        (tokens, _labels(6, 3)),
        nn.CrossEntropyLoss(reduction="sum"),
        None,
        0,
    )
    out["many_classes"] = (  # N·C² beyond the activations: keep the graph, not Mₙ
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 40)),
        (torch.randn(5, 3), _labels(5, 40)),
        ce,
        None,
        0,
    )
    out["conv"] = (
        nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)),
        (torch.randn(5, 1, 10), _labels(5, 3)),
        nn.CrossEntropyLoss(),
        None,
        0,
    )
    out["custom_loss"] = (  # indefinite output Hessians, from autograd (no closed form)
        nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)),
        (torch.randn(6, 4), torch.randn(6, 2)),
        lambda o, y: torch.cos(o - y).sum(),
        None,
        1,
    )
    out["sequence"] = (  # (N, T, features) activations: left to the graph
        nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)),
        (torch.randn(5, 3, 3), torch.randn(5, 3, 2)),
        nn.MSELoss(),
        None,
        0,
    )
    return {
        k: (m.to(DT).eval(), tuple(t.to(DT) if t.is_floating_point() else t for t in d), *rest)
        for k, (m, d, *rest) in out.items()
    }


CASES = _cases()


def _loss_total(loss):
    return loss if not isinstance(loss, nn.Module) else (lambda o, y: loss(o, y))


@pytest.mark.parametrize("name", list(CASES))
def test_hessian_products_and_route(name):
    model, (x, y), loss, params, chain = CASES[name]
    H = ck.hessian(model, loss, (x, y), params=params, structure="operator")
    V = torch.randn(H.shape[0], 3, dtype=DT)
    ref = ref_hessian(model, _loss_total(loss), [(x, y)], params)
    assert_close(H @ V, ref @ V, what=f"{name}: H @ V")
    assert_close(H @ V[:, 1], ref @ V[:, 1], what=f"{name}: H @ v")
    took = isinstance(H.problem._kept[0][0], _ChainHessian)
    assert took == bool(chain), f"{name}: chain route taken: {took}"


SEEN_BY_EVERY_RULE = [
    "in_place_between",
    "functional_reuse",
    "transposed_reuse",
    "tied_embedding",
    "hook_on_layer",
    "hook_on_activation",
    "other_leaf_uses_weight",
    "no_grad_inside",
    "padded_embedding",
]


@pytest.mark.parametrize("name", SEEN_BY_EVERY_RULE)
def test_dense_hessian_sees_every_use_of_a_parameter(name):
    """The dense engine's per-layer rules see a weight only through its module; a parameter
    also used elsewhere, or an in-place change between modules, must leave them."""
    model, (x, y), loss, params, _ = CASES[name]
    got = ck.hessian(model, loss, (x, y), params=params)
    assert_close(got, ref_hessian(model, _loss_total(loss), [(x, y)], params), what=name)


@pytest.mark.parametrize("name", SEEN_BY_EVERY_RULE[-5:])
def test_every_structure_sees_what_autograd_sees(name):
    """The per-layer rules (ε trick, chains) know only a module's own ``forward``: a user's
    forward hook or a use of its weight inside another module must take them off. Forward-mode
    AD must not be used where torch's reverse-mode conventions differ (``no_grad`` inside
    forward, an embedding's ``padding_idx``)."""
    model, (x, y), loss, params, _ = CASES[name]
    ggn = ref_ggn(model, loss, 1.0, [(x, y)])
    hess = ref_hessian(model, loss, [(x, y)])
    for kind, ref in ((ck.ggn, ggn), (ck.hessian, hess)):
        got = kind(model, loss, (x, y), structure="diag", progress=False).diagonal()
        assert_close(got, ref.diagonal(), what=f"{name}: {kind.__name__} diagonal")
    assert_close(ck.ggn(model, loss, (x, y)), ggn, what=f"{name}: dense GGN")
    G = ck.ggn(model, loss, (x, y), structure="operator")
    V = torch.randn(G.shape[0], 2, dtype=DT)
    assert_close(G @ V, ggn @ V, what=f"{name}: GGN products")


def test_leaky_relu_slope_kept_in_float64():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(0.2), nn.Linear(5, 2)).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    loss = nn.MSELoss(reduction="sum")
    H = ck.hessian(model, loss, (x, y), structure="operator")
    V = torch.randn(H.shape[0], 2, dtype=DT)
    ref = ref_hessian(model, _loss_total(loss), [(x, y)])
    assert_close(H @ V, ref @ V, rtol=1e-13, what="LeakyReLU(0.2) H @ V")


@pytest.mark.parametrize("name", list(CASES))
def test_gradient(name):
    model, (x, y), loss, params, _ = CASES[name]
    total, theta0 = total_loss_fn(model, _loss_total(loss), [(x, y)], params)
    want = grad(total)(theta0)
    for kind in (ck.hessian, ck.ggn):  # kept graph (or chain route) and the plain pass
        got = kind(model, loss, (x, y), params=params, structure="operator").gradient()
        assert_close(got, want, what=f"{name}: {kind.__name__} operator's gradient")


@pytest.mark.parametrize("name", ["tanh_ce_mean", "residual"])
def test_products_over_batches_keep_each_batch(name):
    """Several batches: each keeps its own state (chain route or graph), a tight memory limit
    keeps none (fresh products), and all give the Hessian of the whole data."""
    model, (x, y), loss, params, chain = CASES[name]
    batches = [(x[:2], y[:2]), (x[2:5], y[2:5]), (x[5:], y[5:])]
    ref = ref_hessian(model, _loss_total(loss), [(x, y)], params)
    V = torch.randn(ref.shape[0], 2, dtype=DT)
    H = ck.hessian(model, loss, batches, params=params, structure="operator")
    assert_close(H @ V, ref @ V, what=f"{name}: H @ V over batches, kept")
    assert_close(H @ V, ref @ V, what=f"{name}: H @ V over batches, kept (second pass)")
    kept = H.problem._kept
    assert sorted(kept) == [0, 1, 2] and all(k is not None for k in kept.values())
    assert all(isinstance(k[0], _ChainHessian) == bool(chain) for k in kept.values())
    tight = ck.hessian(model, loss, batches, structure="operator")
    tight.problem._budget = 0  # no room to keep anything (the floor is 16 MB otherwise)
    assert_close(tight @ V, ref @ V, what=f"{name}: H @ V over batches, nothing kept")
    assert all(k is None for k in tight.problem._kept.values())


class Reshuffled:
    """A loader that splits the data differently on every pass."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        self.passes += 1
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.passes))
        x, y = self.x[order], self.y[order]
        return iter([(x[:4], y[:4]), (x[4:8], y[4:8])])


def test_kept_state_is_all_batches_or_none():
    """If only some batches fit the budget, a reshuffling loader would mix batches of the first
    pass with later ones: nothing is kept then, and every pass gives the same matrix."""
    model, (x, y), loss, _, _ = CASES["tanh_ce_mean"]
    x, y = x[:8], y[:8]
    ref = ref_hessian(model, _loss_total(loss), [(x, y)])
    one = ck.hessian(model, loss, (x[:4], y[:4]), structure="operator")
    one @ torch.randn(one.shape[0], dtype=DT)
    H = ck.hessian(model, loss, Reshuffled(x, y), structure="operator")
    H.problem._budget = one.problem._kept_bytes + 1  # room for one batch, not two
    for _ in range(3):
        v = torch.randn(H.shape[0], dtype=DT)
        assert_close(H @ v, ref @ v, what="reshuffled loader, budget for one batch")
    assert H.problem._kept == {} and H.problem._keep_none
    full = ck.hessian(model, loss, Reshuffled(x, y), structure="operator")  # room for all
    for _ in range(3):
        v = torch.randn(H.shape[0], dtype=DT)
        assert_close(full @ v, ref @ v, what="reshuffled loader, all batches kept")
    assert sorted(full.problem._kept) == [0, 1]


def test_gradient_over_batches_of_a_mean_loss():
    model, (x, y), loss, _, _ = CASES["tanh_ce_mean"]
    total, theta0 = total_loss_fn(model, _loss_total(loss), [(x, y)])
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    got = ck.hessian(model, loss, batches, structure="operator").gradient()
    assert_close(got, grad(total)(theta0), what="gradient of a mean over two batches")


def _sgd_step(model, x, y):
    with torch.no_grad():
        next(iter(model.parameters())).add_(1)


def _data_step(model, x, y):  # old-style manual SGD: .data leaves _version alone
    for p in model.parameters():
        p.data.add_(0.1)


def _data_rebind(model, x, y):
    p = next(iter(model.parameters()))
    p.data = p.data * 1.5


def _data_negate(model, x, y):  # a sign flip: a plain sum of the bits can miss it
    next(iter(model.parameters())).data.mul_(-1)


def _edit_targets(model, x, y):
    y[:2] = y[:2].flip(0) if y.is_floating_point() else (y[:2] + 1) % 2


@pytest.mark.parametrize(
    "change", [_sgd_step, _data_step, _data_negate, _data_rebind, _edit_targets]
)
@pytest.mark.parametrize("name", ["tanh_ce_mean", "residual"])  # chain route, kept graph
def test_a_change_makes_the_kept_products_fail_loudly(name, change):
    """Products and the gradient kept from the first pass must not answer for a model or a
    batch that changed since: edits through .data (no _version bump) and edited targets went
    through silently (the products matched neither the old nor the new Hessian)."""
    model, (x, y), loss, _, _ = CASES[name]
    model, x, y = __import__("copy").deepcopy((model, x, y))
    H = ck.hessian(model, loss, [(x[:3], y[:3]), (x[3:], y[3:])], structure="operator")
    v = torch.randn(H.shape[0], dtype=DT)
    H @ v
    change(model, x[:3], y[:3])
    with pytest.raises(ck.CurvkitValueError, match="changed after"):
        H @ v
    with pytest.raises(ck.CurvkitValueError, match="changed after"):
        H.gradient()


def test_lanczos_starts_from_the_gradient_for_the_hessian_only():
    model, (x, y), loss, _, _ = CASES["tanh_ce_mean"]
    H = ck.hessian(model, loss, (x, y), structure="operator")
    assert_close(H._start_direction(), H.gradient(), what="Hessian start direction")
    assert ck.ggn(model, loss, (x, y), structure="operator")._start_direction() is None
    assert (2.0 * H)._start_direction() is not None and (-1.0 * H)._start_direction() is None


def test_top_eigenvalues_takes_a_start_vector():
    A = torch.diag(torch.arange(1.0, 41.0, dtype=DT))
    v0 = torch.ones(40, dtype=DT)
    assert_close(ck.top_eigenvalues(A, k=3, tol=1e-10, v0=v0), [40.0, 39.0, 38.0], what="v0")
    for bad, msg in [(torch.ones(39), r"shape \(40,\)"), (torch.zeros(40), "nonzero")]:
        with pytest.raises(ck.CurvkitValueError, match=msg):
            ck.top_eigenvalues(A, k=3, v0=bad)


def test_a_loader_whose_data_changed_is_refused_and_a_reshuffled_one_is_not():
    """The kept state is per batch index of the first pass; a DataLoader collates fresh
    tensors every pass, so an edit of the dataset's tensors went unseen (the old Hessian came
    back, 1.7 off). The same samples in another order still give the same matrix."""
    model, (x, y), loss, _, _ = CASES["tanh_ce_mean"]
    x, y = x.clone(), y.clone()
    data = torch.utils.data.TensorDataset(x, y)
    fixed = torch.utils.data.DataLoader(data, batch_size=3)
    H = ck.hessian(model, loss, fixed, structure="operator")
    v = torch.randn(H.shape[0], dtype=DT)
    first = H @ v
    shuffled = ck.hessian(
        model,
        loss,
        torch.utils.data.DataLoader(
            data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(0)
        ),
        structure="operator",
    )
    assert_close(shuffled @ v, first, what="first pass")
    assert_close(shuffled @ v, first, what="another order, same samples")
    with torch.no_grad():
        x.mul_(-1)  # a sign flip
    with pytest.raises(ck.CurvkitValueError, match="data changed"):
        H @ v
    with pytest.raises(ck.CurvkitValueError, match="data changed"):
        H.gradient()


@pytest.mark.parametrize("change", ["flip", "repair", "swap_samples"])
@pytest.mark.parametrize("kind", ["ggn", "ef", "fisher"])
def test_a_loader_that_rearranges_within_samples_is_refused(kind, change):
    """The data print summed a hash per element: a flip within each sample (random flip
    augmentation) or targets re-paired with other inputs left it unchanged, and products of
    one operator differed by 0.5-1.1 between passes, silently. Samples in another order are
    the same data."""
    model, (x, y), loss, _, _ = CASES["tanh_ce_mean"]
    passes = []

    class Loader:
        def __iter__(self):
            passes.append(None)
            xs, ys = x, y
            if len(passes) > 1 and change == "flip":
                xs = x.flip(-1)
            elif len(passes) > 1 and change == "repair":
                ys = y.roll(1)
            elif len(passes) > 1:
                xs, ys = x.roll(1, 0), y.roll(1, 0)
            yield xs[:3], ys[:3]
            yield xs[3:], ys[3:]

    extra = {"generator": torch.Generator().manual_seed(0)} if kind == "fisher" else {}
    op = getattr(ck, kind)(model, loss, Loader(), structure="operator", **extra)
    v = torch.randn(op.shape[0], dtype=DT)
    op @ v
    if change == "swap_samples" and kind != "fisher":  # the Fisher's draws belong to rows
        op @ v
        return
    with pytest.raises(ck.CurvkitValueError, match="data changed|other data"):
        op @ v


def test_two_shared_inputs_swapped_between_passes_are_other_data():
    """Inputs the model takes whole (no batch dimension) counted by their hash plus their
    position, a sum: two of them swapped between passes left the print unchanged."""

    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, a, b):
            return self.lin(x * a + b)

    torch.manual_seed(0)
    model = TwoTables().to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    a, b = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)
    passes = []

    class Loader:
        def __iter__(self):
            passes.append(None)
            yield ((x, a, b) if len(passes) == 1 else (x, b, a)), y

    op = ck.ggn(model, nn.MSELoss(), Loader(), structure="operator")
    v = torch.randn(op.shape[0], dtype=DT)
    op @ v
    with pytest.raises(ck.CurvkitValueError, match="data changed"):
        op @ v


def test_every_query_of_a_stale_hessian_operator_is_refused():
    """Products refused after a change while diagonal(), to_dense() and trace() answered for
    the new model: one operator must be one matrix."""
    model, (x, y), loss, _, _ = CASES["tanh_ce_mean"]
    model = __import__("copy").deepcopy(model)
    H = ck.hessian(model, loss, (x, y), structure="operator")
    H @ torch.randn(H.shape[0], dtype=DT)
    _sgd_step(model, x, y)
    for query in (H.diagonal, H.to_dense, H.trace):
        with pytest.raises(ck.CurvkitValueError, match="changed after"):
            query()


def test_products_with_no_columns():
    model, (x, y), loss, _, _ = CASES["tanh_ce_mean"]
    for fn in (ck.hessian, ck.ggn, ck.ef, ck.fisher):
        op = fn(model, loss, (x, y), structure="operator")
        assert (op @ torch.empty(op.shape[0], 0, dtype=DT)).shape == (op.shape[0], 0)


def test_a_frozen_parameter_changed_in_place_also_stales_the_operator():
    """Only the chosen parameters are copied (a model's frozen part may be most of it); the
    others are watched by version, which an in-place step moves."""
    model, (x, y), loss, _, _ = CASES["tanh_ce_mean"]
    model = __import__("copy").deepcopy(model)
    first, *rest = list(model.parameters())
    H = ck.hessian(model, loss, (x, y), params=rest, structure="operator")
    H @ torch.randn(H.shape[0], dtype=DT)
    copied = (sum(p.numel() for p in rest) + x.numel() + y.numel()) * 8  # float64, int64
    assert [k[2].nbytes for k in H.problem._kept.values()] == [copied]
    with torch.no_grad():
        first.add_(1)
    with pytest.raises(ck.CurvkitValueError, match="changed after"):
        H @ torch.randn(H.shape[0], dtype=DT)


def _autograd_hessian(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """Row by row with torch.autograd: it honours no_grad sections, instance forwards and
    in-place edits exactly as the model runs."""
    ps = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model(x), y), ps, create_graph=True, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if d is None else d).reshape(-1) for p, d in zip(ps, g)])
    rows = []
    for i in range(flat.numel()):
        if not flat[i].requires_grad:
            rows.append(torch.zeros_like(flat))
            continue
        r = torch.autograd.grad(flat[i], ps, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if d is None else d).reshape(-1) for p, d in zip(ps, r)]
            )
        )
    return torch.stack(rows)


class _NoGradTrunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.h = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))

    def forward(self, x):
        with torch.no_grad():
            z = self.f(x)
        return self.h(z)


def _masked_head():
    torch.manual_seed(13)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT).eval()
    lin, mask = m[2], (torch.rand(2, 5) > 0.5).to(DT)
    lin.forward = lambda x: nn.functional.linear(
        x, lin.weight * mask, lin.bias
    )  # an instance's own
    return m


@pytest.mark.parametrize("which", ["no_grad_trunk", "instance_forward"])
def test_rules_stay_off_what_they_cannot_see(which):
    """A no_grad section inside forward(), or a Linear whose forward was replaced on the instance
    (a mask, an adapter): the hand-written chain rules see modules only. The operator's products
    were 0.05 (no_grad) and 0.77 (instance forward) off autograd, the dense Hessian 0.73 and the
    diagonal 0.17 off for the masked Linear, and the GGN's structured diagonal nonzero on a
    trunk whose dense GGN is 0."""
    torch.manual_seed(12)
    model = _NoGradTrunk().to(DT).eval() if which == "no_grad_trunk" else _masked_head()
    x, y = torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT)
    want = _autograd_hessian(model, nn.MSELoss(), x, y)
    op = ck.hessian(model, nn.MSELoss(), (x, y), structure="operator")
    assert_close(op @ torch.eye(want.shape[0], dtype=DT), want, what="operator products")
    assert_close(ck.hessian(model, nn.MSELoss(), (x, y)), want, what="dense")
    diag = ck.hessian(model, nn.MSELoss(), (x, y), structure="diag").diagonal()
    assert_close(diag, want.diagonal(), what="diag")
    G = ck.ggn(model, nn.MSELoss(), (x, y))
    for structure in ("diag", "kron"):
        D = ck.ggn(model, nn.MSELoss(), (x, y), structure=structure).diagonal()
        if structure == "diag":
            assert_close(D, G.diagonal(), what="ggn diag")
        else:  # where the GGN is zero (the no_grad trunk), so is its KFAC
            assert bool((D[G.diagonal() == 0] == 0).all())


def test_an_output_fn_that_edits_in_place_keeps_the_rules_off():
    """output_fn=lambda o: o.mul_(2): the rules took the output's derivatives at the edited
    output but propagated as if unscaled (3.0 off)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT).eval()
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    want = ck.hessian(model, nn.MSELoss(), (x, y), output_fn=lambda o: o * 2)
    op = ck.hessian(
        model, nn.MSELoss(), (x, y), structure="operator", output_fn=lambda o: o.mul_(2)
    )
    assert_close(op @ torch.eye(want.shape[0], dtype=DT), want, what="in-place output_fn")


def test_hessian_through_the_legacy_weight_norm_is_refused():
    """torch.nn.utils.weight_norm (the pre-hook version) goes through the same fused kernel as
    parametrizations.weight_norm, whose double backward is wrong (1.11 off)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    torch.nn.utils.weight_norm(model[0])
    data = (torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT))
    with pytest.raises(ck.CurvkitValueError, match="weight_norm.*ck.ggn"):
        ck.hessian(model, nn.MSELoss(), data)
    ck.ggn(model, nn.MSELoss(), data)  # first derivatives only: right
    ck.hessian(model, nn.MSELoss(), data, params=[model[2].weight])  # not through it


@pytest.mark.parametrize("params", ["all", "last"])
def test_a_hessian_operator_refuses_after_its_buffers_change(params):
    """BatchNorm statistics refreshed by a training-mode call after the first product: the
    operator answered, for neither the old model nor the new one (buffers were not watched;
    on the generic route an edited buffer raised autograd's raw in-place error)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    model.train()
    model(torch.randn(20, 4, dtype=DT))
    model.eval()
    batches = [(torch.randn(4, 4, dtype=DT), torch.randn(4, 3, dtype=DT))]
    chosen = None if params == "all" else list(model[3].parameters())
    op = ck.hessian(model, nn.MSELoss(), batches, structure="operator", params=chosen)
    v = torch.randn(op.shape[0], dtype=DT)
    op @ v
    model.train()
    with torch.no_grad():
        model(torch.randn(20, 4, dtype=DT) * 2 + 1)
    model.eval()
    with pytest.raises(ck.CurvkitValueError, match="buffers"):
        op @ v


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("data", ["loader", "one_batch"])
def test_an_operator_answers_every_pass_for_the_same_data(kind, data):
    """After the data changed, products were refused but diagonal() and to_dense() answered for
    the edited data. Any order of first use agrees with itself."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT).eval()
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    source = [(x[:4], y[:4]), (x[4:], y[4:])] if data == "loader" else (x, y)
    op = getattr(ck, kind)(model, nn.MSELoss(), source, structure="operator")
    d = op.diagonal()  # first use: a diagonal, then products and the dense form agree
    v = torch.randn(op.shape[0], dtype=DT)
    assert_close((op.to_dense() @ v), op @ v, what="dense vs products")
    assert_close(op.to_dense().diagonal(), d, what="diagonal")
    x.mul_(1.5)  # the batches are views of x: edited in place
    for use in (lambda: op @ v, op.diagonal, op.to_dense):
        with pytest.raises(ck.CurvkitValueError, match="changed"):
            use()
