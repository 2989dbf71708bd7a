"""Spectral benchmark: workload W-spectral of ``BENCHMARKS.md``.

The W-kfac-mlp model (MLP 64-256-256-10 Tanh, P=85002, built after ``torch.manual_seed(0)``,
``eval()``) on ALL 1437 training digits as one batch, ``CrossEntropyLoss()`` (mean), float32.

Reference: the converged top-10 Hessian eigenvalues in float64 (a float64 copy of the model and
data), from curvkit's ``top_eigenvalues`` (Lanczos with full reorthogonalisation, tol=1e-10) and,
independently, from ``scipy.sparse.linalg.eigsh`` (ARPACK, tol=1e-10) on curvlinops'
``HessianLinearOperator`` in float64 (on curvkit's own operator via ``to_scipy()`` if curvlinops
is missing); their agreement is printed. Exact trace: curvkit's exact Hessian diagonal,
``ck.hessian(..., structure="diag").trace()``.

Rows (one warm-up, then the median of ``--repeats`` rounds, each timing every row once in turn;
errors vs the reference):

* curvkit ``ck.top_eigenvalues(H, k=10)`` with its defaults (tol=1e-4): time, products with H
  (counted by wrapping the operator), max relative error of the 10 values;
* hessian-eigenthings ``lanczos`` (its ``compute_hessian_eigenthings`` of the 0.x API is gone in
  1.0) at 40 iterations and at its default (``max_iter=2k``), ``which="LA"``;
* PyHessian ``hessian(...).eigenvalues(top_n=10, tol=1e-3)`` (power iteration with deflation);
* curvlinops ``HessianLinearOperator`` + ``scipy.sparse.linalg.eigsh(k=10, which="LA")``;
* traces: curvkit ``estimate_trace`` (Hutch++, 60 products) and PyHessian ``trace()``
  (Hutchinson, stops when the running mean moves < 1e-3), relative error vs the exact trace;
* context: one curvkit HVP ``H @ v``, one ``torch.func`` HVP (jvp of grad), one double-backward
  HVP, and one gradient pass (forward + backward of the mean loss).

Every peer import is guarded; a missing or failing peer is skipped and its line says why.

Usage::

    python benchmarks/bench_spectral.py [--repeats 3] [--quick]

``--quick``: one timed run per row and only the curvkit reference (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _common import cpu_model, digits_train, fmt_t, load_average, short_exc  # noqa: E402
from torch import nn
from torch.func import functional_call, grad, jvp

import curvkit as ck

N_TRAIN = 1437
THREADS = 2
K = 10


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    loss_fn: nn.Module

    @property
    def P(self) -> int:  # noqa: N802
        return sum(p.numel() for p in self.model.parameters())

    def copy(self, dtype: torch.dtype = torch.float32) -> Workload:
        """A private deep copy (peers leave graphs in ``.grad`` or hooks on modules)."""
        return Workload(
            copy.deepcopy(self.model).to(dtype),
            self.X.to(dtype).clone(),
            self.y.clone(),
            nn.CrossEntropyLoss(),
        )


def build() -> Workload:
    X, y = digits_train()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    ).eval()
    return Workload(model, X, y, nn.CrossEntropyLoss())


class Counting(ck.LinearOperator):
    """Counts the products (columns) that go through a curvkit operator."""

    def __init__(self, op: ck.LinearOperator):
        self.op = op
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.columns = 0

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.columns += V.shape[1]
        return self.op._matmat(V)

    def _start_direction(self):  # the wrapped operator's default start, unchanged
        return self.op._start_direction()


def counting_scipy(op):
    """A SciPy LinearOperator around ``op`` that counts its products (columns)."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    count = [0]

    def mv(x):
        count[0] += 1 if np.ndim(x) == 1 else x.shape[1]
        return op.matmat(x) if np.ndim(x) == 2 else op.matvec(x)

    wrapped = LinearOperator(op.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype=op.dtype)
    return wrapped, count


def rel_err(vals, ref: torch.Tensor) -> float:
    """max_i |vals_i − ref_i| / |ref_i| over the top K, both sorted descending."""
    v = torch.as_tensor(list(vals) if not isinstance(vals, torch.Tensor) else vals)
    v = v.double().sort(descending=True).values[:K]
    return float(((v - ref[:K]) / ref[:K]).abs().max())


