"""curvkit's dense curvatures and operators against the float64 references in ``helpers.py``."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from cases import CASES, MULTI_BATCH_CASES, Case
from helpers import (
    assert_close,
    concat_batches,
    finite_difference_hessian,
    per_sample_jacobians,
    ref_ef,
    ref_ggn,
    ref_hessian,
    rel_error,
    total_loss_fn,
)

import curvkit as ck

KINDS = ("hessian", "ggn", "ef")
CASE_NAMES = list(CASES)
OPERATOR_CASES = (
    "sigmoid_mean_callable",
    "mlp_ce_mean",
    "bn_pool_dropout_ce",
    "tied_embedding_ce",
    "attention_ce",
    "dict_inputs_ce_sum",
    "mse_mean_param_subset",
    "gaussian_nll_callable",
    "batches_ce_mean",
    "dataloader_mse_mean",
)


@functools.cache
def case(name: str) -> Case:
    return CASES[name]()


@functools.cache
def reference(name: str, kind: str) -> torch.Tensor:
    c = case(name)
    if kind == "hessian":
        return ref_hessian(c.model, c.loss_fn, c.batches, c.params, output_fn=c.output_fn)
    ref = {"ggn": ref_ggn, "ef": ref_ef}[kind]
    return ref(c.model, c.sample_loss, c.scale, c.batches, c.params, output_fn=c.output_fn)


def _vectors(p: int, k: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (p,) if k is None else (p, k)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_dense_matches_reference(name, kind):
    c = case(name)
    result = c.run(getattr(ck, kind), structure="dense")
    assert isinstance(result, torch.Tensor), f"expected a torch.Tensor, got {type(result)}"
    assert tuple(result.shape) == (c.num_params, c.num_params)
    assert result.dtype == torch.float64, f"float64 model gave a {result.dtype} {kind}"
    assert_close(result, reference(name, kind), what=f"{name} {kind}")
    assert_close(result, result.T, rtol=1e-10, what=f"{name} {kind} symmetry")


@pytest.mark.parametrize("kind", KINDS)
def test_default_structure_is_dense(kind):
    c = case("cnn_ce")
    assert_close(c.run(getattr(ck, kind)), reference("cnn_ce", kind), what=kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MULTI_BATCH_CASES)
def test_several_batches_equal_one_concatenated_batch(name, kind):
    c = case(name)
    fn = getattr(ck, kind)
    on_batches = c.run(fn)
    on_one = fn(c.model, c.loss_fn, concat_batches(c.batches), params=c.params, **c.kwargs)
    assert_close(on_batches, on_one, what=f"{name} {kind}: batches vs concatenated")


def test_sum_reduction_is_additive_over_batches():
    c = case("batches_ce_sum")
    parts = [ck.hessian(c.model, c.loss_fn, b) for b in c.batches]
    assert_close(ck.hessian(c.model, c.loss_fn, c.batches), sum(parts))


def test_ggn_equals_hessian_for_a_model_linear_in_its_parameters():
    c = case("frozen_first_layer_ce")
    assert_close(c.run(ck.ggn), c.run(ck.hessian))


def test_frozen_parameters_are_excluded():
    c = case("frozen_first_layer_ce")
    trainable = sum(p.numel() for p in c.model[2].parameters())
    assert trainable == 18
    for kind in KINDS:
        assert tuple(c.run(getattr(ck, kind)).shape) == (trainable, trainable), kind


def test_params_may_be_any_iterable():
    c = case("mse_mean_param_subset")
    as_generator = (p for p in c.params)
    h = ck.hessian(c.model, c.loss_fn, c.data, params=as_generator)
    assert_close(h, reference("mse_mean_param_subset", "hessian"))


def test_float32_model_is_close_to_float64_reference():
    c = case("mlp_ce_mean")
    model32 = copy.deepcopy(c.model).float()
    x, t = c.data
    for kind in KINDS:
        result = getattr(ck, kind)(model32, c.loss_fn, (x.float(), t))
        assert_close(result, reference("mlp_ce_mean", kind), rtol=1e-4, what=f"float32 {kind}")


def test_call_leaves_the_model_untouched():
    c = CASES["attention_ce"]()  # a fresh copy: this test must not depend on call order
    before = {n: p.detach().clone() for n, p in c.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in c.model.named_parameters()}
    for kind in KINDS:
        c.run(getattr(ck, kind))
    c.run(ck.hessian, structure="operator") @ _vectors(c.num_params)
    assert not c.model.training
    for n, p in c.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed"
        assert p.requires_grad == flags[n], f"{n}.requires_grad changed"
        assert p.grad is None, f"{n}.grad was left populated"


# --------------------------------------------------------------------------------------------
# finite differences (independent of any autodiff second derivative)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sigmoid_mean_callable", "sigmoid_bce", "mlp_ce_mean"])
def test_hessian_matches_central_finite_differences(name):
    c = case(name)
    total, theta0 = total_loss_fn(c.model, c.loss_fn, c.batches, c.params, output_fn=c.output_fn)
    h_fd = finite_difference_hessian(total, theta0, step=1e-5)
    assert_close(reference(name, "hessian"), h_fd, rtol=1e-6, what="reference vs FD")
    assert_close(c.run(ck.hessian), h_fd, rtol=1e-6, what=f"{name} curvkit vs FD")


# --------------------------------------------------------------------------------------------
# matrix-free operator
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", OPERATOR_CASES)
def test_operator_matches_reference(name, kind):
    c = case(name)
    ref = reference(name, kind)
    p = ref.shape[0]
    op = c.run(getattr(ck, kind), structure="operator")
    assert tuple(op.shape) == (p, p)
    v, mat = _vectors(p), _vectors(p, 3, seed=2)
    assert_close(op @ v, ref @ v, what=f"{name} {kind} op @ v")
    assert_close(op @ mat, ref @ mat, what=f"{name} {kind} op @ V")
    assert_close(op.to_dense(), ref, what=f"{name} {kind} to_dense")
    assert_close(op.diagonal(), torch.diagonal(ref), what=f"{name} {kind} diagonal")
    assert_close(op.trace(), torch.trace(ref), what=f"{name} {kind} trace")


def test_operator_to_scipy():
    c = case("attention_ce")
    ref = reference("attention_ce", "ggn").numpy()
    p = ref.shape[0]
    lin = c.run(ck.ggn, structure="operator").to_scipy()
    assert isinstance(lin, spla.LinearOperator)
    assert tuple(lin.shape) == (p, p)
    rng = np.random.default_rng(0)
    v, mat = rng.standard_normal(p), rng.standard_normal((p, 3))
    assert_close(lin @ v, ref @ v, what="scipy matvec")
    assert_close(lin.matmat(mat), ref @ mat, what="scipy matmat")
    top = spla.eigsh(lin, k=1, which="LA", return_eigenvectors=False)
    assert_close(top, np.linalg.eigvalsh(ref)[-1:], rtol=1e-6, what="largest eigenvalue")


# --------------------------------------------------------------------------------------------
# Monte-Carlo Fisher
# --------------------------------------------------------------------------------------------
def _ce_fisher_expected_sq_error(c: Case, mc_samples: int) -> float:
    """``E ||F_mc - GGN||_F^2`` for CE with ``mc_samples`` independent draws per sample.

    With ``u_y = softmax(f_n) - e_y`` (the CE gradient w.r.t. the logits when ``y`` is drawn from
    the model), ``F_mc = s * sum_n (1/M) sum_m J_n^T u u^T J_n`` is unbiased for the GGN and
    ``E||F_mc - GGN||^2 = s^2/M * sum_n sum_y p_ny ||J_n^T u_y u_y^T J_n - J_n^T H_n J_n||^2``.
    """
    outs, jac, _ = per_sample_jacobians(c.model, c.batches, c.params, output_fn=c.output_fn)
    probs = torch.softmax(outs[:, 0], dim=-1)
    total = 0.0
    for p_n, j_n in zip(probs, jac):
        h_n = j_n.T @ (torch.diag(p_n) - torch.outer(p_n, p_n)) @ j_n
        for y, p_y in enumerate(p_n):
            u = j_n.T @ (p_n - torch.nn.functional.one_hot(torch.tensor(y), len(p_n)))
            total += p_y.item() * torch.linalg.matrix_norm(torch.outer(u, u) - h_n).item() ** 2
    return c.scale**2 * total / mc_samples


def test_mc_fisher_approaches_ggn_for_cross_entropy():
    """Relative error within 4 predicted standard deviations.

    ``||F_mc - GGN||^2`` is (asymptotically) a Gaussian quadratic form, so exceeding 16 times its
    mean is at most as likely as a chi-square(1) exceeding 16, i.e. < 1e-4: a correct Fisher fails
    this for essentially no seed, while a wrong scale or distribution is far outside.
    """
    name, mc_samples = "mlp_ce_mean", 1000  # predicted rel. RMS error 0.019 -> bound 0.078
    c = case(name)
    ggn = reference(name, "ggn")
    rms_rel = _ce_fisher_expected_sq_error(c, mc_samples) ** 0.5 / torch.linalg.norm(ggn).item()
    bound = 4 * rms_rel
    assert bound < 0.1, f"test set-up: predicted error {rms_rel:.3g} too large to be informative"
    fisher = c.run(ck.fisher, mc_samples=mc_samples, generator=torch.Generator().manual_seed(0))
    assert tuple(fisher.shape) == tuple(ggn.shape)
    assert_close(fisher, fisher.T, rtol=1e-10, what="fisher symmetry")
    err = rel_error(fisher, ggn)
    assert err <= bound, f"MC Fisher vs GGN: rel. error {err:.3g} > {bound:.3g} (4 sigma)"


def test_mc_fisher_is_reproducible_with_a_seeded_generator():
    c = case("mlp_ce_mean")

    def run(seed: int) -> torch.Tensor:
        return c.run(ck.fisher, mc_samples=5, generator=torch.Generator().manual_seed(seed))

    first, second, other = run(0), run(0), run(1)
    assert torch.equal(first, second), "same generator seed gave different Fishers"
    assert not torch.equal(first, other), "different seeds gave the same Fisher: generator unused?"


# --------------------------------------------------------------------------------------------
# parameter_slices
# --------------------------------------------------------------------------------------------
def _check_slices(slices: dict[str, slice], expected: list[tuple[str, torch.Tensor]]) -> None:
    assert list(slices) == [n for n, _ in expected]
    start = 0
    for n, p in expected:
        s = slices[n]
        assert (s.start, s.stop, s.step or 1) == (start, start + p.numel(), 1), n
        start = s.stop


@pytest.mark.parametrize("name", ["bn_pool_dropout_ce", "attention_ce", "frozen_first_layer_ce"])
def test_parameter_slices_follow_named_parameters(name):
    model = case(name).model
    expected = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    _check_slices(ck.parameter_slices(model), expected)


def test_parameter_slices_with_params_in_given_order():
    c = case("mse_mean_param_subset")
    _check_slices(
        ck.parameter_slices(c.model, c.params), [("2.weight", c.params[0]), ("0.bias", c.params[1])]
    )


def test_parameter_slices_with_tied_weights():
    model = case("tied_embedding_ce").model
    slices = ck.parameter_slices(model)
    assert "out.weight" not in slices and "emb.weight" in slices
    assert max(s.stop for s in slices.values()) == 55


def test_parameter_slices_index_the_curvature_blocks():
    c = case("mlp_ce_mean")
    h = c.run(ck.hessian)
    named = dict(c.model.named_parameters())
    for n, s in ck.parameter_slices(c.model).items():
        block = ck.hessian(c.model, c.loss_fn, c.data, params=[named[n]])
        assert_close(h[s, s], block, what=n)


def test_mc_fisher_operator_refuses_a_reshuffling_loader():
    """Its labels are drawn once per batch index: with shuffle=True the next pass paired them
    with other samples, and two products with the same vector differed by 20%."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = model.double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    data = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    F = ck.fisher(model, torch.nn.CrossEntropyLoss(), loader, structure="operator")
    v = torch.randn(F.shape[0], dtype=torch.float64)
    F @ v
    with pytest.raises(ck.CurvkitValueError, match="fixed order"):
        F @ v
    fixed = ck.fisher(
        model,
        torch.nn.CrossEntropyLoss(),
        torch.utils.data.DataLoader(data, batch_size=4),
        structure="operator",
    )
    assert torch.equal(fixed @ v, fixed @ v)


