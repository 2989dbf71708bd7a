"""KFAC and diagonal-GGN benchmark: workloads W-kfac-mlp and W-kfac-cnn of ``BENCHMARKS.md``.

W-kfac-mlp: MLP 64-256-256-10 (Tanh, P=85002); W-kfac-cnn: ``Unflatten -> Conv2d(1,16,3,pad=1)
-> ReLU -> Conv2d(16,32,3) -> ReLU -> Flatten -> Linear(1152,10)`` (P=16330). Both on the 1437
training images of scikit-learn's ``load_digits`` in batches of 256 (the last one 157),
``CrossEntropyLoss(reduction="sum")``, float32, ``model.eval()``.

Rows: KFAC with the exact GGN, KFAC with a 1-sample Monte-Carlo Fisher, the exact GGN diagonal
and the MC diagonal, each from curvkit and from every installed peer that offers it (BackPACK,
nngeometry, curvlinops, ASDL). Each method's time is reported as a multiple of ONE gradient pass
over the same loader (forward + backward of the summed loss per batch, after ``zero_grad``),
timed interleaved with it (grad pass, method, grad pass, method, ...): ratio = min(method) /
min(the grad passes interleaved with it), after one warm-up of each. Correctness: curvkit's
exact KFAC and exact diagonal against BackPACK's KFLR and DiagGGNExact (and curvlinops' type-2
KFAC, nngeometry's and ASDL's exact diagonals where they run). A nominal multiply-add count of
the gradient pass, of an exact KFAC and of an exact diagonal is printed next to the table.

Every peer import is guarded: a peer that is missing or fails is skipped and its line says why.
curvkit itself never imports a peer; only this script does.

Usage::

    python benchmarks/bench_kfac.py [--repeats 5] [--workloads mlp,cnn] [--quick]

``--quick`` is one timed run per method (a smoke test of the whole script, ratios not quotable).
The script prints markdown tables on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _common import cpu_model, digits_train, fmt_t, load_average, short_exc  # noqa: E402
from torch import nn

import curvkit as ck

N_TRAIN = 1437
BATCH = 256
THREADS = 2
PEERS = ("curvkit", "BackPACK", "nngeometry", "curvlinops", "ASDL")
ROWS = {
    "kfac_exact": "KFAC, exact GGN",
    "kfac_mc": "KFAC, MC Fisher (1 sample)",
    "diag_exact": "diagonal GGN, exact",
    "diag_mc": "diagonal GGN, MC (1 sample)",
}


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    key: str
    title: str
    model: nn.Module
    loader: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: nn.Module
    has_unflatten: bool
    layers: list[nn.Module] = field(default_factory=list)  # Linear / Conv2d, in order

    @property
    def N(self) -> int:  # noqa: N802
        return sum(int(y.shape[0]) for _, y in self.loader)

    @property
    def P(self) -> int:  # noqa: N802
        return sum(p.numel() for p in self.model.parameters())


def make_loader(X: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (X[i : i + BATCH].contiguous(), y[i : i + BATCH].contiguous())
        for i in range(0, X.shape[0], BATCH)
    ]


def build_workloads(which: list[str]) -> list[Workload]:
    X, y = digits_train()
    out = []
    if "mlp" in which:
        torch.manual_seed(0)
        mlp = nn.Sequential(
            nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
        ).eval()
        out.append(
            Workload(
                "W-kfac-mlp",
                "MLP 64-256-256-10 Tanh",
                mlp,
                make_loader(X, y),
                nn.CrossEntropyLoss(reduction="sum"),
                False,
            )
        )
    if "cnn" in which:
        torch.manual_seed(0)
        cnn = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(1152, 10),
        ).eval()
        out.append(
            Workload(
                "W-kfac-cnn",
                "CNN Conv(1,16,3,p1)-ReLU-Conv(16,32,3)-ReLU-Linear(1152,10)",
                cnn,
                make_loader(X, y),
                nn.CrossEntropyLoss(reduction="sum"),
                True,
            )
        )
    for w in out:
        w.layers = [m for m in w.model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return out


def private_copy(w: Workload, drop_unflatten: bool = False):
    """A deep copy of the model (same weights) and of the batches, for one peer.

    Peers install hooks, set ``requires_grad`` on inputs or leave graphs in ``.grad``; a copy
    keeps that from touching the gradient pass or the other methods. With ``drop_unflatten``
    the leading ``Unflatten`` is removed and applied to the inputs instead."""
    model = copy.deepcopy(w.model)
    loader = [(x.clone(), t.clone()) for x, t in w.loader]
    if drop_unflatten and w.has_unflatten:
        first = model[0]
        assert isinstance(first, nn.Unflatten)
        model = nn.Sequential(*list(model)[1:]).eval()
        loader = [(first(x).contiguous(), t) for x, t in loader]
    return model, loader


def grad_pass(w: Workload) -> None:
    """ONE gradient pass over the loader: zero_grad, forward, summed loss, backward per batch."""
    for x, t in w.loader:
        w.model.zero_grad()
        w.loss_fn(w.model(x), t).backward()


# --------------------------------------------------------------------------------------------
# Results in a common form, for the checks
# --------------------------------------------------------------------------------------------


@dataclass
class KronResult:
    """Per rule layer (in module order): weight block Bw ⊗ Aw and bias block Bb ⊗ ab (all sums,
    scaled so that they estimate the GGN of the summed loss), plus the full layer's
    (B, A_aug) when the peer couples weight and bias like curvkit (bias as last input column)."""

    weight: list[tuple[torch.Tensor, torch.Tensor]]
    bias: list[torch.Tensor]
    joint: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def kron_rel_diff(B1, A1, B2, A2) -> float:
    """‖B1⊗A1 − B2⊗A2‖_F / ‖B2⊗A2‖_F without forming either product (float64):
    ‖X⊗Y‖² = ‖X‖²‖Y‖² and ⟨B1⊗A1, B2⊗A2⟩ = ⟨B1,B2⟩⟨A1,A2⟩."""
    B1, A1, B2, A2 = (t.double() for t in (B1, A1, B2, A2))
    n1 = B1.square().sum() * A1.square().sum()
    n2 = B2.square().sum() * A2.square().sum()
    ip = (B1 * B2).sum() * (A1 * A2).sum()
    return float((n1 + n2 - 2 * ip).clamp_min(0).sqrt() / n2.sqrt())


def vec_rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def curvkit_kron_factors(K) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(B, A_aug) of each Kronecker block of a curvkit KFAC operator, in module order.

    A block keeps its factors (B, A), or stores (U_B ⊗ U_A) diag(vec λ) (U_B ⊗ U_A)ᵀ with
    λ = λ_B λ_Aᵀ (rank one); then B = U_B diag(λ[:, j]) U_Bᵀ and A = U_A diag(λ[i, :] / λ[i, j])
    U_Aᵀ give B ⊗ A exactly."""
    out = []
    for blk in K.blocks:
        if not hasattr(blk, "UB"):
            continue
        factors = getattr(blk, "factors", None)  # curvkit >= 9dffd78 keeps B, A until needed
        if factors is not None:
            out.append((factors[0].double(), factors[1].double()))
            continue
        lam = blk.lam.double()
        j = int(lam.abs().sum(0).argmax())
        i = int(lam.abs().sum(1).argmax())
        UB, UA = blk.UB.double(), blk.UA.double()
        B = (UB * lam[:, j]) @ UB.T
        A = (UA * (lam[i, :] / lam[i, j])) @ UA.T
        out.append((B, A))
    return out