# --------------------------------------------------------------------------------------------
# References (float64)
# --------------------------------------------------------------------------------------------


def reference_curvkit(w64: Workload, max_iter: int) -> tuple[torch.Tensor, int, float]:
    H = Counting(
        ck.hessian(w64.model, w64.loss_fn, (w64.X, w64.y), structure="operator", progress=False)
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ck.CurvkitWarning)  # an unconverged reference is fatal
        lam = ck.top_eigenvalues(
            H, k=K, tol=1e-10, max_iter=max_iter, generator=torch.Generator().manual_seed(123)
        )
    return lam.double(), H.columns, time.perf_counter() - t0


def curvlinops_hessian(w: Workload, dtype):
    """curvlinops' Hessian of the workload's mean loss as a scipy operator of ``dtype``."""
    from curvlinops import HessianLinearOperator

    params = [p for p in w.model.parameters() if p.requires_grad]
    return HessianLinearOperator(
        w.model,
        w.loss_fn,
        params,
        [(w.X, w.y)],
        progressbar=False,
        check_deterministic=False,
        num_data=N_TRAIN,
    ).to_scipy(dtype=dtype)


def reference_eigsh(w64: Workload) -> tuple[torch.Tensor, int, float, str]:
    """eigsh (ARPACK) at tol=1e-10 on a float64 operator: curvlinops' if it imports."""
    import numpy as np
    from scipy.sparse.linalg import eigsh

    try:
        op = curvlinops_hessian(w64, np.float64)
        source = "curvlinops `HessianLinearOperator` (float64) + eigsh"
    except Exception as exc:
        H = ck.hessian(w64.model, w64.loss_fn, (w64.X, w64.y), structure="operator", progress=False)
        op = H.to_scipy()
        source = f"curvkit `H.to_scipy()` (float64) + eigsh (curvlinops: {type(exc).__name__})"
    op, count = counting_scipy(op)
    v0 = np.random.default_rng(1).standard_normal(op.shape[0])
    t0 = time.perf_counter()
    vals = eigsh(op, k=K, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False)
    dt = time.perf_counter() - t0
    return torch.from_numpy(np.sort(vals)[::-1].copy()), count[0], dt, source


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    fn: Callable[[int], tuple[object, dict]]  # seed -> (result, extras such as products)
    kind: str = "eig"  # "eig" | "trace"
    times: list[float] = field(default_factory=list)
    results: list[object] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)
    skipped: str | None = None
    note: str = ""


def curvkit_rows(w: Workload) -> list[Row]:
    def eig(seed: int):
        H = Counting(
            ck.hessian(w.model, w.loss_fn, (w.X, w.y), structure="operator", progress=False)
        )
        lam = ck.top_eigenvalues(H, k=K, generator=torch.Generator().manual_seed(seed))
        return lam, {"products": H.columns}

    def trace(seed: int):
        H = ck.hessian(w.model, w.loss_fn, (w.X, w.y), structure="operator", progress=False)
        g = torch.Generator().manual_seed(seed)
        return float(ck.estimate_trace(H, num_matvecs=60, method="hutch++", generator=g)), {
            "products": 60
        }

    def hutchinson(seed: int):
        H = ck.hessian(w.model, w.loss_fn, (w.X, w.y), structure="operator", progress=False)
        g = torch.Generator().manual_seed(seed)
        est = ck.estimate_trace(H, num_matvecs=60, method="hutchinson", generator=g)
        return float(est), {"products": 60}

    return [
        Row("ck", "curvkit `top_eigenvalues(H, k=10)` (tol=1e-4, defaults)", eig),
        Row("ck_trace", "curvkit `estimate_trace(H, 60, method='hutch++')`", trace, "trace"),
        Row(
            "ck_hutch",
            "curvkit `estimate_trace(H, 60, method='hutchinson')`",
            hutchinson,
            "trace",
        ),
    ]


