"""A quantised frozen base (QLoRA and its relatives) as a rewrite of a traced step (no torch).

bitsandbytes' 4-bit and 8-bit linears do not run under fake tensors, so the step is traced
with the base in the compute dtype and rewritten, as the analytic path's ``qlora`` method
does (:mod:`simcost.peft.qlora`):

- which weights: every frozen base ``nn.Linear`` weight the method did not add, except the
  output head (transformers' ``get_keys_to_not_convert`` keeps ``lm_head`` unquantised);
- storage: ``nf4`` is QLoRA's NF4 with double quantisation (4 + 0.127 bits per weight, QLoRA
  §2); ``int8`` is LLM.int8's row-wise int8 (bitsandbytes ``Int8Params``: one byte per
  weight and one fp32 scale per output row);
- work: every recorded call that reads such a weight (the forward GEMM, and the backward GEMM
  giving the input's gradient) first dequantises it into the compute dtype: a kernel reading
  the quantised weight and writing the dense one (about two operations per weight); that
  dense copy lives while its GEMM runs, the step's largest such copy is the ``temporaries``
  row.
Any tuner combines with it (QLoRA + DoRA, + LoHa, + VeRA, ...), since the adapters are traced.
"""
from __future__ import annotations

import math
from dataclasses import replace

from simcost.dtypes import BYTES
from simcost.errors import SimcostError

MODES = ("none", "nf4", "int8")


def quantized(params, mode: str) -> dict:
    """Parameter name -> its ParamInfo, for the weights of ``params`` (a recording's parameter
    table) that ``mode`` quantises."""
    if mode == "none":
        return {}
    if mode not in MODES:
        raise SimcostError(f"unknown quantisation '{mode}'; valid: {', '.join(MODES)}")
    return {p.name: p for p in params
            if p.kind == "linear" and not p.trainable and not p.added and len(p.shape) == 2}


def storage_bytes(p, mode: str) -> float:
    n = math.prod(p.shape)
    if mode == "nf4":
        return n * BYTES["nf4"]
    return n * 1 + p.shape[0] * 4              # int8 + one fp32 scale per output row


def rewrite_calls(priced: list, q: dict, mode: str, compute: str) -> float:
    """Add the dequantisation to every priced call reading a quantised weight (in place; the
    costs are copied first, since a recording's static costs are shared). Returns the largest
    dense copy (bytes)."""
    if not q:
        return 0.0
    largest = 0.0
    for pc in priced:
        hit = [q[n] for n in pc.call.params if n in q]
        if not hit:
            continue
        c = pc.cost
        extra_bytes = extra_flops = 0.0
        for p in hit:
            n = math.prod(p.shape)
            dense = n * BYTES[compute]
            extra_bytes += storage_bytes(p, mode) + dense
            extra_flops += 2 * n
            largest = max(largest, dense)
        pc.cost = replace(c, flops=c.flops + extra_flops, bytes=c.bytes + extra_bytes,
                          kernels=c.kernels + len(hit), gemms=list(c.gemms),
                          special=dict(c.special))
    return largest