# --------------------------------------------------------------------------------------------
# curvkit
# --------------------------------------------------------------------------------------------


def ck_kfac_exact(w: Workload):
    return ck.ggn(w.model, w.loss_fn, w.loader, structure="kron", progress=False)


def ck_kfac_mc(w: Workload):
    g = torch.Generator().manual_seed(0)
    return ck.fisher(
        w.model, w.loss_fn, w.loader, structure="kron", mc_samples=1, generator=g, progress=False
    )


def ck_diag_exact(w: Workload):
    return ck.ggn(w.model, w.loss_fn, w.loader, structure="diag", progress=False)


def ck_diag_mc(w: Workload):
    g = torch.Generator().manual_seed(0)
    return ck.fisher(
        w.model, w.loss_fn, w.loader, structure="diag", mc_samples=1, generator=g, progress=False
    )


# --------------------------------------------------------------------------------------------
# Peers. Each factory returns (fn, note) or raises; fn() computes the quantity once.
# --------------------------------------------------------------------------------------------


class NotOffered(Exception):
    """The peer has no such method (a '—' cell with a footnote, not a failure)."""


def _version(mod) -> str:
    return getattr(mod, "__version__", "?")


def peer_versions() -> dict[str, str]:
    """Which peers import, with their versions (or why not)."""
    out = {}
    for name, modname in [
        ("BackPACK", "backpack"),
        ("nngeometry", "nngeometry"),
        ("curvlinops", "curvlinops"),
        ("ASDL", "asdl"),
    ]:
        try:
            mod = __import__(modname)
            ver = _version(mod)
            if ver == "?":
                from importlib.metadata import version

                dist = {
                    "backpack": "backpack-for-pytorch",
                    "curvlinops": "curvlinops-for-pytorch",
                    "asdl": "asdfghjkl",
                }.get(modname, modname)
                try:
                    ver = version(dist)
                except Exception:
                    pass
            out[name] = ver
        except Exception as exc:
            out[name] = f"not importable ({type(exc).__name__}: {exc})"
    return out


