"""curvkit demo: the Hessian of a loss with respect to a network's parameters, and its cousins.

Part 1 answers the question "How do I get the Hessian of my loss with respect to the network's
parameters?" on a tiny network (21 parameters), compares the Hessian with the generalized
Gauss-Newton (GGN) and the empirical Fisher (EF), and saves a picture of the three matrices.

Part 2 does the same at a realistic size: an MLP with 3466 parameters on 512 handwritten digits.

Run it with ``make demo`` (or ``python examples/demo.py``); it takes well under a minute on CPU.
"""

from __future__ import annotations

import os
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402

import curvkit as ck  # noqa: E402

RULE = "=" * 78


def section(title: str) -> None:
    print(f"\n{RULE}\n{title}\n{RULE}")


def rel_dist(A: torch.Tensor, H: torch.Tensor) -> float:
    """Relative Frobenius distance ||A - H||_F / ||H||_F."""
    return float(torch.linalg.norm(A - H) / torch.linalg.norm(H))


def compact(values: torch.Tensor, digits: int = 3) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in values.tolist()) + "]"


def psd_words(min_eig: float, scale: float, tol: float = 1e-6) -> str:
    if min_eig >= -tol * scale:
        return f"yes (smallest eigenvalue {min_eig:.2e}, i.e. >= 0 up to rounding)"
    return f"no (smallest eigenvalue {min_eig:.3g})"


# ---------------------------------------------------------------------------------------------
# Part 1
# ---------------------------------------------------------------------------------------------


