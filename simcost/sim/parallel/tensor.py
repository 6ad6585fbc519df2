"""Tensor-parallel splitting: how each op of the analysed graph divides over ``tp`` ranks
(Megatron column / row parallel linears, LoRA's A and B, heads, sequence parallelism), its time
on one rank, the exposed TP communication under TransformerEngine-style overlap, and the fp8
GEMM rate."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from simcost.errors import SimcostError
from simcost.graph import kinds as K
from simcost.sim.timing import TimeModel, attention_kind, recomputed

BLOCK_PREFIX = ("model.layers", "transformer.h")
COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc", "w1", "w3",
          "query_key_value", "fc1", "qkv_proj", "gate_up_proj"}
ROW = {"o_proj", "down_proj", "c_proj", "dense", "fc2", "out_proj"}
# how an op divides under TP (the first element of :func:`role`)
COLUMN_BASE, ROW_BASE = "column_base", "row_base"     # a linear split on n / on k
SPLIT = "split"                # its work divides by tp (heads, vocabulary, the MLP activation)
HIDDEN = "hidden"              # over the hidden state: split only with sequence parallelism
REPLICATED = "replicated"      # every rank does all of it
TP_LINEAR_ROLES = (COLUMN_BASE, ROW_BASE)


def role(rec) -> tuple[str, str | None]:
    """(how the op splits under TP, the parent linear's parallel style)."""
    op = rec.op
    in_block = op.module.startswith(BLOCK_PREFIX)
    parent = op.name.split(".")[0]
    style = None
    if parent in COLUMN:
        style = "column"
    if parent in ROW:
        style = "row"
    if "experts" in op.module and parent == "w2":
        style = "row"
    if not in_block:
        if op.kind in (K.LINEAR, *K.FUSED_HEADS):          # lm_head: vocab-parallel (column)
            return COLUMN_BASE, "column"
        if op.kind in (K.EMBEDDING, K.CROSS_ENTROPY):
            return SPLIT, None
        return HIDDEN, None
    if style is not None:
        sub = op.name[len(parent):]
        if op.kind == K.LINEAR and sub == "":
            return f"{style}_base", style
        if "lora_A" in sub:
            return (REPLICATED if style == "column" else ROW_BASE), style
        if "lora_B" in sub:
            return (COLUMN_BASE if style == "column" else REPLICATED), style
        if "cast_input" in sub:
            return (REPLICATED if style == "column" else SPLIT), style
        return (SPLIT if style == "column" else HIDDEN), style
    if op.kind in K.NORMS or "residual" in op.name:
        return HIDDEN, None
    return SPLIT, None


def adapter_split(op) -> bool:
    """Whether an adapter weight is split under TP (lora_B of a column-parallel linear,
    lora_A of a row-parallel one)."""
    parent = op.name.split(".")[0]
    return ("lora_B" in op.name and parent in COLUMN) or ("lora_A" in op.name and parent in ROW)


def split_gemm(gemm, dim, tp):
    b, m, n, k = gemm
    if n == dim:
        return (b, m, n / tp, k)
    if k == dim:
        return (b, m, n, k / tp)
    if m == dim:
        return (b, m / tp, n, k)
    return (b, m, n, k)


@dataclass
class SegTimes:
    fwd: list
    bwd: list
    lin_fwd: list          # time of TP-split linears (what TP comm can overlap with)
    lin_bwd: list
    attn_fwd: list         # attention time (what CP comm can overlap with)
    attn_bwd: list
    wgrad_bwd: list        # weight-gradient GEMM time of TP-split linears (what the backward
                           # reduce-scatter of the input gradient can hide behind)
    stages: dict = field(default_factory=dict, compare=False, repr=False)
    # pp -> the slowest stage's work (:func:`simcost.sim.parallel.stage.stage_work`), kept by
    # :meth:`simcost.sim.parallel.context.Context.stage`


@dataclass(slots=True)
class OpShare:
    """One op's share of the work on one TP rank."""
    role: str
    fraction: float        # of its FLOPs, bytes and special work
    gemms_fwd: list
    gemms_bwd: list


@dataclass(slots=True)
class OpTimes:
    """One op's time on one rank (one execution of its segment): device seconds, and the
    host seconds to issue its kernels (combined per segment, :meth:`TimeModel.combine`)."""
    fwd_s: float
    bwd_s: float
    bwd_matmul_flops: float     # its backward matmul FLOPs (0 without a backward)
    is_attention: bool
    is_tp_linear: bool
    fwd_host_s: float = 0.0
    bwd_host_s: float = 0.0


@dataclass(frozen=True, slots=True)
class OpStatic:
    """What the TP split and the pricing read of one record, whatever the plan (kept per
    graph by :func:`op_statics`)."""
    role: str                   # how it splits under TP (:func:`role`)
    is_attention: bool
    base_linear: bool           # a linear on a base (not adapter) weight
    attention: tuple | None     # :func:`simcost.sim.timing.attention_kind`
    weight_dim: int | None      # the weight dimension a TP-split linear divides


def op_static(r) -> OpStatic:
    rl, _ = role(r)
    op = r.op
    p = op.params[0] if op.params else None
    dim = None
    if rl in TP_LINEAR_ROLES and p is not None and len(p.shape) == 2:
        dim = p.shape[0] if rl == COLUMN_BASE else p.shape[1]
    return OpStatic(rl, op.kind == K.SDPA or "attention" in op.name,
                    bool(op.kind == K.LINEAR and op.params
                         and not any(q.role == "adapter" for q in op.params)),
                    attention_kind(r), dim)


def op_statics(g, a) -> tuple:
    """:func:`op_static` of each of ``a.records``, listed once per graph."""
    hit = g.meta.get("_op_statics")
    if hit is None:
        hit = g.meta["_op_statics"] = tuple(op_static(r) for r in a.records)
    return hit


def op_share(r, st: OpStatic, tp: int, sp: bool, fp8: bool) -> OpShare:
    c = r.cost
    rl = st.role if tp > 1 or fp8 else REPLICATED
    f = 1.0
    gf, gb = c.gemms_fwd, c.gemms_bwd
    if tp > 1:
        if rl in TP_LINEAR_ROLES:
            f = 1.0 / tp
            dim = st.weight_dim
            if dim is not None:
                gf = [split_gemm(x, dim, tp) for x in gf]
                gb = [split_gemm(x, dim, tp) for x in gb]
        elif rl == SPLIT or (rl == HIDDEN and sp):
            f = 1.0 / tp
            gf = [(x[0] / tp, *x[1:]) for x in gf]
            gb = [(x[0] / tp, *x[1:]) for x in gb]
    return OpShare(rl, f, gf, gb)


def op_times(tm: TimeModel, dtype: str, r, st: OpStatic, share: OpShare, *, cp: int,
             fp8: bool, fp8_attention: bool) -> OpTimes:
    """Forward and backward time of one op's share, with the fp8 quantisation passes and
    ring attention's cp-fold attention work."""
    c = r.cost
    f, gf, gb = share.fraction, share.gemms_fwd, share.gemms_bwd
    is_attn = st.is_attention
    mult = cp if (is_attn and cp > 1) else 1.0
    base_linear = st.base_linear
    mdt = "fp8" if ((fp8 and base_linear) or (fp8_attention and is_attn)) else dtype
    sp_f = {k: v * f for k, v in c.special_fwd.items()} if c.special_fwd else c.special_fwd
    sp_b = {k: v * f for k, v in c.special_bwd.items()} if c.special_bwd else c.special_bwd
    tf = tb = 0.0
    mm = 0.0
    att = st.attention
    if c.fwd_kernels:
        tf = tm.device_time(mdt, gf, c.fwd_matmul_flops * f,
                            (c.fwd_flops - c.fwd_matmul_flops) * f, c.fwd_bytes * f, sp_f,
                            attention=att and ("fwd", att[1])) * mult
        if fp8 and base_linear and gf:      # quantise the input (bf16 -> fp8)
            tf = tf + sum(3.0 * x[0] * x[1] * x[3] for x in gf) / tm.bandwidth
    if c.bwd_kernels:
        mm = c.bwd_act_matmul_flops + c.bwd_weight_matmul_flops
        other = c.bwd_act_flops + c.bwd_weight_flops - mm
        tb = tm.device_time(mdt, gb, mm * f, other * f, c.bwd_bytes * f, sp_b,
                            attention=att and ("bwd", att[1])) * mult
        if fp8 and base_linear and gb:      # quantise the output gradient
            tb = tb + sum(3.0 * x[0] * x[1] * x[3] for x in gb[:1]) / tm.bandwidth
    hf = tm.host_time(c.fwd_kernels) * mult if c.fwd_kernels else 0.0
    hb = tm.host_time(c.bwd_kernels) * mult if c.bwd_kernels else 0.0
    return OpTimes(tf, tb, mm, is_attn, share.role in TP_LINEAR_ROLES and r.op.kind == K.LINEAR,
                   hf, hb)


def segment_times(tm: TimeModel, dtype: str, g, a, *, tp: int, sp: bool, cp: int,
                  fp8: bool, fp8_attention: bool, recompute, tm_key=None) -> SegTimes:
    """Per-segment time on one rank (forward, backward with any recomputation), and the parts
    communication can overlap with (device time of the TP linears, attention, weight
    gradients). A segment's phase costs its device time combined with the host time that
    issues its kernels (:func:`simcost.sim.timing.phase_times`).

    With ``tm_key`` (:meth:`TimeModel.key` of ``tm``) the result is kept on the graph, for
    every checkpointing mode from one pricing of the ops: a plan search over device counts, checkpointing modes
    and profiles (``simcost plan train``) prices each (time model, shape, tp, sp, cp) once.
    Graphs are never changed once analysed, and callers only read the lists."""
    if tm_key is None:
        return _assemble(tm, g, a, _all_op_times(tm, dtype, g, a, tp, sp, cp, fp8,
                                                 fp8_attention), recompute)
    cache = g.meta.setdefault("_segment_times", {})
    key = (tm_key, dtype, tp, sp, cp, fp8, fp8_attention)
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = (_all_op_times(tm, dtype, g, a, tp, sp, cp, fp8, fp8_attention), {})
    ops, modes = hit
    out = modes.get(recompute)
    if out is None:
        out = modes[recompute] = _assemble(tm, g, a, ops, recompute)
    return out


def _all_op_times(tm, dtype, g, a, tp, sp, cp, fp8, fp8_attention) -> list:
    return [op_times(tm, dtype, r, st, op_share(r, st, tp, sp, fp8), cp=cp, fp8=fp8,
                     fp8_attention=fp8_attention) for r, st in zip(a.records, op_statics(g, a))]


def _assemble(tm: TimeModel, g, a, ops: list, recompute) -> SegTimes:
    """Sum the records' op times per segment (``ops[i]`` is ``a.records[i]``'s)."""
    nseg = len(g.segments)
    out = SegTimes(*[[0.0] * nseg for _ in range(7)])
    host_f, host_b = [0.0] * nseg, [0.0] * nseg
    for r, t in zip(a.records, ops):
        c = r.cost
        si = r.segment
        out.fwd[si] += t.fwd_s
        out.bwd[si] += t.bwd_s
        host_f[si] += t.fwd_host_s
        host_b[si] += t.bwd_host_s
        if c.fwd_kernels and recomputed(r, recompute):
            out.bwd[si] += t.fwd_s
            host_b[si] += t.fwd_host_s
        if t.is_tp_linear:
            out.lin_fwd[si] += t.fwd_s
            out.lin_bwd[si] += t.bwd_s
            if t.bwd_matmul_flops > 0 and c.bwd_kernels:
                out.wgrad_bwd[si] += t.bwd_s * c.bwd_weight_matmul_flops / t.bwd_matmul_flops
        if t.is_attention:
            out.attn_fwd[si] += t.fwd_s
            out.attn_bwd[si] += t.bwd_s
    for si in range(nseg):
        out.fwd[si] = float(tm.combine(out.fwd[si], host_f[si]))
        out.bwd[si] = float(tm.combine(out.bwd[si], host_b[si]))
    return out


# TransformerEngine userbuffers TP overlap (transformer_engine/pytorch/module/base.py,
# initialize_ub): the reduce-scatters after the row-parallel linears (proj_fprop, fc2_fprop)
# use the "pipeline" method, the GEMM split into num_splits = 4 chunks, each chunk's
# reduce-scatter overlapping the next chunk's GEMM, so the last chunk's share is exposed. The
# all-gathers before column-parallel linears (qkv_fprop, fc1_fprop) and in the backward
# (proj_dgrad, fc2_dgrad) are ring exchanges overlapping the GEMM's own chunks. The backward
# reduce-scatter of the column-parallel linears' input gradient (qkv_dgrad / fc1_dgrad, method
# "bulk") overlaps the *weight-gradient* GEMM, independent work; a frozen base weight (LoRA)
# has none, so that reduce-scatter hides only behind the adapters' small wgrad GEMMs.
UB_PIPELINE_SPLITS = 4


def tp_overlap_exposed(tp_f, tp_b, lin_f, lin_b, wgrad_b, sp: bool):
    """Exposed TP communication (forward, backward) with overlap on.

    Per block the forward moves 2 all-gathers + 2 reduce-scatters (sequence parallel) or 2
    all-reduces, the backward the same; half the volume is all-gather, half reduce-scatter.
    Without sequence parallelism there is no userbuffers overlap: the forward all-reduces sit
    on the critical path and only the backward input-gradient all-reduce of the
    column-parallel linears overlaps their weight-gradient GEMMs (Megatron-LM's async
    tensor-parallel all-reduce)."""
    if not sp:
        return tp_f, tp_b / 2 + max(0.0, tp_b / 2 - wgrad_b)
    rs_f = tp_f / 2                  # the other half of the forward volume is all-gather
    ag_b = rs_b = tp_b / 2
    exp_f = max(0.0, tp_f - lin_f) + rs_f / UB_PIPELINE_SPLITS
    exp_b = max(0.0, ag_b - (lin_b - wgrad_b)) + max(0.0, rs_b - wgrad_b)
    return min(exp_f, tp_f), min(exp_b, tp_b)


def fp8_time_model(tm: TimeModel, device) -> TimeModel:
    peak = device.peak_flops_per_s.get("fp8")
    if peak is None:
        raise SimcostError(f"{device.name} has no fp8 peak in its profile: --dtype fp8 needs one")
    if "fp8" in tm.mm_peak:           # the profile's measured fp8 efficiency (or its bf16 one)
        return tm
    mm = dict(tm.mm_peak)
    eff = device.params.matmul_efficiency
    mm["fp8"] = peak * (1.0 if eff is None else eff)
    return dataclasses.replace(tm, mm_peak=mm)
