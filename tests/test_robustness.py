"""Models and losses outside ``torch.func``'s comfort zone.

The contract takes "any nn.Module" and "any callable separable over samples". For pieces that
``torch.func`` cannot transform (a legacy ``autograd.Function`` without ``setup_context``, an op
without forward-mode AD such as ``huber_loss``), curvkit must either return the exact answer or
refuse with a ``CurvkitError`` that says what is wrong -- never leak a raw torch error. The truth
here is plain (loop-based, double-backward) ``torch.autograd``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import FlatModel, assert_close, ref_ef, ref_ggn, ref_hessian, rel_error
from torch import nn
from torch.func import jacrev

import curvkit as ck

DT = torch.float64


class LegacyTanh(torch.autograd.Function):
    """Old-style custom function: ``forward(ctx, ...)``, no ``setup_context``, no ``jvp``."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class LegacyFunctionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(LegacyTanh.apply(self.a(x)))


def huber_sum(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.huber_loss(out, target, reduction="sum", delta=0.5)


def _plain_hessian(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    fm = FlatModel(model)
    return torch.autograd.functional.hessian(lambda th: loss_fn(fm(th, x), y), fm.theta0)


def _exact_or_curvkit_error(model: nn.Module, loss_fn, x, y) -> None:
    try:
        result = ck.hessian(model, loss_fn, (x, y))
    except ck.CurvkitError as err:  # a clear refusal is acceptable
        assert len(str(err)) > 20, f"unhelpful message: {err!r}"
        return
    except Exception as err:  # the point is to report what leaked
        pytest.fail(f"raw {type(err).__name__} leaked instead of a CurvkitError: {str(err)[:300]}")
    assert_close(result, _plain_hessian(model, loss_fn, x, y), what="hessian")


def test_model_with_a_legacy_autograd_function():
    torch.manual_seed(0)
    model = LegacyFunctionModel().to(DT).eval()
    x, t = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    _exact_or_curvkit_error(model, nn.CrossEntropyLoss(), x, t)


@pytest.mark.parametrize(
    "loss_fn", [huber_sum, nn.HuberLoss(delta=0.5)], ids=["callable", "module"]
)
def test_loss_without_forward_mode_ad(loss_fn):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT).eval()
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    _exact_or_curvkit_error(model, loss_fn, x, y)


def test_monte_carlo_class_draws_follow_the_softmax():
    """The MC Fisher's sampler: class frequencies over 200k draws match p within 5 standard
    errors (fixed seed), including a class of probability 0 that must never be drawn."""
    from curvkit.losses import _categorical

    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05], dtype=torch.float64)
    n = 200_000
    y = _categorical(p.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(y, minlength=5).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert freq[1] == 0
    assert bool(((freq - p).abs() <= 5 * se + 1e-12).all()), (freq, p)


def test_monte_carlo_fisher_of_nll_draws_from_the_log_probabilities():
    """NLLLoss on log-softmax outputs is CrossEntropyLoss on the logits, so their MC Fishers
    (same seed, hence the same class draws) agree to rounding, and both approach the exact
    Fisher, the GGN of the cross-entropy (400 draws: about 5 % error here)."""
    torch.manual_seed(1)
    logits = nn.Linear(3, 4).to(DT)
    with torch.no_grad():
        logits.weight.mul_(4)  # a confident predictive, far from softmax(softmax(·))
    x, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, 2, 3, 1, 2])
    exact = ref_ggn(logits, lambda o, t: F.cross_entropy(o, t, reduction="sum"), 1 / 6, [(x, y)])
    log_probs = nn.Sequential(logits, nn.LogSoftmax(1))

    def mc(model, loss_fn):
        gen = torch.Generator().manual_seed(0)
        return ck.fisher(model, loss_fn, (x, y), mc_samples=400, generator=gen)

    f_nll = mc(log_probs, nn.NLLLoss())
    assert_close(f_nll, mc(logits, nn.CrossEntropyLoss()), what="NLL vs CE MC Fisher")
    assert rel_error(f_nll, exact) < 0.1


