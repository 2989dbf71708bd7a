"""Spectral tools (top eigenvalues, trace estimation, spectral density) against dense linear
algebra: ``torch.linalg.eigvalsh`` and the exact trace of float64 matrices.

Stochastic estimators use fixed seeds, and their bounds are a few standard deviations of the
estimator, computed from the matrix itself (see each test), so a correct estimator passes for
essentially any seed while a wrong scale or a biased estimator fails.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from cases import DT, Case, ce_sample
from helpers import assert_close, ref_ggn, ref_hessian
from torch import nn

import curvkit as ck


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.cache
def mlp_case() -> Case:
    """Linear(6, 8) -> Tanh -> Linear(8, 4), CE mean over 10 samples: P = 92."""
    torch.manual_seed(40)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).to(DT).eval()
    x, t = torch.randn(10, 6, dtype=DT), torch.randint(0, 4, (10,))
    return Case("mlp_p92", model, nn.CrossEntropyLoss(), (x, t), [(x, t)], ce_sample, 1 / 10)


@functools.cache
def dense(kind: str) -> torch.Tensor:
    c = mlp_case()
    if kind == "hessian":
        return ref_hessian(c.model, c.loss_fn, c.batches)
    return ref_ggn(c.model, c.sample_loss, c.scale, c.batches)


def _with_spectrum(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U diag(lam) U^T with a random orthogonal U."""
    n = lam.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=DT))
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


def _top(A: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.eigvalsh(A).flip(0)[:k]


def _check_eigenvectors(A: torch.Tensor, vals: torch.Tensor, V: torch.Tensor, tol: float) -> None:
    """Orthonormal Ritz vectors with small residuals: Lanczos stops when each residual is at
    most tol * |theta| + eps * ||A|| (here twice tol, and 32 eps for rounding in the basis and
    in the check itself); a wrong pairing of vectors and values fails by O(1)."""
    k = vals.numel()
    assert tuple(V.shape) == (A.shape[0], k)
    assert_close(V.T @ V, torch.eye(k, dtype=DT), rtol=0, atol_scale=1e-8, what="V^T V")
    norm_a = torch.linalg.matrix_norm(A, 2).item()
    res = torch.linalg.vector_norm(A @ V - V * vals, dim=0)
    bound = 2 * tol * vals.abs() + 32 * torch.finfo(DT).eps * norm_a
    assert bool((res <= bound).all()), f"residuals {res.tolist()} > {bound.tolist()}"
    # the Rayleigh quotients of the vectors are the returned values
    assert_close((V * (A @ V)).sum(0), vals, rtol=1e-8, what="Rayleigh quotients")


# --------------------------------------------------------------------------------------------
# top_eigenvalues
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_top_eigenvalues_of_a_dense_curvature(kind):
    A = dense(kind)
    assert A.shape[0] == 92
    vals = ck.top_eigenvalues(A, k=5, tol=1e-8, generator=_gen())
    assert tuple(vals.shape) == (5,)
    assert bool((vals[:-1] >= vals[1:]).all()), f"not descending: {vals.tolist()}"
    assert_close(vals, _top(A, 5), rtol=1e-6, what=f"{kind} top-5")


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_top_eigenvectors(kind):
    A = dense(kind)
    vals, V = ck.top_eigenvalues(A, k=4, tol=1e-8, eigenvectors=True, generator=_gen(1))
    assert_close(vals, _top(A, 4), rtol=1e-6, what=f"{kind} top-4 with vectors")
    _check_eigenvectors(A, vals, V, 1e-8)


def test_top_eigenvalue_alone_is_not_stopped_by_a_missing_gap():
    """k=1: after one product the single Ritz value has no neighbour; its bound is the
    residual, not r²/∞ = 0 (which returned the start vector's Rayleigh quotient)."""
    A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    assert_close(ck.top_eigenvalues(A, k=1, tol=1e-8, generator=_gen()), [100.0], what="k=1")


def test_top_eigenvalues_nearly_degenerate():
    """lam = [10, 10 - 1e-6, 9.9, ...]: both members of the close pair must be returned, not the
    first one twice or one and then 9.9."""
    n = 60
    lam = torch.cat(
        [torch.tensor([10.0, 10.0 - 1e-6, 9.9], dtype=DT), torch.linspace(9.0, 0.1, n - 3)]
    )
    A = _with_spectrum(lam, seed=3)
    expected = lam[:4]
    vals = ck.top_eigenvalues(A, k=4, tol=1e-8, generator=_gen(2))
    assert_close(vals, expected, rtol=1e-6, what="nearly degenerate top-4")
    # tol=1e-8 bounds each value's distance to an eigenvalue by 1e-7 < the 1e-6 gap: the two
    # members of the pair are told apart (a duplicated 10 would be 1e-6 off)
    err = (vals - expected).abs().max().item()
    assert err <= 1e-8 * 10, f"pair not resolved: {(vals - expected).tolist()}"
    vals, V = ck.top_eigenvalues(A, k=3, tol=1e-8, eigenvectors=True, generator=_gen(4))
    assert_close(vals, expected[:3], rtol=1e-6, what="nearly degenerate top-3 with vectors")
    _check_eigenvectors(A, vals, V, 1e-8)


def test_stopping_bound_holds_with_a_cluster_below_the_kth_eigenvalue():
    """W-spectral's shape: nine well separated values, then the 10th with two neighbours within
    3% below it and a dense bulk. Over many start vectors, every returned value must be within
    its promised tol of the true one."""
    top = torch.tensor([1.394, 1.313, 1.297, 1.207, 1.196, 1.138, 1.125, 1.082, 0.991], dtype=DT)
    cluster = torch.tensor([0.3873, 0.3787, 0.3756], dtype=DT)
    lam = torch.cat([top, cluster, torch.linspace(0.37, 0.0, 288, dtype=DT) ** 2 / 0.37])
    A = _with_spectrum(lam, seed=11)
    expected = lam.sort(descending=True).values[:10]
    for seed in range(12):
        vals = ck.top_eigenvalues(A, k=10, tol=1e-4, generator=_gen(seed))
        rel = ((vals - expected).abs() / expected).max().item()
        assert rel <= 1e-4, f"seed {seed}: relative error {rel:.2e} > tol"


def test_close_pair_at_the_kth_place_is_resolved_before_stopping():
    """lam_10 = 1 and lam_11 = 0.999 over a bulk in [0, 0.9]: until Lanczos resolves the pair,
    one Ritz value sits between them with a residual near the gap. Stopping on r^2/gap with the
    gap to the next Ritz value (far down in the bulk) returned it up to 10x tol off (6 of 8
    seeds over tol); the residual rule waits until each value is within tol of an eigenvalue."""
    n = 400
    top = torch.linspace(2.0, 1.1, 9, dtype=DT)
    bulk = torch.rand(n - 11, generator=_gen(5), dtype=DT) * 0.9
    lam = torch.cat([top, torch.tensor([1.0, 0.999], dtype=DT), bulk])
    A = _with_spectrum(lam, seed=100)
    expected = lam[:10]
    for seed in range(6):
        vals = ck.top_eigenvalues(A, k=10, tol=1e-4, generator=_gen(seed))
        rel = ((vals - expected).abs() / expected).max().item()
        assert rel <= 1e-4, f"seed {seed}: relative error {rel:.2e} > tol"


def test_top_eigenvalues_of_a_matrix_free_hessian():
    c = mlp_case()
    op = ck.hessian(c.model, c.loss_fn, c.data, structure="operator")
    assert isinstance(op, ck.LinearOperator)
    A = dense("hessian")
    vals, V = ck.top_eigenvalues(op, k=3, tol=1e-8, eigenvectors=True, generator=_gen(5))
    assert_close(vals, _top(A, 3), rtol=1e-6, what="hessian operator top-3")
    _check_eigenvectors(A, vals, V, 1e-8)


def test_top_eigenvalues_of_a_structured_operator():
    """KFAC's eigenvalues are known in closed form (op.eigenvalues())."""
    c = mlp_case()
    op = ck.ggn(c.model, c.loss_fn, c.data, structure="kron")
    exact = op.eigenvalues()
    assert_close(exact, torch.linalg.eigvalsh(op.to_dense()).flip(0), what="kron eigenvalues()")
    vals = ck.top_eigenvalues(op, k=3, tol=1e-8, generator=_gen(6))
    assert_close(vals, exact[:3], rtol=1e-6, what="kron top-3")


def test_top_eigenvalues_default_tolerance_and_diagonal_example():
    A = torch.diag(torch.arange(1.0, 101.0, dtype=DT))
    vals = ck.top_eigenvalues(A, k=3, generator=_gen())
    assert_close(vals, torch.tensor([100.0, 99.0, 98.0], dtype=DT), rtol=1e-4)


def test_top_eigenvalues_with_fewer_distinct_eigenvalues_than_k():
    """One start vector's Krylov space holds one vector per distinct eigenvalue: on
    diag(3, 2, 1, 1, 1, 1) it is exhausted after 3 products (a KeyError before). Lanczos goes on
    from a fresh vector orthogonal to it and finds the repeated 1s."""
    lam = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0], dtype=DT)
    for A in (torch.diag(lam), _with_spectrum(lam, seed=20)):
        assert_close(ck.top_eigenvalues(A, k=4, generator=_gen()), lam[:4], what="top-4")
        vals, V = ck.top_eigenvalues(A, k=6, tol=1e-8, eigenvectors=True, generator=_gen(1))
        assert_close(vals, _top(A, 6), rtol=1e-10, what="all 6")
        _check_eigenvectors(A, vals, V, 1e-8)


