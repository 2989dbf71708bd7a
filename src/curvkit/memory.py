"""Memory budgets: refuse a dense request before allocating it, size the work chunks."""

from __future__ import annotations

import torch

from .errors import CurvkitMemoryError


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: MemAvailable (Linux) for the CPU, the driver's view on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def _fmt(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1000 or unit == "PB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"  # pragma: no cover


def check_dense(
    what: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    memory_limit: int | None,
    alternatives: str,
) -> None:
    """Raise CurvkitMemoryError when a dense ``shape`` result cannot fit."""
    numel = 1
    for s in shape:
        numel *= s
    check_bytes(
        f"a dense {what} of shape {shape} in {str(dtype).replace('torch.', '')}",
        numel * torch.empty((), dtype=dtype).element_size(),
        device,
        memory_limit,
        alternatives,
    )


def check_bytes(
    what: str,
    need: int,
    device: torch.device,
    memory_limit: int | None,
    alternatives: str,
    *,
    can_raise: bool = True,
) -> None:
    """Raise CurvkitMemoryError, before allocating, when ``need`` bytes exceed the limit; its
    message offers ``memory_limit=`` only where the caller takes one (``can_raise``)."""
    free = available_bytes(device)
    limit = int(0.8 * free) if memory_limit is None else int(memory_limit)
    if need > limit:
        source = (
            f"this machine has {_fmt(free)} available ({device.type}) and curvkit allows 80% of it"
            if memory_limit is None
            else f"memory_limit={memory_limit} allows {_fmt(limit)}"
        )
        more = (
            " If you know better, raise the limit with memory_limit=<bytes>." if can_raise else ""
        )
        raise CurvkitMemoryError(f"{what} needs {_fmt(need)}; {source}. {alternatives}{more}")


def work_budget(device: torch.device, memory_limit: int | None) -> int:
    """Bytes the engine may use for temporaries (vmapped chunks)."""
    free = available_bytes(device)
    cap = free // 8 if memory_limit is None else max(int(memory_limit) // 4, 1)
    return max(min(cap, 2 * 2**30), 16 * 2**20)