def test_monte_carlo_fisher_with_label_smoothing():
    """Label smoothing has no closed-form gradient here, and torch's loss does not run under
    vmap: ck.fisher raised vmap's raw error for every structure. It now approaches the model's
    Fisher, s Σₙ κ Σ_c pₙc ∇ℓₙ(c) ∇ℓₙ(c)ᵀ with the unsmoothed ℓ and κ = (1 − ε) + ε = 1,
    enumerated class by class: the GGN, whose curvature label smoothing leaves unchanged (the
    smoothed loss's own gradients at the draws averaged to 0.55 less)."""
    torch.manual_seed(2)
    model = nn.Linear(3, 4).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.tensor([0, 1, 2, 3, 1, 2])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    plain = nn.CrossEntropyLoss()
    params = list(model.parameters())
    exact = torch.zeros(16, 16, dtype=DT)
    for n in range(6):
        p = model(x[n : n + 1]).softmax(1)[0].detach()
        for c in range(4):
            g = torch.autograd.grad(plain(model(x[n : n + 1]), torch.tensor([c])), params)
            g = torch.cat([t.reshape(-1) for t in g])
            exact += p[c] * torch.outer(g, g) / 6
    gen = torch.Generator().manual_seed(0)
    fisher = lambda structure: ck.fisher(  # noqa: E731
        model, loss_fn, (x, y), mc_samples=2000, generator=gen, structure=structure
    )
    assert rel_error(exact, ck.ggn(model, loss_fn, (x, y))) < 1e-12
    assert rel_error(fisher("dense"), exact) < 0.1
    assert rel_error(fisher("diag").diagonal(), exact.diagonal()) < 0.1
    K = fisher("kron")  # KFAC is not the Fisher here; it must run and be a Fisher-sized PSD
    assert float(K.eigenvalues().min()) > -1e-12 and rel_error(K.trace(), exact.trace()) < 0.5


def test_mean_callable_is_caught_when_the_first_losses_are_zero():
    """A satisfied hinge gives ℓ = 0 on the first two samples, where sum and mean agree: the
    check passed a mean callable taken as a sum (the EF came out N times too small)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([5.0, 5.0], dtype=DT))
    x, t = torch.randn(6, 3, dtype=DT), torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0], dtype=DT)
    x[:2] = 0  # outputs (5, 5) with target +1: the hinge is satisfied, ℓ = 0

    def hinge_mean(o, t):
        return F.relu(1 - t[:, None] * o).mean()

    with pytest.raises(ck.CurvkitValueError, match="averages over samples"):
        ck.ef(model, hinge_mean, (x, t))
    ck.ef(model, hinge_mean, (x, t), reduction="mean")


def test_mean_callable_is_checked_on_the_first_batch_with_two_samples():
    """A callable that averages over samples, passed as a sum, must be refused even when the
    first batch has one sample (on which sum and mean agree); with reduction='mean' it gives
    the Hessian of the mean over all samples."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)

    def mean_loss(out, t):
        return (out - t).square().sum(1).mean()

    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    with pytest.raises(ck.CurvkitError, match="averages over samples"):
        ck.hessian(model, mean_loss, batches)
    result = ck.hessian(model, mean_loss, batches, reduction="mean")
    assert_close(result, ref_hessian(model, mean_loss, batches), what="hessian")


class _WeightedCE(nn.CrossEntropyLoss):
    """A subclass: curvkit takes it as a generic torch loss, whose mean is still weighted."""


def _mean_loss_cases():
    n, c = 7, 4
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, c, (n,), generator=gen)
    bits = torch.randint(0, 2, (n, c), generator=gen).to(DT)
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=DT)
    cases = [
        ("multilabel_soft_margin", nn.MultiLabelSoftMarginLoss(), 4, bits),
        ("soft_margin", nn.SoftMarginLoss(), 4, 2 * bits - 1),
        ("poisson_nll", nn.PoissonNLLLoss(), 4, torch.rand(n, c, generator=gen, dtype=DT)),
        ("kl_div_batchmean", nn.KLDivLoss(reduction="batchmean"), 4, bits.softmax(1)),
        ("ce_subclass", _WeightedCE(weight=weight, ignore_index=1), 4, labels),
    ]
    if hasattr(nn, "LinearCrossEntropyLoss"):
        lce = nn.LinearCrossEntropyLoss(5, c, weight=weight, ignore_index=1).to(DT)
        cases.append(("linear_ce", lce, 5, labels))
    return [pytest.param(*case, id=case[0]) for case in cases]


def _two_uneven_batches(width: int, y: torch.Tensor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, width)).to(DT)
    x = torch.randn(y.shape[0], 3, dtype=DT)
    return model, [(x[:3], y[:3]), (x[3:], y[3:])]


@pytest.mark.parametrize("name,loss_fn,width,y", _mean_loss_cases())
def test_torch_loss_means_divide_by_torchs_denominator(name, loss_fn, width, y):
    """reduction='mean' over two uneven batches is the module's mean over all samples: per
    sample for the multi-label losses (each ℓₙ averages over classes), per element, per sample
    for 'batchmean', by class weight for cross-entropy-like losses."""
    model, batches = _two_uneven_batches(width, y)
    result = ck.hessian(model, loss_fn, batches)
    assert_close(result, ref_hessian(model, loss_fn, batches), what=name)


@pytest.mark.parametrize(
    "loss_fn,y",
    [
        (nn.MultiLabelMarginLoss(), torch.tensor([[3, 0, -1, 1]] * 7)),  # -1 ends the labels
        (
            nn.MultiMarginLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=DT)),
            torch.arange(7) % 4,
        ),
    ],
    ids=["multilabel_margin", "multi_margin"],
)
def test_margin_loss_means_are_over_samples(loss_fn, y):
    """Margin losses have no second derivative in torch; their empirical Fisher shows the mean
    is over the 7 samples (each ℓₙ averages over the 4 classes), not over 28 elements."""
    model, batches = _two_uneven_batches(4, y)
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    expected = ref_ef(model, summed, 1 / 7, batches)
    assert_close(ck.ef(model, loss_fn, batches), expected, what=type(loss_fn).__name__)