def test_top_eigenvalues_of_a_low_rank_psd_matrix_beyond_its_rank():
    """Rank 5, k = 9: the top 5 and then zeros, with orthonormal vectors (the null-space ones
    from restarts)."""
    lam = torch.cat([torch.linspace(5.0, 1.0, 5, dtype=DT), torch.zeros(35, dtype=DT)])
    A = _with_spectrum(lam, seed=21)
    vals, V = ck.top_eigenvalues(A, k=9, tol=1e-8, eigenvectors=True, generator=_gen(2))
    assert_close(vals, lam[:9], rtol=1e-10, atol_scale=1e-12, what="rank 5, k=9")
    _check_eigenvectors(A, vals, V, 1e-8)


def test_lowrank_ggn_of_a_rank_deficient_problem():
    """N=4 samples, C=3 classes: the GGN has rank <= N (C - 1) = 8 < rank=20 (a KeyError
    before). The low-rank structure holds the top 20 eigenpairs of the dense GGN: its top 8,
    then zeros, so it reconstructs the GGN exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()  # P = 31
    x, t = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    G = ref_ggn(model, ce_sample, 1 / 4, [(x, t)])
    L = ck.ggn(model, nn.CrossEntropyLoss(), (x, t), structure="lowrank")
    assert tuple(L.U.shape) == (31, 20)
    assert_close(L.lam, _top(G, 20), rtol=1e-8, atol_scale=1e-12, what="lowrank eigenvalues")
    assert_close(L.U.T @ L.U, torch.eye(20, dtype=DT), rtol=0, atol_scale=1e-8, what="U^T U")
    assert_close(G @ L.U, L.U * L.lam, rtol=1e-6, what="G U = U diag(lam)")
    assert_close(L.to_dense(), G, rtol=1e-8, what="lowrank reconstruction")


def test_k_beyond_the_dimension_and_max_iter_below_k_are_clear_errors():
    A = torch.diag(torch.arange(1.0, 7.0, dtype=DT))
    with pytest.raises(ck.CurvkitValueError, match="k=7 exceeds the operator's dimension 6"):
        ck.top_eigenvalues(A, k=7)
    with pytest.raises(ck.CurvkitValueError, match="max_iter must be an int >= k=4"):
        ck.top_eigenvalues(A, k=4, max_iter=2)


@pytest.mark.parametrize(
    ("lam", "k"),
    [([3.0, 3.0, 3.0, 1.0, 0.0], 4), ([3.0, 3.0, 3.0, 1.0, 0.0], 2)]
    + [([5.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.1], 4)],
)
def test_top_eigenvalues_finds_every_copy_of_a_repeated_eigenvalue(lam, k):
    """diag(3, 3, 3, 1, 0): the first Krylov space is exhausted after 3 products with the exact
    Ritz values 3, 1, 0 — k of them for k = 2, and zero error bounds — and Lanczos stopped
    there, returning [3, 1] for k = 2 and [3, 3, 1, 0] for k = 4. A breakdown leaves the
    orthogonal complement unexplored: it restarts instead, and finds the other copies."""
    lam = torch.tensor(lam, dtype=DT)
    for A in (torch.diag(lam), _with_spectrum(lam, seed=24)):
        vals, V = ck.top_eigenvalues(A, k=k, tol=1e-8, eigenvectors=True, generator=_gen(3))
        assert_close(vals, _top(A, k), rtol=1e-10, what=f"top-{k} of {lam.tolist()}")
        _check_eigenvectors(A, vals, V, 1e-8)


def test_top_eigenvalues_waits_for_the_block_after_a_restart():
    """lam = 10, 5, 5, 4, 3, 2, 1 and twenty 0s, k = 3. The first Krylov space breaks down with
    10, 5, 4, ... (exact); the restarted block lives in the complement (the second 5 and the
    zeros), and its first Ritz value, about 5/21, is far below θ_3 = 4 while the top three
    have zero error bounds. Stopping there returned [10, 5, 4]: the restarted block's largest
    Ritz value below θ_3 must itself be converged first."""
    lam = torch.cat([torch.tensor([10.0, 5.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=DT)])
    lam = torch.cat([lam, torch.zeros(20, dtype=DT)])
    for A in (torch.diag(lam), _with_spectrum(lam, seed=25)):
        vals = ck.top_eigenvalues(A, k=3, tol=1e-8, generator=_gen(4))
        assert_close(vals, _top(A, 3), rtol=1e-10, what="top-3")


def test_top_eigenvalues_of_a_hessian_with_a_null_space():
    """The P = 92 Hessian has a null space: k = 80 and k = 91 skipped one of its zeros (an
    error of 0.23 and 0.07) when the first Krylov space broke down with >= k values."""
    A = dense("hessian")
    for k in (80, 91):
        vals = ck.top_eigenvalues(A, k=k, tol=1e-8, generator=_gen())
        assert_close(vals, _top(A, k), rtol=0, atol_scale=1e-10, what=f"hessian top-{k}")


def test_top_eigenvalue_of_a_one_parameter_hessian():
    """P = 1: the start vector v/|v| + g/|g| (random part plus gradient) is 0 whenever their
    signs differ, and Lanczos returned NaN (also through structure="lowrank")."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False).to(DT).eval()
    x, y = torch.randn(5, 1, dtype=DT), torch.randn(5, 1, dtype=DT)
    data = (x, y)
    exact = ck.hessian(model, nn.MSELoss(), data)
    assert_close(exact, 2 * x.square().mean().reshape(1, 1), what="exact 1x1 Hessian")
    op = ck.hessian(model, nn.MSELoss(), data, structure="operator")
    for seed in range(4):
        vals = ck.top_eigenvalues(op, k=1, generator=_gen(seed))
        assert_close(vals, exact[0], rtol=1e-12, what=f"seed {seed}")
    for seed in range(4):  # the low-rank build draws its start from torch's global generator
        torch.manual_seed(seed)
        low = ck.hessian(model, nn.MSELoss(), data, structure="lowrank")
        assert_close(low.to_dense(), exact, rtol=1e-12, what=f"lowrank P=1, seed {seed}")