# BackPACK ------------------------------------------------------------------------------------


def backpack_factory(w: Workload, row: str):
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR, DiagGGNExact, DiagGGNMC

    ext, field_name = {
        "kfac_exact": (KFLR, "kflr"),
        "kfac_mc": (lambda: KFAC(mc_samples=1), "kfac"),
        "diag_exact": (DiagGGNExact, "diag_ggn_exact"),
        "diag_mc": (lambda: DiagGGNMC(mc_samples=1), "diag_ggn_mc"),
    }[row]
    extension = ext()
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))

    def make(drop_unflatten: bool):
        model, loader = private_copy(w, drop_unflatten=drop_unflatten)
        model = extend(model)
        layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]

        def run():
            acc: dict = {}
            for x, t in loader:
                model.zero_grad()
                loss = loss_fn(model(x), t)
                with backpack(extension):
                    loss.backward()
                n = x.shape[0]
                for li, m in enumerate(layers):
                    fw, fb = getattr(m.weight, field_name), getattr(m.bias, field_name)
                    if row.startswith("diag"):
                        vals = [fw, fb]
                    else:
                        # Per batch: weight [B_b, A_b / N_b] (A_b = Σ_batch x xᵀ), bias [B_b].
                        # Summed consistently: B = Σ_b B_b, A = Σ_b N_b · (A_b / N_b) = Σ x xᵀ,
                        # and KFAC(weight) = B ⊗ A / N for the summed loss.
                        vals = [fw[0], fw[1] * n, fb[0]]
                    if li not in acc:
                        acc[li] = [v.detach().clone() for v in vals]
                    else:
                        for a, v in zip(acc[li], vals, strict=True):
                            a.add_(v)
            return acc

        return model, loader, run

    if not w.has_unflatten:
        return make(False)[2], ""
    # BackPACK has no extension for nn.Unflatten. As the first module it gets no backpropagated
    # quantity, so the model may run as is; if one batch fails, move the reshape into the data.
    model, loader, run = make(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = loss_fn(model(loader[0][0]), loader[0][1])
            with backpack(extension):
                loss.backward()
        return run, (
            "Unflatten kept in the model: BackPACK has no extension for it, but as the first "
            "module it receives no backpropagated quantity (results checked against curvkit)"
        )
    except Exception as exc:
        note = f"Unflatten moved into the data (with it in the model: {short_exc(exc)})"
        return make(True)[2], note


def backpack_kron(acc: dict, N: int) -> KronResult:
    weight = [(B, A / N) for B, A, _ in (acc[i] for i in sorted(acc))]
    bias = [Bb for _, _, Bb in (acc[i] for i in sorted(acc))]
    return KronResult(weight, bias)


def backpack_diag(acc: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for i in sorted(acc) for t in acc[i]])


# nngeometry ----------------------------------------------------------------------------------