def test_torch_loss_module_with_another_mean_is_refused():
    """A loss module outside torch whose mean is not over the targets' elements: refused, not
    scaled wrongly."""

    class SampleMeanMSE(nn.Module):
        reduction = "mean"

        def forward(self, out, t):
            per_sample = (out - t).square().sum(1)
            return per_sample.sum() if self.reduction == "sum" else per_sample.mean()

    model = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    with pytest.raises(ck.CurvkitError, match="divides its sum by 5 on this batch, not by the 10"):
        ck.ggn(model, SampleMeanMSE(), (x, y))


@pytest.mark.parametrize("structure", ["dense", "diag", "operator"])
@pytest.mark.parametrize("curvature", [ck.hessian, ck.ggn], ids=["hessian", "ggn"])
def test_loss_without_second_derivatives_is_refused_clearly(curvature, structure):
    """torch has no derivative of multi_margin_loss_backward: a CurvkitError naming the op and
    pointing to ck.ef, not torch's raw RuntimeError, whichever route computes the curvature."""
    model, batches = _two_uneven_batches(4, torch.arange(7) % 4)
    with pytest.raises(
        ck.CurvkitError, match=r"no derivative of aten::multi_margin_loss_backward.*ck\.ef"
    ):
        result = curvature(model, nn.MultiMarginLoss(), batches, structure=structure)
        if structure == "operator":
            result @ torch.ones(result.shape[1], dtype=DT)


# --------------------------------------------------------------------------------------------
# A layer input whose leading size equals N without being the sample dimension
# --------------------------------------------------------------------------------------------
class TableProjection(nn.Module):
    """A Linear applied to a learned (T, F) table broadcast over the batch: its input is not
    batched, but its leading size is T."""

    def __init__(self, T: int = 5, F: int = 3):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T, F))
        self.proj = nn.Linear(F, F)
        self.head = nn.Linear(F, 3)

    def forward(self, x):  # (N, T, F)
        return self.head(torch.tanh(x + self.proj(self.pos))).mean(1)


class SequenceFirst(nn.Module):
    """(N, T, F) transposed to (T, N, F) before a Linear: its leading size is T."""

    def __init__(self, F: int = 3):
        super().__init__()
        self.l1, self.l2 = nn.Linear(F, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.transpose(0, 1)))).mean(0)


@pytest.mark.parametrize("model_cls", [TableProjection, SequenceFirst])
def test_a_leading_size_equal_to_n_is_not_taken_for_samples(model_cls):
    """With T = N the rules read the table's (or the time axis') rows as samples: the dense
    GGN was 0.19 off, the dense Hessian 0.08 off, the GGN diagonal 0.97 off (T ≠ N was exact).
    A second probe on a smaller batch tells a sample dimension from one that only matches."""
    torch.manual_seed(3)
    model = model_cls().to(DT).eval()
    x, y = torch.randn(5, 5, 3, dtype=DT), torch.randint(0, 3, (5,))
    ce = nn.CrossEntropyLoss()
    G = ref_ggn(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), 1 / 5, [(x, y)])
    assert_close(ck.ggn(model, ce, (x, y)), G, what="dense GGN")
    ce_sum = lambda o, t: F.cross_entropy(o, t, reduction="sum") / 5  # noqa: E731
    assert_close(ck.hessian(model, ce, (x, y)), ref_hessian(model, ce_sum, [(x, y)]), what="H")
    D = ck.ggn(model, ce, (x, y), structure="diag")
    assert_close(D.diagonal(), G.diagonal(), what="GGN diagonal")
    B = ck.ggn(model, ce, (x, y), structure="block").to_dense()
    assert_close(B[B != 0], G[B != 0], what="GGN blocks")


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.rnn, self.fc = cell(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class ChecksItsInput(nn.Module):
    """Python control flow on values: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.l1, self.norm, self.l2 = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("non-finite input")
        return self.l2(torch.tanh(self.norm(self.l1(x))))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: Recurrent(nn.GRU), (5, 4, 3)),
        (lambda: Recurrent(nn.LSTM), (5, 4, 3)),
        (ChecksItsInput, (5, 3)),
    ],
    ids=["gru", "lstm", "control_flow"],
)
def test_modules_that_cannot_run_under_vmap_get_exact_structures(make, shape):
    """The per-sample rows of parameters without a rule ran the model under vmap over samples:
    recurrent layers and value-dependent control flow raised torch's raw errors for diag, block
    and kron. One sample at a time is exact."""
    torch.manual_seed(4)
    model = make().to(DT).eval()
    x, y = torch.randn(*shape, dtype=DT), torch.randint(0, 3, (5,))
    ce = nn.CrossEntropyLoss()
    # the references cannot vmap over samples either: per-sample Jacobians in a loop
    fm = FlatModel(model)
    G = torch.zeros(fm.num_params, fm.num_params, dtype=DT)
    EF = torch.zeros_like(G)
    for n in range(5):
        J = jacrev(lambda th, n=n: fm(th, x[n : n + 1])[0])(fm.theta0)  # (3, P)
        p = fm(fm.theta0, x[n : n + 1])[0].softmax(0).detach()
        g = J.T @ (p - F.one_hot(y[n], 3).to(DT))
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J / 5
        EF += torch.outer(g, g) / 5
    assert_close(ck.ggn(model, ce, (x, y), structure="diag").diagonal(), G.diagonal())
    B = ck.ggn(model, ce, (x, y), structure="block").to_dense()
    assert_close(B[B != 0], G[B != 0], what="blocks")
    E = ck.ef(model, ce, (x, y), structure="diag").diagonal()
    assert_close(E, EF.diagonal(), what="EF diagonal")


class UsesAWeightTwice(nn.Module):
    """l1's weight also reaches the output outside l1's call: an escape the probe must see."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)) + x @ self.l1.weight.T)


@pytest.mark.parametrize("structure", ["diag", "block", "kron"])
def test_a_smaller_last_batch_inherits_the_probe_findings(structure):
    """A batch that differs from a probed one only in its size reuses that probe's findings
    (escapes, reverse mode, the sample dimension) instead of probing again; the escape found
    on the first batch must still keep l1 off the rules on the last one."""
    torch.manual_seed(5)
    model = UsesAWeightTwice().to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    ce = nn.CrossEntropyLoss(reduction="sum")
    G = ref_ggn(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), 1.0, [(x, y)])
    op = ck.ggn(model, ce, batches, structure=structure)
    assert "'l1' (exact" in " ".join(op.labels), op.labels
    D = op.to_dense()
    if structure == "kron":
        i = torch.cat(
            [torch.arange(s.start, s.stop) for s in ck.parameter_slices(model).values()][:2]
        )
        D, G = D[i][:, i], G[i][:, i]
    mask = D != 0
    assert_close(D[mask], G[mask], what=f"{structure} over batches of 5 and 3")


