"""One plan priced (step time, communication per axis, memory per device) and the search over
plans."""
from __future__ import annotations

from dataclasses import dataclass, field

from simcost.sim.breakdown import PlanDetail, recorder
from simcost.sim.parallel import comm as K
from simcost.sim.parallel.context import Context
from simcost.sim.parallel.memory import plan_memory
from simcost.sim.parallel.plans import Plan
from simcost.sim.parallel.stage import StageWork

# the communication table's rows, in report order
AXES = ("tensor_parallel", "context_parallel", "zero3_gather", "expert_parallel",
        "pipeline_p2p", "data_parallel", "offload")


@dataclass
class PlanResult:
    plan: Plan
    time_s: dict
    memory_bytes: dict
    communication: dict
    fits: bool
    tokens_per_s: float
    notes: list = field(default_factory=list)


@dataclass(slots=True)
class MicroStep:
    """One micro-batch's forward and backward slot on the slowest stage, exposed
    communication and the SMs lent to hidden communication included."""
    fwd_s: float
    bwd_s: float
    slowdown_fwd_s: float
    slowdown_bwd_s: float


def micro_step(ctx: Context, work: StageWork, tp: K.AxisComm, cp: K.AxisComm,
               z3: K.AxisComm, ep: K.AxisComm) -> MicroStep:
    # collectives that run concurrently with compute take SMs from it (see overlap_slowdown)
    sm_frac = K.comm_sm_fraction(ctx.device)
    slow_f = K.overlap_slowdown(tp.fwd_hidden_s + cp.fwd_hidden_s + z3.fwd_hidden_s, sm_frac)
    slow_b = K.overlap_slowdown(tp.bwd_hidden_s + cp.bwd_hidden_s + z3.bwd_hidden_s, sm_frac)
    slot_f = work.fwd_s + tp.fwd_exposed_s + cp.fwd_exposed_s + z3.fwd_exposed_s + slow_f \
        + ep.fwd_exposed_s
    slot_b = work.bwd_s + tp.bwd_exposed_s + cp.bwd_exposed_s + z3.bwd_exposed_s + slow_b \
        + ep.bwd_exposed_s
    return MicroStep(slot_f, slot_b, slow_f, slow_b)


def plan_peak(ctx: Context, plan: Plan) -> dict:
    """The plan's memory per device (``peak`` and its parts), without pricing its time."""
    work = ctx.stage(plan.micro_batch, plan.cp, plan.tp, plan.seq_parallel, plan.pp)
    return plan_memory(ctx, plan, work.layers_stage, work.layers).as_dict(ctx.stack,
                                                                          ctx.device.kind)


def evaluate_plan(ctx: Context, plan: Plan, mem: dict | None = None) -> PlanResult:
    """The plan priced; ``mem``: its :func:`plan_peak`, when already known."""
    g, _ = ctx.graph(plan.micro_batch, plan.cp)
    work = ctx.stage(plan.micro_batch, plan.cp, plan.tp, plan.seq_parallel, plan.pp)
    shard = K.stage_shard(ctx, plan, g, work)
    tp = K.tensor_parallel(ctx, plan, work)
    cp = K.context_parallel(ctx, plan, work)
    z3 = K.zero3_gather(ctx, plan, work, shard)
    ep = K.expert_parallel(ctx, plan, work)
    ms = micro_step(ctx, work, tp, cp, z3, ep)
    pipe = K.pipeline(ctx, plan, ms.fwd_s, ms.bwd_s)
    dp = K.data_parallel(ctx, plan, shard, ms.bwd_s)
    t_opt, off = K.optimizer_and_offload(ctx, plan, g, shard)
    comm = dict(zip(AXES, (tp, cp, z3, ep, pipe.p2p, dp, off)))
    step = pipe.pipe_s + pipe.p2p.exposed_s + dp.exposed_s + t_opt + off.exposed_s \
        + ctx.tm.step_overhead_s
    if mem is None:
        mem = plan_peak(ctx, plan)
    fits = bool(mem["peak"] <= ctx.device.memory_bytes)
    m = plan.micro_batches
    comm_total = sum(v.total_s for v in comm.values())
    comm_exposed = sum(v.exposed_s for v in comm.values())
    times = {"step": step, "forward": work.fwd_s * m, "backward": work.bwd_s * m,
             "optimizer": t_opt, "host_overhead": ctx.tm.step_overhead_s,
             "pipeline_bubble": pipe.bubble_s,
             "communication": comm_total, "communication_exposed": comm_exposed,
             "communication_hidden": max(0.0, comm_total - comm_exposed),
             "overlap_compute_slowdown": (ms.slowdown_fwd_s + ms.slowdown_bwd_s) * m,
             "micro_step_forward": ms.fwd_s, "micro_step_backward": ms.bwd_s}
    tokens = ctx.global_batch * ctx.seq
    rec = recorder()
    if rec is not None:
        rec.plans[plan.label()] = PlanDetail(
            plan, work.fwd_s, work.bwd_s, ms.fwd_s, ms.bwd_s, ms.slowdown_fwd_s,
            ms.slowdown_bwd_s, comm, pipe.pipe_s, pipe.bubble_s, t_opt, ctx.tm.step_overhead_s,
            step)
    return PlanResult(plan, times, mem, _communication_table(ctx, plan, comm, shard), fits,
                      tokens / step)