def nngeometry_factory(w: Workload, row: str):
    import nngeometry
    from nngeometry.object import PMatDiag, PMatKFAC
    from torch.utils.data import DataLoader, TensorDataset

    # nngeometry's own inputs: it sets requires_grad=True on every input batch.
    model, batches = private_copy(w)
    X = torch.cat([x for x, _ in batches])
    Y = torch.cat([t for _, t in batches])

    class Prebatched(DataLoader):
        """A DataLoader (nngeometry reads len(loader.sampler) as N) that yields the same
        pre-built batches as everybody else, so no per-sample collation is timed."""

        def __iter__(self):
            return iter(batches)

    loader = Prebatched(TensorDataset(X, Y), batch_size=BATCH)
    rep = PMatKFAC if row.startswith("kfac") else PMatDiag
    if row.endswith("exact"):

        def run():
            return nngeometry.FIM(model, loader, rep, variant="classif_logits")

        return run, "`FIM`, variant classif_logits: exact softmax Fisher (C−1 backward passes)"

    def run_mc():
        return nngeometry.FIM_MonteCarlo(model, loader, rep, variant="classif_logits", trials=1)

    return run_mc, "`FIM_MonteCarlo`, trials=1: one sampled label per input"


# curvlinops ----------------------------------------------------------------------------------


def curvlinops_factory(w: Workload, row: str):
    from curvlinops import KFACLinearOperator

    if row.startswith("diag"):
        raise NotOffered(
            "no exact or MC GGN diagonal (only the stochastic estimators hutchinson_diag, xdiag)"
        )
    model, loader = private_copy(w)
    params = [p for p in model.parameters() if p.requires_grad]
    fisher_type = "type-2" if row == "kfac_exact" else "mc"

    def run():
        # num_data and num_per_example_loss_terms given, check_deterministic off: no extra
        # passes over the data, only the factor computation is timed.
        op = KFACLinearOperator(
            model,
            nn.CrossEntropyLoss(reduction="sum"),
            params,
            loader,
            progressbar=False,
            check_deterministic=False,
            fisher_type=fisher_type,
            mc_samples=1,
            kfac_approx="expand",
            num_per_example_loss_terms=1,
            separate_weight_and_bias=False,
            num_data=w.N,
        )
        op.compute_kronecker_factors()
        return op

    return run, f'`KFACLinearOperator`, fisher_type="{fisher_type}", expand, joint weight+bias'


def curvlinops_kron(op, w: Workload) -> KronResult:
    names = {id(m): n for n, m in op._model_func.named_modules()}
    mods = [m for m in op._model_func.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    joint = []
    for m in mods:
        n = names[id(m)]
        joint.append((op._gradient_covariances[n], op._input_covariances[n]))
    return KronResult([], [], joint)


# ASDL ----------------------------------------------------------------------------------------


def asdl_factory(w: Workload, row: str):
    import asdl

    model, loader = private_copy(w)
    fisher_type = asdl.FISHER_EXACT if row.endswith("exact") else asdl.FISHER_MC
    shape = asdl.SHAPE_KRON if row.startswith("kfac") else asdl.SHAPE_DIAG
    cfg = asdl.FisherConfig(
        fisher_type=fisher_type,
        fisher_shapes=[shape],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        n_mc_samples=1,
        data_size=1,  # ASDL scales by 1 / data_size: 1 gives the sum over samples
    )
    maker = asdl.get_fisher_maker(model, cfg)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]

    def run():
        for i, (x, _t) in enumerate(loader):
            maker.setup_model_call(model, x)
            maker.forward_and_backward(accumulate=i > 0)
        return layers

    kind = "exact" if fisher_type == asdl.FISHER_EXACT else "MC, 1 sample"
    return run, f"`get_fisher_maker` fisher_type {fisher_type} ({kind}), shape {shape}"


def asdl_diag(layers) -> torch.Tensor:
    parts = []
    for m in layers:
        d = m.fisher.diag
        parts += [d.weight.reshape(-1), d.bias.reshape(-1)]
    return torch.cat(parts)


FACTORIES: dict[str, Callable] = {
    "BackPACK": backpack_factory,
    "nngeometry": nngeometry_factory,
    "curvlinops": curvlinops_factory,
    "ASDL": asdl_factory,
}
CURVKIT = {
    "kfac_exact": ck_kfac_exact,
    "kfac_mc": ck_kfac_mc,
    "diag_exact": ck_diag_exact,
    "diag_mc": ck_diag_mc,
}


# --------------------------------------------------------------------------------------------
# FLOP model
# --------------------------------------------------------------------------------------------


@dataclass
class LayerGeom:
    kind: str  # "Linear" | "Conv2d"
    N: int
    R: int  # output positions per sample (1 for Linear)
    d: int  # output features / channels
    a: int  # inputs per position (in_features or C_in·k²), without the bias