def test_a_last_batch_as_small_as_the_sub_probe_probes_again():
    """Batches of 8 then 2 with a learned (2, F) table: the second batch took over the first's
    probe, whose sub-run on 2 samples had marked the table's layer batched, and at N = 2 the
    table's rows were read as samples (dense GGN 20 off on a scale of 80)."""
    torch.manual_seed(6)
    model = TableProjection(T=2).to(DT).eval()
    x, y = torch.randn(10, 2, 3, dtype=DT), torch.randint(0, 3, (10,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    G = ref_ggn(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), 1.0, [(x, y)])
    got = ck.ggn(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    assert_close(got, G, what="dense GGN over batches of 8 and 2")


# --------------------------------------------------------------------------------------------
# callables and loaders users pass (an adversarial review of input handling)
# --------------------------------------------------------------------------------------------
def _linear_mse():
    torch.manual_seed(3)
    model = nn.Linear(3, 2).to(DT)
    return model, torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("structure", ["dense", "diag"])
def test_mse_loss_mean_callable_matches_the_module(kind, structure):
    """`lambda o, t: F.mse_loss(o, t)` with reduction="mean", the README's pattern, raised
    torch's raw "ZeroTensors are immutable" from forward mode; reverse mode takes it."""
    model, x, y = _linear_mse()
    fn = getattr(ck, kind)
    got = fn(model, lambda o, t: F.mse_loss(o, t), (x, y), reduction="mean", structure=structure)
    want = fn(model, nn.MSELoss(), (x, y), structure=structure)
    if structure != "dense":
        got, want = got.to_dense(), want.to_dense()
    assert_close(got, want)


def test_a_mean_callable_over_one_sample_batches_is_caught():
    """With batches of one sample the sum-or-mean check had no pair to look at, and a mean
    callable taken as a sum gave an EF N× too large; it now pairs two batches' samples."""
    model, x, y = _linear_mse()
    batches = [(x[i : i + 1], y[i : i + 1]) for i in range(8)]
    with pytest.raises(ck.CurvkitValueError, match="averages over samples"):
        ck.ef(model, lambda o, t: ((o - t) ** 2).mean(), batches)
    got = ck.ef(model, lambda o, t: ((o - t) ** 2).mean(), batches, reduction="mean")
    assert_close(got, ck.ef(model, lambda o, t: ((o - t) ** 2).mean(), (x, y), reduction="mean"))


class _Redrawn:
    """A loader that draws other samples on every pass (shuffle=True with drop_last=True)."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def __iter__(self):
        self.passes += 1
        g = torch.Generator().manual_seed(self.passes)
        idx = torch.randperm(self.x.shape[0], generator=g)[:6]
        yield self.x[idx[:3]], self.y[idx[:3]]
        yield self.x[idx[3:]], self.y[idx[3:]]


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_a_ggn_operator_refuses_a_loader_that_draws_other_samples(kind):
    """Two products with the same vector differed by 22% and Lanczos ran on no fixed matrix;
    the Hessian and MC Fisher operators refused such a loader already."""
    model, x, y = _linear_mse()
    op = getattr(ck, kind)(model, nn.MSELoss(reduction="sum"), _Redrawn(x, y), structure="operator")
    v = torch.ones(op.shape[0], dtype=DT)
    op @ v
    with pytest.raises(ck.CurvkitValueError, match="data changed after this operator was built"):
        op @ v


class _Encoder(nn.Module):
    """nn.TransformerEncoderLayer: F.scaled_dot_product_attention's CPU kernel has no second
    derivative in torch (and no forward mode)."""

    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(7, 4)
        self.t = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.o = nn.Linear(4, 3)

    def forward(self, tokens):
        return self.o(self.t(self.e(tokens)).mean(1))


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_dense_ggn_and_ef_need_first_derivatives_only(kind):
    """The dense GGN and EF of a TransformerEncoderLayer were refused (their products take a
    double backward that torch lacks there); per-sample rows need first derivatives only."""
    torch.manual_seed(0)
    model = _Encoder().to(DT).eval()
    batches = [
        (torch.randint(0, 7, (3, 5)), torch.randint(0, 3, (3,))),
        (torch.randint(0, 7, (2, 5)), torch.randint(0, 3, (2,))),
    ]
    ce = lambda o, t: F.cross_entropy(o, t, reduction="sum")  # noqa: E731
    ref = {"ggn": ref_ggn, "ef": ref_ef}[kind](model, ce, 1.0, batches)
    got = getattr(ck, kind)(model, nn.CrossEntropyLoss(reduction="sum"), batches)
    assert_close(got, ref, what=f"{kind} dense")


# --------------------------------------------------------------------------------------------
# the new checks' false refusals and misses (a second adversarial review)
# --------------------------------------------------------------------------------------------
class _Bank(nn.Module):
    """Each sample attends over a shared memory bank (K, 4), passed as a second input."""

    def __init__(self):
        super().__init__()
        self.q, self.o = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, bank):
        return self.o((self.q(x) @ bank.T).softmax(-1) @ bank)


def test_a_shared_input_with_the_batchs_leading_size_is_not_a_coupling():
    """With K = N the bank looked batched, and slicing it made the samples look coupled."""
    torch.manual_seed(0)
    model = _Bank().to(DT)
    x, bank, y = (
        torch.randn(8, 4, dtype=DT),
        torch.randn(8, 4, dtype=DT),
        torch.randn(8, 2, dtype=DT),
    )
    mse = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    H = ck.hessian(model, mse, ((x, bank), y))
    flat = FlatModel(model)
    want = torch.func.hessian(lambda th: mse(flat(th, (x, bank)), y))(flat.theta0)
    assert_close(H, want)


class _Coupled(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.how = nn.Linear(3, 4), nn.Linear(4, 2), how

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h.cumsum(0)) if self.how == "cumsum" else self.b(h - h.mean(0)) + 1e4


@pytest.mark.parametrize("how", ["cumsum", "offset"])
def test_one_way_and_offset_couplings_are_caught(how):
    """h.cumsum(0): the first samples never see the rest (the check ran on the first ones);
    a coupling under an output offset of 1e4 hid below a tolerance of 1e-3 of the scale."""
    torch.manual_seed(0)
    model = _Coupled(how).to(DT)
    x, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT)
    with pytest.raises(ck.CurvkitValueError, match="depends on the other samples"):
        ck.ggn(model, nn.MSELoss(reduction="sum"), (x, y))


@pytest.mark.parametrize("flag", ["sparse", "scale_grad_by_freq"])
def test_embedding_flags_are_fine_on_a_frozen_embedding(flag):
    """The flags change the embedding weight's gradient only: refused when that weight is
    chosen (tests/test_errors.py), exact when it is frozen or not chosen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3, **{flag: True}), nn.Flatten(), nn.Linear(6, 2)).to(DT)
    model[0].weight.requires_grad_(False)
    x, y = torch.randint(0, 5, (7, 2)), torch.randint(0, 2, (7,))
    ce = lambda o, t: F.cross_entropy(o, t, reduction="sum")  # noqa: E731
    got = ck.ggn(model, nn.CrossEntropyLoss(reduction="sum"), (x, y))
    assert_close(got, ref_ggn(model, ce, 1.0, [(x, y)], [model[2].weight, model[2].bias]))