def test_lanczos_never_divides_by_a_zero_norm():
    from curvkit.operators.base import DenseOperator
    from curvkit.spectral import _lanczos

    A = torch.diag(torch.tensor([2.0, 1.0], dtype=DT))
    Q, H, _, _ = _lanczos(DenseOperator(A), torch.zeros(2, dtype=DT), 2, generator=_gen())
    assert bool(torch.isfinite(Q).all()) and bool(torch.isfinite(H).all())
    assert_close(Q @ Q.T, torch.eye(Q.shape[0], dtype=DT), rtol=0, atol_scale=1e-12)


def test_lanczos_basis_grows_instead_of_being_preallocated(monkeypatch):
    """The basis held room for max_iter = max(4k + 60, 300) vectors up front: k = 1 on a
    20M-parameter model asked for 24 GB. It now starts with 2k + 40 rows and doubles. Here the
    memory allows 100 vectors of size 200: k = 1 needs ~65 iterations (42 rows, then 84); the
    preallocated 200 were refused. When even the first rows do not fit, the error names the
    argument that helps (max_iter), not a memory_limit= that top_eigenvalues does not take."""
    import curvkit.memory
    import curvkit.spectral

    n = 200
    lam = torch.cat([torch.tensor([1.0, 0.999], dtype=DT), torch.linspace(0.95, -1, n - 2)])
    A = torch.diag(lam.to(DT))
    for free in (100, 10):  # room for `free` vectors once curvkit's 80% is taken
        room = int(free * n * 8 / 0.8) + 8
        monkeypatch.setattr(curvkit.memory, "available_bytes", lambda device, b=room: b)
        if free == 100:
            vals, V = ck.top_eigenvalues(A, k=1, tol=1e-10, eigenvectors=True, generator=_gen())
            assert_close(vals, lam[:1], rtol=1e-10, what="top-1 through a grown basis")
            _check_eigenvectors(A, vals, V, 1e-10)
            continue
        with pytest.raises(ck.CurvkitMemoryError, match=r"42 vectors.*max_iter") as e:
            ck.top_eigenvalues(A, k=1, generator=_gen())
        assert "memory_limit" not in str(e.value)


