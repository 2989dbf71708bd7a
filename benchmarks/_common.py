"""Helpers shared by the benchmark scripts: machine facts and formatting."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def fmt_t(t: float) -> str:
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def short_exc(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:157] + '...' if len(msg) > 160 else msg}"


def digits_train(n: int = 1437):
    """The first ``n`` of the 1437 training samples of the BENCHMARKS.md digits split
    (permutation with seed 0, features / 16, float32)."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    X_all = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y_all = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(X_all.shape[0], generator=torch.Generator().manual_seed(0))
    train = perm[: min(n, 1437)]
    return X_all[train].contiguous(), y_all[train].contiguous()