def test_separable_broadcasting_of_targets_is_accepted_cross_sample_is_not():
    """(N, 1) outputs against (N, 4) targets (four measurements per sample) broadcast within a
    sample: separable, and exact. (N,) integer targets against (N, 1) outputs broadcast across
    samples: refused like float ones (int counts for PoissonNLLLoss were accepted, 5× off)."""
    model, x, _ = _linear_mse()
    model = nn.Linear(3, 1).to(DT)
    y4 = torch.randn(8, 4, dtype=DT)
    got = ck.hessian(model, nn.HuberLoss(reduction="sum"), (x, y4))
    want = ck.hessian(model, lambda o, t: F.huber_loss(o.expand_as(t), t, reduction="sum"), (x, y4))
    assert_close(got, want)
    with pytest.raises(ck.CurvkitValueError, match="broadcasts to"):
        ck.hessian(model, nn.PoissonNLLLoss(reduction="sum"), (x, torch.randint(0, 5, (8,))))


def test_well_damped_float32_diagonal_is_invertible():
    """Raw-pixel inputs make a float32 diagonal's largest entry 8e5; damped by 1e-3 it was
    refused as 'singular to rounding', though a diagonal's entries are computed exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    x, y = torch.rand(256, 64) * 255, torch.randint(0, 10, (256,))
    D = ck.ggn(model, nn.CrossEntropyLoss(reduction="sum"), (x, y), structure="diag")
    P = D.add_identity(1e-3)
    b = torch.ones(P.shape[0])
    assert_close(P.solve(b), b / P.diagonal(), rtol=1e-6)


class _Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1)
        self.out = nn.Linear(8, 2)

    def forward(self, x, pad):
        return self.out(self.enc(self.inp(x), src_key_padding_mask=pad).mean(1))


def test_transformer_encoder_with_a_padding_mask_takes_autograds_path():
    """Under no_grad torch's fast path returns 0 at padded positions where the function
    autograd differentiates has values; outputs and per-sample rows disagreed, and it was
    refused."""
    torch.manual_seed(0)
    model = _Padded().to(DT).eval()
    x, pad = torch.randn(4, 5, 3, dtype=DT), torch.zeros(4, 5, dtype=torch.bool)
    pad[:, 3:] = True
    y = torch.randn(4, 2, dtype=DT)
    got = ck.ggn(model, nn.MSELoss(reduction="sum"), ((x, pad), y))
    flat = FlatModel(model)  # the reference loops: torch's mask check cannot run under vmap
    rows = [
        torch.autograd.functional.jacobian(
            lambda th, i=i: flat(th, (x[i : i + 1], pad[i : i + 1])), flat.theta0
        )
        for i in range(4)
    ]
    J = torch.cat([r.reshape(2, -1) for r in rows])
    assert_close(got, 2 * J.T @ J)


def test_one_sample_batches_of_varying_length_still_pair():
    """Variable-length sequences, batch_size=1: consecutive batches rarely share a shape, and
    the pairing only tried the previous one."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(DT)
    batches = [
        (torch.randn(1, L, 3, dtype=DT), torch.randn(1, L, 2, dtype=DT)) for L in (3, 5, 3, 5, 2)
    ]
    with pytest.raises(ck.CurvkitValueError, match="averages over samples"):
        ck.ef(model, lambda o, t: ((o - t) ** 2).sum(-1).mean(), batches)