def layer_geometry(w: Workload) -> list[LayerGeom]:
    geo: list[LayerGeom] = []

    def hook(mod, args, out):
        R = 1 if isinstance(mod, nn.Linear) else out.shape[2:].numel()
        a = mod.in_features if isinstance(mod, nn.Linear) else mod.weight[0].numel()
        d = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        geo.append(LayerGeom(type(mod).__name__, w.N, int(R), d, a))

    handles = [m.register_forward_hook(hook) for m in w.layers]
    with torch.no_grad():
        w.model(torch.cat([x for x, _ in w.loader]))
    for h in handles:
        h.remove()
    return geo


def flop_model(geo: list[LayerGeom], C: int) -> dict[str, float]:
    """Nominal multiply-adds of one pass over all N samples (elementwise work ignored).

    fwd_l = N·R·d·a per layer (R output positions, d outputs, a inputs per position).
    grad pass = Σ fwd_l + Σ fwd_l (weight gradient) + Σ_{l>1} fwd_l (input gradient).
    exact KFAC = forward + C backward passes of the activation gradient (Σ_{l>1} C·fwd_l)
        + factors Σ_l (N·C·R·d² + N·R·A²), A = a + 1 (bias column).
    exact diagonal = forward + C backward passes of the activation gradient
        + squared per-sample gradients: Linear N·(C·d + d·A); Conv N·C·R·d·A (the per-sample
        weight gradients Σ_r g aᵀ are needed before squaring)."""
    fwd = [g.N * g.R * g.d * g.a for g in geo]
    grad = 2 * sum(fwd) + sum(fwd[1:])
    act_back = C * sum(fwd[1:])
    kfac = sum(fwd) + act_back
    diag = sum(fwd) + act_back
    for g in geo:
        A = g.a + 1
        kfac += g.N * C * g.R * g.d**2 + g.N * g.R * A**2
        if g.kind == "Linear":
            diag += g.N * (C * g.d + g.d * A)
        else:
            diag += g.N * C * g.R * g.d * A
    return {"grad": float(grad), "kfac": float(kfac), "diag": float(diag)}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Timed:
    label: str
    fn: Callable[[], object]
    t_method: list[float] = field(default_factory=list)
    t_grad: list[float] = field(default_factory=list)
    result: object = None
    note: str = ""

    @property
    def ratio(self) -> float:
        return min(self.t_method) / min(self.t_grad)


