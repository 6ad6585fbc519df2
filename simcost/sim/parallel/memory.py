"""Memory per device under a plan: the single-device components scaled by the device's share
(TP split, PP stage, ZeRO shards, expert shards), activations by the micro-batches in flight,
the loss and optimizer transients, and DeepSpeed's own buffers (the package docstring gives
the model)."""
from __future__ import annotations

from dataclasses import dataclass

from simcost.sim.memory import (backward_step_terms, in_backward_peak, logits_fp32_bytes,
                                loss_peak, prologue_saved)
from simcost.sim.parallel.context import Context
from simcost.stack.allocator import device_peak
from simcost.sim.parallel.plans import Plan
from simcost.sim.parallel.stage import (ActSplit, ParamSplit, stage_bytes, stage_trainable,
                                        trainable_elem, trainable_params)

# Korthikanti et al. 2022 Table 2: per-layer activations sbh(34 + 5as/h); with TP
# sbh(10 + 24/t + 5as/(ht)), with TP + SP sbh(34/t + 5as/(ht)). Flash attention drops the
# 5as/h score term, leaving 10 of 34 replicated without SP.
TP_REPLICATED_ACT_FRACTION = 10 / 34


@dataclass(frozen=True)
class PlanMemory:
    """Bytes per device. ``peak`` = runtime + weights + master + optimizer + resident DeepSpeed
    buffers + max(activations + loss + DeepSpeed backward buckets, gradient term) +
    temporaries."""
    weights: float
    gradients: float
    optimizer: float
    master_weights: float
    activations: float
    temporaries: float
    runtime_overhead: float
    peak: float
    capacity: float
    loss_transient: float = 0.0        # the two candidate peak instants' transients, as in
    gradient_transient: float = 0.0    # simcost.sim.memory.Memory (peak_rows adds them up)
    deepspeed_buckets_backward: float | None = None    # only under DeepSpeed ZeRO, dp > 1
    deepspeed_buffers_resident: float | None = None

    def as_dict(self, stack=None, device_kind: str = "gpu") -> dict:
        """The ``memory_bytes`` mapping; the peak rows from
        :func:`simcost.stack.allocator.device_peak` (``stack`` None: allocated = reserved)."""
        resident = self.weights + self.master_weights + self.optimizer \
            + (self.deepspeed_buffers_resident or 0.0)
        rows = device_peak(self.peak - self.runtime_overhead, resident, self.runtime_overhead,
                           stack, device_kind)
        d = {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
             "master_weights": self.master_weights, "activations": self.activations,
             "temporaries": self.temporaries, "loss_transient": self.loss_transient,
             "gradient_transient": self.gradient_transient,
             **{k: float(v) for k, v in rows.items()}, "capacity": self.capacity}
        if self.deepspeed_buckets_backward is not None:
            d["deepspeed_buckets_backward"] = self.deepspeed_buckets_backward
            d["deepspeed_buffers_resident"] = self.deepspeed_buffers_resident
        return d


@dataclass(slots=True)
class States:
    """Per-device weights and training states (bytes)."""
    weights: float
    gradients: float
    optimizer: float
    master_weights: float


def _uses_deepspeed(plan: Plan) -> bool:
    return plan.deepspeed is not None and plan.zero >= 1 and plan.dp > 1