def eigenthings_rows(w: Workload) -> list[Row]:
    try:
        import hessian_eigenthings as he
    except Exception as exc:
        why = f"not importable ({type(exc).__name__}: {exc})"
        return [
            Row("he40", "hessian-eigenthings `lanczos` 40 it.", None, skipped=why),
            Row("he50", "hessian-eigenthings `lanczos` 50 it.", None, skipped=why),
            Row("he_def", "hessian-eigenthings `lanczos` default", None, skipped=why),
        ]
    wc = w.copy()

    def make(max_iter: int | None):
        def run(seed: int):
            op = he.HessianOperator(wc.model, [(wc.X, wc.y)], he.supervised_loss(wc.loss_fn))
            count = [0]
            inner = op.matvec

            def mv(v):
                count[0] += 1
                return inner(v)

            op.matvec = mv
            res = he.lanczos(op, k=K, max_iter=max_iter, which="LA", seed=seed)
            return res.eigenvalues, {"products": count[0]}

        return run

    default_iter = min(2 * K, w.P - 1)
    note = (
        f"v{getattr(he, '__version__', '?')}: `lanczos(HessianOperator(...), k=10, which='LA')`; "
        "reorthogonalises only when max_iter <= 50; HVP by double backward"
    )
    return [
        Row("he40", "hessian-eigenthings `lanczos`, max_iter=40", make(40), note=note),
        # 50: the most iterations it still reorthogonalises at; 40 misses 1e-4 on some seeds
        Row("he50", "hessian-eigenthings `lanczos`, max_iter=50", make(50), note=note),
        Row(
            "he_def",
            f"hessian-eigenthings `lanczos`, default max_iter=2k={default_iter}",
            make(None),
            note=note,
        ),
    ]


def pyhessian_rows(w: Workload) -> list[Row]:
    try:
        import pyhessian

        # pyhessian/__init__ rebinds the name `hessian` to the class: take the module itself.
        ph = sys.modules["pyhessian.hessian"]
    except Exception as exc:
        why = f"not importable ({type(exc).__name__}: {exc})"
        return [
            Row("ph", "PyHessian `eigenvalues(top_n=10)`", None, skipped=why),
            Row("ph_trace", "PyHessian `trace()`", None, "trace", skipped=why),
        ]
    wc = w.copy()
    count = [0]
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        count[0] += 1
        return original(gradsH, params, v)

    def make_obj():
        # The constructor runs backward(create_graph=True) into .grad: start from no grads,
        # or the previous run's graph would be added in.
        wc.model.zero_grad(set_to_none=True)
        return pyhessian.hessian(wc.model, wc.loss_fn, data=(wc.X, wc.y), cuda=False)

    def eig(seed: int):
        torch.manual_seed(seed)  # PyHessian draws its start vectors from the global RNG
        count[0] = 0
        ph.hessian_vector_product = counted
        try:
            vals, _ = make_obj().eigenvalues(top_n=K, tol=1e-3)
        finally:
            ph.hessian_vector_product = original
        return vals, {"products": count[0]}

    def trace(seed: int):
        torch.manual_seed(seed)
        vhv = torch.tensor(make_obj().trace(), dtype=torch.float64)  # maxIter=100, tol=1e-3
        # The spread of its own probes, zᵀHz, tells how noisy any 60-probe Hutchinson is here.
        return float(vhv.mean()), {"products": len(vhv), "probe_std": float(vhv.std())}

    note = "power iteration with deflation, maxIter=100 per eigenvalue; constructor timed too"
    return [
        Row("ph", "PyHessian `hessian(...).eigenvalues(top_n=10, tol=1e-3)`", eig, note=note),
        Row("ph_trace", "PyHessian `hessian(...).trace()` (Hutchinson, tol=1e-3)", trace, "trace"),
    ]


def curvlinops_rows(w: Workload) -> list[Row]:
    try:
        import curvlinops  # noqa: F401
        import numpy as np
        from scipy.sparse.linalg import eigsh
    except Exception as exc:
        why = f"not importable ({type(exc).__name__}: {exc})"
        return [Row("cl", "curvlinops + eigsh", None, skipped=why)]
    wc = w.copy()

    def run(seed: int):
        op = curvlinops_hessian(wc, np.float32)
        op, count = counting_scipy(op)
        v0 = np.random.default_rng(seed).standard_normal(op.shape[0]).astype(np.float32)
        vals = eigsh(op, k=K, which="LA", tol=1e-4, v0=v0, return_eigenvectors=False)
        return np.sort(vals)[::-1].copy(), {"products": count[0]}

    note = (
        "`HessianLinearOperator(...).to_scipy(float32)` + `eigsh(k=10, which='LA', tol=1e-4)` "
        "(tol matched to curvkit's; eigsh's default tol=0 asks for machine precision)"
    )
    return [Row("cl", "curvlinops `HessianLinearOperator` + scipy `eigsh`", run, note=note)]