@pytest.mark.parametrize("seeded", [True, False])
def test_mc_fisher_operator_replays_its_draws_without_keeping_them(seeded):
    """An operator's products over a loader repeat the first pass's draws (those of the dense
    Fisher from the same generator state) from the generator's state, not from kept (N, C, S)
    factors of every batch; random numbers drawn between products change nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = model.double()
    # batches of 400: their draws (400 x 3 x 2 float64, 19 KB) outweigh a generator state
    # (5 KB), which is kept instead; smaller draws are kept as they are
    x, y = torch.randn(1200, 3, dtype=torch.float64), torch.randint(0, 3, (1200,))
    data = [(x[i : i + 400], y[i : i + 400]) for i in range(0, 1200, 400)]
    loss = torch.nn.CrossEntropyLoss()

    def gen():
        return torch.Generator().manual_seed(3) if seeded else None

    torch.manual_seed(7)
    dense = ck.fisher(model, loss, data, mc_samples=2, generator=gen())
    torch.manual_seed(7)
    F = ck.fisher(model, loss, data, mc_samples=2, generator=gen(), structure="operator")
    eye = torch.eye(F.shape[0], dtype=torch.float64)
    first = F @ eye
    torch.rand(100)  # the global generator moves on between products
    assert_close(first, dense, rtol=1e-12)
    assert torch.equal(F @ eye, first)
    kept = F.problem._fisher_cache.values()
    assert len(kept) == 3 and not any(isinstance(k[1], torch.Tensor) for k in kept)


def test_mc_fisher_operator_refuses_a_batch_reordered_in_place():
    """Its factors belong to each batch's rows: the same samples in another order (a full-batch
    loader with shuffle=True) gave another matrix (2.97 off on a scale of 10)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    model = model.double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    F = ck.fisher(model, torch.nn.CrossEntropyLoss(), (x, y), structure="operator")
    v = torch.randn(F.shape[0], dtype=torch.float64)
    F @ v
    perm = torch.tensor([1, 0, 2, 3, 4, 5])
    x.copy_(x[perm].clone())
    y.copy_(y[perm].clone())
    with pytest.raises(ck.CurvkitValueError, match="fixed order"):
        F @ v
