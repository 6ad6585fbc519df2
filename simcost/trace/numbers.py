"""A traced step's numbers: FLOPs, memory and time of a :class:`CompiledTrace` at given sizes
(no torch here).

- FLOPs per phase from the priced calls (:mod:`simcost.trace.price`); the recomputation of a
  checkpointed step is the forward work recorded inside backward.
- Time from the IR (:mod:`simcost.trace.ir`) through the same time model, optimizer step and
  stack terms as the hand-built graphs (:func:`simcost.sim.train.step_numbers`).
- Memory: the parameters, gradients, optimizer state and master weights as for the hand-built
  graphs (:func:`simcost.sim.memory.param_memory`); the activations and transients from the
  recording's live-memory timeline (:mod:`simcost.trace.timeline`): ``activations`` is what is
  alive at the end of forward (the loss computed), ``loss_transient`` the worst instant up to
  the loss's backward above it, and ``gradient_transient`` the worst instant of the rest of
  backward, or of the optimizer step, above the gradients. On a CPU with a host allocator that
  returns large blocks to the OS, every allocation at or above its threshold faults in
  (:mod:`simcost.sim.page_faults`); the timeline lists them exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simcost.hardware.host_allocator import resolve
from simcost.sim.breakdown import recorder, step_spans
from simcost.sim.memory import Memory, param_memory
from simcost.sim.timing import TimeModel, phase_times
from simcost.sim.train import TrainNumbers, optimizer_step, step_numbers
from simcost.trace.ir import build_ir
from simcost.trace.price import byte_values, evaluate, saved_bytes, totals
from simcost.trace.timeline import build_timeline, evaluate as timeline_at


@dataclass
class TracedNumbers:
    numbers: TrainNumbers
    unpriced: dict = field(default_factory=dict)      # aten op -> calls per step priced by
    #                                                   their bytes alone


def timeline_of(ct):
    tl = getattr(ct, "_timeline", None)
    if tl is None:
        tl = build_timeline(ct.calls, ct.events, ct.births, ct.counts, ct.layer_outputs,
                            ct.layer_inputs)
        ct._timeline = tl
    return tl


def traced_numbers(ct, dims: dict, device, *, optimizer: str, mixed: str, stack=None,
                   host_allocator: str | None = None, dtype: str, tokens,
                   quantize: str = "none") -> TracedNumbers:
    """``dims``: the task's sizes (numbers or numpy arrays); ``dtype``: the compute dtype;
    ``tokens``: what ``tokens_per_s`` counts per step; ``quantize``: the frozen base's
    storage (:mod:`simcost.trace.quantize`: 'nf4', 'int8' or 'none')."""
    from simcost.trace.quantize import quantized, rewrite_calls
    priced, vals = evaluate(ct, dims)
    dense = rewrite_calls(priced, quantized(ct.params, quantize), quantize, dtype)
    saved = saved_bytes(ct, vals)
    g, a = build_ir(ct, priced, batch=dims.get("batch"), seq=dims.get("seq"), dtype=dtype,
                    saved=saved, quantize=quantize)
    tm = TimeModel.from_device(device, stack)
    rec = recorder()
    per = [] if rec is not None else None
    t_fwd, t_bwd = phase_times(tm, dtype, a, per_op=per)
    opt_flops, t_opt, impl = optimizer_step(g, tm, device, optimizer=optimizer, mixed=mixed,
                                            stack=stack)
    nbytes = byte_values(ct, vals, ct.storage_bytes)
    mem = traced_memory(g, timeline_of(ct), nbytes, optimizer=optimizer, mixed=mixed,
                        impl=impl, runtime_overhead=device.runtime_overhead_bytes,
                        temporaries=dense)
    policy = resolve(device.params, device.kind, host_allocator)
    faults = None
    if policy.active:
        b = fresh_blocks(ct, g, nbytes, policy.threshold_bytes, optimizer=optimizer,
                         impl=impl, mixed=mixed)
        faults = {k: v / policy.fault_bytes_per_s for k, v in b.items()}
    f = totals(priced)
    flops = {"forward": f.fwd_flops,
             "backward": f.bwd_act_flops + f.bwd_weight_flops + f.rec_flops,
             "backward_activation": f.bwd_act_flops, "backward_weight": f.bwd_weight_flops,
             "recompute": f.rec_flops, "optimizer": opt_flops,
             "matmul_forward": f.fwd_matmul_flops, "matmul_backward": f.bwd_matmul_flops}
    if rec is not None:
        rec.step = step_spans(g, a, per, t_opt=t_opt, step_overhead_s=tm.step_overhead_s,
                              faults=faults, optimizer_name=f"{optimizer} step")
    n = step_numbers(g, device, tm, stack, flops=flops, mem=mem, t_fwd=t_fwd, t_bwd=t_bwd,
                     t_opt=t_opt, faults=faults, tokens=tokens, policy=policy)
    return TracedNumbers(n, dict(f.unpriced))


def traced_memory(g, tl, nbytes: list, *, optimizer: str, mixed: str, impl: str,
                  runtime_overhead: float, temporaries: float = 0.0) -> Memory:
    """``temporaries``: a working copy alive on top of the recorded step (a dequantised
    weight, :mod:`simcost.trace.quantize`)."""
    pm = param_memory(g, optimizer=optimizer, mixed=mixed, foreach=impl == "foreach",
                      fused_optimizer=impl == "fused")
    t = timeline_at(tl, nbytes)
    act = t["end_forward"]
    loss = np.maximum(t["peak_loss"] - act, 0.0)
    at_step = np.maximum(t["peak_backward"], pm.grads + pm.opt_temp)
    peak = runtime_overhead + pm.weights + pm.master + pm.opt + np.maximum(act + loss, at_step) \
        + temporaries
    return Memory(pm.weights, pm.grads, pm.opt, pm.master, act, temporaries, runtime_overhead,
                  peak, loss_transient=loss, gradient_transient=at_step - pm.grads)


def fresh_blocks(ct, g, nbytes: list, threshold: float, *, optimizer: str, impl: str,
                 mixed: str) -> dict:
    """Bytes per phase of the step's allocations of at least ``threshold`` (each birth of the
    timeline, as often as its layer runs), plus the optimizer's temporaries."""
    from simcost.sim.page_faults import big_block, optimizer_blocks
    out = {"forward": 0.0, "backward": 0.0,
           "optimizer": optimizer_blocks(g, threshold, optimizer=optimizer, impl=impl,
                                         mixed=mixed)}
    for sign, sid, i in ct.events:
        if sign < 0:
            continue
        c = ct.calls[i]
        w = ct.counts.get(c.layer, 1) if c.layer is not None else 1
        key = "forward" if c.phase == "fwd" else "backward"
        out[key] = out[key] + big_block(nbytes[sid], threshold) * w
    return out
