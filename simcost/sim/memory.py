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

OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "mezo")
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

    def breakdown(self, capacity: float) -> dict:
        """The ``memory_bytes`` mapping of an estimate."""
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "master_weights": self.master_weights, "activations": self.activations,
                "temporaries": self.temporaries, "runtime_overhead": self.runtime_overhead,
                "peak": self.peak, "capacity": capacity}


def optimizer_state_bytes(optimizer: str, trainable, mixed: str) -> float:
    """trainable: (numel of one tensor, dtype, how many such tensors) per trainable tensor."""
    if optimizer not in OPTIMIZERS:
        raise SimcostError(f"unknown optimizer '{optimizer}'; valid: {', '.join(OPTIMIZERS)}")
    if optimizer in ("sgd", "mezo"):   # torch.optim.SGD, momentum 0 / MeZO: no state
        return 0
    total = 0
    for n, dt, count in trainable:
        if optimizer == "adamw":    # exp_avg + exp_avg_sq in the param's dtype, fp32 step
            state = 4 if mixed != "none" else BYTES[dt]
            total += (2 * n * state + 4) * count
        else:                       # bitsandbytes 8-bit AdamW: 2 uint8 states + fp32 absmax per 2048
            total += (2 * n + 2 * math.ceil(n / 2048) * 4 + 4) * count
    return total


CHECKPOINTING = ("none", "full", "selective")


def ckpt_mode(checkpointing) -> str:
    """False/None/'none' -> 'none'; True/'full' -> 'full'; 'selective' (Korthikanti et al.
    2022: keep everything but the attention core, recompute that core in backward)."""
    if checkpointing in (False, None, "none"):
        return "none"
    if checkpointing is True or checkpointing == "full":
        return "full"
    if checkpointing == "selective":
        return "selective"
    raise SimcostError(f"unknown checkpointing '{checkpointing}'; valid: {', '.join(CHECKPOINTING)}")


def training_memory(g, analysis, *, optimizer: str, mixed: str, checkpointing,
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
    mode = ckpt_mode(checkpointing)
    if mode == "full":
        act = checkpointed_activations(g, analysis)
    elif mode == "selective":
        act = selective_activations(g, analysis)[0]
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


def inference_memory(g, analysis, *, runtime_overhead: float) -> Memory:
    """MeZO's memory: forward passes under ``torch.no_grad`` only. Nothing is kept for a
    backward; what is live is the residual stream entering the current block plus the op at
    hand (its distinct input and output storages), or, at the end, the logits with the loss's
    fp32 upcast; plus one z (MeZO regenerates z per parameter tensor from the seed)."""
    weights = 0
    z = 0
    for p, count in g.params():
        weights += p.nbytes * count
        if p.trainable:
            z = max(z, p.nbytes)
    work = 0
    for seg in g.segments:
        resid = g.tensors[seg.input_tid].nbytes if seg.input_tid is not None else 0
        for op in seg.ops:
            if op.kind == "view":
                continue
            st = {g.tensors[t].storage for t in (*op.inputs, *op.outputs)}
            work = np.maximum(work, resid + sum(g.tensors[s].nbytes for s in st))
    lt = g.tensors[_logits_tid(g)]
    logits = lt.nbytes + lt.nbytes / BYTES[lt.dtype] * 4
    act = np.maximum(work, logits)
    temps = 0
    for r in analysis.records:
        temps = np.maximum(temps, r.cost.temp_bytes)
    temps = temps + z
    peak = runtime_overhead + weights + act + temps
    return Memory(weights, 0, 0, 0, act, temps, runtime_overhead, peak)


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


def selective_activations(g, analysis):
    """Selective activation checkpointing (Korthikanti et al. 2022, arXiv 2205.05198): the
    attention core (QKᵀ, softmax, dropout, ·V, or the fused SDPA kernel) keeps only its inputs
    (q, k, v) and is recomputed in backward; every other op keeps what autograd saves.
    Returns (total bytes, per-segment bytes of one instance)."""
    by_seg: dict[int, list] = {}
    for r in analysis.records:
        by_seg.setdefault(r.segment, []).append(r)
    glob: dict[int, object] = {}
    per_seg = []
    for si, seg in enumerate(g.segments):
        local: dict[object, object] = {}
        for r in by_seg.get(si, ()):
            if not r.rg_out:
                continue
            kept = list(r.op.inputs) if r.op.attrs.get("attn_core") else r.cost.saved
            for s in kept:
                if isinstance(s, tuple):
                    local[(r.op.name, len(local))] = s[1]
                    continue
                base = g.tensors[g.tensors[s].storage]
                # the core's inputs made inside the core (views, copies) are recomputed too
                if r.op.attrs.get("attn_core") and _made_in_core(seg, s):
                    continue
                if base.is_global:
                    glob[base.tid] = base.nbytes
                else:
                    local[base.tid] = base.nbytes
        per_seg.append(sum(local.values()) if local else 0)
    total = sum(glob.values()) if glob else 0
    for seg, b in zip(g.segments, per_seg):
        total = total + b * seg.count
    return total, per_seg


def _made_in_core(seg, tid) -> bool:
    for op in seg.ops:
        if tid in op.outputs:
            return bool(op.attrs.get("attn_core"))
    return False