def test_a_fisher_draw_is_the_same_whichever_route_computes_it():
    """The first-derivative route reran after a failed attempt had drawn labels from the
    generator: the dense and block Fishers of one seed differed by 53%."""
    torch.manual_seed(0)
    model = _Padded().to(DT).eval()
    x, pad = torch.randn(4, 5, 3, dtype=DT), torch.zeros(4, 5, dtype=torch.bool)
    y = torch.randint(0, 2, (4,))
    ce = nn.CrossEntropyLoss(reduction="sum")
    fisher = lambda s: ck.fisher(  # noqa: E731
        model, ce, ((x, pad), y), structure=s, generator=torch.Generator().manual_seed(3)
    )
    assert_close(fisher("dense").diagonal(), fisher("block").diagonal())


def _linear_classifier(n: int = 4, c: int = 3):
    torch.manual_seed(0)
    return nn.Linear(2, c).to(DT).eval(), torch.randn(n, 2, dtype=DT)


@pytest.mark.parametrize(
    "loss_fn,y",
    [
        (
            nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 5.0], dtype=DT), reduction="sum"),
            torch.tensor([0, 1, 2, 1]),
        ),
        (nn.CrossEntropyLoss(ignore_index=1, reduction="sum"), torch.tensor([0, 1, 2, 1])),
        (
            nn.CrossEntropyLoss(
                weight=torch.tensor([0.2, 1.0, 5.0], dtype=DT), label_smoothing=0.2
            ),
            torch.tensor([0, 1, 2, 1]),
        ),
        (
            nn.BCEWithLogitsLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT), reduction="sum"),
            torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=DT),
        ),
    ],
    ids=["ce_weight", "ce_ignore_real_class", "ce_weight_label_smoothing", "bce_logits_weight"],
)
def test_mc_fisher_of_weighted_losses_averages_to_the_ggn(loss_fn, y):
    """Each draw weighted by its own target's weight, as in the GGN. The loss's gradient at the
    draw carried the drawn class's weight (w of the draw, squared: 9.5x off for CE, w^2 for BCE)
    and dropped draws equal to a real ignore_index class."""
    model, x = _linear_classifier()
    G = ck.ggn(model, loss_fn, (x, y))
    Fm = ck.fisher(
        model, loss_fn, (x, y), mc_samples=3000, generator=torch.Generator().manual_seed(0)
    )
    assert rel_error(Fm, G) < 0.08, rel_error(Fm, G)  # the flaws: 0.3 to 9x