class _CountingOperator(ck.LinearOperator):
    """A dense operator that fails after 100 products (a loop that never ends)."""

    def __init__(self, A):
        self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device
        self.calls = 0

    def _matmat(self, V):
        self.calls += 1
        assert self.calls < 100, "looped"
        return self.A @ V


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda A: ck.estimate_diagonal(A, 5, block=0), r"block must be an int >= 1.*got 0"),
        (lambda A: ck.estimate_diagonal(A, 5, block=-1), r"block must be an int >= 1.*got -1"),
        (lambda A: ck.estimate_diagonal(A, 5, block=2.5), r"block must be an int.*got 2\.5"),
        (lambda A: ck.estimate_diagonal(A, 0), r"num_matvecs must be an int >= 1.*got 0"),
        (lambda A: ck.estimate_trace(A, 0), r"num_matvecs must be an int >= 1.*got 0"),
        (lambda A: ck.estimate_trace(A, -1), r"num_matvecs must be an int >= 1.*got -1"),
        (
            lambda A: ck.estimate_trace(A, 0, method="hutch++"),
            r"num_matvecs must be an int >= 3 \(hutch\+\+.*got 0.*method='hutchinson'",
        ),
        (lambda A: ck.top_eigenvalues(A, 1, tol=math.nan), r"tol must be a finite positive.*nan"),
        (lambda A: ck.top_eigenvalues(A, 1, tol=math.inf), r"tol must be a finite positive.*inf"),
        (lambda A: ck.top_eigenvalues(A, 1, tol=0.0), r"tol must be a finite positive.*got 0"),
        (lambda A: ck.spectral_density(A, num_probes=0), r"num_probes must be an int >= 1"),
        (lambda A: ck.spectral_density(A, steps=0), r"steps must be an int >= 1.*got 0"),
        (lambda A: ck.spectral_density(A, sigma=-1.0), r"sigma must be a finite positive.*-1"),
        (lambda A: ck.spectral_density(A, sigma=0.0), r"sigma must be a finite positive.*got 0"),
    ],
)
def test_spectral_tools_refuse_bad_counts_and_tolerances(call, match):
    """These hung (block=0), returned NaN (num_matvecs=0), silently used 3 products (hutch++
    with 0), ran with tol=nan, raised torch's own errors, or gave a density integrating to
    -0.77 (sigma=-1)."""
    A = _CountingOperator(torch.diag(torch.arange(1.0, 6.0, dtype=DT)))
    with pytest.raises(ck.CurvkitValueError, match=match):
        call(A)
    assert A.calls == 0


def test_spectral_density_of_a_single_eigenvalue():
    """torch.eye(5) in float32: all Ritz values within rounding of 1, so the grid spanned ~1e-7
    and collapsed onto 3 representable points; the density integrated to ~10. The grid now
    spans at least 1e-3 of the eigenvalue's magnitude."""
    for A in (torch.eye(5), 3 * torch.eye(7, dtype=DT), torch.zeros(4, 4)):
        x, dens = ck.spectral_density(A, generator=_gen(17))
        assert bool((x[1:] > x[:-1]).all()), "grid collapsed"
        value = A[0, 0].item()
        assert x[0].item() < value < x[-1].item()
        mass, mean = _moments(x.double(), dens.double())
        assert abs(mass - 1) < 1e-2, f"{A.dtype} {value}: integrates to {mass}"
        assert abs(mean - value) < 1e-2 * max(abs(value), 1e-9), (value, mean)


# --------------------------------------------------------------------------------------------
# estimate_trace
# --------------------------------------------------------------------------------------------
def test_hutchinson_is_exact_on_a_diagonal_matrix():
    """Rademacher probes: z^T D z = sum_i D_ii z_i^2 = tr(D) for every probe."""
    D = torch.diag(torch.linspace(-2.0, 5.0, 50, dtype=DT))
    est = ck.estimate_trace(D, num_matvecs=7, method="hutchinson", generator=_gen())
    assert_close(est, D.trace(), rtol=1e-12)


def test_hutchpp_is_exact_on_a_low_rank_matrix():
    """Rank 8 < num_matvecs // 3 sketch vectors: the sketch spans range(A), so the deflated
    remainder is zero and Hutch++ returns the exact trace."""
    lam = torch.cat([torch.linspace(1.0, 8.0, 8, dtype=DT), torch.zeros(72, dtype=DT)])
    A = _with_spectrum(lam, seed=7)
    est = ck.estimate_trace(A, num_matvecs=30, method="hutch++", generator=_gen())
    assert_close(est, A.trace(), rtol=1e-10)


def _hutchinson_std(A: torch.Tensor, m: int) -> float:
    """Rademacher: Var(z^T A z) = 2 (||A||_F^2 - sum_i A_ii^2); the mean of m probes."""
    var = 2 * (torch.linalg.norm(A) ** 2 - A.diagonal().square().sum()).item()
    return math.sqrt(var / m)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_estimate_trace_within_a_few_standard_deviations(kind):
    """Hutchinson: |est - tr| <= 4 sd (sd exact, above). Hutch++ with m = 60 // 3 = 20
    Hutchinson probes on the deflated (I - QQ^T) A (I - QQ^T), whose Frobenius norm is at most
    ||A||_F: the same 4 sd bound with m = 20 and ||A||_F holds a fortiori."""
    A = dense(kind)
    tr = A.trace().item()
    est = ck.estimate_trace(A, num_matvecs=60, method="hutchinson", generator=_gen(8)).item()
    sd = _hutchinson_std(A, 60)
    assert abs(est - tr) <= 4 * sd, f"hutchinson {est:.5g} vs {tr:.5g} (sd {sd:.3g})"
    est = ck.estimate_trace(A, num_matvecs=60, method="hutch++", generator=_gen(9)).item()
    sd = math.sqrt(2 / 20) * torch.linalg.norm(A).item()
    assert abs(est - tr) <= 4 * sd, f"hutch++ {est:.5g} vs {tr:.5g} (sd {sd:.3g})"
    if kind == "ggn":  # PSD: the bound is informative, a factor-of-two slip would land outside
        assert 4 * sd < 0.5 * abs(tr)


def test_estimate_trace_of_operators():
    c = mlp_case()
    for structure in ("kron", "operator"):
        op = ck.ggn(c.model, c.loss_fn, c.data, structure=structure)
        tr = dense("ggn").trace().item() if structure == "operator" else op.trace().item()
        A = dense("ggn") if structure == "operator" else op.to_dense()
        est = ck.estimate_trace(op, num_matvecs=30, method="hutchinson", generator=_gen(10))
        sd = _hutchinson_std(A, 30)
        assert abs(est.item() - tr) <= 4 * sd, (structure, est.item(), tr, sd)


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    """lam_i = 1 / i^2 (n = 300) at 60 products: Hutchinson's sd is ~0.19 (||A||_F ~ 1.04);
    Hutch++ deflates the top ~20 eigenvalues, leaving ||A - A_20||_F ~ 6e-3 for its 20 probes
    (sd ~ 2e-3). Mean absolute errors over 10 fixed seeds must differ by far more than 5x."""
    n = 300
    lam = 1.0 / torch.arange(1, n + 1, dtype=DT).square()
    A = _with_spectrum(lam, seed=11)
    tr = A.trace().item()
    err = {"hutchinson": 0.0, "hutch++": 0.0}
    for seed in range(10):
        for method in err:
            est = ck.estimate_trace(A, num_matvecs=60, method=method, generator=_gen(seed))
            err[method] += abs(est.item() - tr) / 10
    assert err["hutch++"] < 0.2 * err["hutchinson"], err
    assert err["hutch++"] < 0.02 * tr, err


