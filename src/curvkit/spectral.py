"""Spectral tools on any operator (torch-native, CPU or GPU): top eigenvalues, trace, density.

They only use ``op @ V``, so they work on dense tensors, curvature operators and structured
operators alike. Products are issued in blocks where the algorithm allows, since one product
with a (P, b) block costs far less than b products with vectors.
"""

from __future__ import annotations

import math

import torch

from .errors import (
    CurvkitTypeError,
    CurvkitValueError,
    check_count,
    check_generator,
    check_positive,
)
from .memory import check_bytes
from .operators.base import DenseOperator, LinearOperator


def _as_operator(op, symmetric_for: str | None = None) -> LinearOperator:
    """``op`` as an operator; with ``symmetric_for`` (the tool's name), refuse a square tensor
    that is not symmetric, since Lanczos would return numbers that mean nothing for it."""
    if isinstance(op, LinearOperator):
        return op
    if not isinstance(op, torch.Tensor):
        raise CurvkitTypeError(
            f"expected a curvkit operator or a square tensor, got {type(op).__name__}."
        )
    if not op.is_floating_point():
        raise CurvkitTypeError(f"expected a floating-point matrix, got dtype {op.dtype}.")
    dense = DenseOperator(op)  # checks that it is square
    if symmetric_for is not None and op.numel():
        off = float((op - op.T).abs().max())
        size = float(op.abs().max())
        if off > torch.finfo(op.dtype).eps ** 0.5 * size:
            raise CurvkitValueError(
                f"{symmetric_for} needs a symmetric matrix (it runs Lanczos), but max |A − Aᵀ| "
                f"= {off:.3g} against max |A| = {size:.3g}. If the asymmetry is rounding from "
                "how A was computed, pass (A + A.T) / 2; for a general matrix use "
                "torch.linalg.eigvals."
            )
    return dense