@pytest.mark.parametrize("mc_samples", [1, 3])
def test_cross_entropy_fisher_draws_from_one_softmax_equal_the_general_path(mc_samples):
    """The plain cross-entropy's draws (p - e_y from one softmax, zero at ignored targets) are
    those of the general path, draw for draw, from the same generator state."""
    from curvkit.losses import CrossEntropy, Loss

    torch.manual_seed(0)
    out, y = torch.randn(40, 6, dtype=DT), torch.randint(0, 6, (40,))
    y[[2, 7]] = -100
    loss = CrossEntropy(nn.CrossEntropyLoss())
    fast = loss.fisher_factors(out, y, mc_samples, torch.Generator().manual_seed(5))
    general = Loss.fisher_factors(loss, out, y, mc_samples, torch.Generator().manual_seed(5))
    assert fast.shape == (40, 6, mc_samples)
    assert_close(fast, general, rtol=1e-14)
    assert not fast[[2, 7]].any() and fast.abs().sum() > 0


def test_nll_fisher_draws_are_the_gradients_at_the_draw():
    """NLLLoss subclasses the cross-entropy but its gradient w.r.t. the log-probabilities at a
    draw is -e_y, not p - e_y: it must not take the cross-entropy's one-softmax draws
    (0.42 off)."""
    from curvkit.losses import as_loss

    torch.manual_seed(0)
    out = torch.randn(40, 6, dtype=DT).log_softmax(1)
    cols = as_loss(nn.NLLLoss(), "mean").fisher_factors(
        out, torch.randint(0, 6, (40,)), 1, torch.Generator().manual_seed(5)
    )[:, :, 0]
    assert ((cols == 0) | (cols == -1)).all() and (cols.sum(1) == -1).all()


def test_callable_mean_over_part_of_the_samples_is_refused_on_a_loader():
    """F.cross_entropy's default mean skips ignored targets: a mean, but not over samples. The
    first batch's pair passed the check and the batches were weighted by N_b / N (22% off)."""
    model, x = _linear_classifier(6)
    y = torch.tensor([0, 2, -100, 1, -100, 2])
    fn = lambda o, t: F.cross_entropy(o, t)  # noqa: E731
    want = ck.ggn(model, nn.CrossEntropyLoss(), (x, y))
    assert_close(ck.ggn(model, fn, (x, y), reduction="mean"), want, what="one batch: exact")
    with pytest.raises(ck.CurvkitValueError, match="not a mean over samples"):
        ck.ggn(model, fn, [(x[:2], y[:2]), (x[2:], y[2:])], reduction="mean")
    # an ignored target first: its own value is NaN (a mean over nothing), which left the
    # batch unchecked and passed a loader 13% off
    y0 = y.roll(-2)  # [-100, 1, -100, 2, 0, 2]
    want = ck.ggn(model, nn.CrossEntropyLoss(), (x, y0))
    assert_close(ck.ggn(model, fn, (x, y0), reduction="mean"), want, what="one batch: exact")
    with pytest.raises(ck.CurvkitValueError, match="a mean over nothing"):
        ck.ggn(model, fn, [(x[:3], y0[:3]), (x[3:], y0[3:])], reduction="mean")


def test_loss_weights_are_checked_against_the_output():
    model, x = _linear_classifier()
    y = torch.tensor([0, 1, 2, 1])
    for w, match in [
        (torch.ones(4, dtype=DT), r"weight has shape \(4,\).*needs shape \(3,\)"),
        (torch.ones(3), "weight is torch.float32"),
    ]:
        for fn in (ck.ggn, ck.ef, ck.hessian):
            with pytest.raises(ck.CurvkitValueError, match=match):
                fn(model, nn.CrossEntropyLoss(weight=w), (x, y))
    yb = torch.rand(4, 3, dtype=DT)
    w32 = torch.tensor([2.0, 0.5, 1.0])  # torch type-promotes elementwise weights: accepted
    for loss in (nn.BCEWithLogitsLoss(pos_weight=w32), nn.BCEWithLogitsLoss(weight=w32)):
        want = type(loss)(
            **{k: w32.double() for k in ("weight", "pos_weight") if getattr(loss, k) is not None}
        )
        assert_close(ck.ggn(model, loss, (x, yb)), ck.ggn(model, want, (x, yb)), what="f32 weight")
    bce = nn.BCEWithLogitsLoss(weight=torch.rand(4, 3, dtype=DT))  # per sample of all the data
    ck.ggn(model, bce, (x, yb))  # one batch: it fits
    with pytest.raises(ck.CurvkitValueError, match="does not follow a loader's batches"):
        ck.ggn(model, bce, [(x[:2], yb[:2]), (x[2:], yb[2:])])