# --------------------------------------------------------------------------------------------
# spectral_density
# --------------------------------------------------------------------------------------------
def _moments(x: torch.Tensor, dens: torch.Tensor) -> tuple[float, float]:
    return torch.trapezoid(dens, x).item(), torch.trapezoid(x * dens, x).item()


def _check_density(A, x, dens, num_probes: int) -> None:
    """Integrates to 1; its mean is the average of num_probes Rayleigh quotients v^T A v / v^T v
    (SLQ's first moment is exact: e1^T T e1), each with mean tr(A)/P and variance
    2 var(lam) / (P + 2) (Dirichlet(1/2) weights on the eigenvalues); 4 sd + grid error."""
    P = A.shape[0]
    lam = torch.linalg.eigvalsh(A)
    assert x.shape == dens.shape and x.dim() == 1
    assert bool((x[1:] > x[:-1]).all())
    assert bool((dens >= 0).all()) and bool(torch.isfinite(dens).all())
    assert x[0].item() <= lam[0].item() and x[-1].item() >= lam[-1].item()
    mass, mean = _moments(x, dens)
    assert abs(mass - 1) < 1e-3, f"density integrates to {mass:.6g}"
    sd = math.sqrt(2 * lam.var(correction=0).item() / ((P + 2) * num_probes))
    span = (lam[-1] - lam[0]).item()
    assert abs(mean - A.trace().item() / P) <= 4 * sd + 1e-3 * span, (mean, A.trace() / P, sd)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_spectral_density_of_a_dense_curvature(kind):
    A = dense(kind)
    x, dens = ck.spectral_density(A, num_probes=5, steps=80, generator=_gen(12))
    _check_density(A, x, dens, 5)


def test_spectral_density_of_a_known_spectrum():
    """Two clusters with weights 1/4 and 3/4: the mass near each cluster matches."""
    n = 80
    lam = torch.cat([torch.full((20,), 5.0, dtype=DT), torch.full((60,), 1.0, dtype=DT)])
    lam = lam + 1e-3 * torch.linspace(0, 1, n, dtype=DT)
    A = _with_spectrum(lam, seed=13)
    x, dens = ck.spectral_density(A, num_probes=20, steps=40, generator=_gen(14))
    _check_density(A, x, dens, 20)
    high = x > 3.0
    mass_high = torch.trapezoid(dens[high], x[high]).item()
    # Rayleigh-quotient weight of the top cluster: Beta(10, 30)-like mean 1/4, sd ~0.07 per
    # probe, ~0.015 for the mean of 20 probes
    assert abs(mass_high - 0.25) < 0.07, mass_high


def test_spectral_density_of_a_structured_operator():
    c = mlp_case()
    op = ck.ggn(c.model, c.loss_fn, c.data, structure="kron")
    x, dens = ck.spectral_density(op, num_probes=5, steps=80, generator=_gen(15))
    _check_density(op.to_dense(), x, dens, 5)


def test_spectral_tools_build_no_graph_through_a_scale_that_requires_grad():
    """A scale kept as a tensor (for differentiable logdets) reached the Lanczos loop: a
    graph through every iteration (twice the memory), a warning per step, and a raw
    in-place error on backward."""
    A = dense("ggn")
    T = torch.tensor(2.0, dtype=DT, requires_grad=True)
    op = ck.DenseOperator(A) * T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vals = ck.top_eigenvalues(op, 3, generator=_gen(30))
        tr = ck.estimate_trace(op, 12, generator=_gen(31))
    assert not vals.requires_grad and not tr.requires_grad
    assert_close(vals, 2 * torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-6)


