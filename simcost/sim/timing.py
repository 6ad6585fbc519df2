"""A plain roofline per op: time = max(compute, memory) + launch overhead per kernel.

Matmul FLOPs run at the dtype's dense tensor peak, other FLOPs at the vector (fp32) peak;
bytes at the datasheet bandwidth. This is the day-one model; the calibrated time model
replaces the efficiencies.
"""
from __future__ import annotations

import numpy as np


def op_time(device, dtype: str, matmul_flops, other_flops, nbytes, kernels):
    compute = matmul_flops / device.matmul_peak(dtype) + other_flops / device.vector_peak()
    memory = nbytes / device.memory_bandwidth_bytes_per_s
    return np.maximum(compute, memory) + kernels * device.launch_overhead_s


def phase_times(device, dtype: str, analysis, *, recompute_blocks: bool = False):
    """(forward, backward) seconds summed over ops."""
    fwd = 0
    bwd = 0
    for r in analysis.records:
        c = r.cost
        if c.fwd_kernels:
            t = op_time(device, dtype, c.fwd_matmul_flops, c.fwd_flops - c.fwd_matmul_flops,
                        c.fwd_bytes, c.fwd_kernels)
            fwd = fwd + t * r.count
            if recompute_blocks and r.rg_out and r.op.module.startswith(("model.layers", "transformer.h")):
                bwd = bwd + t * r.count
        if c.bwd_kernels:
            mm = c.bwd_act_matmul_flops + c.bwd_weight_matmul_flops
            other = c.bwd_act_flops + c.bwd_weight_flops - mm
            bwd = bwd + op_time(device, dtype, mm, other, c.bwd_bytes, c.bwd_kernels) * r.count
    return fwd, bwd


def optimizer_time(device, optimizer: str, trainable_numel, n_tensors: int, mixed: str):
    """Element-wise update over the trainable parameters (memory bound)."""
    if trainable_numel == 0:
        return 0.0
    per = {"adamw": 4 * 7, "sgd": 4 * 3, "adamw8bit": 4 * 3 + 2 * 2}[optimizer]
    if mixed != "none":
        per += 2 + 4      # read the fp32 master, write the 16-bit copy
    flops = {"adamw": 14, "sgd": 2, "adamw8bit": 20}[optimizer] * trainable_numel
    nbytes = per * trainable_numel
    kernels = n_tensors * (1 if device.kind == "gpu" else 10)
    return float(max(flops / device.vector_peak(), nbytes / device.memory_bandwidth_bytes_per_s)
                 + kernels * device.launch_overhead_s)
