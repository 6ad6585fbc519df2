"""Data parallelism for traced graphs: DDP, ZeRO-1/2/3 and FSDP (= ZeRO-3) over ``devices``
ranks, with gradient accumulation (no torch here).

A traced graph has no module roles (which linear is column- or row-parallel, where attention
and the experts are), so tensor, pipeline, context and expert parallelism are refused with the
reason; for the hand-built decoder graphs ``--frontend analytic`` prices them. What a rank does
per optimizer step, for a plan of ``dp`` = devices ranks, ``micro_batch`` samples per
micro-batch and ``m`` micro-batches:

- compute: ``m`` times the traced step's forward and backward at ``micro_batch``
  (:func:`simcost.trace.numbers.traced_numbers`), then the optimizer over its share of the
  trainable parameters (ZeRO-1 and up shard it);
- communication, from the analytic path's collectives on the profile's topology
  (:mod:`simcost.sim.parallel.comm`): DDP all-reduces the gradients in buckets overlapped
  with the last micro-batch's backward, ZeRO-1/2 all-gather the updated parameters after the
  step, ZeRO-3 gathers the parameters forward and backward and reduce-scatters the gradients;
- memory: the traced step's activations and transients at ``micro_batch``; weights sharded
  over dp under ZeRO-3 (plus two layers' worth gathered, the one running and the one
  prefetched), gradients under ZeRO-2/3, optimizer states and master weights under ZeRO-1 and
  up. During backward the full gradients of the micro-batch are alive until they are
  reduce-scattered; ZeRO-2/3 keep only their shard after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simcost.errors import SimcostError
from simcost.sim import collectives as C
from simcost.sim.parallel.comm import (StageShard, data_parallel, optimizer_numel,
                                       zero3_gather)
from simcost.sim.parallel.plans import Plan, divisors
from simcost.sim.parallel.stage import StageWork
from simcost.sim.timing import TimeModel, optimizer_time
from simcost.stack.allocator import device_peak


@dataclass
class DPResult:
    plan: Plan
    step_s: float
    time_s: dict
    memory_bytes: dict
    fits: bool
    communication_s: dict


def refuse_axes(req) -> None:
    for name, v in (("--tp", req.tp), ("--pp", req.pp), ("--cp", req.cp), ("--ep", req.ep)):
        if v not in (None, 1):
            raise SimcostError(f"traced front end: {name} needs the model's module roles "
                               f"(column/row linears, attention, experts), which a traced graph "
                               f"does not have; it prices data parallelism, ZeRO and FSDP "
                               f"(--frontend analytic prices {name} for decoder LMs)")
    for bad, what in ((req.offload != "none", "--offload"), (req.dtype == "fp8", "--dtype fp8"),
                      (req.fp8_attention, "--fp8-attention"), (req.deepspeed is not None,
                                                              "a DeepSpeed config")):
        if bad:
            raise SimcostError(f"traced front end: {what} is priced by the analytic path only")


def plans(req) -> list[Plan]:
    """The plans a request names (``--zero``, ``--micro-batch``) or, with ``--parallel
    auto``, every ZeRO stage x micro-batch size that divides a rank's batch."""
    dp = req.devices
    if req.dp not in (None, dp):
        raise SimcostError(f"--dp {req.dp} must equal --devices {dp} for a traced graph (data "
                           f"parallelism is its only axis)")
    if req.batch % dp:
        raise SimcostError(f"--batch {req.batch} is not divisible by the {dp} data-parallel "
                           f"ranks")
    per_rank = req.batch // dp
    if req.parallel == "auto":
        mbs = [req.micro_batch] if req.micro_batch else divisors(per_rank)
        zeros = (0, 1, 2, 3) if dp > 1 else (0,)
    else:
        mbs = [req.micro_batch or per_rank]
        zeros = (req.zero,)
    out = []
    for mb in mbs:
        if per_rank % mb:
            raise SimcostError(f"--micro-batch {mb} does not divide the {per_rank} samples of a "
                               f"rank")
        out += [Plan(dp=dp, zero=z, micro_batch=mb, micro_batches=per_rank // mb) for z in zeros]
    return out


def evaluate(plan: Plan, n, ct, *, topo, device, tm: TimeModel, stack, optimizer: str,
             mixed: str, impl: str) -> DPResult:
    """One plan from the micro-batch's :class:`~simcost.sim.train.TrainNumbers` ``n``."""
    m = plan.micro_batches
    t_fwd, t_bwd = float(n.time_s["forward"]), float(n.time_s["backward"])
    mem = {k: float(v) for k, v in n.memory_bytes.items()}
    tr_elem = _trainable_elem(ct)
    shard = StageShard(param_bytes=mem["weights"], trainable_numel=float(n.params_trainable),
                       trainable_elem=tr_elem, grad_bytes=mem["gradients"],
                       expert_param_bytes=0.0, expert_grad_bytes=0.0,
                       expert_trainable_numel=0.0)
    layers = max(1, sum(ct.counts.values()))
    work = StageWork(layers, layers, t_fwd, t_bwd, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    ctx = _Ctx(topo)
    ddp = data_parallel(ctx, plan, shard, t_bwd)
    z3 = zero3_gather(ctx, plan, work, shard)
    n_tensors = sum(p.count for p in ct.params if p.trainable)   # trainable tensors
    t_opt = optimizer_time(tm, optimizer, optimizer_numel(plan, shard), max(1, n_tensors),
                           mixed, foreach=impl == "foreach", elem_bytes=tr_elem,
                           fused=impl == "fused")
    exposed = ddp.exposed_s + z3.exposed_s
    step = m * (t_fwd + t_bwd) + exposed + t_opt + tm.step_overhead_s
    memory = _memory(plan, mem, ct, device, stack)
    comm = {"data_parallel_s": ddp.total_s, "data_parallel_exposed_s": ddp.exposed_s,
            "zero3_s": z3.total_s, "zero3_exposed_s": z3.exposed_s}
    times = {"step": step, "forward": m * t_fwd, "backward": m * t_bwd, "optimizer": t_opt,
             "host_overhead": tm.step_overhead_s, "communication_exposed": exposed}
    return DPResult(plan, step, times, memory, memory["peak"] <= device.memory_bytes, comm)


class _Ctx:
    """What :mod:`simcost.sim.parallel.comm`'s data-parallel collectives read of a context."""

    def __init__(self, topo):
        self.topo = topo


def _trainable_elem(ct) -> int:
    from simcost.dtypes import BYTES
    return max((BYTES[p.dtype] for p in ct.params if p.trainable), default=4)


def _memory(plan: Plan, mem: dict, ct, device, stack) -> dict:
    dp, z = plan.dp, plan.zero
    weights = mem["weights"]
    if z == 3 and dp > 1:
        weights = weights / dp + 2 * _largest_unit_bytes(ct)
    grads_full = mem["gradients"]
    grads = grads_full / dp if z >= 2 else grads_full
    opt = mem["optimizer"] / dp if z >= 1 else mem["optimizer"]
    master = mem["master_weights"] / dp if z >= 1 else mem["master_weights"]
    # the device's own runtime (device_peak adds the stack's context on top, as for one device)
    act, loss, runtime = mem["activations"], mem["loss_transient"], device.runtime_overhead_bytes
    # the backward's instant: its full gradients until reduce-scattered, then the shard
    at_step = max(grads_full + mem["gradient_transient"], grads_full) - grads_full + grads
    dynamic = max(act + loss, at_step)
    peak = runtime + weights + master + opt + dynamic
    rows = device_peak(peak - runtime, weights + master + opt, runtime, stack, device.kind)
    return {"weights": weights, "gradients": grads, "optimizer": opt, "master_weights": master,
            "activations": act, "temporaries": 0.0, "loss_transient": loss,
            "gradient_transient": at_step - grads, **{k: float(v) for k, v in rows.items()},
            "capacity": device.memory_bytes}


def _largest_unit_bytes(ct) -> float:
    """Bytes FSDP gathers at once: one layer's parameters, or those outside the layers (the
    root unit: embeddings, head), whichever is larger."""
    from simcost.dtypes import BYTES
    units: dict = {}
    for p in ct.params:
        units[p.layer] = units.get(p.layer, 0.0) + float(np.prod(p.shape)) * BYTES[p.dtype]
    return max(units.values(), default=0.0)


def topology(profile, devices: int, nodes):
    return C.Topology.from_profile(profile, devices, nodes)
