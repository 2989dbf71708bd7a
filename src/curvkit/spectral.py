"""Spectral tools on any operator (torch-native, CPU or GPU): top eigenvalues, trace, density.

They only use ``op @ V``, so they work on dense tensors, curvature operators and structured
operators alike. Products are issued in blocks where the algorithm allows, since one product
with a (P, b) block costs far less than b products with vectors.
"""

from __future__ import annotations

import math
import warnings

import torch

from .errors import (
    CurvkitTypeError,
    CurvkitValueError,
    CurvkitWarning,
    check_count,
    check_generator,
    check_positive,
)
from .memory import check_bytes, work_budget
from .operators.base import DenseOperator, LinearOperator


def _as_operator(op, symmetric_for: str | None = None) -> LinearOperator:
    """``op`` as an operator; with ``symmetric_for`` (the tool's name), refuse one that is not
    symmetric (a square tensor, a ``DenseOperator``, an operator tagged ``is_symmetric=False``),
    since Lanczos would return numbers that mean nothing for it."""
    if isinstance(op, LinearOperator):
        _check_precision(op.dtype)
        if symmetric_for is not None and not op.is_symmetric:
            raise CurvkitValueError(
                f"{symmetric_for} needs a symmetric operator (it runs Lanczos); this "
                f"{type(op).__name__} says it is not (is_symmetric=False). For a general matrix "
                "use torch.linalg.eigvals."
            )
        if isinstance(op, DenseOperator):
            _check_matrix(op.A, symmetric_for)
        return op
    if not isinstance(op, torch.Tensor):
        raise CurvkitTypeError(
            f"expected a curvkit operator or a square tensor, got {type(op).__name__}."
        )
    _check_precision(op.dtype)
    dense = DenseOperator(op)  # checks that it is square
    _check_matrix(op, symmetric_for)
    return dense