def _orthogonalize(v: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """v minus its projection on Q's rows; a second pass only when the first cancelled most of
    v, where one pass loses orthogonality ("twice is enough", Kahan–Parlett)."""
    before = v.norm()
    v = v.addmv(Q.T, Q @ v, alpha=-1)  # v − Qᵀ(Q v), the subtraction fused into the product
    if v.norm() < 0.7 * before:
        v = v.addmv(Q.T, Q @ v, alpha=-1)
    return v


def _lanczos(
    op: LinearOperator,
    v0: torch.Tensor,
    steps: int,
    on_step=None,
    *,
    restart: bool = False,
    generator: torch.Generator | None = None,
    rows: int | None = None,
    advice: str = "Lower max_iter (one basis vector per iteration) or k.",
):
    """Lanczos with full reorthogonalisation: (Q (m, n), alpha (m,), beta (m,)), m <= steps.

    The basis is stored row by row (contiguous rows make the projections fast), in a buffer of
    ``rows`` vectors (default ``steps``) that doubles when full, so a run that converges early
    never holds room for ``steps`` vectors; ``advice`` ends the error when one does not fit.
    ``on_step(Q, alpha, beta)`` may return True to stop early. At a breakdown (β ≈ 0: the
    basis spans an invariant subspace, whose Ritz values are exact) it stops, or with
    ``restart`` goes on from a random vector (from ``generator``) orthogonal to the basis:
    β = 0 there keeps Qᵀ A Q tridiagonal, and the new vectors reach the eigenvalues the first
    start missed (a repeated eigenvalue's other copies, a low-rank operator's zeros)."""
    Q = _basis(op, min(steps, rows or steps), advice)
    alpha = torch.empty(steps, dtype=op.dtype, device=op.device)
    beta = torch.empty(steps, dtype=op.dtype, device=op.device)
    if not bool(v0.norm() > 0):  # never 0/0: a start that cancelled out becomes a random one
        v0 = _random_vector(op, generator)
    q = v0 / v0.norm()
    m = 0
    for j in range(steps):
        if j == Q.shape[0]:
            Q = _grown(Q, min(steps, 2 * j), op, advice)
        Q[j] = q
        w = op @ q
        alpha[j] = q @ w
        # The three-term recurrence first removes w's large components along q_j and q_{j-1};
        # the full pass then only meets rounding-level ones, so it rarely needs a second sweep
        # over the basis (W-spectral's top 10: 33 against 41 ms of orthogonalisation per call,
        # interleaved A/B; the whole call is ~0.45 s).
        w.sub_(q, alpha=float(alpha[j]))
        if j:
            w.sub_(Q[j - 1], alpha=float(beta[j - 1]))
        w = _orthogonalize(w, Q[: j + 1])
        beta[j] = w.norm()
        m = j + 1
        size = torch.cat([alpha[:m].abs(), beta[:j]]).max().clamp_min(1e-30)  # ≈ ‖A‖ from below
        broke = bool(beta[j] <= _breakdown(op.dtype) * size)
        if broke:
            beta[j] = 0  # invariant subspace found: its Ritz values are exact
        if on_step is not None and on_step(Q[:m], alpha[:m], beta[:m]):
            break
        if m == steps or (broke and not restart):
            break
        if broke:
            w = _orthogonalize(_random_vector(op, generator), Q[:m])
            if not bool(w.norm() > 0):  # the basis already spans everything
                break
        q = w / w.norm()  # > 0: β above the breakdown threshold, or checked just above
    return Q[:m], alpha[:m], beta[:m]


def _breakdown(dtype: torch.dtype) -> float:
    """β below this times ‖T‖ is a breakdown: the Krylov space is exhausted up to rounding.
    Rounding leaves β of an exhausted space well above eps (5e-12 in float64 after a few dozen
    steps, 7e-8 in float32); eps^(2/3) (3.6e-11, 2.4e-5) catches it, and a Ritz value it calls
    exact is still within that much of an eigenvalue."""
    return torch.finfo(dtype).eps ** (2 / 3)


def _basis(op: LinearOperator, rows: int, advice: str) -> torch.Tensor:
    """An empty (rows, n) Lanczos basis, refused with a clear error if it cannot fit."""
    n = op.shape[0]
    size = torch.empty((), dtype=op.dtype).element_size()
    what = f"a Lanczos basis of {rows} vectors of size {n}"
    check_bytes(what, rows * n * size, op.device, None, advice, can_raise=False)
    return torch.empty(rows, n, dtype=op.dtype, device=op.device)


def _grown(Q: torch.Tensor, rows: int, op: LinearOperator, advice: str) -> torch.Tensor:
    """Q copied into a larger basis of ``rows`` vectors."""
    bigger = _basis(op, rows, advice)
    bigger[: Q.shape[0]] = Q
    return bigger


def _random_vector(op: LinearOperator, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(op.shape[0], generator=generator, dtype=op.dtype).to(op.device)


def _start_vector(op: LinearOperator, generator: torch.Generator | None) -> torch.Tensor:
    v = _random_vector(op, generator)
    hint = op._start_direction()
    if hint is not None:
        norm = hint.norm()
        if bool(torch.isfinite(norm)) and norm > 0:  # a zero gradient (a minimum) adds nothing
            mixed = v / v.norm() + hint / norm
            # the two unit vectors nearly cancel only when they point almost opposite ways (in
            # 1-D, whenever their signs differ): the sum would be 0 or rounding noise
            if mixed.norm() > 0.5:
                v = mixed
    return v


def _checked_start(v0, op: LinearOperator) -> torch.Tensor:
    n = op.shape[0]
    if not isinstance(v0, torch.Tensor) or v0.shape != (n,):
        got = tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__
        raise CurvkitValueError(f"v0 must be a tensor of shape ({n},), got {got}.")
    v0 = v0.to(dtype=op.dtype, device=op.device)
    norm = v0.norm()
    if not (bool(torch.isfinite(norm)) and norm > 0):
        raise CurvkitValueError(
            "v0 must be a finite, nonzero vector; pass v0=None for a random start."
        )
    return v0


def _tridiag(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    T = torch.diag(alpha)
    if alpha.numel() > 1:
        off = beta[: alpha.numel() - 1]
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _block_start(beta: torch.Tensor) -> int:
    """The first row of the current Lanczos block: one past the last restart (β = 0 exactly,
    set at each breakdown) before the last row; 0 when nothing restarted."""
    zeros = (beta[:-1] == 0).nonzero()
    return int(zeros[-1]) + 1 if zeros.numel() else 0


def _ritz(alpha: torch.Tensor, beta: torch.Tensor):
    """Ritz values θ (descending), vectors S (columns), residuals r and a mask of the current
    block's values. After restarts T is block diagonal; the earlier blocks and the current one
    are solved apart, so the earlier values (exact: an invariant subspace) keep residual 0 and
    their vectors never mix with the current block's. Without a restart this is one eigh."""
    m = alpha.numel()
    b = _block_start(beta)
    if b == 0:  # no restart: one block (the common case, once per Lanczos step)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        theta, S = theta.flip(0), S.flip(1)
        current = torch.ones(m, dtype=torch.bool, device=alpha.device)
        return theta, S, (beta[m - 1] * S[m - 1, :]).abs(), current
    parts = [torch.linalg.eigh(_tridiag(alpha[s], beta[s])) for s in (slice(0, b), slice(b, m))]
    theta = torch.cat([vals.flip(0) for vals, _ in parts])
    S = torch.block_diag(*[vecs.flip(1) for _, vecs in parts])
    theta, order = theta.sort(descending=True, stable=True)  # the identity without a restart
    S = S[:, order]
    current = (torch.arange(m, device=alpha.device) >= b)[order]
    return theta, S, (beta[m - 1] * S[m - 1, :]).abs(), current


def _error_bounds(theta: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """errᵢ = min(rᵢ, rᵢ²/gapᵢ), gapᵢ the distance from θᵢ to the other Ritz values less their
    residuals (another Ritz value θⱼ only places an eigenvalue within rⱼ of itself)."""
    m = theta.numel()
    gaps = torch.full_like(theta, math.inf)
    if m > 1:
        d = ((theta[:, None] - theta[None, :]).abs() - r[None, :]).clamp_min(0)
        d.fill_diagonal_(math.inf)
        gaps = d.min(1).values
    gaps[m - 1] = 0  # nothing is known below the lowest Ritz value: its bound is r alone
    return torch.fmin(r, r.square() / gaps)  # fmin: r = 0 (a breakdown) is exact, not 0/0


def _complement_converged(theta, r, err, current, k: int, tol: float) -> bool:
    """After a restart the current block explores the complement of the earlier blocks, whose
    eigenvalues it approaches from below: the top k stand once its largest Ritz value strictly
    below θ_k is converged too, so that no eigenvalue of the complement is still on its way up
    past θ_k. Its gap is to the other current values less their residuals and to the earlier
    exact values (``err`` already holds that); if it is the current block's lowest value,
    nothing is known below it and its bound is its residual alone."""
    below = (current & (theta < theta[k - 1])).nonzero().flatten()
    if below.numel() == 0:  # every current value is in the top k: more may follow
        return False
    i = int(below[0])
    bound = r[i] if i == int(current.nonzero()[-1]) else err[i]
    return bool(bound <= tol * theta[i].abs())


def top_eigenvalues(
    op,
    k: int = 1,
    tol: float = 1e-4,
    *,
    max_iter: int | None = None,
    eigenvectors: bool = False,
    generator: torch.Generator | None = None,
    v0: torch.Tensor | None = None,
):
    """The ``k`` largest (algebraic) eigenvalues of a symmetric operator, descending.

    Lanczos with full reorthogonalisation. Each returned θᵢ satisfies |θᵢ − λ| ≤ errᵢ for an
    eigenvalue λ, with errᵢ = min(rᵢ, rᵢ²/gapᵢ) from the Ritz residual rᵢ (Parlett) and gapᵢ
    the distance to the nearest other Ritz value θⱼ less its residual rⱼ (the eigenvalue θⱼ
    stands for may lie that much closer); the iteration stops once errᵢ ≤ tol·|θᵢ| for all k —
    no iteration count to tune. (Like every Krylov method it cannot see an eigenvalue whose
    eigenvector the start vector misses; a random start makes that improbable.) A Krylov space
    holds one vector per distinct eigenvalue: when it is exhausted (a breakdown: it spans an
    invariant subspace, whose Ritz values are exact) before the whole space is, the orthogonal
    complement is unexplored — it may hold more copies of a repeated eigenvalue, or zeros — so
    Lanczos never stops there but goes on from a fresh random vector orthogonal to the basis.
    After such a restart it also waits until the new block's largest Ritz value below θ_k is
    converged, so the complement hides nothing above θ_k. Once its Krylov space is exhausted,
    an operator with a repeated eigenvalue or a null space may thus take up to min(n, max_iter)
    products. In float32, rounding can keep β of an exhausted space as large as 1e-4·‖A‖, so
    that no breakdown shows and copies of an exactly repeated eigenvalue can be missed; use a
    float64 operator when multiplicities matter. Structured operators (KFAC, diagonal, blocks,
    low-rank) answer exactly from their structure instead.

    The start vector ``v0`` defaults to a random vector (from ``generator``) plus, for a Hessian
    operator from ``ck.hessian``, the loss gradient at equal norm: the gradient lies mostly in
    the top eigenspace (Gur-Ari et al., 2018), and the random part keeps every direction in.

    >>> import torch, curvkit as ck
    >>> A = torch.diag(torch.arange(1., 101.))
    >>> ck.top_eigenvalues(A, k=3).tolist()
    [100.0, 99.0, 98.0]
    """
    op = _as_operator(op, "top_eigenvalues")
    n = op.shape[0]
    check_generator(generator)
    if isinstance(k, int) and k > n:
        raise CurvkitValueError(
            f"k={k} exceeds the operator's dimension {n}: it has only {n} eigenvalues."
        )
    if not isinstance(k, int) or not 1 <= k <= n:
        raise CurvkitValueError(f"k must be an int in [1, {n}], got {k!r}.")
    check_positive(
        "tol",
        tol,
        "number",
        "the relative accuracy asked of each eigenvalue",
        "Pass e.g. tol=1e-4 (the default) or tol=1e-8.",
    )
    if hasattr(op, "top_eigenpairs"):  # structured: exact from the structure, no iteration
        vals, vecs = op.top_eigenpairs(k)
        return (vals, vecs) if eigenvectors else vals
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < k):
        raise CurvkitValueError(
            f"max_iter must be an int >= k={k} (one product per Ritz value), got {max_iter!r}."
        )
    max_iter = min(n, max_iter or max(4 * k + 60, 300))
    v0 = _start_vector(op, generator) if v0 is None else _checked_start(v0, op)

    def converged(Q, alpha, beta):
        m = alpha.numel()
        if m < k:
            return False
        theta, S, r, current = _ritz(alpha, beta)
        err = _error_bounds(theta, r)
        if not bool((err[:k] <= tol * theta[:k].abs()).all()):
            return False
        if beta[m - 1] == 0 and m < n:
            if bool(current.all()):
                return False
            top = theta[current].max()
            return bool(top <= theta[k - 1] + _breakdown(theta.dtype) * theta.abs().max())
        return bool(current.all()) or _complement_converged(theta, r, err, current, k, tol)

    # restart: at a breakdown (an invariant subspace found) Lanczos goes on from a fresh random
    # vector orthogonal to it; the basis starts with room for 2k + 40 vectors and grows
    Q, alpha, beta = _lanczos(
        op,
        v0,
        max_iter,
        on_step=converged,
        restart=True,
        generator=generator,
        rows=2 * k + 40,
    )
    theta, S, r, _ = _ritz(alpha, beta)  # of the last step, also when it stopped at max_iter
    err = _error_bounds(theta, r)
    if not bool((err[:k] <= tol * theta[:k].abs()).all()) and Q.shape[0] < n:
        import warnings

        from .errors import CurvkitWarning

        warnings.warn(
            f"top_eigenvalues stopped after {Q.shape[0]} iterations with relative error bounds "
            f"up to {float((err[:k] / theta[:k].abs()).max()):.2g} > tol={tol:g}; raise "
            "max_iter or tol.",
            CurvkitWarning,
            stacklevel=2,
        )
    vals = theta[:k]
    if eigenvectors:
        return vals, Q.T @ S[:, :k]
    return vals


def estimate_trace(
    op,
    num_matvecs: int = 60,
    *,
    method: str = "hutchinson",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A stochastic estimate of tr(A) from ``num_matvecs`` products (Rademacher probes).

    ``method="hutchinson"``: mean of zᵀAz. ``"hutch++"`` (Meyer et al., 2021): exact trace on a
    sketched top subspace plus Hutchinson on the rest — far lower variance for decaying spectra;
    it spends num_matvecs // 3 products on each of its three stages, so it needs at least 3.
    For the exact trace use ``op.trace()``.
    """
    op = _as_operator(op)
    n = op.shape[0]
    check_generator(generator)
    if method not in ("hutchinson", "hutch++"):
        raise CurvkitValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}.")
    if method == "hutchinson":
        check_count(
            "num_matvecs",
            num_matvecs,
            "products with the operator",
            "Pass num_matvecs=60 (the default) or more: the error falls as 1/sqrt(num_matvecs).",
        )
    else:
        check_count(
            "num_matvecs",
            num_matvecs,
            "hutch++ spends a third on a sketch, a third on its products, a third on probes",
            "Pass num_matvecs=60 (the default), or method='hutchinson' for fewer products.",
            least=3,
        )

    def rademacher(m):
        z = torch.randint(0, 2, (n, m), generator=generator).to(op.dtype).to(op.device)
        return 2 * z - 1

    if method == "hutchinson":
        Z = rademacher(num_matvecs)
        return (Z * (op @ Z)).sum() / num_matvecs
    m = num_matvecs // 3
    Q, _ = torch.linalg.qr(op @ rademacher(m))
    G = rademacher(m)
    G = G - Q @ (Q.T @ G)
    return (Q * (op @ Q)).sum() + (G * (op @ G)).sum() / m


def estimate_diagonal(
    op, num_matvecs: int = 60, *, generator: torch.Generator | None = None, block: int = 16
) -> torch.Tensor:
    """A stochastic (Hutchinson) estimate of diag(A): the mean of z ⊙ (A z) over Rademacher
    probes z, issued ``block`` probes per product. Unbiased; its variance per entry is
    Σⱼ≠ᵢ Aᵢⱼ² / num_matvecs. For the exact diagonal use ``structure="diag"``."""
    op = _as_operator(op)
    n = op.shape[0]
    check_generator(generator)
    check_count(
        "num_matvecs",
        num_matvecs,
        "products with the operator",
        "Pass num_matvecs=60 (the default) or more: the variance falls as 1/num_matvecs.",
    )
    check_count(
        "block",
        block,
        "probes per product",
        "Pass block=16 (the default); a smaller block only saves memory.",
    )
    acc = torch.zeros(n, dtype=op.dtype, device=op.device)
    done = 0
    while done < num_matvecs:
        m = min(block, num_matvecs - done)
        Z = 2 * torch.randint(0, 2, (n, m), generator=generator).to(op.dtype).to(op.device) - 1
        acc += (Z * (op @ Z)).sum(1)
        done += m
    return acc / num_matvecs


def spectral_density(
    op,
    *,
    num_probes: int = 5,
    steps: int = 80,
    grid: int = 400,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
):
    """Stochastic Lanczos quadrature: (x (grid,), density (grid,)) — a Gaussian-smoothed
    eigenvalue density that integrates to 1 (Ghorbani et al., 2019). The grid spans the Ritz
    values plus 5% each side, and at least 1e-3 of their magnitude (a single distinct
    eigenvalue has no spread); ``sigma`` defaults to 1% of that span."""
    op = _as_operator(op, "spectral_density")
    n = op.shape[0]
    check_generator(generator)
    _check_density_args(num_probes, steps, grid, sigma)
    nodes, weights = [], []
    for _ in range(num_probes):
        v = torch.randn(n, generator=generator, dtype=op.dtype).to(op.device)
        _, alpha, beta = _lanczos(op, v, min(steps, n), advice="Lower steps.")
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        nodes.append(theta)
        weights.append(S[0, :].square())
    theta, w = torch.cat(nodes), torch.cat(weights) / num_probes
    lo, hi = float(theta.min()), float(theta.max())
    # a single distinct eigenvalue (the identity) has no spread: in float32 a grid that narrow
    # collapses onto a few representable points and the density integrated to ~10
    span = max(hi - lo, 1e-3 * max(abs(lo), abs(hi)), 1e-12)
    pad = 0.05 * span + 0.5 * (span - (hi - lo))  # centred; 0.05 * span when hi - lo is wide
    sigma = sigma or span / 100
    x = torch.linspace(lo - pad, hi + pad, grid, dtype=op.dtype)
    dens = (
        w[None, :].cpu() * torch.exp(-0.5 * ((x[:, None] - theta[None, :].cpu()) / sigma).square())
    ).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return x, dens


def _check_density_args(num_probes, steps, grid, sigma) -> None:
    check_count(
        "num_probes",
        num_probes,
        "random start vectors averaged",
        "Pass num_probes=5 (the default) or more for a smoother density.",
    )
    check_count("steps", steps, "Lanczos steps per probe", "Pass steps=80 (the default).")
    check_count("grid", grid, "points the density is evaluated at", "Pass grid=400.", least=2)
    if sigma is not None:
        check_positive(
            "sigma",
            sigma,
            "width",
            "the Gaussian smoothing of each Ritz value",
            "Pass sigma=None for 1% of the spectrum's span.",
        )


def plot_spectral_density(
    x,
    density,
    path: str,
    *,
    title: str = "spectral density",
    log: bool = True,
) -> str:
    """Save a PNG of a density from ``spectral_density`` (tensors or arrays; needs matplotlib:
    curvkit[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'curvkit[plot]'.") from e
    fig, ax = plt.subplots(figsize=(6, 3.5))
    y = torch.as_tensor(density).detach().cpu().numpy()
    ax.plot(torch.as_tensor(x).detach().cpu().numpy(), y)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(max(y.max() * 1e-8, 1e-12), y.max() * 2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
