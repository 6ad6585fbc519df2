"""The multi-device / fp8 / offload path of :func:`simcost.api.estimate_train`."""
from __future__ import annotations

from collections import OrderedDict

from simcost import pipeline
from simcost.dtypes import FLOAT_DTYPES
from simcost.errors import SimcostError
from simcost.hardware import load_profile
from simcost.sim import parallel as P
from simcost.sim.collectives import Topology
from simcost.sim.memory import MIXED
from simcost.sim.train import train_numbers


def estimate_parallel(spec, hardware, *, batch, seq, peft, peft_config, dtype, mixed_precision,
                      attn, optimizer, grad_checkpointing, devices, nodes, tp, pp, dp, cp, zero,
                      parallel, micro_batch, sequence_parallel, tp_overlap, pp_schedule,
                      virtual_stages, offload, fp8_attention, peft_options, ep=None,
                      loss_chunks=1, optimizer_in_backward=False, stack=None,
                      fp8_params=False, fp8_activation=False):
    from simcost.pipeline import kernel_kind as _kernel_kind
    from simcost.request.train import check_seq as _check_seq, resolve_peft
    from simcost.result import make_estimate
    from simcost.peft import tokens_added

    if dtype not in (*FLOAT_DTYPES, "fp8"):
        raise SimcostError(f"unknown dtype '{dtype}'; valid: {', '.join(FLOAT_DTYPES)}, fp8")
    if mixed_precision not in MIXED:
        raise SimcostError(f"unknown mixed precision '{mixed_precision}'; valid: {', '.join(MIXED)}")
    if devices < 1:
        raise SimcostError(f"--devices must be >= 1, got {devices}")
    if parallel not in (None, "auto", "manual"):
        raise SimcostError(f"unknown --parallel '{parallel}'; valid: auto")
    P.check_ep(spec, ep)
    if optimizer == "mezo":
        raise SimcostError("--optimizer mezo is priced on one device only (no --devices, "
                           "--parallel, --offload or fp8)")
    peft_options, ds = _deepspeed(peft_options, spec, optimizer_in_backward)
    fp8 = dtype == "fp8"
    store = "bf16" if fp8 else dtype
    compute = mixed_precision if mixed_precision != "none" else store
    pspec = resolve_peft(peft, peft_config, **peft_options)
    warns = _check_seq(spec, seq, tokens_added(pspec))
    profile = load_profile(hardware)
    device = profile.device()
    if nodes is not None and nodes < 1:
        raise SimcostError(f"--nodes must be >= 1, got {nodes}")
    if nodes is not None and devices % nodes:
        raise SimcostError(f"--devices {devices} is not divisible by --nodes {nodes}")
    topo = Topology.from_profile(profile, devices, nodes)
    kind = _kernel_kind(device)

    structure = repr((spec, pspec, compute, store, attn, kind, stack, fp8_activation,
                      fp8_params))

    def build(mb, s):
        return _graph(structure, mb, s, lambda: _build_graph(
            spec, mb, s, compute=compute, store=store, attn=attn, pspec=pspec, kind=kind,
            stack=stack, fp8_activation=fp8_activation, fp8_params=fp8_params))

    ctx = P.Context(build, device, profile, topo, global_batch=batch, seq=seq, dtype=store,
                    compute_dtype=compute, fp8=fp8, fp8_attention=fp8_attention,
                    optimizer=optimizer, mixed=mixed_precision,
                    checkpointing=grad_checkpointing, spec=spec, loss_chunks=loss_chunks,
                    optimizer_in_backward=optimizer_in_backward, stack=stack)
    best, searched, candidates = _choose_plan(
        ctx, topo, devices=devices, batch=batch, spec=spec, seq=seq, tp=tp, pp=pp, dp=dp, cp=cp,
        zero=zero, parallel=parallel, micro_batch=micro_batch,
        sequence_parallel=sequence_parallel, tp_overlap=tp_overlap, pp_schedule=pp_schedule,
        virtual_stages=virtual_stages, offload=offload, ds=ds, ep=ep,
        optimizer_in_backward=optimizer_in_backward)
    warns = [*warns, *_no_effect(best.plan, tp_overlap, sequence_parallel, pp_schedule,
                                 virtual_stages, optimizer_in_backward)]
    # whole-job FLOPs and parameter counts from the single-sequence graph
    g1, a1 = build(1, seq)
    n1 = train_numbers(g1, a1, device, batch=1, seq=seq, optimizer=optimizer,
                       mixed=mixed_precision, checkpointing=grad_checkpointing,
                       loss_chunks=loss_chunks, optimizer_in_backward=optimizer_in_backward,
                       stack=stack)
    flops = {k: float(v) * (batch if k != "optimizer" else 1) for k, v in n1.flops.items()}
    par = _parallel_dict(best, topo, devices, fp8=fp8, fp8_attention=fp8_attention,
                         searched=searched, priced=ctx.plans_priced or searched,
                         candidates=candidates)
    return make_estimate(spec, device, pspec, n1, batch=batch, seq=seq, dtype=dtype,
                         mixed_precision=mixed_precision, attn=attn, optimizer=optimizer,
                         checkpointing=grad_checkpointing, flops=flops,
                         memory_bytes=best.memory_bytes, time_s=best.time_s,
                         tokens_per_s=best.tokens_per_s, fits=best.fits, parallel=par,
                         warnings=warns, loss_chunks=loss_chunks,
                         optimizer_in_backward=optimizer_in_backward, stack=stack)