# --------------------------------------------------------------------------------------------
# Context timings
# --------------------------------------------------------------------------------------------


def context_timings(w: Workload, n: int) -> dict[str, float]:
    H = ck.hessian(w.model, w.loss_fn, (w.X, w.y), structure="operator", progress=False)
    v = torch.randn(w.P, generator=torch.Generator().manual_seed(0))
    named = dict(w.model.named_parameters())
    names = list(named)
    shapes = [p.shape for p in named.values()]
    sizes = [p.numel() for p in named.values()]
    detached = {k: p.detach() for k, p in named.items()}
    tangent = {k: t.view(s) for k, t, s in zip(names, v.split(sizes), shapes, strict=True)}

    def loss_of(p):
        return w.loss_fn(functional_call(w.model, p, (w.X,)), w.y)

    g = grad(loss_of)

    def func_hvp():
        return jvp(g, (detached,), (tangent,))[1]

    params = list(w.model.parameters())

    def double_backward():
        gs = torch.autograd.grad(w.loss_fn(w.model(w.X), w.y), params, create_graph=True)
        return torch.autograd.grad(gs, params, grad_outputs=list(tangent.values()))

    def grad_pass():
        w.model.zero_grad()
        w.loss_fn(w.model(w.X), w.y).backward()

    def ck_hvp():
        return H @ v

    out = {}
    fns = {
        "grad": grad_pass,
        "ck_hvp": ck_hvp,
        "func_hvp": func_hvp,
        "double_backward": double_backward,
    }
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):  # interleaved
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        out[k] = statistics.median(ts)
    w.model.zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_rows(rows: list[Row], repeats: int) -> None:
    """One warm-up of each row, then ``repeats`` rounds that time every row once in turn:
    interleaved, so that a slow minute on this shared machine hits every row alike."""

    def once(row: Row, seed: int, timed: bool) -> None:
        if row.skipped:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gc.collect()
                t0 = time.perf_counter()
                res, extra = row.fn(seed)
                if timed:
                    row.times.append(time.perf_counter() - t0)
                    row.results.append(res)
                    row.extras.append(extra)
        except Exception as exc:
            row.skipped = f"failed: {short_exc(exc)}"

    for row in rows:
        log(f"  warm-up: {row.label} ...")
        once(row, 0, timed=False)
    for r in range(repeats):
        log(f"  round {r + 1}/{repeats} ...")
        for row in rows:
            once(row, r + 1, timed=True)


