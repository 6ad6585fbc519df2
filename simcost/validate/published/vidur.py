"""INF-VIDUR-OP: one forward GEMM of Llama-2-7B measured by Vidur's profiler (fp16, cuBLAS),
compared with simcost's per-op time model."""
from __future__ import annotations

import re

from simcost.validate.published.mapping import GemmMapping, register_mapper, row_hardware
from simcost.validate.published.rows import Unsupported, first_int

@register_mapper("INF-VIDUR-OP")
def map_vidur(row: dict) -> GemmMapping:
    m = re.search(r"\[T x (\d+)\] x \[(\d+) x (\d+)\]", row["notes"])
    t = first_int(row["batch_size"])
    if not m or t is None:
        raise Unsupported("GEMM shape not stated")
    notes: list[str] = []
    hw = row_hardware(row, notes)
    k, _, n = (int(x) for x in m.groups())
    if 0 in (t, k, n):
        raise Unsupported(f"GEMM shape [{t} x {k}] x [{k} x {n}] has a zero dimension")
    return GemmMapping(hardware=hw, dtype=row["precision"].lower() or "fp16", m=t, n=n, k=k,
                       notes=notes)