def test_plot_spectral_density_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    A = dense("ggn")
    x, dens = ck.spectral_density(A, num_probes=2, steps=30, generator=_gen(16))
    path = tmp_path / "density.png"
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # the user's choice: the PNG must not switch it (it set Agg)
    try:
        out = ck.plot_spectral_density(x, dens, str(path))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert str(out) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_spectral_density_accepts_numpy_arrays(tmp_path):
    """The arrays a user saved (np.save) or converted: an AttributeError ('detach') before."""
    pytest.importorskip("matplotlib")
    A = torch.diag(torch.arange(1.0, 6.0, dtype=DT))
    x, dens = ck.spectral_density(A, num_probes=2, steps=5, generator=_gen(18))
    path = tmp_path / "density.png"
    ck.plot_spectral_density(x.numpy(), dens.numpy(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_diagonal_is_unbiased_and_converges():
    torch.manual_seed(0)
    B = torch.randn(40, 40, dtype=torch.float64)
    A = B @ B.T / 40 + torch.diag(torch.linspace(1, 5, 40, dtype=torch.float64))
    off = (A - torch.diag(A.diagonal())).square().sum(1)  # per-entry variance × m
    m = 4000
    est = ck.estimate_diagonal(A, num_matvecs=m, generator=_gen(3))
    z = (est - A.diagonal()) / (off / m).sqrt()
    assert z.abs().max() < 5, z.abs().max()  # 40 entries, each ~N(0,1) by the CLT
    # a diagonal matrix is recovered exactly by any Rademacher probe
    D = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    assert_close(ck.estimate_diagonal(D, num_matvecs=3, generator=_gen(4)), D.diagonal())


# --------------------------------------------------------------------------------------------
# operators: logdet / solve / inverse need a positive definite operator
# --------------------------------------------------------------------------------------------
def _indefinite_operators():
    """Every structure with a logdet, each with smallest eigenvalue -0.5."""
    from curvkit.operators.blocks import DenseBlock, DiagBlock, KronBlock
    from curvkit.operators.structured import BlockDiagonalOperator

    d = torch.tensor([2.0, -0.5, 1.0], dtype=DT)
    M = _with_spectrum(torch.tensor([3.0, 1.0, -0.5, 0.25], dtype=DT), seed=22)
    B = torch.diag(torch.tensor([1.0, -0.5], dtype=DT))
    Af = torch.diag(torch.tensor([1.0, 0.5], dtype=DT))  # kron eigenvalues 1, 0.5, -0.5, -0.25
    idx = [torch.arange(0, 3), torch.arange(3, 7), torch.arange(7, 11)]
    U, _ = torch.linalg.qr(torch.randn(11, 3, generator=_gen(23), dtype=DT))
    return {
        "diag": BlockDiagonalOperator([DiagBlock(d)], [idx[0]], 3),
        "block": BlockDiagonalOperator([DiagBlock(d.abs()), DenseBlock(M)], idx[:2], 7),
        "kron": BlockDiagonalOperator(
            [
                DiagBlock(d.abs()),
                DenseBlock(M @ M + torch.eye(4, dtype=DT)),
                KronBlock.from_factors(B, Af),
            ],
            idx,
            11,
        ),
        "lowrank": ck.LowRankOperator(U, torch.tensor([2.0, 1.0, -1.5], dtype=DT), shift=1.0),
    }


@pytest.mark.parametrize("name", ["diag", "block", "kron", "lowrank"])
def test_logdet_of_an_indefinite_operator_is_a_clear_error(name):
    """log of a negative eigenvalue: logdet was NaN without a word, while solve and inverse
    raised. All three now raise the same error: expected, got, what to do."""
    op = _indefinite_operators()[name]
    expected = r"positive definite.*indefinite \(smallest eigenvalue -0\.5\).*add_identity"
    with pytest.raises(ck.CurvkitValueError, match=expected):
        op.logdet()
    with pytest.raises(ck.CurvkitValueError, match=expected):
        op.solve(torch.ones(op.shape[0], dtype=DT))
    with pytest.raises(ck.CurvkitValueError, match=expected):
        op.inverse()
    damped = op.add_identity(0.75)  # the advised delta > 0.5
    assert_close(damped.logdet(), torch.logdet(damped.to_dense()), what=f"{name} damped logdet")


def test_logdet_of_a_singular_operator_is_a_clear_error():
    from curvkit.operators.blocks import DiagBlock
    from curvkit.operators.structured import BlockDiagonalOperator

    op = BlockDiagonalOperator(
        [DiagBlock(torch.tensor([1.0, 0.0], dtype=DT))], [torch.arange(2)], 2
    )
    with pytest.raises(ck.CurvkitValueError, match=r"singular: its smallest eigenvalue 0 is zero"):
        op.logdet()
    U = torch.eye(3, 2, dtype=DT)
    with pytest.raises(ck.CurvkitValueError, match="singular"):  # undamped: 0 off span(U)
        ck.LowRankOperator(U, torch.tensor([2.0, 1.0], dtype=DT)).logdet()


def test_an_eigenvalue_negative_by_rounding_is_called_singular():
    """A GGN or KFAC block is positive semidefinite, but its eigendecomposition can give -1e-17:
    that is a singular operator (damp it), not an indefinite one ("use the GGN" would be wrong
    advice for a GGN)."""
    from curvkit.operators.blocks import DiagBlock
    from curvkit.operators.structured import BlockDiagonalOperator

    op = BlockDiagonalOperator(
        [DiagBlock(torch.tensor([1.0, -1e-17], dtype=DT))], [torch.arange(2)], 2
    )
    with pytest.raises(ck.CurvkitValueError, match="zero up to rounding") as err:
        op.solve(torch.ones(2, dtype=DT))
    assert "use the GGN" not in str(err.value)
    with pytest.raises(ck.CurvkitValueError, match=r"indefinite \(smallest eigenvalue -1e-06\)"):
        BlockDiagonalOperator(
            [DiagBlock(torch.tensor([1.0, -1e-6], dtype=DT))], [torch.arange(2)], 2
        ).logdet()


def test_logdet_of_an_indefinite_hessian_diag_is_a_clear_error():
    """The public path of the report: ck.hessian(..., structure="diag") with a negative
    diagonal entry."""
    c = mlp_case()
    D = ck.hessian(c.model, c.loss_fn, c.data, structure="diag")
    low = D.diagonal().min().item()
    assert low < 0
    with pytest.raises(ck.CurvkitValueError, match="indefinite.*add_identity.*convex"):
        D.logdet()


@pytest.mark.parametrize("tool", ["top_eigenvalues", "spectral_density"])
def test_lanczos_tools_refuse_a_nonsymmetric_matrix(tool):
    """Lanczos on a non-symmetric matrix returned numbers without a word; rounding-level
    asymmetry (a Hessian from autograd) is still accepted."""
    A = torch.randn(6, 6, generator=_gen(31), dtype=DT)
    fn = getattr(ck, tool)
    with pytest.raises(ck.CurvkitValueError, match=r"symmetric.*\(A \+ A\.T\) / 2"):
        fn(A)
    S = A + A.T
    S[0, 1] += 1e-12  # rounding
    fn(S)
    with pytest.raises(ck.CurvkitTypeError, match="floating-point"):
        fn(torch.eye(3, dtype=torch.long))


def test_a_breakdown_blurred_by_rounding_still_restarts():
    """After the Krylov space of diag(5,5,5,1,.5,.1) is exhausted, rounding leaves β ≈ 5e-12
    in float64, above the old 1e-12 threshold: no restart, and k=2 gave [5, 1]."""
    A = torch.diag(torch.tensor([5.0, 5, 5, 1, 0.5, 0.1], dtype=DT))
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=_gen(41), dtype=DT))
    for M in (A, Q @ A @ Q.T):
        got = ck.top_eigenvalues((M + M.T) / 2, k=2, tol=1e-10, generator=_gen(42))
        assert_close(got, [5.0, 5.0], rtol=1e-10, what="both copies of 5")


def _kron_ggn_operator() -> ck.LinearOperator:
    """A Linear(60, 4) layer under MSE: its GGN is (2 / (N·4)) X̃ᵀX̃ ⊗ I₄ (X̃ the inputs with a
    column of ones), so each of its eigenvalues comes 4 times."""
    torch.manual_seed(0)
    model = nn.Linear(60, 4).to(DT).eval()
    x = torch.randn(400, 60, dtype=DT) * torch.linspace(0.2, 3.0, 60, dtype=DT)
    return ck.ggn(model, nn.MSELoss(), (x, torch.randn(400, 4, dtype=DT)), structure="operator")


