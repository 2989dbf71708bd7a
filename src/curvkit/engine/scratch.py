"""Buffers reused across chunks and batches.

On these machines a fresh megabyte-sized tensor faults in new pages on first touch: 0.13 ms for
one (768, 256) float32 GEMM result against 0.06 ms for the GEMM itself (digits MLP), and the
per-sample products of the digits CNN's exact diagonal ran twice as fast into a kept buffer. The
engine's hot loops therefore write large intermediates into buffers kept in a dict by their
owner (``Forward.scratch``, an accumulator) and reused on the next call.
"""

from __future__ import annotations

import math

import torch


def buffer(scratch: dict, key, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A tensor of ``shape`` from ``scratch[key]``, grown when too small; contents undefined.

    New buffers get twice the room asked for: untouched pages cost nothing, and a later request
    a little larger (a short last batch splits into fewer, longer chunks) then fits."""
    numel = math.prod(shape)
    buf = scratch.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = scratch[key] = torch.empty(2 * numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)