# Analysed graphs by (structure, micro-batch, local sequence). A graph depends on the model,
# the method, the dtypes, the attention, the kernel kind (GPU/CPU), the stack and the fp8
# storage options, never on the hardware's speeds or the plan, so plan searches over many
# profiles and device counts (simcost plan train) build each shape once. Nothing downstream
# writes to a graph after it is built (the dtype changes below happen before it is cached).
_GRAPHS: "OrderedDict[tuple, tuple]" = OrderedDict()
_GRAPHS_MAX = 512


def _graph(structure: str, mb, s, make):
    key = (structure, int(mb), int(s))
    hit = _GRAPHS.get(key)
    if hit is not None:
        _GRAPHS.move_to_end(key)
        return hit
    out = _GRAPHS[key] = make()
    if len(_GRAPHS) > _GRAPHS_MAX:
        _GRAPHS.popitem(last=False)
    return out


def _build_graph(spec, mb, s, *, compute, store, attn, pspec, kind, stack, fp8_activation,
                 fp8_params):
    g, a = pipeline.build_graph(spec, mb, s, dtype=compute, attn=attn, peft=pspec,
                                device_kind=kind, stack=stack, fp8_activation=fp8_activation)
    if store != compute:
        for p, _ in g.params():
            if p.dtype == compute and p.role != "adapter":
                p.dtype = store
    if fp8_params:
        fp8_weights(g)
    return g, a


def fp8_weights(g) -> int:
    """Store the frozen linear weights as fp8, as TransformerEngine's Float8Tensor parameters
    do (NeMo/Megatron ``fp8_params=True``; transformer_engine/pytorch/module/base.py
    ``fp8_model_init`` / ``primary_weights_in_fp8``): one byte per weight, no bf16 copy.
    Only TE linears get them: the embedding, the output layer (not TE modules), the norms and
    the LoRA adapters keep their dtype. Returns the number of weights changed."""
    from simcost.graph import kinds as K
    head = {id(p) for seg in g.segments if seg.first_layer is None for op in seg.ops
            for p in op.params}
    n = 0
    for seg in g.segments:
        if seg.first_layer is None:
            continue
        for op in seg.ops:
            for p in op.params:
                if op.kind == K.LINEAR and len(p.shape) == 2 and p.role != "adapter" \
                        and not p.trainable and id(p) not in head and p.dtype != "fp8":
                    p.dtype = "fp8"
                    n += 1
    return n


def _deepspeed(peft_options, spec, optimizer_in_backward):
    """ZeRO via DeepSpeed: ``deepspeed=DeepSpeedZero(...)`` (or a ds_config
    zero_optimization dict) arrives with the keyword arguments estimate_train passes on;
    returns (the other options, the DeepSpeedZero or None)."""
    peft_options = dict(peft_options)
    ds = peft_options.pop("deepspeed", None)
    if isinstance(ds, dict):
        ds = P.DeepSpeedZero.from_config(ds, spec.hidden)
    if ds is not None and not isinstance(ds, P.DeepSpeedZero):
        raise SimcostError("deepspeed must be a DeepSpeedZero or a zero_optimization dict")
    if ds is not None and optimizer_in_backward:
        raise SimcostError("optimizer in backward is not modelled with DeepSpeed ZeRO (its "
                           "optimizer owns the gradient partitions)")
    return peft_options, ds