@pytest.mark.parametrize("case", ["kron_ggn", "blocks_of_25", "copies_above_a_bulk"])
def test_top_eigenvalues_finds_copies_that_no_breakdown_reveals(case):
    """Many distinct eigenvalues, each repeated: the Krylov space never breaks down, so no
    restart ran, and one Krylov sequence holds one copy of each. The next distinct values came
    back instead of the other copies, 0.05-0.2 off at tol 1e-4 (a Linear(200, 5) GGN under MSE:
    [4.82, 4.51, 4.43, 4.29, 4.18] for 4.82 five times; diag of 1..40 each 50 times: [40, 39,
    38]). The probe after convergence, a fresh random start, finds them (with probability about
    99% per copy; these seeds are not special)."""
    if case == "kron_ggn":
        op = _kron_ggn_operator()
        A, k = op.to_dense(), 4
    elif case == "blocks_of_25":
        A, k = torch.diag(torch.arange(1.0, 41.0, dtype=DT).repeat_interleave(25)), 3
        op = A
    else:  # four copies of 12 over a bulk in [0, 10] thinning towards its top
        bulk = 10 * torch.rand(496, generator=_gen(3), dtype=DT) ** 4
        A, k = _with_spectrum(torch.cat([torch.full((4,), 12.0, dtype=DT), bulk]), seed=3), 4
        op = A
    expected = _top(A, k)
    assert (expected - expected[0]).abs().max() <= 1e-12 * expected[0]  # k copies of the top
    for seed in range(3):
        vals, V = ck.top_eigenvalues(op, k=k, eigenvectors=True, generator=_gen(seed))
        rel = ((vals - expected).abs() / expected).max().item()
        assert rel <= 1e-4, f"seed {seed}: {vals.tolist()} for {expected.tolist()}"
        _check_eigenvectors(A, vals, V, 1e-4)


def test_small_eigenvalues_are_not_taken_for_exact_after_a_small_remainder():
    """lam_i = 0.5^i (n = 200): near the k-th eigenvalue the Lanczos remainder β is genuinely
    that small, below the eps^(2/3)·‖A‖ that was taken for an exhausted Krylov space; the Ritz
    values were then called exact, and the 36th came back up to 0.99 off in float64 (the 16th
    in float32 too). A remainder is now never taken for zero: float64 meets tol, float32 comes
    within a few eps·‖A‖, all that rounding in its products leaves (‖A‖ = 1 here)."""
    A = _with_spectrum(0.5 ** torch.arange(200, dtype=DT), seed=0)
    for dtype, k in ((torch.float64, 36), (torch.float32, 16)):
        M = A.to(dtype)
        expected = _top(M.double(), k)
        for seed in range(3):
            vals = ck.top_eigenvalues(M, k=k, generator=_gen(seed)).double()
            err = (vals - expected).abs()
            if dtype == torch.float64:
                assert bool((err <= 1e-4 * expected).all()), f"seed {seed}: {(err / expected)}"
            else:
                eps = torch.finfo(dtype).eps
                assert err.max().item() <= 4 * eps, f"seed {seed}: {err.max().item() / eps} eps"


class _NaNOperator(ck.LinearOperator):
    """A matrix-free operator whose products come back NaN."""

    def __init__(self, n: int):
        self.shape, self.dtype, self.device = (n, n), DT, torch.device("cpu")

    def _matmat(self, V):
        return torch.full_like(V, math.nan)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda A: ck.top_eigenvalues(A, 1), ck.CurvkitValueError, "1 NaN or Inf entries"),
        (lambda A: ck.spectral_density(A), ck.CurvkitValueError, "1 NaN or Inf entries"),
        (lambda A: ck.estimate_trace(A), ck.CurvkitValueError, "1 NaN or Inf entries"),
        (lambda A: ck.estimate_diagonal(A), ck.CurvkitValueError, "1 NaN or Inf entries"),
        (
            lambda A: ck.top_eigenvalues(_NaNOperator(3), 1),
            ck.CurvkitValueError,
            "operator returned NaN or Inf",
        ),
        (
            lambda A: ck.top_eigenvalues(torch.eye(3, dtype=torch.float16), 1),
            ck.CurvkitTypeError,
            r"float32 or float64, got torch\.float16.*A\.float\(\)",
        ),
        (
            lambda A: ck.spectral_density(torch.eye(3, dtype=torch.bfloat16)),
            ck.CurvkitTypeError,
            r"float32 or float64, got torch\.bfloat16",
        ),
        (lambda A: ck.spectral_density(torch.zeros(0, 0)), ck.CurvkitValueError, "0 x 0"),
        (lambda A: ck.top_eigenvalues(torch.eye(3), True), ck.CurvkitValueError, "got True"),
    ],
)
def test_spectral_tools_refuse_nan_half_precision_empty_and_bool_inputs(call, error, match):
    """These raised torch's own LinAlgError (NaN or Inf entries), NotImplementedError
    (float16/bfloat16) or IndexError (a 0 x 0 matrix), returned NaN (the estimators), or took
    k=True for k=1."""
    for bad in (math.nan, math.inf):
        A = torch.diag(torch.tensor([1.0, bad, 3.0], dtype=DT))
        with pytest.raises(error, match=match):
            call(A)


def test_a_structured_operator_checks_max_iter_and_v0_too():
    """A structured operator answers from its structure without iterating, and max_iter=-3 or
    v0="x" passed without a word; they are checked as for any operator."""
    c = mlp_case()
    op = ck.ggn(c.model, c.loss_fn, c.data, structure="diag")
    with pytest.raises(ck.CurvkitValueError, match=r"max_iter must be an int >= k=1.*-3"):
        ck.top_eigenvalues(op, 1, max_iter=-3)
    with pytest.raises(ck.CurvkitValueError, match=r"v0 must be a tensor of shape \(92,\)"):
        ck.top_eigenvalues(op, 1, v0="x")
    assert_close(ck.top_eigenvalues(op, 2, max_iter=5, v0=torch.ones(92)), op.eigenvalues()[:2])


def test_spectral_density_integrates_to_one_for_any_sigma():
    """The grid reached 5% of the span past the extreme Ritz values whatever sigma was: with
    sigma=5 on a spectrum in [1, 10] the density integrated to 0.51 over it. It now reaches
    5 sigma past them."""
    A = torch.diag(torch.cat([torch.ones(100, dtype=DT), torch.full((100,), 10.0, dtype=DT)]))
    for sigma in (0.05, 1.0, 5.0):
        x, dens = ck.spectral_density(A, sigma=sigma, generator=_gen(19))
        mass, mean = _moments(x, dens)
        assert abs(mass - 1) < 1e-6, f"sigma={sigma}: integrates to {mass}"
        assert abs(mean - 5.5) < 0.5, f"sigma={sigma}: mean {mean}"  # 5 probes' quotients
        assert x[0].item() <= 1 - 5 * sigma + 1e-9 and x[-1].item() >= 10 + 5 * sigma - 1e-9


