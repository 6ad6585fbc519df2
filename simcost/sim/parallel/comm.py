"""Communication per parallel axis for one plan: what each axis moves, how long it takes on the
topology's links, and how much of it the compute hides (the package docstring gives the model;
:mod:`simcost.sim.collectives` the collective formulas)."""
from __future__ import annotations

from dataclasses import dataclass

from simcost.dtypes import BYTES
from simcost.sim import collectives as C
from simcost.sim.parallel.context import Context
from simcost.sim.parallel.plans import Plan
from simcost.sim.parallel.stage import (StageWork, stage_bytes, stage_trainable, trainable_elem,
                                        trainable_params)
from simcost.sim.parallel.tensor import tp_overlap_exposed
from simcost.sim.timing import optimizer_time

DDP_BUCKET_BYTES = 25 * 2 ** 20          # torch DDP bucket_cap_mb default


@dataclass(slots=True)
class AxisComm:
    """One axis's communication: over the whole step, its traffic time and the part on the
    critical path; per micro-batch, forward and backward, the same two (for the overlap)."""
    total_s: float = 0.0
    exposed_s: float = 0.0
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    fwd_exposed_s: float = 0.0
    bwd_exposed_s: float = 0.0

    @property
    def fwd_hidden_s(self) -> float:
        return self.fwd_s - self.fwd_exposed_s

    @property
    def bwd_hidden_s(self) -> float:
        return self.bwd_s - self.bwd_exposed_s


@dataclass(slots=True)
class StageShard:
    """What the data-parallel collectives of the slowest stage move on one rank."""
    param_bytes: float              # every parameter of the stage (ZeRO-3 gathers)
    trainable_numel: float
    trainable_elem: int             # bytes per trainable element (its storage dtype)
    grad_bytes: float               # its trainable gradients (fp32 under mixed precision)
    expert_param_bytes: float       # the expert shard's part of each (ep > 1)
    expert_grad_bytes: float
    expert_trainable_numel: float


def stage_shard(ctx: Context, plan: Plan, g, work: StageWork) -> StageShard:
    ps = ctx.base_memory(plan.micro_batch, plan.cp)[1]
    ep, L, ls = plan.ep, work.layers, work.layers_stage
    tr_elem = trainable_elem(g)
    grad_elem = 4 if ctx.mixed != "none" else tr_elem
    tr_numel = stage_trainable(ps, plan.tp, plan.pp, ls, L, ep)
    # expert shards (ep > 1) synchronise over their dp/ep replicas only, spaced ep apart
    return StageShard(
        param_bytes=stage_bytes(ps, plan.tp, plan.pp, ls, L, ep),
        trainable_numel=tr_numel, trainable_elem=tr_elem, grad_bytes=tr_numel * grad_elem,
        expert_param_bytes=ps.block_expert / ep / max(L, 1) * ls,
        expert_grad_bytes=ps.block_expert_tr / ep / max(L, 1) * ls * grad_elem,
        expert_trainable_numel=ps.block_expert_tr / ep / max(L, 1) * ls)


