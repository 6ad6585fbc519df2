"""From the tensors' peak to what the device really holds: the caching allocator and the
context.

- ``peak_allocated``: the most bytes live tensors hold at once (``torch.cuda.
  max_memory_allocated``), what :mod:`simcost.sim.memory` computes.
- ``peak_reserved``: what the CUDA caching allocator has taken from the driver at that point
  (``max_memory_reserved``). It keeps freed blocks cached for reuse; a block freed at one size
  and requested at another cannot always be reused, so the cache grows above the allocated
  peak in proportion to the bytes that come and go within a step (activations, the loss's
  logits, gradients, optimizer temporaries), not to the weights that stay put. The cache takes
  memory in segments rounded up to ``round_bytes`` (2 MiB for large allocations):
  ``reserved = round_up(allocated + fragmentation x transient, round_bytes)``, with
  ``fragmentation`` a stack constant (fitted where no source gives it; the profile says).
- ``runtime_overhead``: memory held before any tensor exists (CUDA context, cuBLAS/cuDNN
  workspaces, from the hardware profile) plus what the stack's libraries add.
- ``peak`` = ``peak_reserved`` + ``runtime_overhead``: what ``nvidia-smi`` shows, and what
  ``fits`` compares with the device's capacity.

A CPU device has no caching allocator in front of the tensors (torch's CPU allocator hands
blocks straight to malloc), so there ``peak_reserved`` = ``peak_allocated``.
"""
from __future__ import annotations

import numpy as np


def device_peak(tensors_peak, resident, runtime_overhead: float, stack, device_kind: str) -> dict:
    """The peak rows of an estimate: ``tensors_peak`` is the allocated peak (no runtime),
    ``resident`` the part of it that stays allocated all step (weights, master weights,
    optimizer state, resident buffers). Works elementwise on sweep arrays."""
    allocated = tensors_peak
    extra = 0.0
    if stack is None or device_kind == "cpu":
        reserved = allocated
    else:
        transient = np.maximum(allocated - resident, 0.0)
        reserved = allocated + stack.fragmentation * transient
        if stack.round_bytes:
            reserved = np.ceil(reserved / stack.round_bytes) * stack.round_bytes
        extra = stack.extra_context_bytes
    runtime = runtime_overhead + extra
    return {"peak_allocated": allocated, "peak_reserved": reserved,
            "runtime_overhead": runtime, "peak": reserved + runtime}