def test_spectral_density_refuses_a_grid_coarser_than_sigma():
    """grid=2 integrated to 8e-5: points farther apart than sigma miss the Gaussians."""
    A = torch.diag(torch.arange(1.0, 11.0, dtype=DT))
    with pytest.raises(ck.CurvkitValueError, match=r"grid=2 points .* Pass grid >= 111 "):
        ck.spectral_density(A, grid=2, generator=_gen(20))
    with pytest.raises(ck.CurvkitValueError, match=r"grid=400 .*more than sigma=0\.001"):
        ck.spectral_density(A, sigma=1e-3, generator=_gen(20))
    x, dens = ck.spectral_density(A, sigma=1e-3, grid=9011, generator=_gen(20))  # as advised
    assert abs(_moments(x, dens)[0] - 1) < 1e-6


def test_top_eigenvalues_docstring_example_runs_as_printed():
    """The example promised [100.0, 99.0, 98.0] and printed float32 noise
    ([100.00000762939453, 98.9999771118164, 97.99978637695312])."""
    import doctest

    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(ck.top_eigenvalues, "top_eigenvalues", globs={}):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0


def test_top_eigenvalues_resumes_a_sequence_the_probe_cut():
    """Linear(100, 5) under MSE, each eigenvalue 5 times. A copy found partly by a sequence
    that a probe had cut kept part of that sequence's remainder in its residual, which nothing
    reduced: the bound never certified it, and the call ran to max_iter (300 products) and
    warned, for values already right. The cut sequence is now resumed from its remainder."""
    torch.manual_seed(0)
    model = nn.Linear(100, 5).to(DT).eval()
    x = torch.randn(500, 100, dtype=DT) * torch.linspace(0.2, 3.0, 100, dtype=DT)
    op = ck.ggn(model, nn.MSELoss(), (x, torch.randn(500, 5, dtype=DT)), structure="operator")
    expected = _top(op.to_dense(), 5)
    for seed in (1, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ck.CurvkitWarning)
            vals = ck.top_eigenvalues(op, k=5, generator=_gen(seed))
        assert_close(vals, expected, rtol=1e-4, what=f"seed {seed}")


def test_top_eigenvalues_warns_in_absolute_terms_when_max_iter_runs_out():
    """Ten copies of 0 at the top: the values are right, but the bounds converge slowly; the
    warning said 'relative error bounds up to 3e+06', meaningless for a value of 0."""
    g = _gen(5)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=DT))
    lam = torch.cat([torch.zeros(10, dtype=DT), -torch.linspace(2, 50, 190, dtype=DT)])
    A = (Q * lam) @ Q.T
    with pytest.warns(ck.CurvkitWarning, match=r"max_iter.*may be off by up to .* allowed"):
        vals = ck.top_eigenvalues(A, k=3, max_iter=20, generator=_gen(6))
    assert vals.shape == (3,)


def test_max_iter_that_cuts_the_copy_probe_short_warns():
    """kron(I_3, M): every eigenvalue three times. max_iter=25 ended the run during the probe
    for missed copies and returned the pre-probe values, 0.65 off, without a warning."""
    X = torch.randn(20, 20, generator=_gen(0), dtype=DT)
    A = torch.kron(torch.eye(3, dtype=DT), X @ X.T / 20)
    top = _top(A, 3)
    for max_iter in (20, 25, 30):
        with pytest.warns(ck.CurvkitWarning, match="max_iter"):
            vals = ck.top_eigenvalues(A, 3, max_iter=max_iter, generator=_gen(1))
        assert bool((vals <= top + 1e-9).all())  # Ritz values: never above the eigenvalues
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(ck.top_eigenvalues(A, 3, generator=_gen(1)), top, rtol=1e-6, what="default")


def test_dense_operators_are_checked_like_tensors():
    """ck.DenseOperator(A) of a non-symmetric A (or with symmetric=False) went straight into
    Lanczos: top_eigenvalues 10.4 where the largest real eigenvalue is 5.0. An int64 one
    raised torch's 'normal_kernel_cpu' error; a complex v0 lost its imaginary part."""
    A = torch.randn(6, 6, generator=_gen(31), dtype=DT)
    for op in (ck.DenseOperator(A), ck.DenseOperator(A + A.T, symmetric=False)):
        with pytest.raises(ck.CurvkitValueError, match="symmetric"):
            ck.top_eigenvalues(op, 2)
        with pytest.raises(ck.CurvkitValueError, match="symmetric"):
            ck.spectral_density(op)
    ck.estimate_trace(ck.DenseOperator(A))  # Hutchinson needs no symmetry
    for tool in (ck.top_eigenvalues, ck.estimate_trace, ck.estimate_diagonal):
        with pytest.raises(ck.CurvkitTypeError, match="floating-point"):
            tool(ck.DenseOperator(torch.eye(3, dtype=torch.long)))
    with pytest.raises(ck.CurvkitTypeError, match="v0 must be a real vector"):
        ck.top_eigenvalues(A + A.T, 1, v0=torch.ones(6, dtype=torch.complex128))


def test_spectral_density_is_scale_invariant():
    """Half the spectrum at 0, half at s: an absolute 1e-12 floor on the span made sigma the
    whole span at s = 1e-14 (0.19 of the mass between the two atoms)."""
    lam = torch.cat([torch.zeros(30, dtype=DT), torch.ones(30, dtype=DT)])
    A = _with_spectrum(lam, seed=3)
    x1, d1 = ck.spectral_density(A, generator=_gen(0))
    for s in (1e-11, 1e-14):
        x, d = ck.spectral_density(A * s, generator=_gen(0))
        assert_close(x / s, x1, rtol=1e-6, what=f"grid at scale {s}")
        assert_close(d * s, d1, rtol=1e-6, what=f"density at scale {s}")


def test_structured_top_eigenvalues_without_vectors_match_the_pairs():
    c = mlp_case()
    op = ck.ggn(c.model, c.loss_fn, c.data, structure="kron").add_identity(0.1)
    vals = ck.top_eigenvalues(op, k=7)
    assert_close(vals, op.top_eigenpairs(7)[0], what="values only")
    assert_close(vals, torch.linalg.eigvalsh(op.to_dense()).flip(0)[:7], what="against eigvalsh")
