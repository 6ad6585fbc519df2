"""Multi-PEFT training (mLoRA / ASPEN, Ye et al. 2023, arXiv 2312.02515).

N LoRA jobs fine-tune one frozen base model in one process. BatchLoRA concatenates the jobs'
micro-batches along the batch dimension, so every *base* op (the frozen GEMMs, attention,
norms, the LM head) runs once over N·b sequences, while each job's adapter branch runs over its
own b rows with its own weights. Memory holds one copy of the base weights plus, per job, its
adapters, their gradients and optimizer state, and its activations.

Priced from two analysed graphs of the same model and PEFT config: one at batch N·b (the base
ops and every job's activations) and one at batch b (one job's adapter ops, N times over, and
one separate run for the comparison).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simcost.dtypes import BYTES
from simcost.errors import SimcostError
from simcost.sim.memory import ckpt_mode, training_memory
from simcost.sim.timing import TimeModel, optimizer_time, phase_times
from simcost.stack import optimizer_impl
from simcost.sim.train import TrainNumbers, param_counts, train_numbers


@dataclass
class MultiNumbers:
    shared: TrainNumbers        # the N jobs in one process, base GEMMs batched
    single: TrainNumbers        # one job run alone (what N separate runs each cost)
    phases: dict                # seconds of the shared step: base vs adapter ops, optimizer


def split_times(tm: TimeModel, dtype: str, analysis, checkpointing) -> dict:
    """Forward and backward seconds of the base ops and of the adapter ops (recompute under
    activation checkpointing counted in backward)."""
    per: list = []
    phase_times(tm, dtype, analysis, recompute_blocks=checkpointing, per_op=per)
    out = {"base_forward": 0.0, "base_backward": 0.0, "adapter_forward": 0.0,
           "adapter_backward": 0.0}
    for r, tf, tb, trc in per:
        kind = "adapter" if r.op.attrs.get("adapter") else "base"
        out[f"{kind}_forward"] += float(tf * r.count)
        out[f"{kind}_backward"] += float((tb + trc) * r.count)
    return out


def multi_numbers(build, device, *, jobs: int, batch: int, seq: int, optimizer: str,
                  mixed: str, checkpointing, stack=None) -> MultiNumbers:
    """``build(batch) -> (graph, analysis)`` with the PEFT method applied."""
    if jobs < 1:
        raise SimcostError(f"--jobs must be >= 1, got {jobs}")
    if optimizer == "mezo":
        raise SimcostError("--jobs does not combine with --optimizer mezo")
    mode = ckpt_mode(checkpointing)
    ck = False if mode == "none" else mode
    g1, a1 = build(batch)
    for p, _ in g1.params():
        if p.trainable and p.role != "adapter":
            raise SimcostError(f"multi-job training shares a frozen base model, but this PEFT "
                               f"method trains base parameter '{p.name}' (use lora, qlora, dora, "
                               f"ia3, adapter, lst, ...)")
    single = train_numbers(g1, a1, device, batch=batch, seq=seq, optimizer=optimizer,
                           mixed=mixed, checkpointing=ck, stack=stack)
    gN, aN = build(jobs * batch)
    tm = TimeModel.from_device(device, stack)
    impl = optimizer_impl(stack, device.kind)
    tN = split_times(tm, g1.dtype, aN, ck)
    t1 = split_times(tm, g1.dtype, a1, ck)
    _, _, trainable1, tensors1 = param_counts(g1)
    elem = max((BYTES[p.dtype] for p, _ in g1.params() if p.trainable), default=4)
    t_opt = optimizer_time(tm, optimizer, jobs * trainable1, jobs * tensors1, mixed,
                           foreach=impl == "foreach", elem_bytes=elem, fused=impl == "fused")
    fwd = tN["base_forward"] + jobs * t1["adapter_forward"]
    bwd = tN["base_backward"] + jobs * t1["adapter_backward"]
    step = fwd + bwd + t_opt + tm.step_overhead_s
    # N adapter sets: each job's adapter parameters stand N times in the shared graph
    for p, _ in gN.params():
        if p.role == "adapter":
            p.shape = (jobs * p.shape[0], *p.shape[1:]) if p.shape else (jobs,)
    mem = training_memory(gN, aN, optimizer=optimizer, mixed=mixed, checkpointing=ck,
                          runtime_overhead=device.runtime_overhead_bytes,
                          foreach=impl == "foreach", fused_optimizer=impl == "fused")
    total, added, trainable, _ = param_counts(gN)
    flops = {k: v * jobs for k, v in single.flops.items()}   # N jobs' work, batched or not
    memory = mem.breakdown(device.memory_bytes, stack, device.kind)
    times = {"step": step, "forward": fwd, "backward": bwd, "optimizer": t_opt,
             "host_overhead": tm.step_overhead_s}
    shared = TrainNumbers(total, added, trainable, flops, memory, times,
                          jobs * batch * seq / step,
                          np.asarray(memory["peak"]) <= device.memory_bytes)
    phases = {"base_forward": tN["base_forward"], "base_backward": tN["base_backward"],
              "adapter_forward": jobs * t1["adapter_forward"],
              "adapter_backward": jobs * t1["adapter_backward"], "optimizer": t_opt,
              "separate_base": jobs * (t1["base_forward"] + t1["base_backward"])}
    return MultiNumbers(shared, single, phases)