def test_ggn_of_nll_on_log_probabilities_warns_that_it_is_zero():
    model, x = _linear_classifier()
    net = nn.Sequential(model, nn.LogSoftmax(dim=1))
    y = torch.tensor([0, 1, 2, 1])
    with pytest.warns(ck.CurvkitWarning, match="GGN of NLLLoss is zero"):
        G = ck.ggn(net, nn.NLLLoss(), (x, y))
    assert not bool(G.any())
    with pytest.warns(ck.CurvkitWarning, match="GGN of NLLLoss is zero"):
        ck.ggn(net, nn.NLLLoss(), (x, y), structure="kron")


def test_mean_over_targets_broadcast_within_a_sample_uses_torchs_denominator():
    """Huber on (N, 3) outputs against (N, 1) targets: torch's mean divides by 3N; the check
    refused it ("cannot tell what its mean averages over")."""
    model, x = _linear_classifier(6)
    y = torch.randn(6, 1, dtype=DT)
    with pytest.warns(UserWarning):  # torch's own broadcasting warning
        mean = ck.ggn(model, nn.HuberLoss(), [(x[:2], y[:2]), (x[2:], y[2:])])
        total = ck.ggn(model, nn.HuberLoss(reduction="sum"), (x, y))
    assert_close(mean, total / 18, what="mean = sum / 3N")


class _Scaled(nn.Module):
    """A learned scalar (a 0-dim parameter, like CLIP's logit_scale) after a Linear layer."""

    def __init__(self):
        super().__init__()
        self.fc, self.scale = nn.Linear(3, 2), nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef"])
@pytest.mark.parametrize("structure", ["dense", "operator", "diag", "block", "lowrank"])
def test_a_zero_dim_parameter_is_one_coordinate(kind, structure):
    """Products split a flat vector into parameter shapes: reshape(*()) raised a raw TypeError
    for a 0-dim parameter (dense, operator, the Hessian diagonal)."""
    torch.manual_seed(0)
    model = _Scaled().to(DT).eval()
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    mse = nn.MSELoss(reduction="sum")
    sample = lambda o, t: ((o - t) ** 2).sum()  # noqa: E731
    want = {
        "hessian": lambda p: ref_hessian(model, mse, [(x, y)], p),
        "ggn": lambda p: ref_ggn(model, sample, 1.0, [(x, y)], p),
        "ef": lambda p: ref_ef(model, sample, 1.0, [(x, y)], p),
    }[kind]
    for params in (None, [model.scale]):
        got = getattr(ck, kind)(model, mse, (x, y), structure=structure, params=params)
        got = got if isinstance(got, torch.Tensor) else got.to_dense()
        ref = want(params)
        if structure == "diag":
            ref = torch.diag(ref.diagonal())
        elif structure == "block":  # one block per module: the root's scalar (first), fc's
            ref = ref.clone()
            if params is None:
                ref[1:, 0] = ref[0, 1:] = 0
        assert_close(got, ref, rtol=1e-9, what=f"{kind} {structure} params={params}")


class _EmptyHead(nn.Module):
    """An empty head (Linear(2, 0)) and a bare zero-element parameter beside a Linear layer."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(3, 2), nn.Linear(2, 0)
        self.empty = nn.Parameter(torch.zeros(0, 3))

    def forward(self, x):
        h = self.body(x)
        return h + self.head(h).sum(1, keepdim=True) + (x @ self.empty.T).sum()


@pytest.mark.parametrize("structure", ["dense", "operator", "diag", "block", "kron"])
def test_parameters_without_elements_have_no_coordinates(structure):
    """vmap rejected the empty head's tensors (even the dense GGN raised an AssertionError) and
    the structured diagonal a max() over nothing."""
    torch.manual_seed(0)
    model = _EmptyHead().to(DT).eval()
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    mse = nn.MSELoss(reduction="sum")
    got = ck.ggn(model, mse, (x, y), structure=structure)
    got = got if isinstance(got, torch.Tensor) else got.to_dense()
    want = ref_ggn(
        model, lambda o, t: ((o - t) ** 2).sum(), 1.0, [(x, y)], list(model.body.parameters())
    )
    if structure == "diag":
        want = torch.diag(want.diagonal())
    assert_close(got, want, rtol=1e-10)
    with pytest.raises(ck.CurvkitValueError, match="no elements"):
        ck.ggn(model, mse, (x, y), params=[model.empty, model.head.weight])
    slices = ck.parameter_slices(model)  # every parameter named, the empty ones empty
    assert slices == {
        "empty": slice(0, 0),  # the module's own parameters come first
        "body.weight": slice(0, 6),
        "body.bias": slice(6, 8),
        "head.weight": slice(8, 8),
        "head.bias": slice(8, 8),
    }