def _communication_table(ctx: Context, plan: Plan, comm: dict, shard: K.StageShard) -> dict:
    d = {k: {"total_s": v.total_s, "exposed_s": v.exposed_s,
             "hidden_s": max(0.0, v.total_s - v.exposed_s)} for k, v in comm.items()}
    d["bytes"] = {"tp_allreduce_per_block": K.activation_bytes(ctx, plan),
                  "dp_gradients": shard.grad_bytes,
                  "zero3_params_per_gather": shard.param_bytes if plan.zero == 3 else 0.0,
                  "ep_all_to_all_per_layer": K.expert_all_to_all_bytes(ctx, plan)}
    return d


def step_lower_bound(ctx: Context, plan: Plan) -> float:
    """A lower bound of :func:`evaluate_plan`'s step time, from the slowest stage's compute
    alone: the schedule's slots times one micro-batch's forward and backward, plus the per-step
    host work. Every term the full price adds (exposed communication, the SMs it takes, the
    optimizer, offload) is non-negative, so ``step >= bound`` (a test checks it)."""
    work = ctx.stage(plan.micro_batch, plan.cp, plan.tp, plan.seq_parallel, plan.pp)
    slots = plan.micro_batches
    if plan.pp > 1:
        v = plan.virtual_stages if plan.schedule == "interleaved" else 1
        slots = slots + (plan.pp - 1) / v
    return slots * (work.fwd_s + work.bwd_s) + ctx.tm.step_overhead_s


# the bound is compared after rounding to the search's 1 us tie grain; this margin keeps a
# summation-order difference of a few ulps from ever pruning a plan that ties
_BOUND_SLACK = 1e-9


def _rank_key(r: PlanResult, index: int) -> tuple:
    # fastest; ties (ZeRO stages cost the same for tiny LoRA gradients) go to less memory,
    # then to the earlier plan of the enumeration
    return round(r.time_s["step"], 6), r.memory_bytes["peak"], index


def search(ctx: Context, plans: list[Plan], keep: int = 5) -> tuple[PlanResult, list[PlanResult]]:
    """The fastest fitting plan and the ``keep`` best (or, when none fits, the plans needing
    the least memory).

    Branch and bound, exact: plans are taken in the order of :func:`step_lower_bound`; a plan
    whose memory does not fit is not priced (unless none fits), and the search stops once
    ``keep`` fitting plans are known and the next bound (on the same 1 us grain the ranking
    uses) is slower than the slowest of them: no plan left can enter the ranking. The answer
    is the one pricing every plan gives (a test checks it); a search over hundreds of plans
    prices a few dozen."""
    shapes: dict = {}               # plans differing only in ZeRO stage or ep share a bound
    bounds = []
    for p in plans:
        key = (p.micro_batch, p.micro_batches, p.cp, p.tp, p.sp, p.pp, p.schedule,
               p.virtual_stages)
        b = shapes.get(key)
        if b is None:
            b = shapes[key] = step_lower_bound(ctx, p) * (1.0 - _BOUND_SLACK)
        bounds.append(b)
    order = sorted(range(len(plans)), key=bounds.__getitem__)
    top: list[tuple] = []           # (rank key, result) of the best fitting plans so far
    misses: list[tuple] = []        # (peak, index, memory) of the plans that do not fit
    for i in order:
        if len(top) >= keep and round(bounds[i], 6) > top[keep - 1][0][0]:
            break
        mem = plan_peak(ctx, plans[i])
        if mem["peak"] <= ctx.device.memory_bytes:
            ctx.plans_priced += 1
            r = evaluate_plan(ctx, plans[i], mem)
            top.append((_rank_key(r, i), r))
            top.sort(key=lambda e: e[0])
            del top[keep:]
        else:
            misses.append((mem["peak"], i, mem))
    if top:
        return top[0][1], [r for _, r in top]
    misses.sort(key=lambda e: e[:2])        # every plan was visited: none fits
    out = [evaluate_plan(ctx, plans[i], mem) for _, i, mem in misses[:keep]]
    ctx.plans_priced += len(out)
    return out[0], out