def _choose_plan(ctx, topo, *, devices, batch, spec, seq, tp, pp, dp, cp, zero, parallel,
                 micro_batch, sequence_parallel, tp_overlap, pp_schedule, virtual_stages,
                 offload, ds, ep, optimizer_in_backward):
    """(the plan's result, plans searched, the best candidates): searched, or as given."""
    candidates = []
    if parallel == "auto":
        plans = P.enumerate_plans(devices, batch, spec, seq, topo.gpus_per_node,
                                  zeros=(zero,) if zero else (0, 1, 2, 3), tp_overlap=tp_overlap,
                                  fixed=dict(tp=tp, pp=pp, dp=dp, cp=cp, micro_batch=micro_batch,
                                             ep=ep), sp=sequence_parallel, schedule=pp_schedule,
                                  virtual_stages=virtual_stages, offload=offload, deepspeed=ds)
        if optimizer_in_backward:       # no gradient accumulation under it (refused below)
            plans = [p for p in plans if p.micro_batches == 1]
        if not plans:
            raise SimcostError(_no_plan(devices, batch, spec, seq, topo.gpus_per_node))
        best, top = P.search(ctx, plans)
        candidates = [{"plan": r.plan.label(), "step_s": r.time_s["step"],
                       "peak_bytes": r.memory_bytes["peak"], "fits": r.fits} for r in top]
        searched = len(plans)
    else:
        plan = P.make_plan(devices, batch, tp=tp, pp=pp, dp=dp, cp=cp, zero=zero,
                           micro_batch=micro_batch, sp=sequence_parallel, tp_overlap=tp_overlap,
                           schedule=pp_schedule, virtual_stages=virtual_stages, offload=offload,
                           spec=spec, seq=seq, deepspeed=ds, ep=ep)
        if optimizer_in_backward and plan.micro_batches > 1:
            raise SimcostError(f"--optimizer-in-backward steps each parameter as its gradient "
                               f"arrives, so gradients cannot accumulate over the plan's "
                               f"{plan.micro_batches} micro-batches (torchtune refuses it too)")
        if plan.tp > topo.gpus_per_node:
            raise SimcostError(f"tp = {plan.tp} exceeds the {topo.gpus_per_node} devices of a node")
        best = P.evaluate_plan(ctx, plan)
        searched = 1
    return best, searched, candidates


def _parallel_dict(best, topo, devices, *, fp8, fp8_attention, searched, priced,
                   candidates) -> dict:
    t = best.time_s
    return {"plan": best.plan.as_dict(), "plan_label": best.plan.label(), "devices": devices,
            "nodes": topo.nodes, "gpus_per_node": topo.gpus_per_node,
            "topology": _topology_dict(topo),
            "memory_bytes_per_device": {k: float(v) for k, v in best.memory_bytes.items()},
            "communication": best.communication,
            "phases": {k: t[k] for k in ("forward", "backward", "optimizer", "pipeline_bubble",
                                         "communication_exposed", "host_overhead")},
            "fp8": fp8, "fp8_attention": fp8_attention, "plans_searched": searched,
            "plans_priced": priced,
            "candidates": candidates}


def _topology_dict(topo) -> dict:
    if topo.torus_dims:
        return {"ici_torus": {"kind": topo.intra.kind, "dims": topo.torus_dims,
                              "chips_per_axis": topo.torus_axis,
                              "bandwidth_per_axis_bytes_per_s": topo.torus_axis_bandwidth,
                              "latency_s": topo.intra.latency}}
    return {"intra_node": {"kind": topo.intra.kind, "bandwidth_bytes_per_s": topo.intra.bandwidth,
                           "latency_s": topo.intra.latency},
            "inter_node": {"kind": topo.inter.kind, "bandwidth_bytes_per_s": topo.inter.bandwidth,
                           "latency_s": topo.inter.latency}}


def _no_plan(devices, batch, spec, seq, gpus_per_node) -> str:
    return (f"no valid parallel plan for {devices} devices, global batch {batch} and the given "
            f"constraints (tp <= {gpus_per_node} per node dividing {spec.name}'s {spec.heads} "
            f"heads, pp <= {spec.layers} layers, cp dividing half the sequence {seq}, dp "
            f"dividing the batch, tp*pp*cp*dp = devices)")


def _no_effect(plan, tp_overlap, sequence_parallel, pp_schedule, virtual_stages,
               optimizer_in_backward=False) -> list[str]:
    """One line for each plan option the chosen plan leaves without effect."""
    out = []
    if optimizer_in_backward and plan.zero < 2 and plan.dp > 1:
        out.append(f"--optimizer-in-backward frees nothing under DDP (ZeRO-{plan.zero}, dp = "
                   f"{plan.dp}): the reducer keeps gradient-sized buckets")
    if plan.tp == 1:
        if tp_overlap:
            out.append("--tp-overlap has no effect: the plan has tp = 1")
        if sequence_parallel is not None:
            out.append(f"sequence_parallel={sequence_parallel} (--no-sequence-parallel) has no "
                       f"effect: the plan has tp = 1")
    if pp_schedule == "interleaved" and plan.pp == 1:
        out.append("--pp-schedule interleaved has no effect: the plan has pp = 1")
    if virtual_stages != 1 and (pp_schedule != "interleaved" or plan.pp == 1):
        out.append(f"--virtual-stages {virtual_stages} has no effect without an interleaved "
                   f"pipeline (--pp-schedule interleaved, pp > 1)")
    return out