def _check_matrix(A: torch.Tensor, symmetric_for: str | None) -> None:
    """Finite entries, and with ``symmetric_for`` symmetric up to √eps of its largest entry;
    checked a block of rows at a time (a dense Hessian may take most of memory already)."""
    n = A.shape[0]
    rows = max(1, 2**22 // max(n, 1))
    bad, off, size = 0, 0.0, 0.0
    for i in range(0, n, rows):
        R = A[i : i + rows]
        bad += int((~torch.isfinite(R)).sum())
        size = max(size, float(R.abs().max()))
        if symmetric_for is not None:
            off = max(off, float((R - A[:, i : i + rows].T).abs().max()))
    if bad:
        raise CurvkitValueError(
            f"the matrix has {bad} NaN or Inf entries; its spectrum is undefined. Check how it "
            "was computed (a Hessian of a loss that overflowed, a division by zero)."
        )
    if off > torch.finfo(A.dtype).eps ** 0.5 * size:
        raise CurvkitValueError(
            f"{symmetric_for} needs a symmetric matrix (it runs Lanczos), but max |A − Aᵀ| "
            f"= {off:.3g} against max |A| = {size:.3g}. If the asymmetry is rounding from "
            "how A was computed, pass (A + A.T) / 2; for a general matrix use "
            "torch.linalg.eigvals."
        )


def _check_precision(dtype: torch.dtype) -> None:
    """Refuse anything but float32/float64: float16/bfloat16 have no eigh kernel and 3-4
    significant digits, which could not meet a tolerance anyway; curvkit does not upcast
    silently (a float32 copy of a big matrix doubles its memory). Integer and complex
    operators have no real symmetric spectrum to compute here."""
    if dtype in (torch.float16, torch.bfloat16):
        raise CurvkitTypeError(
            f"the spectral tools need float32 or float64, got {dtype} (no eigh kernel, and "
            "3-4 significant digits). Upcast it yourself: a tensor as A.float() (or "
            "A.double()); an operator by building it from a float32 copy of the model "
            "(copy.deepcopy(model).float()). structure='lowrank' runs these tools too."
        )
    if dtype not in (torch.float32, torch.float64):
        raise CurvkitTypeError(
            "the spectral tools need a floating-point (float32 or float64) matrix or operator, "
            f"got dtype {dtype}. Convert it: A.double()."
        )


def _orthogonalize(v: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v minus its projection on Q's rows, the coefficients Q v removed); a second pass only
    when the first cancelled most of v, where one pass loses orthogonality ("twice is enough",
    Kahan–Parlett)."""
    before = v.norm()
    c = Q @ v
    v = v.addmv(Q.T, c, alpha=-1)  # v − Qᵀ(Q v), the subtraction fused into the product
    if v.norm() < 0.7 * before:
        c2 = Q @ v
        v = v.addmv(Q.T, c2, alpha=-1)
        c = c + c2
    return v, c


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
    """Lanczos with full reorthogonalisation: (Q (m, n), H (m, m), beta (m,), fresh (m,)),
    m <= steps.

    H = Q A Qᵀ: the recurrence's α and β plus every coefficient the reorthogonalisation
    removes. beta[j] is the norm of the remainder w_j, the part of A q_j outside q_0..q_j. The
    next row is w_j / beta[j] (one Krylov sequence) or, where ``fresh`` is True, a fresh
    random vector (from ``generator``) orthogonal to the basis: a new sequence, which reaches
    what the earlier ones cannot see (a repeated eigenvalue's other copies, a low-rank
    operator's zeros). Since H keeps the coupling of the new rows to the old ones (through the
    old remainders), its Ritz values stay those of A on the whole basis, whatever the earlier
    remainders were. ``on_step(Q, H, beta, fresh)`` returns True to stop, "fresh" to go on from
    a fresh vector, a row e to resume the sequence cut after row e (from its remainder, kept
    for that), None to go on. A remainder at rounding level (the basis spans an
    invariant subspace) ends the run, or with ``restart`` a fresh vector follows: w_j / beta[j]
    would be rounding noise. The basis is stored row by row (contiguous rows make the
    projections fast), in a buffer of ``rows`` vectors (default ``steps``) that doubles when
    full, so a run that converges early never holds room for ``steps`` vectors; ``advice`` ends
    the error when one does not fit."""
    Q = _basis(op, min(steps, rows or steps), advice)
    H = torch.zeros(Q.shape[0], Q.shape[0], dtype=op.dtype, device=op.device)
    beta = torch.empty(steps, dtype=op.dtype, device=op.device)
    fresh = torch.zeros(steps, dtype=torch.bool)  # on the CPU: read at every step
    fresh[0] = True
    if not bool(v0.norm() > 0):  # never 0/0: a start that cancelled out becomes a random one
        v0 = _random_vector(op, generator)
    q = v0 / v0.norm()
    m = 0
    cut = {}  # row -> remainder of a sequence cut there
    for j in range(steps):
        if j == Q.shape[0]:
            Q = _grown(Q, min(steps, 2 * j), op, advice)
            H = torch.nn.functional.pad(H, (0, Q.shape[0] - j, 0, Q.shape[0] - j))
        Q[j] = q
        w = op @ q
        a = float(q @ w)
        if not math.isfinite(a):
            raise CurvkitValueError(
                f"the operator returned NaN or Inf (qᵀAq = {a}) for a finite unit vector q: "
                "check the matrix, or the model's parameters and data, for NaN/Inf."
            )
        # The three-term recurrence first removes w's large components along q_j and q_{j-1};
        # the full pass then only meets rounding-level ones (on a fresh row, the coupling to
        # the old remainders), so it rarely needs a second sweep over the basis (W-spectral's
        # top 10: 33 against 41 ms of orthogonalisation per call, interleaved A/B).
        w.sub_(q, alpha=a)
        b = 0.0 if fresh[j] else float(beta[j - 1])
        if b:
            w.sub_(Q[j - 1], alpha=b)
        w, c = _orthogonalize(w, Q[: j + 1])
        c[j] += a
        if b:
            c[j - 1] += b
        H[: j + 1, j] = c
        H[j, : j + 1] = c
        beta[j] = w.norm()
        m = j + 1
        size = torch.cat([H.diagonal()[:m].abs(), beta[:j]]).max().clamp_min(1e-30)  # ≲ ‖A‖
        broke = bool(beta[j] <= 10 * torch.finfo(op.dtype).eps * size)
        action = on_step(Q[:m], H[:m, :m], beta[:m], fresh[:m]) if on_step else None
        if action is True or m == steps or (broke and not restart):
            break
        if isinstance(action, int) and action not in cut:
            action = None  # nothing to resume there (a remainder at rounding level)
        if broke or action is not None:
            if not broke:
                cut[m - 1] = w  # this sequence may have to be resumed
            w = cut.pop(action) if isinstance(action, int) else _random_vector(op, generator)
            w = _orthogonalize(w, Q[:m])[0]
            if not bool(w.norm() > 0):  # the basis already spans everything
                break
            fresh[m] = True
        q = w / w.norm()  # > 0: above rounding level, or checked just above
    return Q[:m], H[:m, :m], beta[:m], fresh[:m]


def _exhausted(dtype: torch.dtype) -> float:
    """A remainder below this times ‖A‖ means the Krylov space is exhausted up to rounding,
    which leaves it well above eps (5e-12 in float64 after a few dozen steps, 7e-8 in
    float32); eps^(2/3) (3.6e-11, 2.4e-5) catches that. Such a sequence says nothing about the
    rest of the space, so the probe after it looks for anything above θ_k(1 + tol), not only
    above the midpoint L. (The error bounds do not rely on it: they keep every remainder.)"""
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
    if v0.is_complex():
        raise CurvkitTypeError(
            f"v0 must be a real vector (the operator is real symmetric), got {v0.dtype}."
        )
    v0 = v0.to(dtype=op.dtype, device=op.device)
    norm = v0.norm()
    if not (bool(torch.isfinite(norm)) and norm > 0):
        raise CurvkitValueError(
            "v0 must be a finite, nonzero vector; pass v0=None for a random start."
        )
    return v0


def _ritz(H: torch.Tensor, beta: torch.Tensor, fresh: torch.Tensor):
    """Ritz values θ (descending), vectors S (columns), residual bounds r >= ‖A y − θ y‖ and
    their parts (the rows that end a sequence, and each one's share of each r).

    For y = Qᵀs, A y − θ y = Σₑ sₑ ρₑ over the rows e that end a Krylov sequence (the last row,
    and each row before a fresh one), ρₑ the part of A qₑ outside the whole basis: its
    remainder, of norm beta[e], less what the later rows took in, Σᵢ₌ₑ₊₁ H[i, e]² (Bessel).
    Within a sequence the remainder became the next row: nothing of it is outside. A small
    remainder is never taken for zero: a Ritz value is exact only up to ρₑ|sₑ|."""
    theta, S = torch.linalg.eigh(H)
    theta, S = theta.flip(0), S.flip(1)
    ends = torch.cat([fresh[1:], fresh.new_ones(1)])
    rows = ends.nonzero().flatten().tolist()
    ends = ends.to(H.device)
    rho = (beta[ends].square() - H.tril(-1)[:, ends].square().sum(0)).clamp_min(0).sqrt()
    parts = rho[:, None] * S[ends].abs()  # (end, Ritz value): what each remainder adds to r
    return theta, S, parts.sum(0), (rows, parts)


def _allowed(theta: torch.Tensor, tol: float) -> torch.Tensor:
    """The error each Ritz value may keep: tol·|θ|, plus eps·‖A‖, below which rounding in the
    products themselves decides (and a zero eigenvalue could never meet tol·|θ|)."""
    return tol * theta.abs() + torch.finfo(theta.dtype).eps * theta.abs().max()


# The probe stops once a missed eigenvector's component in its random start (about 1/√n' for
# a random vector in n' dimensions) would have to be below √(_UNSEEN / n') to stay hidden:
# for a Gaussian start that happens with probability √(2·_UNSEEN/π) ≈ 1%.
_UNSEEN = 1.6e-4


def _unseen_weight(H: torch.Tensor, beta: torch.Tensor, start: int, level: float) -> float:
    """The most weight the probe's start vector (row ``start``) can put on eigenvalues >=
    level, given its Lanczos polynomials Pᵢ so far: 1/Σᵢ Pᵢ(level)² (the Christoffel function;
    Chebyshev–Markov–Stieltjes), valid once level lies above the probe's Ritz values (all
    Pᵢ(level) > 0, Sturm); 1 before that."""
    a = H.diagonal()[start:].tolist()
    b = H.diagonal(-1)[start:].tolist() + [float(beta[-1])]
    prev, p, total = 0.0, 1.0, 1.0
    for i in range(len(a)):
        if b[i] <= 0:  # the probe's Krylov space is exhausted: it holds its whole weight
            return 0.0
        prev, p = p, ((level - a[i]) * p - (b[i - 1] if i else 0.0) * prev) / b[i]
        if not p > 0:
            return 1.0
        total += p * p
        if total > 1e300:
            return 0.0
    return 1.0 / total


@torch.no_grad()  # estimates, not differentiated: no graph through the iterations
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
    """The ``k`` largest algebraic eigenvalues of a symmetric operator, descending: the most
    positive ones, not the largest in magnitude (an indefinite Hessian's most negative
    eigenvalues are not among them unless k reaches them).

    Lanczos with full reorthogonalisation, stopped by an error bound instead of an iteration
    count: each returned θᵢ has a Ritz residual rᵢ = ‖A yᵢ − θᵢ yᵢ‖ <= tol·|θᵢ| + ε‖A‖, so an
    eigenvalue of A lies within that distance of it (ε the dtype's machine epsilon: rounding
    in the products decides below it, so eigenvalues under about ε‖A‖/tol come back to within
    about ε‖A‖, not tol). The error itself is usually far smaller, about rᵢ²/gapᵢ; but that
    sharper estimate is not used to stop, because the gap to the nearest *other* eigenvalue is
    unknown: two eigenvalues closer than the residual share one Ritz value until Lanczos
    resolves them, and stopping on the gap to the next Ritz value returned values 100× tol
    off (a pair 1% apart at the k-th place, tol 1e-4). Like every Krylov method it cannot see
    an eigenvalue whose eigenvector the start vector misses; a
    random start makes that improbable, except for one case, which a probe covers:

    **Repeated eigenvalues.** One Krylov sequence holds one vector per distinct eigenvalue, so
    it finds one copy of a repeated eigenvalue (e.g. every eigenvalue of a Linear layer's GGN
    under MSE comes d_out times) and would return the next distinct values in place of the
    other copies. So once the k values have converged, a probe runs Lanczos from a fresh random
    vector orthogonal to the whole basis, the basis kept. If any of the top k Ritz values then
    rises by more than its tolerance, a copy was missed (Ritz values only rise towards the
    eigenvalues): the iteration goes on until the k values converge again, then probes again.
    The probe stops when its own Lanczos polynomials show that its start vector puts less than
    1.6e-4/n' of its weight on eigenvalues above the midpoint L between θ_k and θ₁ (n' the
    dimension left outside the basis; the Christoffel function bounds that weight). A missed
    copy above L, which a random start reaches with weight about 1/n', stays hidden with
    probability about 1%. That is a probabilistic check, not a proof: a copy between
    θ_k(1 + tol) and L is found only if the probe happens to lift a Ritz value above θ_k, and
    none is looked for when k = 1 or when all k values are within tol of θ_k (another copy
    changes nothing then). It costs a few products where the top eigenvalues stand clear of
    the rest of the spectrum (W-spectral, the top 10 of an 85k-parameter MLP's Hessian: 6 added
    to 46-47) and more where they are packed (diag(1, ..., 1000), k = 5: about 40 added to
    170). When the first Krylov space is exhausted (the operator has few distinct
    eigenvalues, or v0 lies in an invariant subspace) the rest of the space is unexplored and
    the probe looks above θ_k(1 + tol) instead. ``max_iter`` counts the probe's products too;
    the values returned are those from before the probe (the probe only checks them).
    Structured operators (KFAC, diagonal, blocks, low-rank) answer exactly from their
    structure instead, copies included.

    The start vector ``v0`` defaults to a random vector (from ``generator``) plus, for a Hessian
    operator from ``ck.hessian``, the loss gradient at equal norm: the gradient lies mostly in
    the top eigenspace (Gur-Ari et al., 2018), and the random part keeps every direction in.

    >>> import torch, curvkit as ck
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> [round(x, 3) for x in ck.top_eigenvalues(A, k=3).tolist()]
    [100.0, 99.0, 98.0]
    """
    op = _as_operator(op, "top_eigenvalues")
    n = op.shape[0]
    check_generator(generator)
    if isinstance(k, int) and not isinstance(k, bool) and k > n:
        raise CurvkitValueError(
            f"k={k} exceeds the operator's dimension {n}: it has only {n} eigenvalues."
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise CurvkitValueError(f"k must be an int in [1, {n}], got {k!r}.")
    check_positive(
        "tol",
        tol,
        "number",
        "the relative accuracy asked of each eigenvalue",
        "Pass e.g. tol=1e-4 (the default) or tol=1e-8.",
    )
    bad_iter = isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < k
    if max_iter is not None and bad_iter:
        raise CurvkitValueError(
            f"max_iter must be an int >= k={k} (one product per Ritz value), got {max_iter!r}."
        )
    if v0 is not None:  # checked for every operator, also those that do not iterate
        v0 = _checked_start(v0, op)
    if op.has_spectrum:  # structured: exact from the structure, no iteration
        if not eigenvectors:  # no (P, k) eigenvectors to build and drop
            return op.eigenvalues()[:k]
        return op.top_eigenpairs(k)
    max_iter = min(n, max_iter or max(4 * k + 60, 300))
    v0 = _start_vector(op, generator) if v0 is None else v0

    # "probe": its first row, θ[:k] when it began, and its level L; "kept": the converged
    # values and vectors it checks (returned unless it finds a miss)
    state = {}

    def step(Q, H, beta, fresh):
        m = H.shape[0]
        if m < k:
            return None
        theta, S, r, (rows, parts) = _ritz(H, beta, fresh)
        allowed = _allowed(theta, tol)[:k]
        if "probe" in state:
            start, before, level = state["probe"]
            if bool((theta[:k] - before > allowed).any()):
                del state["probe"], state["kept"]  # a copy was missed: converge, probe again
                return None
            if _unseen_weight(H, beta, start, level) * (n - start) <= _UNSEEN:
                state["checked"] = True
                return True
            return None
        excess = r[:k] / allowed
        if bool((excess > 1).any()):
            # A sequence cut for a probe stops converging: if its remainder now holds back
            # the worst value most (a copy found partly there), resume it, else go on.
            end = rows[int(parts[:, int(excess.argmax())].argmax())]
            return end if end < m - 1 else None
        least = float(theta[k - 1] + allowed[-1])
        if bool(beta[-1] <= _exhausted(theta.dtype) * theta.abs().max()) and m < n:
            level = least  # the first Krylov space is used up: anything above θ_k may hide
        elif float(theta[0]) > least:
            level = (least + float(theta[0])) / 2
        else:
            state["checked"] = True
            return True  # all k within tol of θ_k: another copy would change nothing
        state["probe"] = (m, theta[:k].clone(), level)
        state["kept"] = (theta[:k].clone(), S[:, :k].clone(), m)
        return "fresh"

    # restart: a fresh random vector orthogonal to the basis after an exhausted Krylov space
    # (and for the probe); the basis starts with room for 2k + 40 vectors and grows
    Q, H, beta, fresh = _lanczos(
        op, v0, max_iter, on_step=step, restart=True, generator=generator, rows=2 * k + 40
    )
    if state.get("checked") and "kept" in state:  # converged; the probe found nothing
        vals, S, m = state["kept"]
        Q = Q[:m]
    else:  # the last step's values: converged with no probe needed, or stopped at max_iter
        theta, S, r, _ = _ritz(H, beta, fresh)
        vals, err = theta[:k], r[:k]
        allowed = _allowed(theta, tol)[:k]
        cut = not state.get("checked") and Q.shape[0] < n
        if cut and "kept" in state:  # the whole basis' values: never lower than the kept ones
            _warn(
                f"top_eigenvalues stopped after {Q.shape[0]} iterations (max_iter) while "
                "checking for missed copies of repeated eigenvalues: the values converged, but "
                "a copy may be missing from them. Raise max_iter."
            )
        elif cut and not bool((err <= allowed).all()):
            worst = int((err / allowed).argmax())
            _warn(
                f"top_eigenvalues stopped after {Q.shape[0]} iterations (max_iter) before its "
                f"error bounds met tol={tol:g}: value {worst + 1} ({float(vals[worst]):.6g}) may "
                f"be off by up to {float(err[worst]):.2g}, against {float(allowed[worst]):.2g} "
                "allowed. Raise max_iter or tol. (Values at or near 0 with several copies, and "
                "tight clusters, converge slowest.)"
            )
    if eigenvectors:
        return vals, Q.T @ S[:, :k]
    return vals


def _warn(message: str) -> None:
    warnings.warn(message, CurvkitWarning, stacklevel=3)  # at top_eigenvalues' caller


@torch.no_grad()
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

    size = torch.empty((), dtype=op.dtype).element_size()
    if method == "hutchinson":  # probes in blocks that fit the work budget (~3 copies each)
        per = max(1, work_budget(op.device, None) // max(3 * n * size, 1))
        total = torch.zeros((), dtype=op.dtype, device=op.device)
        for start in range(0, num_matvecs, per):
            Z = _rademacher(op, min(per, num_matvecs - start), generator)
            total += (Z * (op @ Z)).sum()
        return total / num_matvecs
    m = num_matvecs // 3
    check_bytes(
        f"Hutch++'s sketch of {m} vectors of size {n} (and its products)",
        3 * n * m * size,
        op.device,
        None,
        "Lower num_matvecs, or use method='hutchinson', which works in blocks.",
        can_raise=False,
    )
    Q, _ = torch.linalg.qr(op @ _rademacher(op, m, generator))
    G = _rademacher(op, m, generator)
    G = G - Q @ (Q.T @ G)
    return (Q * (op @ Q)).sum() + (G * (op @ G)).sum() / m


def _rademacher(op: LinearOperator, m: int, generator) -> torch.Tensor:
    """(n, m) random signs, drawn in the operator's dtype (no int64 copy of the block)."""
    z = torch.randint(0, 2, (op.shape[0], m), generator=generator, dtype=op.dtype)
    return z.mul_(2).sub_(1).to(op.device)


@torch.no_grad()
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
        Z = _rademacher(op, m, generator)
        acc += (Z * (op @ Z)).sum(1)
        done += m
    return acc / num_matvecs


@torch.no_grad()
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
    eigenvalue density that integrates to 1 over x (Ghorbani et al., 2019). ``sigma`` (the
    Gaussians' width) defaults to 1% of the span of the Ritz values, taken as at least 1e-3 of
    their magnitude (a single distinct eigenvalue has no spread); the grid covers that span
    plus 5 sigma each side, so the tails are in (all but 6e-7 of the mass). Its points must be
    at most sigma apart, or the Gaussians fall between them and the integral is no longer 1: a
    coarser ``grid`` (or a narrower ``sigma``) is refused with the grid size needed."""
    op = _as_operator(op, "spectral_density")
    n = op.shape[0]
    check_generator(generator)
    _check_density_args(num_probes, steps, grid, sigma)
    if n == 0:
        raise CurvkitValueError("spectral_density needs an operator of size >= 1, got 0 x 0.")
    nodes, weights = [], []
    for _ in range(num_probes):
        v = torch.randn(n, generator=generator, dtype=op.dtype).to(op.device)
        _, H, _, _ = _lanczos(op, v, min(steps, n), advice="Lower steps.")
        theta, S = torch.linalg.eigh(H)
        nodes.append(theta)
        weights.append(S[0, :].square())
    theta, w = torch.cat(nodes), torch.cat(weights) / num_probes
    lo, hi = float(theta.min()), float(theta.max())
    # a single distinct eigenvalue (the identity) has no spread: in float32 a grid that narrow
    # collapses onto a few representable points and the density integrated to ~10
    span = max(hi - lo, 1e-3 * max(abs(lo), abs(hi))) or 1.0  # 1.0: only zeros, no scale
    sigma = sigma or span / 100
    pad = 0.5 * (span - (hi - lo)) + 5 * sigma  # centred; 5 sigma (5% by default) past the ends
    # points at most sigma apart: the trapezoid rule's error on the Gaussians is then about
    # exp(-2π²) = 3e-9 (floor, not ceil: width/sigma may be an integer plus rounding)
    needed = math.floor((hi - lo + 2 * pad) / sigma * (1 - 1e-9)) + 2
    if grid < needed:
        raise CurvkitValueError(
            f"grid={grid} points over [{lo - pad:.4g}, {hi + pad:.4g}] are "
            f"{(hi - lo + 2 * pad) / (grid - 1):.3g} apart, more than sigma={sigma:.3g}: the "
            "Gaussians would fall between them and the density would not integrate to 1. Pass "
            f"grid >= {needed} or a larger sigma."
        )
    x = torch.linspace(lo - pad, hi + pad, grid, dtype=op.dtype)
    theta, w = theta.cpu(), w.cpu()
    dens = torch.empty_like(x)
    rows = max(1, 2**20 // theta.numel())  # grid points per chunk: (rows, Ritz values) at most
    for i in range(0, grid, rows):
        z = (x[i : i + rows, None] - theta[None, :]) / sigma
        dens[i : i + rows] = (w * torch.exp(-0.5 * z.square())).sum(1)
    return x, dens / (sigma * math.sqrt(2 * math.pi))


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
    try:  # a Figure of its own, without pyplot: the process's backend stays the user's
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'curvkit[plot]'.") from e
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    y = torch.as_tensor(density).detach().cpu().numpy()
    ax.plot(torch.as_tensor(x).detach().cpu().numpy(), y)
    if log:
        ax.set_yscale("log")
        if y.max() > 0:  # eight decades below the peak, whatever its scale
            ax.set_ylim(y.max() * 1e-8, y.max() * 2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
