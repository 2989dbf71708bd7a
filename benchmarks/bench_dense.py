"""Dense curvature benchmark: workloads W-dense and W-seed of ``BENCHMARKS.md``.

W-dense: MLP 64-32-32-10 (Tanh, P=3466) on the first 512 training images of scikit-learn's
``load_digits``, ``CrossEntropyLoss()`` (mean), float32, one batch. curvkit's dense Hessian, GGN
and empirical Fisher are timed side by side with peers in the same process, and each result is
checked against the peer's. Peak memory added by each call is measured in a fresh subprocess.

W-seed: the exact 21x21 Hessian of ``Flatten -> Linear(2,5) -> Linear(5,1) -> Sigmoid`` with
``BCELoss`` on 5 points, checked against central finite differences of the gradient (float64).

Peers that are not installed (curvlinops, laplace-torch) are skipped and the table says so.
curvkit itself never imports a peer; only this script does, guarded.

Usage::

    PYTHONPATH=src python benchmarks/bench_dense.py [--repeats 3] [--no-memory]

The script prints a markdown table on stdout (paste it into ``benchmarks/README.md``).
Internally, ``--child METHOD`` runs one method once in this process and prints its memory use as
one JSON line; the parent runs each method that way in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _common import cpu_model, digits_train  # noqa: E402
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import curvkit as ck

N_TRAIN = 1437
N_BATCH = 512
THREADS = 2
MM_SIZE = 2048


# --------------------------------------------------------------------------------------------
# Workload set-up
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    loss_fn: nn.Module
    names: list[str]
    shapes: list[torch.Size]
    sizes: list[int]
    theta0: torch.Tensor
    layer_sizes: list[int] = field(default_factory=list)

    @property
    def P(self) -> int:
        return int(self.theta0.numel())

    @property
    def N(self) -> int:
        return int(self.X.shape[0])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: t.view(s)
            for n, t, s in zip(self.names, theta.split(self.sizes), self.shapes, strict=True)
        }


def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """First ``N_BATCH`` training samples of the BENCHMARKS.md digits split (float32)."""
    return digits_train(N_BATCH)


def build_dense() -> Workload:
    torch.set_num_threads(THREADS)
    X, y = digits_batch()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    )
    model.eval()
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    layer_sizes = [m.out_features * (m.in_features + 1) for m in model if isinstance(m, nn.Linear)]
    return Workload(model, X, y, nn.CrossEntropyLoss(), names, shapes, sizes, theta0, layer_sizes)


def curvkit_to_named_order(w: Workload, M: torch.Tensor) -> torch.Tensor:
    """Reorder a curvkit (P,P) matrix into ``model.named_parameters()`` order (the peers')."""
    slices = ck.parameter_slices(w.model)
    idx = torch.cat([torch.arange(w.P)[slices[n]] for n in w.names])
    if torch.equal(idx, torch.arange(w.P)):
        return M
    return M[idx][:, idx]


# --------------------------------------------------------------------------------------------
# Methods (each returns a (P,P) tensor in named_parameters order)
# --------------------------------------------------------------------------------------------


def ck_hessian(w: Workload) -> torch.Tensor:
    return curvkit_to_named_order(w, ck.hessian(w.model, w.loss_fn, (w.X, w.y)))


def ck_ggn(w: Workload) -> torch.Tensor:
    return curvkit_to_named_order(w, ck.ggn(w.model, w.loss_fn, (w.X, w.y)))


def ck_ef(w: Workload) -> torch.Tensor:
    return curvkit_to_named_order(w, ck.ef(w.model, w.loss_fn, (w.X, w.y)))


def rowwise_hessian(w: Workload) -> torch.Tensor:
    """Row-by-row double backward: ``autograd.grad`` of each entry of the flat gradient."""
    params = list(w.model.parameters())
    loss = w.loss_fn(w.model(w.X), w.y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    H = torch.empty(w.P, w.P, dtype=g.dtype)
    for i in range(w.P):
        row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        H[i] = torch.cat(
            [
                (r if r is not None else torch.zeros_like(p)).reshape(-1)
                for r, p in zip(row, params, strict=True)
            ]
        )
    return H


def func_hessian(w: Workload) -> torch.Tensor:
    """``torch.func.hessian`` over ``functional_call`` on the flat parameter vector."""

    def loss_of(theta: torch.Tensor) -> torch.Tensor:
        return w.loss_fn(functional_call(w.model, w.unflatten(theta), (w.X,)), w.y)

    return torch.func.hessian(loss_of)(w.theta0)


def vmap_ggn(w: Workload) -> torch.Tensor:
    """Per-sample ``vmap(jacrev)`` Jacobians contracted with the softmax Hessian, / N."""

    def f_single(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(w.model, w.unflatten(theta), (x.unsqueeze(0),)).squeeze(0)

    J = vmap(jacrev(f_single), in_dims=(None, 0))(w.theta0, w.X)  # (N, C, P)
    with torch.no_grad():
        p = torch.softmax(w.model(w.X), dim=-1)  # (N, C)
    Hs = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (N, C, C)
    HJ = torch.einsum("ncd,ndp->ncp", Hs, J)
    return J.reshape(-1, w.P).T @ HJ.reshape(-1, w.P) / w.N


def vmap_ef(w: Workload) -> torch.Tensor:
    """Per-sample ``vmap(grad)`` gradients ``G`` (N,P), then ``G.T @ G / N``."""

    def loss_single(theta: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = functional_call(w.model, w.unflatten(theta), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0))

    G = vmap(grad(loss_single), in_dims=(None, 0, 0))(w.theta0, w.X, w.y)
    return G.T @ G / w.N


def curvlinops_available() -> tuple[bool, str]:
    try:
        import curvlinops
    except Exception as exc:
        return False, f"not installed ({type(exc).__name__})"
    return True, f"curvlinops {getattr(curvlinops, '__version__', '?')}"


def _curvlinops_dense(w: Workload, cls_name: str) -> torch.Tensor:
    """``<cls_name>(...) @ eye(P)``, for both the scipy-based and the torch-based curvlinops."""
    import curvlinops

    cls = getattr(curvlinops, cls_name)
    params = [p for p in w.model.parameters() if p.requires_grad]
    accepted = inspect.signature(cls).parameters
    optional = {"check_deterministic": False, "progressbar": False}
    kwargs = {k: v for k, v in optional.items() if k in accepted}
    op = cls(w.model, w.loss_fn, params, [(w.X, w.y)], **kwargs)
    try:
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator
    except ImportError:  # pragma: no cover - scipy is a curvlinops dependency
        ScipyLinearOperator = ()
    if isinstance(op, ScipyLinearOperator):  # curvlinops < 3: numpy in, numpy out
        import numpy as np

        return torch.from_numpy(np.asarray(op @ np.eye(w.P, dtype=np.float32)))
    out = op @ torch.eye(w.P, dtype=w.theta0.dtype)
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def curvlinops_hessian(w: Workload) -> torch.Tensor:
    return _curvlinops_dense(w, "HessianLinearOperator")


def curvlinops_ggn(w: Workload) -> torch.Tensor:
    return _curvlinops_dense(w, "GGNLinearOperator")


def laplace_available() -> tuple[bool, str]:
    try:
        import laplace
        from laplace import Laplace  # noqa: F401
    except Exception as exc:
        return False, f"not installed or not importable ({type(exc).__name__})"
    return True, f"laplace-torch {getattr(laplace, '__version__', '?')}"


def laplace_full_ggn(w: Workload) -> torch.Tensor:
    """laplace-torch ``FullLaplace`` fit (default backend); its ``H`` is the sum-loss GGN."""
    from laplace import Laplace
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(w.X, w.y), batch_size=w.N)
    la = Laplace(w.model, "classification", subset_of_weights="all", hessian_structure="full")
    if "progress_bar" in inspect.signature(la.fit).parameters:
        la.fit(loader, progress_bar=False)
    else:
        la.fit(loader)
    return la.H.detach() / w.N


@dataclass
class Method:
    key: str
    group: str  # "hessian" | "ggn" | "ef"
    label: str
    fn: Callable[[Workload], torch.Tensor]
    curvkit: bool = False
    available: Callable[[], tuple[bool, str]] = lambda: (True, "")


METHODS: list[Method] = [
    Method("ck_hessian", "hessian", "curvkit `ck.hessian`", ck_hessian, curvkit=True),
    Method("rowwise_hessian", "hessian", "row-by-row double backward", rowwise_hessian),
    Method("func_hessian", "hessian", "`torch.func.hessian` (flat params)", func_hessian),
    Method(
        "curvlinops_hessian",
        "hessian",
        "curvlinops `HessianLinearOperator @ eye(P)`",
        curvlinops_hessian,
        available=curvlinops_available,
    ),
    Method("ck_ggn", "ggn", "curvkit `ck.ggn`", ck_ggn, curvkit=True),
    Method("vmap_ggn", "ggn", "`vmap(jacrev)` Jacobians + softmax Hessian", vmap_ggn),
    Method(
        "curvlinops_ggn",
        "ggn",
        "curvlinops `GGNLinearOperator @ eye(P)`",
        curvlinops_ggn,
        available=curvlinops_available,
    ),
    Method(
        "laplace_full",
        "ggn",
        "laplace-torch `FullLaplace.fit`",
        laplace_full_ggn,
        available=laplace_available,
    ),
    Method("ck_ef", "ef", "curvkit `ck.ef`", ck_ef, curvkit=True),
    Method("vmap_ef", "ef", "`vmap(grad)` per-sample gradients, `G.T@G/N`", vmap_ef),
]
METHODS_BY_KEY = {m.key: m for m in METHODS}
GROUP_TITLES = {"hessian": "exact Hessian", "ggn": "GGN", "ef": "empirical Fisher"}


# --------------------------------------------------------------------------------------------
# Measurement helpers
# --------------------------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kib() -> int:
    """Current resident set size in KiB (``VmRSS``), psutil as fallback."""
    rss = _proc_status_kib("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return psutil.Process().memory_info().rss // 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(key: str) -> None:
    """Run one method once in this (fresh) process; print its memory use as one JSON line.

    The peak is ``ru_maxrss``. On Linux, however, ``ru_maxrss`` of a process started by
    fork+exec also remembers the parent's RSS at fork time (the kernel folds the pre-exec peak
    into it), so a child of a 2 GB parent reports >= 2 GB whatever it does. Where the kernel
    lets us reset the peak mark (``/proc/self/clear_refs``), the process's own peak ``VmHWM``
    is used instead, which that inheritance does not touch.
    """
    method = METHODS_BY_KEY[key]
    w = build_dense()
    gc.collect()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = reset_peak_rss()
    before = rss_kib()
    result = method.fn(w)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _proc_status_kib("VmHWM")
    use_hwm = reset and hwm is not None
    print(
        json.dumps(
            {
                "method": key,
                "rss_before_kib": before,
                "peak_kib": hwm if use_hwm else maxrss,
                "peak_source": "VmHWM" if use_hwm else "ru_maxrss",
                "ru_maxrss_kib": maxrss,
                "ru_maxrss_before_kib": maxrss_before,
                "peak_reset": use_hwm,
                "result_mb": result.numel() * result.element_size() / 2**20,
            }
        )
    )


def measure_memory(key: str) -> dict | str:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", key]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"child failed: {tail}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (elementwise maximum, in float64)."""
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def matmul_gflops(repeats: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(MM_SIZE, MM_SIZE, generator=g)
    B = torch.randn(MM_SIZE, MM_SIZE, generator=g)
    torch.mm(A, B)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(A, B)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return t, 2 * MM_SIZE**3 / t / 1e9


def flop_counts(layer_sizes: list[int], N: int) -> tuple[float, float]:
    """Nominal FLOPs of the structured dense GGN and Hessian (see the table's footnote)."""
    L = len(layer_sizes)
    upper = sum(2 * N * layer_sizes[l] * layer_sizes[m] for l in range(L) for m in range(l, L))
    strict = sum(2 * N * layer_sizes[l] * layer_sizes[m] for l in range(L) for m in range(l + 1, L))
    return float(upper + strict), float(upper)  # (Hessian, GGN)


# --------------------------------------------------------------------------------------------
# W-seed
# --------------------------------------------------------------------------------------------


def wseed() -> dict:
    torch.manual_seed(0)
    X = torch.randn(5, 2, 1, 1, dtype=torch.float64)
    t = torch.rand(5, 1, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 5), nn.Linear(5, 1), nn.Sigmoid()).double()
    loss_fn = nn.BCELoss()

    t0 = time.perf_counter()
    H = ck.hessian(model, loss_fn, (X, t))
    t_ck = time.perf_counter() - t0
    names = [n for n, _ in model.named_parameters()]
    slices = ck.parameter_slices(model)
    P = sum(p.numel() for p in model.parameters())
    idx = torch.cat([torch.arange(P)[slices[n]] for n in names])
    H = H[idx][:, idx]

    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def grad_at(theta: torch.Tensor) -> torch.Tensor:
        theta = theta.clone().requires_grad_(True)
        pdict = {n: v.view(s) for n, v, s in zip(names, theta.split(sizes), shapes, strict=True)}
        loss = loss_fn(functional_call(model, pdict, (X,)), t)
        return torch.autograd.grad(loss, theta)[0]

    eps = 1e-5
    t0 = time.perf_counter()
    H_fd = torch.empty(P, P, dtype=torch.float64)
    for i in range(P):
        e = torch.zeros(P, dtype=torch.float64)
        e[i] = eps
        H_fd[:, i] = (grad_at(theta0 + e) - grad_at(theta0 - e)) / (2 * eps)
    H_fd = 0.5 * (H_fd + H_fd.T)
    t_fd = time.perf_counter() - t0
    return {
        "P": P,
        "shape": tuple(H.shape),
        "t_ck": t_ck,
        "t_fd": t_fd,
        "max_abs": float((H.double() - H_fd).abs().max()),
        "max_entry": float(H_fd.abs().max()),
        "dtype": str(H.dtype),
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def fmt_t(t: float | None) -> str:
    return "—" if t is None else (f"{t * 1e3:.1f} ms" if t < 0.1 else f"{t:.3f} s")


def fmt_spread(ts: list[float]) -> str:
    """Median with the min-max range of the timed runs."""
    lo, hi = min(ts), max(ts)
    unit, k = ("ms", 1e3) if hi < 0.1 else ("s", 1.0)
    return f"{fmt_t(statistics.median(ts))} ({lo * k:.3g}–{hi * k:.3g} {unit})"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (>=3)")
    ap.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    ap.add_argument("--child", metavar="METHOD", choices=sorted(METHODS_BY_KEY), help="internal")
    args = ap.parse_args()

    if args.child:
        run_child(args.child)
        return 0
    if args.repeats < 3:
        ap.error("--repeats must be at least 3")

    load_start = load_average()
    w = build_dense()
    print(
        f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU {cpu_model()} ({os.cpu_count()} logical cores), python {platform.python_version()}; "
        f"curvkit {getattr(ck, '__version__', '?')}",
        flush=True,
    )
    print(
        f"W-dense: MLP 64-32-32-10 Tanh, P={w.P}, N={w.N}, CrossEntropyLoss (mean), float32; "
        f"{args.repeats} timed runs after 1 warm-up, median; peers interleaved with curvkit",
        file=sys.stderr,
        flush=True,
    )

    # Availability.
    skipped: dict[str, str] = {}
    for m in METHODS:
        ok, why = m.available()
        if not ok:
            skipped[m.key] = why

    # Memory first, while this parent process is still small (see run_child).
    mem: dict[str, dict | str] = {}
    if not args.no_memory:
        for m in METHODS:
            if m.key not in skipped:
                print(f"  memory {m.key} (fresh process) ...", file=sys.stderr, flush=True)
                mem[m.key] = measure_memory(m.key)

    # Warm-up.
    active: list[Method] = []
    for m in METHODS:
        if m.key in skipped:
            continue
        print(f"  warm-up {m.key} ...", file=sys.stderr, flush=True)
        try:
            m.fn(w)
        except Exception as exc:
            skipped[m.key] = f"failed: {type(exc).__name__}: {exc}"
            if m.curvkit:
                raise
            continue
        active.append(m)

    # Timed rounds, interleaved so that machine noise hits every method alike.
    times: dict[str, list[float]] = {m.key: [] for m in active}
    results: dict[str, torch.Tensor] = {}
    for r in range(args.repeats):
        print(f"  round {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for m in active:
            gc.collect()
            t0 = time.perf_counter()
            out = m.fn(w)
            times[m.key].append(time.perf_counter() - t0)
            results[m.key] = out
            del out
    med = {k: statistics.median(v) for k, v in times.items()}

    t_mm, gflops_mm = matmul_gflops(max(args.repeats, 5))
    flops_h, flops_g = flop_counts(w.layer_sizes, w.N)
    flops = {"ck_hessian": flops_h, "ck_ggn": flops_g}

    print("  W-seed ...", file=sys.stderr, flush=True)
    seed = wseed()

    # ---- table ----
    print()
    print(
        "| workload | quantity | method | time | peer / curvkit | max rel. diff vs curvkit "
        "| memory added | GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    any_peak_unreset = False
    for group in ("hessian", "ggn", "ef"):
        ck_key = next(m.key for m in METHODS if m.group == group and m.curvkit)
        for m in (m for m in METHODS if m.group == group):
            if m.key in skipped:
                print(
                    f"| W-dense | {GROUP_TITLES[group]} | {m.label} | skipped: {skipped[m.key]} "
                    "| | | | |"
                )
                continue
            t = med[m.key]
            t_s = fmt_spread(times[m.key])
            ratio = "1.00× (ref)" if m.curvkit else f"{t / med[ck_key]:.2f}×"
            diff = "—" if m.curvkit else f"{max_rel_diff(results[ck_key], results[m.key]):.1e}"
            mm = mem.get(m.key)
            if mm is None:
                mem_s = "not measured"
            elif isinstance(mm, str):
                mem_s = mm
            else:
                added = (mm["peak_kib"] - mm["rss_before_kib"]) / 1024
                mem_s = f"{added:.0f} MB"
                if not mm["peak_reset"] and mm["ru_maxrss_before_kib"] > mm["rss_before_kib"]:
                    mem_s += " (†)"
                    any_peak_unreset = True
            gf = f"{flops[m.key] / t / 1e9:.1f}" if m.key in flops else ""
            print(
                f"| W-dense | {GROUP_TITLES[group]} | {m.label} | {t_s} | {ratio} | {diff} "
                f"| {mem_s} | {gf} |"
            )
    print(
        f"| reference | `torch.mm` {MM_SIZE}×{MM_SIZE} float32 | torch | {fmt_t(t_mm)} | | | "
        f"| {gflops_mm:.1f} |"
    )
    print(
        f"| W-seed | exact Hessian {seed['shape'][0]}×{seed['shape'][1]} ({seed['dtype']}) "
        f"| curvkit `ck.hessian` | {fmt_t(seed['t_ck'])} | | max abs diff vs central FD of "
        f"the gradient: {seed['max_abs']:.1e} (max entry {seed['max_entry']:.2f}; "
        f"FD took {fmt_t(seed['t_fd'])}) | | |"
    )
    print()
    L = len(w.layer_sizes)
    print(
        "Footnotes. Time: median (min–max) of "
        f"{args.repeats} runs after one warm-up, all methods interleaved in one process; "
        "ratio = peer time / curvkit time from the same run (> 1: curvkit faster). "
        "Max rel. diff = max|curvkit − peer| / max|peer|. "
        "Memory added = peak RSS minus RSS before the call, one call in a fresh process after "
        "the model and data are built (peak = `VmHWM` after resetting it via "
        "`/proc/self/clear_refs`, else `ru_maxrss`; includes the "
        f"{w.P * w.P * 4 / 2**20:.0f} MB result). "
        "GFLOP/s = nominal FLOPs / time, with P_l = d_out,l·(d_in,l + 1) per Linear layer "
        f"(here {', '.join(map(str, w.layer_sizes))}; L = {L}, N = {w.N}): "
        f"GGN = Σ_(l≤m) 2·N·P_l·P_m = {flops_g / 1e9:.2f} GFLOP; "
        f"Hessian = GGN + Σ_(l<m) 2·N·P_l·P_m = {flops_h / 1e9:.2f} GFLOP; "
        f"`torch.mm` = 2·{MM_SIZE}³ = {2 * MM_SIZE**3 / 1e9:.2f} GFLOP."
    )
    print(
        f"Load average (1/5/15 min) at start {load_start}, at end {load_average()}, on "
        f"{os.cpu_count()} logical cores. Time column: median (min–max). Under contention "
        "(load above the core count) times of many small kernels — the row-by-row peer above "
        "all — inflate by large factors; rerun on a quiet machine before quoting a ratio."
    )
    if any_peak_unreset:
        print(
            "(†) the peak-RSS mark could not be reset before the call and was already above the "
            "baseline, so this figure may understate the call's own peak."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