def time_interleaved(w: Workload, m: Timed, repeats: int) -> None:
    """Warm-up, then ``repeats`` rounds of (grad pass, method), each timed on its own."""
    grad_pass(w)
    m.result = m.fn()
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        grad_pass(w)
        m.t_grad.append(time.perf_counter() - t0)
        gc.collect()
        t0 = time.perf_counter()
        m.result = m.fn()
        m.t_method.append(time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def fmt_g(x: float) -> str:
    return f"{x / 1e9:.3f} G"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_workload(w: Workload, repeats: int, peers: list[str], versions: dict[str, str]):
    log(f"{w.key}: {w.title}, P={w.P}, N={w.N}, {len(w.loader)} batches")
    cells: dict[tuple[str, str], Timed] = {}
    skipped_peer: dict[str, str] = {}
    not_offered: dict[tuple[str, str], str] = {}
    notes: dict[str, set[str]] = {p: set() for p in PEERS}

    for p in peers:
        if p != "curvkit" and versions.get(p, "").startswith("not importable"):
            skipped_peer[p] = versions[p]

    for row in ROWS:
        for p in peers:
            if p in skipped_peer:
                continue
            if p == "curvkit":
                fn = CURVKIT[row]
                m = Timed(f"curvkit {row}", lambda fn=fn: fn(w))
            else:
                try:
                    fn, note = FACTORIES[p](w, row)
                except NotOffered as e:
                    not_offered[(row, p)] = str(e)
                    continue
                except Exception as exc:  # a failing peer is skipped, and says why
                    not_offered[(row, p)] = f"failed to set up: {short_exc(exc)}"
                    continue
                m = Timed(f"{p} {row}", fn, note=note)
                if note:
                    notes[p].add(note)
            log(f"  {m.label} ...")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    time_interleaved(w, m, repeats)
            except Exception as exc:
                if p == "curvkit":
                    raise
                not_offered[(row, p)] = f"failed: {short_exc(exc)}"
                continue
            cells[(row, p)] = m
    return cells, skipped_peer, not_offered, notes


def checks(w: Workload, cells) -> tuple[dict[str, list[str]], list[str]]:
    """Agreement of curvkit's exact results with the peers': short cells per row, and details."""
    cell: dict[str, list[str]] = {"kfac_exact": [], "diag_exact": []}
    detail: list[str] = []
    ck_k = cells.get(("kfac_exact", "curvkit"))
    layer_names = [type(m).__name__ for m in w.layers]
    if ck_k is not None:
        ckf = curvkit_kron_factors(ck_k.result)
        bp = cells.get(("kfac_exact", "BackPACK"))
        if bp is not None:
            r = backpack_kron(bp.result, w.N)
            diffs, worst = [], 0.0
            for li, ((B, A), (Bw, Aw), Bb) in enumerate(zip(ckf, r.weight, r.bias, strict=True)):
                if layer_names[li] != "Linear":
                    continue
                a = Aw.shape[0]
                # curvkit: (Σ g gᵀ / N) ⊗ Σ [x;1][x;1]ᵀ. Its weight block is the [:a, :a] corner
                # of A, its bias block B·A[a, a] = B·N; BackPACK's are B ⊗ (Σ x xᵀ)/N and B.
                dw = kron_rel_diff(B, A[:a, :a], Bw, Aw)
                db = vec_rel_diff(B * A[a, a], Bb)
                worst = max(worst, dw, db)
                diffs.append(f"layer {li} ({layer_names[li]}): weight {dw:.1e}, bias {db:.1e}")
            cell["kfac_exact"].append(f"BackPACK KFLR ≤{worst:.0e}")
            txt = "; ".join(diffs)
            if "Conv2d" in layer_names:
                txt += (
                    ". Conv2d layers not compared: BackPACK's KFLR pairs the spatially summed "
                    "output gradients with Σ over positions of the patches / N, which is neither "
                    "KFAC-expand (curvkit's default) nor -reduce"
                )
            detail.append(
                "KFAC exact vs BackPACK KFLR (summed over batches: B = Σ_b B_b, A = Σ_b N_b·A_b; "
                f"weight block B⊗A/N, bias block B), rel. Frobenius difference: {txt}."
            )
        cl = cells.get(("kfac_exact", "curvlinops"))
        if cl is not None:
            r = curvlinops_kron(cl.result, w)
            diffs = [
                kron_rel_diff(B, A, Bc, Ac)
                for (B, A), (Bc, Ac) in zip(ckf, r.joint or [], strict=True)
            ]
            cell["kfac_exact"].append(f"curvlinops ≤{max(diffs):.0e}")
            detail.append(
                "KFAC exact vs curvlinops type-2 (expand, weight and bias joint, same convention "
                "as curvkit), rel. Frobenius difference of the whole layer block B⊗A: "
                + ", ".join(
                    f"layer {i} ({n}) {d:.1e}"
                    for i, (n, d) in enumerate(zip(layer_names, diffs, strict=True))
                )
                + "."
            )
    ck_d = cells.get(("diag_exact", "curvkit"))
    if ck_d is not None:
        d_ck = ck_d.result.diagonal()
        found = []
        bp = cells.get(("diag_exact", "BackPACK"))
        if bp is not None:
            found.append(("BackPACK", vec_rel_diff(d_ck, backpack_diag(bp.result))))
        nn_ = cells.get(("diag_exact", "nngeometry"))
        if nn_ is not None:  # nngeometry averages over the N samples
            found.append(("nngeometry", vec_rel_diff(d_ck, nn_.result.get_diag() * w.N)))
        asd = cells.get(("diag_exact", "ASDL"))
        if asd is not None:
            found.append(("ASDL", vec_rel_diff(d_ck, asdl_diag(asd.result))))
        cell["diag_exact"] += [f"{p} {d:.0e}" for p, d in found]
        if found:
            detail.append(
                "Exact diagonal, ‖d_curvkit − d_peer‖ / ‖d_peer‖: "
                + ", ".join(f"{p} {d:.1e}" for p, d in found)
                + " (BackPACK DiagGGNExact summed over batches; nngeometry ×N; ASDL data_size=1)."
            )
    return cell, detail


def print_table(w: Workload, cells, skipped_peer, not_offered, notes, chk, peers, flops) -> None:
    chk, chk_detail = chk
    grad_all = [t for m in cells.values() for t in m.t_grad]
    print(
        f"\n### {w.key}: {w.title}, P={w.P}, N={w.N} in {len(w.loader)} batches of ≤{BATCH}, "
        "CrossEntropyLoss(sum), float32"
    )
    print(
        f"\nOne gradient pass (min over all {len(grad_all)} interleaved grad passes): "
        f"{fmt_t(min(grad_all))} (median {fmt_t(sorted(grad_all)[len(grad_all) // 2])})\n"
    )
    head = (
        ["method"] + [f"{p} ×grad" if p == "curvkit" else p for p in PEERS] + ["check vs curvkit"]
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    footnotes: list[str] = []
    for row, title in ROWS.items():
        line = [title]
        for p in PEERS:
            m = cells.get((row, p))
            if m is not None:
                line.append(f"{m.ratio:.1f}× ({fmt_t(min(m.t_method))})")
            elif p not in peers:
                line.append("— (not run)")
            elif p in skipped_peer:
                line.append("— (skipped)")
            elif (row, p) in not_offered:
                footnotes.append(f"{p}, {title}: {not_offered[(row, p)]}")
                line.append(f"— [{len(footnotes)}]")
            else:
                line.append("—")
        line.append("; ".join(chk.get(row, [])) or ("— (random)" if row.endswith("mc") else "—"))
        print("| " + " | ".join(line) + " |")
    print()
    print(
        "Cells: min(method) / min(grad pass), both over the same interleaved rounds "
        "(grad, method, grad, method, ...) after one warm-up; the method's own min time in "
        "parentheses."
    )
    for i, f in enumerate(footnotes, 1):
        print(f"[{i}] {f}")
    for line in chk_detail:
        print(f"Check: {line}")
    for p, why in skipped_peer.items():
        print(f"{p}: skipped — {why}")
    for p in PEERS:
        for n in sorted(notes[p]):
            print(f"{p}: {n}")
    print(
        f"Nominal multiply-adds per pass (see `flop_model`): gradient {fmt_g(flops['grad'])}; "
        f"exact KFAC {fmt_g(flops['kfac'])} ({flops['kfac'] / flops['grad']:.1f}× the gradient "
        f"pass); exact diagonal {fmt_g(flops['diag'])} "
        f"({flops['diag'] / flops['grad']:.1f}×)."
    )
    g = min(grad_all)
    for row, key in (("kfac_exact", "kfac"), ("diag_exact", "diag")):
        m = cells.get((row, "curvkit"))
        if m is not None:
            t = min(m.t_method)
            print(
                f"curvkit {ROWS[row]}: {flops[key] / t / 1e9:.2f} G multiply-adds/s "
                f"(gradient pass: {flops['grad'] / g / 1e9:.2f} G/s)."
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up")
    ap.add_argument("--quick", action="store_true", help="one timed round (smoke test)")
    ap.add_argument("--workloads", default="mlp,cnn", help="comma list of mlp, cnn")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma list of " + ", ".join(PEERS))
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (default 2)")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        ap.error("--repeats must be at least 1")
    peers = [p for p in PEERS if p in args.peers.split(",")]
    if "curvkit" not in peers:
        ap.error("curvkit must be among --peers")

    torch.set_num_threads(args.threads)
    load_start = load_average()
    versions = peer_versions()
    print(
        f"machine: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU {cpu_model()} ({os.cpu_count()} logical cores), python {platform.python_version()}; "
        f"curvkit {getattr(ck, '__version__', '?')}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(
        f"{repeats} timed round(s) per method after 1 warm-up, interleaved with the gradient "
        f"pass; ratio = min/min. Load average at start {load_start}."
    )
    t_start = time.perf_counter()
    for w in build_workloads(args.workloads.split(",")):
        cells, skipped_peer, not_offered, notes = run_workload(w, repeats, peers, versions)
        chk = checks(w, cells)
        C = int(w.model(w.loader[0][0][:1]).shape[-1])
        flops = flop_model(layer_geometry(w), C)
        print_table(w, cells, skipped_peer, not_offered, notes, chk, peers, flops)
    print(
        f"\nLoad average (1/5/15 min) at end {load_average()} on {os.cpu_count()} logical cores; "
        f"total {time.perf_counter() - t_start:.0f} s. With load above the core count, "
        "OpenMP threads wait for each other and every time inflates (often by large factors); "
        "only ratios from one run are meaningful, and only on a quiet machine."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