def span(xs: list[float], fmt: str = "{:.1e}") -> str:
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def print_table(header: str, rows: list[Row], ref_row: Row, error: Callable) -> None:
    """One Markdown table: median time, products and ``error(result)`` over the runs, and the
    time relative to ``ref_row``'s."""
    print(header)
    print("|---|---|---|---|---|")
    t_ref = statistics.median(ref_row.times) if ref_row.times else None
    for row in rows:
        if row.skipped:
            print(f"| {row.label} | skipped: {row.skipped} | | | |")
            continue
        t = statistics.median(row.times)
        errs = [error(res) for res in row.results]
        prods = [e["products"] for e in row.extras]
        ratio = "1.00 (ref)" if row is ref_row else (f"{t / t_ref:.2f}" if t_ref else "—")
        print(f"| {row.label} | {fmt_t(t)} | {span(prods, '{:.0f}')} | {span(errs)} | {ratio} |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    ap.add_argument("--quick", action="store_true", help="one run per row, one reference only")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (default 2)")
    ap.add_argument("--ref-max-iter", type=int, default=600, help="reference Lanczos max_iter")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        ap.error("--repeats must be at least 1")
    torch.set_num_threads(args.threads)
    load_start = load_average()
    t_start = time.perf_counter()

    w = build()
    print(
        f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU {cpu_model()} ({os.cpu_count()} logical cores), python {platform.python_version()}; "
        f"curvkit {getattr(ck, '__version__', '?')}"
    )
    print(
        f"W-spectral: MLP 64-256-256-10 Tanh, P={w.P}, N={w.X.shape[0]} in one batch, "
        f"CrossEntropyLoss() (mean), float32; {repeats} interleaved timed round(s) after 1 "
        "warm-up, median. "
        f"Load average at start {load_start}.",
        flush=True,
    )

    # ---- references ----
    log("reference: curvkit Lanczos, float64, tol=1e-10 ...")
    w64 = w.copy(torch.float64)
    ref, ref_products, ref_t = reference_curvkit(w64, args.ref_max_iter)
    ref_lines = [
        f"curvkit `top_eigenvalues(H64, k=10, tol=1e-10)`: {ref_products} products, {fmt_t(ref_t)}"
    ]
    if not args.quick:
        log("reference: eigsh, float64, tol=1e-10 ...")
        try:
            ref2, n2, t2, source = reference_eigsh(w64)
            agree = float(((ref2 - ref) / ref).abs().max())
            ref_lines.append(
                f"{source} (tol=1e-10): {n2} products, {fmt_t(t2)}; max rel. difference from "
                f"the curvkit reference: {agree:.1e}"
            )
        except Exception as exc:
            ref_lines.append(f"second reference (eigsh) failed: {short_exc(exc)}")
    log("exact trace: curvkit exact Hessian diagonal ...")
    t0 = time.perf_counter()
    exact_trace = float(
        ck.hessian(w.model, w.loss_fn, (w.X, w.y), structure="diag", progress=False).trace()
    )
    t_trace = time.perf_counter() - t0

    # ---- rows ----
    rows = curvkit_rows(w) + eigenthings_rows(w) + pyhessian_rows(w) + curvlinops_rows(w)
    run_rows(rows, repeats)
    ck_row = next(r for r in rows if r.key == "ck")
    ck_trace_row = next(r for r in rows if r.key == "ck_trace")
    log("context timings ...")
    ctx = context_timings(w, max(5, repeats))

    # ---- tables ----
    print("\nReference top-10 (float64): " + ", ".join(f"{x:.6g}" for x in ref.tolist()))
    for line in ref_lines:
        print(f"- {line}")
    print(
        f"- exact trace (curvkit `hessian(..., structure='diag').trace()`, float32): "
        f"{exact_trace:.6g}, computed in {fmt_t(t_trace)}\n"
    )
    print_table(
        "| method | time (median) | products with H | max rel. error of top-10 | × curvkit time |",
        [r for r in rows if r.kind == "eig"],
        ck_row,
        lambda res: rel_err(res, ref),
    )
    print_table(
        "| trace estimator | time (median) | products with H | rel. error vs exact trace | "
        "× curvkit time |",
        [r for r in rows if r.kind == "trace"],
        ck_trace_row,
        lambda res: abs(res - exact_trace) / abs(exact_trace),
    )
    g = ctx["grad"]
    print(
        "Context (median of interleaved runs): one gradient pass "
        f"{fmt_t(g)}; one curvkit HVP `H @ v` {fmt_t(ctx['ck_hvp'])} "
        f"({ctx['ck_hvp'] / g:.1f}× grad); one `torch.func` HVP (jvp of grad) "
        f"{fmt_t(ctx['func_hvp'])} ({ctx['func_hvp'] / g:.1f}×); one double-backward HVP "
        f"{fmt_t(ctx['double_backward'])} ({ctx['double_backward'] / g:.1f}×)."
    )
    stds = [e["probe_std"] for r in rows for e in r.extras if "probe_std" in e]
    if stds:
        sd = statistics.median(stds)
        print(
            f"- Spread of single Rademacher probes zᵀHz (from PyHessian's samples): std {sd:.3g}, "
            f"so plain Hutchinson with 60 probes has a standard error ≈ {sd / 60**0.5:.3g} "
            f"({sd / 60**0.5 / abs(exact_trace):.1%} of the trace); Hutch++ spends 2/3 of its "
            "products on a top-20 subspace, which pays only when the spectrum decays fast."
        )
    for row in rows:
        if row.note and not row.skipped:
            print(f"- {row.label}: {row.note}")
    print(
        "Errors: max_i |λ_i − λ_i,ref| / |λ_i,ref| over the 10 values, each list sorted "
        "descending; median (min–max) over runs with different start vectors. Products: "
        "columns through the operator (curvkit counts each column of a block product)."
    )
    print(
        f"\nLoad average (1/5/15 min) at end {load_average()} on {os.cpu_count()} logical cores; "
        f"total {time.perf_counter() - t_start:.0f} s. With load above the core count every "
        "time inflates; only ratios from one run are meaningful, and only on a quiet machine."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