def part1() -> None:
    section(
        'Part 1 - "How do I get the Hessian of my loss with respect to the network\'s parameters?"'
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 5), nn.Linear(5, 1), nn.Sigmoid()).double()
    input = torch.randn(5, 2, 1, 1, dtype=torch.float64)
    target = torch.rand(5, 1, dtype=torch.float64)

    def loss(yhat, t):
        return -(t * torch.log(yhat)).sum() / yhat.shape[0]

    P = sum(p.numel() for p in model.parameters())
    print("Model:  Sequential(Flatten(), Linear(2,5), Linear(5,1), Sigmoid())   (float64)")
    print(f"Data:   input = torch.randn(5,2,1,1), target = torch.rand(5,1)   -> {P} parameters")
    print("Loss:   loss = lambda yhat, t: -(t*torch.log(yhat)).sum()/yhat.shape[0]")
    print()
    print("The answer is one line:")
    print()
    print('    H = ck.hessian(model, loss, (input, target), reduction="mean")')
    print()
    H = ck.hessian(model, loss, (input, target), reduction="mean")
    print(f"H is a {tuple(H.shape)} {H.dtype} tensor; rows/columns follow model.parameters():")
    for name, sl in ck.parameter_slices(model).items():
        print(f"    {name:<10} -> H[{sl.start}:{sl.stop}]")

    # Independent sanity check with plain PyTorch autograd.
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_of(th: torch.Tensor) -> torch.Tensor:
        pd = {n: v.view(s) for n, v, s in zip(names, th.split(sizes), shapes, strict=True)}
        return loss(torch.func.functional_call(model, pd, (input,)), target)

    H_ref = torch.autograd.functional.hessian(loss_of, theta)
    print(
        f"(Cross-check against torch.autograd.functional.hessian: max abs difference "
        f"{(H - H_ref).abs().max():.1e}.)"
    )

    G = ck.ggn(model, loss, (input, target), reduction="mean")
    E = ck.ef(model, loss, (input, target), reduction="mean")

    eh, eg, ee = (torch.linalg.eigvalsh(M) for M in (H, G, E))
    scale = float(eh.abs().max())
    print()
    shown = torch.where(eh.abs() < 1e-12 * scale, torch.zeros_like(eh), eh)
    n_zero = int((eh.abs() < 1e-12 * scale).sum())
    print("Eigenvalues of the Hessian, sorted (|value| < 1e-12 x the largest shown as 0):")
    print(f"    {compact(shown[:11])}")
    print(f"    {compact(shown[11:])}")
    print(
        f"{n_zero} are zero: with no non-linearity between them, the two Linear layers act only "
        "through\ntheir product (one 2-to-1 linear map), so many parameter directions are "
        "redundant."
    )
    n_neg = int((eh < -1e-10 * scale).sum())
    print(
        f"The Hessian has {n_neg} negative eigenvalue(s) out of {P}: at these weights the loss "
        "curves downward\nin some directions (the weights sit on a saddle-shaped slope, not in "
        "a bowl)."
    )

    print()
    print("Two popular stand-ins for the Hessian, computed the same way:")
    print('    G = ck.ggn(model, loss, (input, target), reduction="mean")   # Gauss-Newton')
    print('    E = ck.ef(model, loss, (input, target), reduction="mean")    # empirical Fisher')
    print()
    print(f"{'matrix':<22}{'rel. distance to H':>20}   {'positive semi-definite?'}")
    for label, M, ev in (("Hessian H", H, eh), ("GGN G", G, eg), ("empirical Fisher E", E, ee)):
        print(f"{label:<22}{rel_dist(M, H):>20.3f}   {psd_words(float(ev.min()), scale)}")
    print("(relative distance = ||A - H||_F / ||H||_F: 0 means identical, 1 means as far from H")
    print(" as H is from zero.)")
    print()
    print("What this means:")
    print(
        "  * GGN: the Hessian is the sum of two terms, one from the curvature of the loss as a\n"
        "    function of the network's output, one from the curvature of the network itself\n"
        "    (its non-linearity). The GGN keeps only the first term; it is always PSD (for a\n"
        "    convex loss), which is why it is used as a stand-in for the Hessian, e.g. in\n"
        "    second-order optimisers and Laplace approximations."
    )
    print(
        "  * Empirical Fisher: the average outer product of the per-sample gradients. It is\n"
        "    PSD by construction and cheap, but it equals the GGN/Fisher only when the targets\n"
        "    are distributed as the model predicts; otherwise it can be far from both."
    )

    vmax = float(max(M.abs().max() for M in (H, G, E)))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), constrained_layout=True)
    titles = ("Hessian H", "Generalized Gauss-Newton G", "Empirical Fisher E")
    for ax, M, title in zip(axes, (H, G, E), titles, strict=True):
        im = ax.imshow(M.detach().numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(f"{title}\n({P}x{P})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("parameter index")
        ax.set_ylabel("parameter index")
        for sl in ck.parameter_slices(model).values():
            if sl.stop < P:
                ax.axhline(sl.stop - 0.5, color="k", lw=0.4)
                ax.axvline(sl.stop - 0.5, color="k", lw=0.4)
    fig.colorbar(im, ax=axes, shrink=0.85, label="entry (shared symmetric scale)")
    fig.suptitle("Curvature of the loss w.r.t. the 21 parameters (lines: layer boundaries)")
    path = os.path.abspath("demo_curvature.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print()
    print(f"Heatmap of the three matrices saved to: {path}")


# ---------------------------------------------------------------------------------------------
# Part 2
# ---------------------------------------------------------------------------------------------


def digits_train(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n of the 1437 training digits (split of BENCHMARKS.md), features / 16."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(X_all.shape[0], generator=torch.Generator().manual_seed(0))
    return X_all[perm[:n]], y_all[perm[:n]]


def part2() -> None:
    section("Part 2 - the same at realistic size: MLP 64-32-32-10 on 512 digits (P = 3466)")
    X, y = digits_train(512)  # first 512 of the 1437 training images

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
    )
    model.eval()
    loss_fn = nn.CrossEntropyLoss()  # mean over the batch
    P = sum(p.numel() for p in model.parameters())
    print(
        f"{P} parameters, {X.shape[0]} samples, CrossEntropyLoss (mean), float32, "
        f"{torch.get_num_threads()} CPU threads."
    )
    print("(The network is untrained: its weights are the random initialisation.)")
    print("Wall-clock time of one call each (the first call also pays one-time set-up costs):")
    print()

    mats = {}
    for label, fn in (("Hessian", ck.hessian), ("GGN", ck.ggn), ("empirical Fisher", ck.ef)):
        t0 = time.perf_counter()
        mats[label] = fn(model, loss_fn, (X, y))
        dt = time.perf_counter() - t0
        call = f"ck.{fn.__name__}(model, loss_fn, (X, y))"
        print(f"  {call:<42} {dt:6.2f} s   -> {tuple(mats[label].shape)}")

    H = mats["Hessian"]
    eigs = {label: torch.linalg.eigvalsh(M.double()) for label, M in mats.items()}
    tol = 1e-6 * float(eigs["Hessian"].abs().max())  # below -tol counts as negative
    print()
    print(f"{'matrix':<18}{'rel. dist. to H':>16}{'smallest eig.':>15}   top-5 eigenvalues")
    for label, M in mats.items():
        ev = eigs[label]
        print(
            f"{label:<18}{rel_dist(M, H):>16.3f}{float(ev.min()):>15.3g}   "
            f"{compact(ev.flip(0)[:5], 4)}"
        )
    print()
    for label, ev in eigs.items():
        n_neg = int((ev < -tol).sum())
        print(
            f"{label + ':':<18} {n_neg:>4} of {P} eigenvalues negative "
            f"({100 * n_neg / P:.1f}%, counting those below -{tol:.1e})"
        )
    top_h, top_g = eigs["Hessian"].flip(0)[:5], eigs["GGN"].flip(0)[:5]
    top_gap = float(((top_g - top_h).abs() / top_h.abs()).max())
    print()
    print(
        f"Reading: the Hessian is indefinite here (the network is untrained, so the loss\n"
        f"surface is far from a bowl), while the GGN and the empirical Fisher are PSD. Entry\n"
        f"by entry they differ a lot from H, yet the GGN's top-5 eigenvalues are within\n"
        f"{100 * top_gap:.0f}% of the Hessian's: the largest curvatures, which set how big a\n"
        f"stable step can be, are similar."
    )


def part3() -> None:
    section("Part 3 - too big for a dense matrix: MLP 64-256-256-10 on 1437 digits (P = 85002)")
    X, y = digits_train(1437)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    ).eval()
    loss_fn = nn.CrossEntropyLoss()
    print("A dense Hessian would take 28.9 GB; curvkit keeps it as an operator instead:")
    print('    H = ck.hessian(model, loss_fn, (X, y), structure="operator")')
    H = ck.hessian(model, loss_fn, (X, y), structure="operator")
    t = time.perf_counter()
    top = ck.top_eigenvalues(H, k=10, generator=torch.Generator().manual_seed(0))
    print(f"    ck.top_eigenvalues(H, k=10)  ({time.perf_counter() - t:.2f} s):")
    print(f"    {compact(top, 4)}")
    t = time.perf_counter()
    x, dens = ck.spectral_density(
        H, num_probes=2, steps=40, generator=torch.Generator().manual_seed(0)
    )
    path = ck.plot_spectral_density(
        x, dens, "demo_spectral_density.png", title="Hessian spectral density (SLQ), digits MLP"
    )
    print(
        f"    spectral density by stochastic Lanczos quadrature ({time.perf_counter() - t:.1f} s)"
        f" saved to: {os.path.abspath(path)}"
    )

    print("\nStructured approximations of the GGN, as operators in the same coordinates:")
    loader = [(X[i : i + 256], y[i : i + 256]) for i in range(0, 1437, 256)]
    loss_sum = nn.CrossEntropyLoss(reduction="sum")
    t = time.perf_counter()
    K = ck.ggn(model, loss_sum, loader, structure="kron", progress=False)
    t_k = time.perf_counter() - t
    t = time.perf_counter()
    D = ck.ggn(model, loss_sum, loader, structure="diag", progress=False)
    t_d = time.perf_counter() - t
    print(f"    K = ck.ggn(model, loss, loader, structure='kron')   {t_k:.2f} s  ({K.labels[-1]})")
    print(f"    D = ck.ggn(model, loss, loader, structure='diag')   {t_d:.2f} s  (exact diagonal)")
    damped = K.add_identity(1.0)
    print(
        f"    K + I: logdet {float(damped.logdet()):.1f}, trace {float(damped.trace()):.1f}; "
        f"exact GGN trace {float(D.trace()) + K.shape[0]:.1f} (+ I)"
    )
    sl = ck.parameter_slices(model)
    w = sl["2.weight"]
    kd, ed = K.diagonal()[w].reshape(256, 256), D.diagonal()[w].reshape(256, 256)
    corr = torch.corrcoef(torch.stack([kd.flatten(), ed.flatten()]))[0, 1]
    print(
        f"    second layer's diagonal: KFAC vs exact, correlation {float(corr):.3f}, "
        f"relative distance {rel_dist(kd, ed):.3f}"
    )
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
    vmax = float(ed.max())
    for ax, (m, title) in zip(axes[:2], ((ed, "exact GGN diagonal"), (kd, "KFAC diagonal"))):
        im = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{title}\nlayer 2 weight (256 x 256)")
        ax.set_xlabel("input unit")
        ax.set_ylabel("output unit")
    fig.colorbar(im, ax=axes[:2].tolist(), shrink=0.8)
    axes[2].loglog(ed.flatten().numpy(), kd.flatten().numpy(), ".", ms=1, alpha=0.3)
    lims = [float(ed[ed > 0].min()), vmax]
    axes[2].plot(lims, lims, "k--", lw=0.8)
    axes[2].set_xlabel("exact")
    axes[2].set_ylabel("KFAC")
    axes[2].set_title("entry by entry")
    fig.savefig("demo_kfac_vs_diag.png", dpi=110)
    plt.close(fig)
    print(f"    picture saved to: {os.path.abspath('demo_kfac_vs_diag.png')}")


def main() -> None:
    t0 = time.perf_counter()
    part1()
    part2()
    part3()
    print(f"\nDone in {time.perf_counter() - t0:.1f} s.")


if __name__ == "__main__":
    main()