def activation_bytes(ctx: Context, plan: Plan) -> float:
    """The hidden state of one micro-batch on one context-parallel rank."""
    return plan.micro_batch * (ctx.seq // plan.cp) * ctx.spec.hidden * BYTES[ctx.compute_dtype]


def tensor_parallel(ctx: Context, plan: Plan, work: StageWork) -> AxisComm:
    """2 all-reduces (or all-gather + reduce-scatter) of the hidden state per block forward, 2
    backward, and the vocab-parallel embedding's, per micro-batch on the stage."""
    tp, m = plan.tp, plan.micro_batches
    if tp == 1:
        return AxisComm()
    t_ar = C.all_reduce(activation_bytes(ctx, plan), tp, ctx.topo.link(tp, 1))
    tp_f = 2 * t_ar * work.layers_stage + t_ar   # + the vocab-parallel embedding's all-reduce
    tp_b = 2 * t_ar * work.layers_stage * work.bwd_fraction
    if plan.tp_overlap:
        exp_f, exp_b = tp_overlap_exposed(tp_f, tp_b, work.linear_fwd_s, work.linear_bwd_s,
                                          work.wgrad_bwd_s, plan.seq_parallel)
    else:
        exp_f, exp_b = tp_f, tp_b
    return AxisComm((tp_f + tp_b) * m, (exp_f + exp_b) * m, tp_f, tp_b, exp_f, exp_b)


def context_parallel(ctx: Context, plan: Plan, work: StageWork) -> AxisComm:
    """Ring exchange of K and V (cp - 1 hops forward, twice that backward), overlapped with
    attention."""
    tp, cp, m = plan.tp, plan.cp, plan.micro_batches
    if cp <= 1:
        return AxisComm()
    elem = BYTES[ctx.compute_dtype]
    kv = 2 * plan.micro_batch * (ctx.seq // cp) * ctx.spec.kv_dim * elem / tp
    hop = C.p2p(kv, ctx.topo.link(cp, tp)) * (cp - 1)
    ls, frac = work.layers_stage, work.bwd_fraction
    exp_f = max(0.0, hop - work.attn_fwd_per_layer_s) * ls
    exp_b = max(0.0, 2 * hop - work.attn_bwd_per_layer_s) * ls * frac
    tot_f, tot_b = hop * ls, 2 * hop * frac * ls
    return AxisComm((tot_f + tot_b) * m, (exp_f + exp_b) * m, tot_f, tot_b, exp_f, exp_b)


def _dp_collective(fn, plan: Plan, total, expert):
    """A data-parallel collective over ``total`` bytes, of which ``expert`` belong to the
    expert shards (those synchronise over their dp/ep replicas, spaced ep apart)."""
    dp, ep, stride = plan.dp, plan.ep, plan.tp * plan.cp
    if ep <= 1 or expert <= 0:
        return fn(total, dp, stride)
    return fn(total - expert, dp, stride) + fn(expert, dp // ep, stride * ep)


def zero3_gather(ctx: Context, plan: Plan, work: StageWork, shard: StageShard) -> AxisComm:
    """ZeRO-3 / FSDP: every parameter of the stage gathered forward and backward (prefetched,
    the first layer's exposed), the gradients reduce-scattered."""
    if not (plan.zero == 3 and plan.dp > 1):
        return AxisComm()
    topo, m = ctx.topo, plan.micro_batches
    ag = _dp_collective(topo.all_gather, plan, shard.param_bytes, shard.expert_param_bytes)
    first_layer = ag / max(work.layers_stage, 1)
    rs = _dp_collective(topo.reduce_scatter, plan, shard.grad_bytes, shard.expert_grad_bytes)
    exp_f = max(0.0, ag - work.fwd_s) + first_layer
    exp_b = max(0.0, ag + rs - work.bwd_s) + first_layer
    return AxisComm((2 * ag + rs) * m, (exp_f + exp_b) * m, ag, ag + rs, exp_f, exp_b)


def expert_all_to_all_bytes(ctx: Context, plan: Plan) -> float:
    """Tokens · top_k · hidden of one micro-batch's MoE dispatch (0 without ep)."""
    ps = ctx.base_memory(plan.micro_batch, plan.cp)[1]
    if not (plan.ep > 1 and ps.moe_layers):
        return 0.0
    tokens = plan.micro_batch * (ctx.seq // plan.cp) / (plan.tp if plan.seq_parallel else 1)
    return tokens * ps.top_k * ctx.spec.hidden * BYTES[ctx.compute_dtype]


def expert_parallel(ctx: Context, plan: Plan, work: StageWork) -> AxisComm:
    """All-to-all dispatch + combine per MoE layer, forward and backward, on the critical path
    (the experts wait for their tokens, the next layer for the outputs)."""
    ps, m = ctx.base_memory(plan.micro_batch, plan.cp)[1], plan.micro_batches
    if not (plan.ep > 1 and ps.moe_layers):
        return AxisComm()
    a2a_bytes = expert_all_to_all_bytes(ctx, plan)
    moe_stage = ps.moe_layers / max(work.layers, 1) * work.layers_stage
    t_a2a = ctx.topo.all_to_all(a2a_bytes, plan.ep, plan.tp * plan.cp)
    ep_f = 2 * t_a2a * moe_stage
    ep_b = 2 * t_a2a * moe_stage * work.bwd_fraction
    return AxisComm((ep_f + ep_b) * m, (ep_f + ep_b) * m, ep_f, ep_b, ep_f, ep_b)


def comm_sm_fraction(device) -> float:
    """Fraction of the compute units a concurrent collective occupies: the profile's
    ``time_model.comm_overlap_sms`` (TransformerEngine userbuffers' default num_sm; NCCL
    likewise runs one CTA per channel on its own SM) over ``compute_units``. 0 when the
    profile gives no such number (overlap then costs the compute nothing)."""
    sms, units = device.params.comm_overlap_sms, device.params.compute_units
    if not sms or not units:
        return 0.0
    return min(1.0, sms / units)


def overlap_slowdown(hidden_s: float, sm_fraction: float) -> float:
    """Extra compute time from running ``hidden_s`` of communication concurrently: for that
    long the compute has (1 - f) of the SMs, so the same work needs hidden_s·f more time
    (work conservation; the compute is longer than the hidden communication by definition)."""
    return max(0.0, hidden_s) * sm_fraction


@dataclass(slots=True)
class PipelineTime:
    pipe_s: float          # the schedule's slots times the micro-step
    bubble_s: float
    p2p: AxisComm          # stage-boundary activations (exposed: fill and drain)


def pipeline(ctx: Context, plan: Plan, slot_f: float, slot_b: float) -> PipelineTime:
    """1F1B: m + p - 1 slots; interleaved with v chunks: m + (p - 1)/v."""
    pp, m = plan.pp, plan.micro_batches
    if pp <= 1:
        return PipelineTime(m * (slot_f + slot_b), 0.0, AxisComm())
    v = plan.virtual_stages if plan.schedule == "interleaved" else 1
    tp, cp, dp = plan.tp, plan.cp, plan.dp
    p2p_bytes = activation_bytes(ctx, plan) / (tp if plan.seq_parallel else 1)
    t_p2p = C.p2p(p2p_bytes, ctx.topo.link(pp, tp * cp * dp))
    slots = m + (pp - 1) / v
    pp_exposed = 2 * (pp - 1) * t_p2p * v
    return PipelineTime(slots * (slot_f + slot_b), (pp - 1) / v * (slot_f + slot_b),
                        AxisComm(2 * m * t_p2p * v, pp_exposed))


def data_parallel(ctx: Context, plan: Plan, shard: StageShard, slot_b: float) -> AxisComm:
    """The trainable gradients all-reduced in DDP buckets, overlapped with the last
    micro-batch's backward (the last bucket exposed); ZeRO-1/2 all-gather the updated
    parameters after the step. ZeRO-3 is :func:`zero3_gather`."""
    dp, topo = plan.dp, ctx.topo
    if not (dp > 1 and plan.zero < 3):
        return AxisComm()
    grad_bytes = shard.grad_bytes
    t_red = _dp_collective(topo.all_reduce, plan, grad_bytes, shard.expert_grad_bytes)
    last = topo.all_reduce(min(grad_bytes, DDP_BUCKET_BYTES), dp, plan.tp * plan.cp)
    exposed = max(t_red - slot_b, last) if grad_bytes > 0 else 0.0
    total = t_red
    if plan.zero in (1, 2):      # updated trainable params all-gathered after the step
        elem = shard.trainable_elem
        t_ag = _dp_collective(topo.all_gather, plan, shard.trainable_numel * elem,
                              shard.expert_trainable_numel * elem)
        exposed += t_ag
        total += t_ag
    return AxisComm(total, exposed)


def optimizer_numel(plan: Plan, shard: StageShard) -> float:
    """Trainable elements this rank's optimizer steps (ZeRO-1+ shards them; expert states over
    the dp/ep replicas of their shard)."""
    dp = plan.dp
    n_opt = shard.trainable_numel / (dp if plan.zero >= 1 else 1)
    if plan.zero >= 1 and plan.ep > 1:
        exp = shard.expert_trainable_numel
        n_opt += exp / (dp // plan.ep) - exp / dp
    return n_opt


def optimizer_and_offload(ctx: Context, plan: Plan, g, shard: StageShard) -> tuple[float, AxisComm]:
    """(optimizer step time, host-link traffic). ZeRO-Offload: gradients down, updated
    parameters up over the host link; CPU Adam at host-memory speed (~20 B/param/step at an
    assumed 100 GB/s host DRAM bandwidth); offloaded parameters cross it every micro-batch."""
    n_opt = optimizer_numel(plan, shard)
    tr_elem = shard.trainable_elem
    if plan.offload == "none":
        n_tensors = max(1, int(sum(c for _, c in trainable_params(g)) / plan.pp))
        return optimizer_time(ctx.tm, ctx.optimizer, n_opt, n_tensors, ctx.mixed,
                              foreach=ctx.foreach, elem_bytes=tr_elem,
                              fused=ctx.optimizer_impl == "fused"), AxisComm()
    hl, dp, zero = ctx.topo.host, plan.dp, plan.zero
    t_opt = n_opt * 20 / 100e9
    off = C.p2p(shard.grad_bytes / (dp if zero >= 1 else 1), hl) + C.p2p(n_opt * tr_elem, hl)
    if plan.offload == "params":
        off += 2 * plan.micro_batches * C.p2p(shard.param_bytes / (dp if zero == 3 else 1), hl)
    return t_opt, AxisComm(off, off)