def plan_memory(ctx: Context, plan: Plan, layers_stage: int, L: int) -> PlanMemory:
    mem, ps, act = ctx.base_memory(plan.micro_batch, plan.cp)
    st = sharded_states(ctx, plan, mem, ps, layers_stage, L)
    activations = stage_activations(plan, act, layers_stage, L)
    temps = float(mem.temporaries) / plan.tp
    g, a = ctx.graph(plan.micro_batch, plan.cp)
    blocks = g.block_segments()
    flowing = float(g.tensors[blocks[0].input_tid].nbytes) / plan.tp if blocks else 0.0
    # logits (vocab-parallel) and the loss on the last stage, as simcost.sim.memory prices them
    loss = float(loss_peak(g, ctx.loss_chunks, flowing, plan.tp))
    opt_temp = st.optimizer / 2 if ctx.optimizer != "sgd" and ctx.optimizer_impl != "fused" \
        else 0.0
    g_share = st.gradients / float(mem.gradients) if float(mem.gradients) else 0.0
    o_share = st.optimizer / float(mem.optimizer) if float(mem.optimizer) else 0.0
    ds_bwd = ds_res = 0.0
    if _uses_deepspeed(plan):
        st, opt_temp, ds_bwd, ds_res = deepspeed_memory(ctx, plan, g, ps, layers_stage, L,
                                                        st.weights, st.optimizer)
    grads, grad_term = st.gradients, st.gradients + opt_temp
    # optimizer-in-backward frees gradients only where each rank owns its shard (ZeRO-2/3,
    # FSDP): DDP's reducer keeps gradient-sized buckets whatever the optimizer does
    in_bwd = ctx.optimizer_in_backward and (plan.zero >= 2 or plan.dp == 1)
    steps = backward_step_terms(g, ctx.optimizer, ctx.mixed, ctx.foreach) if in_bwd else []
    if steps:
        # one parameter's (sharded) gradient and update temporaries at a time, on top of the
        # activations still alive when its hook fires
        grad_term = float(in_backward_peak(steps, activations, logits_fp32_bytes(g, plan.tp),
                                           float(prologue_saved(g, a)) / plan.tp, g_share,
                                           o_share)) + 2 * flowing
        grads = max(gb * g_share for _, gb, _ in steps)
    dynamic = max(activations + loss + ds_bwd, grad_term) + temps
    runtime = float(mem.runtime_overhead)
    peak = runtime + st.weights + st.master_weights + st.optimizer + ds_res + dynamic
    ds = _uses_deepspeed(plan)
    return PlanMemory(st.weights, grads, st.optimizer, st.master_weights, activations, temps,
                      runtime, peak, ctx.device.memory_bytes, loss_transient=loss,
                      gradient_transient=grad_term - grads,
                      deepspeed_buckets_backward=ds_bwd if ds else None,
                      deepspeed_buffers_resident=ds_res if ds else None)


