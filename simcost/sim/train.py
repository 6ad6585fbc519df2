"""Training-step estimate: the pipeline's last stage, from an analysed graph to numbers."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simcost.dtypes import BYTES
from simcost.hardware.host_allocator import resolve
from simcost.sim.breakdown import recorder, step_spans
from simcost.sim.memory import ckpt_mode, inference_memory, training_memory
from simcost.stack import optimizer_impl
from simcost.sim.page_faults import fault_times
from simcost.sim.timing import TimeModel, mezo_perturb_time, optimizer_time, phase_times, recomputed


@dataclass
class TrainNumbers:
    params_total: int
    params_added: int
    params_trainable: int
    flops: dict
    memory_bytes: dict
    time_s: dict
    tokens_per_s: object
    fits: object
    warnings: list = field(default_factory=list)


def train_numbers(g, analysis, device, *, batch, seq, optimizer: str, mixed: str,
                  checkpointing, loss_chunks: int = 1,
                  optimizer_in_backward: bool = False, stack=None,
                  host_allocator: str | None = None) -> TrainNumbers:
    """``checkpointing``: False/'none', True/'full' or 'selective'; ``optimizer='mezo'`` prices
    a zeroth-order MeZO step instead (:func:`mezo_numbers`). ``loss_chunks`` (chunked
    cross-entropy) and ``optimizer_in_backward`` change memory only (see
    :mod:`simcost.sim.memory`); the optimizer's work and time are the same. ``stack``
    (:class:`simcost.stack.Stack`, None: the device alone) sets host cost, sustained GEMM
    rate, the optimizer implementation and the caching allocator. ``host_allocator`` (CPU:
    glibc, tcmalloc, jemalloc; None: the calibration's) adds the page faults of the step's
    fresh large blocks (:mod:`simcost.sim.page_faults`)."""
    if optimizer == "mezo":
        return mezo_numbers(g, analysis, device, batch=batch, seq=seq, stack=stack)
    checkpointing = ckpt_mode(checkpointing)
    if checkpointing == "none":
        checkpointing = False
    a = analysis
    fwd_mm = a.total("fwd_matmul_flops")
    bwd_mm = a.total("bwd_act_matmul_flops") + a.total("bwd_weight_matmul_flops")
    fwd = a.total("fwd_flops")
    bwd_act = a.total("bwd_act_flops")
    bwd_w = a.total("bwd_weight_flops")
    recompute = 0
    if checkpointing:
        for r in a.records:
            if checkpointing == "full" and r.op.module.startswith(("model.layers", "transformer.h")) \
                    or checkpointing == "selective" and recomputed(r, "selective"):
                recompute = recompute + r.cost.fwd_flops * r.count
    tm = TimeModel.from_device(device, stack)
    rec = recorder()
    per = [] if rec is not None else None
    t_fwd, t_bwd = phase_times(tm, g.dtype, a, recompute_blocks=checkpointing, per_op=per)
    opt_flops, t_opt, impl = optimizer_step(g, tm, device, optimizer=optimizer, mixed=mixed,
                                            stack=stack)
    policy = resolve(device.params, device.kind, host_allocator)
    faults = fault_times(g, a, policy, optimizer=optimizer, impl=impl, mixed=mixed,
                         checkpointing=checkpointing)
    mem = training_memory(g, a, optimizer=optimizer, mixed=mixed, checkpointing=checkpointing,
                          runtime_overhead=device.runtime_overhead_bytes,
                          foreach=impl == "foreach", loss_chunks=loss_chunks,
                          optimizer_in_backward=optimizer_in_backward,
                          fused_optimizer=impl == "fused")
    flops = {"forward": fwd, "backward": bwd_act + bwd_w + recompute,
             "backward_activation": bwd_act, "backward_weight": bwd_w, "recompute": recompute,
             "optimizer": opt_flops, "matmul_forward": fwd_mm, "matmul_backward": bwd_mm}
    if rec is not None:
        rec.step = step_spans(g, a, per, t_opt=t_opt, step_overhead_s=tm.step_overhead_s,
                              faults=faults, optimizer_name=f"{optimizer} step")
    return step_numbers(g, device, tm, stack, flops=flops, mem=mem, t_fwd=t_fwd, t_bwd=t_bwd,
                        t_opt=t_opt, faults=faults, tokens=batch * seq, policy=policy)


def optimizer_step(g, tm: TimeModel, device, *, optimizer: str, mixed: str, stack):
    """(FLOPs, seconds, implementation) of the optimizer step over ``g``'s trainable
    parameters (the stack picks the implementation: foreach, fused or for-loop)."""
    _, _, trainable, n_tensors = param_counts(g)
    opt_flops = {"adamw": 14, "sgd": 2, "adamw8bit": 20}[optimizer] * trainable
    elem = max((BYTES[p.dtype] for p, _ in g.params() if p.trainable), default=4)
    impl = optimizer_impl(stack, device.kind)
    t_opt = optimizer_time(tm, optimizer, trainable, n_tensors, mixed, foreach=impl == "foreach",
                           elem_bytes=elem, fused=impl == "fused")
    return opt_flops, t_opt, impl


def step_numbers(g, device, tm: TimeModel, stack, *, flops: dict, mem, t_fwd, t_bwd, t_opt,
                 faults, tokens, policy) -> TrainNumbers:
    """The step's :class:`TrainNumbers` from its phases' times, FLOPs and memory (shared by
    the hand-built and the traced graphs)."""
    total, added, trainable, _ = param_counts(g)
    if faults is not None:
        t_fwd, t_bwd, t_opt = (t_fwd + faults["forward"], t_bwd + faults["backward"],
                               t_opt + faults["optimizer"])
    step = t_fwd + t_bwd + t_opt + tm.step_overhead_s
    memory = mem.breakdown(device.memory_bytes, stack, device.kind)
    times = {"step": step, "forward": t_fwd, "backward": t_bwd, "optimizer": t_opt,
             "host_overhead": tm.step_overhead_s}
    if faults is not None:
        times["page_faults"] = faults["forward"] + faults["backward"] + faults["optimizer"]
    return TrainNumbers(total, added, trainable, flops, memory, times, tokens / step,
                        np.less_equal(memory["peak"], device.memory_bytes),
                        [policy.note] if policy.note else [])


def param_counts(g):
    """(base parameters, parameters the PEFT method adds, trainable, trainable tensors); a
    graph whose parameters are fixed may carry them in ``g.meta['param_counts']``."""
    cached = g.meta.get("param_counts")
    if cached is not None:
        return cached
    total = added = trainable = n_tensors = 0
    for p, count in g.params():
        if p.role == "adapter":
            added += p.numel * count
        else:
            total += p.numel * count
        if p.trainable:
            trainable += p.numel * count
            n_tensors += count
    return total, added, trainable, n_tensors


def mezo_numbers(g, analysis, device, *, batch, seq, stack=None) -> TrainNumbers:
    """MeZO (Malladi et al. 2023, arXiv 2305.17333): a zeroth-order step is two forward passes
    (at θ+εz and θ-εz) under no_grad, four in-place passes over the trainable parameters
    (perturb, perturb back twice, update with z regenerated from a seed), no backward, no
    saved activations, no gradients, no optimizer state: memory is inference memory. With a
    PEFT method only its trainable parameters are perturbed."""
    total, added, trainable, n_tensors = param_counts(g)
    a = analysis
    tm = TimeModel.from_device(device, stack)
    rec = recorder()
    per = [] if rec is not None else None
    t_fwd, _ = phase_times(tm, g.dtype, a, per_op=per)
    elem = max((BYTES[p.dtype] for p, _ in g.params() if p.trainable), default=4)
    t_opt = mezo_perturb_time(tm, trainable, n_tensors, elem)
    if rec is not None:
        rec.step = step_spans(g, a, [(r, f, 0.0, 0.0) for r, f, _, _ in per], t_opt=t_opt,
                              step_overhead_s=tm.step_overhead_s, forward_passes=2,
                              optimizer_name="MeZO perturb and update")
    step = 2 * t_fwd + t_opt + tm.step_overhead_s
    mem = inference_memory(g, a, runtime_overhead=device.runtime_overhead_bytes)
    fwd = a.total("fwd_flops")
    flops = {"forward": 2 * fwd, "backward": 0, "backward_activation": 0, "backward_weight": 0,
             "recompute": 0, "optimizer": 16 * trainable,
             "matmul_forward": 2 * a.total("fwd_matmul_flops"), "matmul_backward": 0}
    memory = mem.breakdown(device.memory_bytes, stack, device.kind)
    times = {"step": step, "forward": 2 * t_fwd, "backward": 0.0, "optimizer": t_opt,
             "host_overhead": tm.step_overhead_s}
    return TrainNumbers(total, added, trainable, flops, memory, times, batch * seq / step,
                        np.less_equal(memory["peak"], device.memory_bytes))
