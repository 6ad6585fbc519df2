"""Training memory: weights, gradients, optimizer state, master weights, activations, peak.

Peak is taken over three instants of a step (the optimizer state exists from the first step
on, and ``zero_grad(set_to_none=True)`` frees gradients before forward):
- end of forward: everything autograd saved + the logits the model returns;
- start of backward: + the loss gradient w.r.t. the logits (fp32, plus its cast);
- end of backward: all gradients + the gradient flowing through the lowest block;
- optimizer step: all gradients + the update's temporaries (torch's for-loop AdamW on CPU
  allocates about two tensors the size of the largest parameter; the foreach implementation,
  the default on GPUs, one list as large as all exp_avg_sq states).
plus the largest transient an op allocates (DoRA's dense weight, NF4 dequantisation) and the
runtime's own reservation from the hardware profile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simcost.dtypes import BYTES
from simcost.errors import SimcostError

OPTIMIZERS = ("adamw", "sgd", "adamw8bit")
MIXED = ("none", "bf16", "fp16")


@dataclass
class Memory:
    weights: object
    gradients: object
    optimizer: object
    master_weights: object
    activations: object
    temporaries: object
    runtime_overhead: object
    peak: object


def optimizer_state_bytes(optimizer: str, trainable, mixed: str) -> float:
    """trainable: (numel of one tensor, dtype, how many such tensors) per trainable tensor."""
    if optimizer not in OPTIMIZERS:
        raise SimcostError(f"unknown optimizer '{optimizer}'; valid: {', '.join(OPTIMIZERS)}")
    if optimizer == "sgd":          # torch.optim.SGD, momentum 0: no state
        return 0
    total = 0
    for n, dt, count in trainable:
        if optimizer == "adamw":    # exp_avg + exp_avg_sq in the param's dtype, fp32 step
            state = 4 if mixed != "none" else BYTES[dt]
            total += (2 * n * state + 4) * count
        else:                       # bitsandbytes 8-bit AdamW: 2 uint8 states + fp32 absmax per 2048
            total += (2 * n + 2 * math.ceil(n / 2048) * 4 + 4) * count
    return total


def training_memory(g, analysis, *, optimizer: str, mixed: str, checkpointing: bool,
                    runtime_overhead: float, foreach: bool = True) -> Memory:
    weights = 0
    grads = 0
    master = 0
    trainable = []
    for p, count in g.params():
        weights += p.nbytes * count
        if p.trainable:
            n = p.numel * count
            trainable.append((p.numel, p.dtype, count))
            grads += n * (4 if mixed != "none" else BYTES[p.dtype])
            if mixed != "none" and BYTES[p.dtype] < 4:
                master += 4 * n
    opt = optimizer_state_bytes(optimizer, trainable, mixed)
    if optimizer == "sgd" or not trainable:
        opt_temp = 0
    elif foreach:
        opt_temp = opt / 2
    else:
        opt_temp = 2 * max(n * (4 if mixed != "none" else BYTES[dt]) for n, dt, _ in trainable)

    act = analysis.activations_bytes
    if checkpointing:
        act = checkpointed_activations(g, analysis)
    temps = 0
    for r in analysis.records:
        temps = np.maximum(temps, r.cost.temp_bytes)
    lt = g.tensors[_logits_tid(g)]
    logits = lt.nbytes
    loss_grad = logits / BYTES[lt.dtype] * 4 + (logits if lt.dtype != "fp32" else 0)
    blocks = g.block_segments()
    lowest_grad = g.tensors[blocks[0].input_tid].nbytes if blocks else 0
    end_fwd = act + logits
    start_bwd = act + logits + loss_grad
    end_bwd = grads + 2 * lowest_grad
    opt_step = grads + opt_temp
    dynamic = np.maximum(np.maximum(np.maximum(end_fwd, start_bwd), end_bwd), opt_step) + temps
    peak = runtime_overhead + weights + master + opt + dynamic
    return Memory(weights, grads, opt, master, act, temps, runtime_overhead, peak)


def _logits_tid(g):
    head = g.segments[-1]
    loss = next(op for op in head.ops if op.kind == "cross_entropy")
    return loss.inputs[0]


def checkpointed_activations(g, analysis):
    """HF gradient checkpointing per decoder layer: each block keeps only its input; backward
    recomputes one block at a time, so one block's saved tensors are live at once."""
    total = analysis.saved_global
    worst_block = 0
    for seg, b in zip(g.segments, analysis.saved_local):
        if seg.first_layer is None:
            total = total + b * seg.count
        else:
            total = total + g.tensors[seg.input_tid].nbytes * seg.count
            worst_block = np.maximum(worst_block, b)
    return total + worst_block