def sharded_states(ctx: Context, plan: Plan, mem, ps: ParamSplit, layers_stage: int,
                   L: int) -> States:
    """Weights, gradients, optimizer states and master weights of the device's share: the
    stage on one TP rank, divided by dp where ZeRO shards them (expert parts by dp/ep), on the
    host where offloaded."""
    tp, dp, ep = plan.tp, plan.dp, plan.ep
    w_all = ps.block.all_bytes + ps.other.all_bytes
    w_stage = stage_bytes(ps, tp, plan.pp, layers_stage, L, ep)
    w_share = w_stage / w_all if w_all else 1.0
    tr_all = ps.block.trainable + ps.other.trainable
    tr_share = stage_trainable(ps, tp, plan.pp, layers_stage, L, ep) / tr_all if tr_all else 0.0
    weights = float(mem.weights) * w_share
    layer_max = ps.layer_bytes_max - ps.layer_expert_max * (1 - 1 / ep)
    # expert shards (ep > 1): their ZeRO partitions span the dp/ep replicas of the shard
    w_exp = float(mem.weights) * (ps.block_expert / ep / max(L, 1) * layers_stage) / w_all \
        if ep > 1 and w_all else 0.0
    tr_exp = ps.block_expert_tr / ep / max(L, 1) * layers_stage / tr_all \
        if ep > 1 and tr_all else 0.0

    def zdiv(total, on):
        if not on:
            return total * tr_share
        return total * (tr_share - tr_exp) / dp + total * tr_exp / (dp // ep)

    if plan.zero == 3 and dp > 1:
        weights = (weights - w_exp) / dp + w_exp / (dp // ep) + 2 * layer_max / tp
    if plan.offload == "params":
        weights = 2 * layer_max / tp
    grads = zdiv(float(mem.gradients), plan.zero >= 2)
    opt = zdiv(float(mem.optimizer), plan.zero >= 1)
    master = zdiv(float(mem.master_weights), plan.zero >= 1)
    if plan.offload != "none":
        # the optimizer lives on the host, and so do the reduced gradient shards it consumes:
        # FSDP2 with CPUOffloadPolicy copies each reduce-scattered shard to the host and frees
        # the device copy (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py
        # foreach_reduce); ZeRO-Offload copies each reduced partition into a pinned host buffer
        # (deepspeed/runtime/zero/stage_1_and_2.py, cpu_offload). With sharded gradients
        # (ZeRO-2/3) the device holds the unreduced gradients of one block, or of the largest
        # parameter outside the blocks (embedding, head), in flight
        opt = master = 0.0
        if plan.zero >= 2:
            grads = min(grads, max(float(mem.gradients) * tr_share / max(layers_stage, 1),
                                   largest_outside_grad(ctx, plan, mem) / tp))
    return States(weights, grads, opt, master)


def stage_activations(plan: Plan, act: ActSplit, layers_stage: int, L: int) -> float:
    """The stage's saved activations: its blocks times the micro-batches in flight (min(m, p)
    on the first stage under 1F1B, more interleaved), split by TP (all of them with sequence
    parallelism, 24 of 34 parts without), plus those outside the blocks and one block's
    recomputation."""
    tp, pp, m = plan.tp, plan.pp, plan.micro_batches
    tp_act = 1.0 / tp if plan.seq_parallel else \
        (TP_REPLICATED_ACT_FRACTION + (1 - TP_REPLICATED_ACT_FRACTION) / tp)
    inflight = min(m, pp) if pp > 1 else 1
    if plan.schedule == "interleaved" and pp > 1:
        inflight = min(m, pp) * (1 + (pp - 1) / (pp * plan.virtual_stages))
    block_act = act.block / max(L, 1) * layers_stage * inflight * tp_act
    other_act = act.other / tp
    return block_act + other_act + act.recompute_block * tp_act


def largest_outside_grad(ctx: Context, plan: Plan, mem) -> float:
    """Gradient bytes of the largest trainable parameter outside the transformer blocks."""
    g, _ = ctx.graph(plan.micro_batch, plan.cp)
    numel = {id(p): (p, c) for p, c in trainable_params(g)}
    total = sum(p.numel * c for p, c in numel.values())
    outside = [p.numel for seg in g.segments if seg.first_layer is None for op in seg.ops
               for p in op.params if p.trainable]
    if not total or not outside:
        return 0.0
    return float(mem.gradients) / total * max(outside)


def deepspeed_memory(ctx: Context, plan: Plan, g, ps: ParamSplit, layers_stage: int, L: int,
                     weights: float, opt: float) -> tuple[States, float, float, float]:
    """What DeepSpeed's ZeRO optimizers hold per device (see the package docstring); returns
    (states, optimizer temporaries, bucket bytes live in backward, resident buffer bytes)."""
    dp, zero, ds = plan.dp, plan.zero, plan.deepspeed
    n = stage_trainable(ps, plan.tp, plan.pp, layers_stage, L, plan.ep)     # trainable numel
    elem = trainable_elem(g)
    half = 2                                                        # bf16 / fp16 module
    if elem > half:        # the engine casts the module (adapters included) to 16-bit
        weights -= n * (elem - half) / (dp if zero == 3 else 1)
    master = 4.0 * n / dp                                           # fp32 partition
    if ctx.optimizer == "adamw":
        opt = 8.0 * n / dp                                          # fp32 exp_avg, exp_avg_sq
    grad16 = half * n / (dp if zero >= 2 else 1)                    # reduced 16-bit gradients
    grads = grad16 + 4.0 * n / dp                                   # + fp32 copy at the step
    bwd, res = ds.buffer_bytes(zero, half)
    if zero == 3:
        res += grad16          # flat 16-bit gradient partition, allocated at initialisation
        grads -= grad16
    return States(weights, grads, opt, master), 0.0, bwd, res
