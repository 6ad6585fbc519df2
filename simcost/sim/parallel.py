"""Distributed PEFT training: parallel plans, per-device work, collectives, memory, auto search.

A :class:`Plan` (dp x tp x pp x cp ranks, a ZeRO stage, micro-batches) maps the single-device
analysed graph onto one device's share of the step:

- **Tensor parallelism** (Megatron-LM, Shoeybi et al. 2019): column-parallel linears (q, k, v,
  gate, up) split their output features, row-parallel ones (o, down) their input features, so
  each GEMM's n or k shrinks by ``tp`` and is priced by :meth:`TimeModel.gemm_time` at the split
  shape. Attention heads, RoPE and the MLP activation split with them. LoRA follows Megatron /
  NeMo: on a column-parallel layer ``lora_A`` is replicated and ``lora_B`` column-split; on a
  row-parallel layer ``lora_A`` is row-split and ``lora_B`` replicated. Per block: 2 all-reduces
  of the hidden state forward and 2 backward (with sequence parallelism, an all-gather and a
  reduce-scatter each, the same volume, and norms / residuals split along the sequence).
  Embedding and LM head are vocabulary-parallel.
- **Pipeline parallelism**: the blocks split into ``pp`` stages (the slowest holds
  ceil(L/pp) blocks plus the embedding or the head). 1F1B runs m micro-batches in
  (m + p - 1) slots, bubble (p-1)/(m+p-1) (Narayanan et al. 2021); interleaved with v chunks per
  device, (m + (p-1)/v) slots. Activations cross stage boundaries point-to-point.
- **Context parallelism** (ring attention): each rank keeps S/cp of the sequence; attention
  over its queries sees all keys, so attention costs cp times the local-length attention; K and V
  circulate around the ring (cp-1 hops forward, twice that backward), overlapped with attention.
- **Data parallelism / ZeRO**: DDP all-reduces the *trainable* gradients only (for LoRA,
  megabytes), bucketed (25 MiB) and overlapped with the last micro-batch's backward. ZeRO-1
  shards the optimizer state (and fp32 master weights), ZeRO-2 also the gradients, ZeRO-3/FSDP
  also the parameters, *all* of them, frozen ones included: each micro-batch all-gathers every
  weight of the stage in forward and again in backward (prefetched, overlapped with compute).
- **Expert parallelism** (MoE, ``ep``): the experts of each MoE layer are sharded over ``ep``
  ranks inside the data-parallel group (GShard / DeepSpeed-MoE); each rank holds E/ep experts
  (weights, gradients, optimizer states / ep) and every MoE layer runs an all-to-all dispatch
  and combine of tokens·top_k·hidden activations forward and again backward, on the critical
  path. Expert gradients are all-reduced over the dp/ep replicas of each shard.
- **Gradient accumulation**: global batch = dp x micro-batch size x micro-batches.

Memory per device scales the single-device components: weights by the device's share (TP
split, PP stage, ZeRO-3 shard + two unsharded layers in flight), gradients / optimizer / master
weights by the trainable share (and 1/dp from ZeRO-2 / ZeRO-1), activations by the stage's
blocks x micro-batches in flight (min(m, p) on the first stage under 1F1B) and by TP:
with sequence parallelism 1/tp, without it (10 + 24/tp)/34 of the per-layer activations
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
Table 2: the 10·sbh bytes of norm inputs, residuals and dropout masks stay replicated).

DeepSpeed ZeRO (``Plan.deepspeed``, a :class:`DeepSpeedZero` holding the ``zero_optimization``
buffer sizes of the ds_config the run used) replaces the generic ZeRO memory with what
DeepSpeed's optimizers allocate (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py):

- the engine casts the module to bf16/fp16 (``bf16.enabled``), so trainable parameters are stored
  16-bit and an fp32 master partition (4 B x trainable / dp) plus fp32 Adam moments
  (8 B x trainable / dp) live in the optimizer; the update is DeepSpeed's fused Adam (no
  parameter-sized temporaries);
- gradients: the 16-bit reduced partition (``contiguous_gradients``: 2 B x trainable / dp,
  ZeRO-1 keeps the full 16-bit gradients) and, at the step, its fp32 copy (4 B x trainable / dp);
- ZeRO-1/2: ``backward()`` allocates the ``reduce_bucket_size``-element 16-bit IPG bucket, twice
  with ``overlap_comm`` (double buffering), whatever the trainable count (with LoRA the buckets
  can dwarf the gradients they carry); they are live through the backward, on top of the
  activations;
- ZeRO-3: the IPG bucket (``reduce_bucket_size``) and the flat 16-bit gradient partition are
  allocated once at initialisation and stay resident.

FP8 (``dtype='fp8'``, TransformerEngine style): weights and activations stay bf16, the base
linears' GEMMs run at the fp8 peak times the measured fp8 matmul efficiency, and each fp8 GEMM
pays a quantisation pass over its inputs (read bf16, write fp8) forward and backward.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from simcost.dtypes import BYTES
from simcost.errors import SimcostError
from simcost.sim import collectives as C
from simcost.sim.memory import (backward_step_terms, ckpt_mode, in_backward_peak,
                                logits_fp32_bytes, loss_peak, prologue_saved,
                                selective_activations, training_memory)
from simcost.sim.timing import TimeModel, attention_kind, optimizer_time, recomputed

BLOCK_PREFIX = ("model.layers", "transformer.h")
COLUMN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc", "w1", "w3",
          "query_key_value", "fc1", "qkv_proj", "gate_up_proj"}
ROW = {"o_proj", "down_proj", "c_proj", "dense", "fc2", "out_proj"}
DDP_BUCKET_BYTES = 25 * 2 ** 20          # torch DDP bucket_cap_mb default
# Korthikanti et al. 2022 Table 2: per-layer activations sbh(34 + 5as/h); with TP
# sbh(10 + 24/t + 5as/(ht)), with TP + SP sbh(34/t + 5as/(ht)). Flash attention drops the
# 5as/h score term, leaving 10 of 34 replicated without SP.
TP_REPLICATED_ACT_FRACTION = 10 / 34



@dataclass(frozen=True)
class DeepSpeedZero:
    """The DeepSpeed ``zero_optimization`` buffer sizes (elements) a ZeRO plan runs with.

    Defaults are DeepSpeed's own (deepspeed/runtime/zero/config.py: ``reduce_bucket_size`` and
    ``allgather_bucket_size`` 5e8, ``overlap_comm`` false for ZeRO-1/2 and true for ZeRO-3,
    ``contiguous_gradients`` true, ``stage3_prefetch_bucket_size`` 5e7,
    ``stage3_max_live_parameters`` 1e9, ``stage3_param_persistence_threshold`` 1e5).
    ``allgather_bucket_size`` is recorded but allocates nothing on torch >= 1.13 (the updated
    partitions are all-gathered in place with ``all_gather_into_tensor``); the stage-3 prefetch
    and live-parameter limits bound the gathered weights, which the plan already prices as two
    unsharded layers in flight."""
    reduce_bucket_size: float = 5e8
    allgather_bucket_size: float = 5e8
    overlap_comm: bool | None = None          # None: DeepSpeed's default (True only for ZeRO-3)
    contiguous_gradients: bool = True
    stage3_prefetch_bucket_size: float = 5e7
    stage3_max_live_parameters: float = 1e9
    stage3_param_persistence_threshold: float = 1e5
    source: str = "DeepSpeed defaults"

    def overlap(self, zero: int) -> bool:
        return (zero == 3) if self.overlap_comm is None else bool(self.overlap_comm)

    def buffer_bytes(self, zero: int, elem: int = 2) -> tuple[float, float]:
        """(bytes live through the backward only, bytes resident) of the gradient buckets."""
        if zero == 3:
            return 0.0, float(self.reduce_bucket_size) * elem
        if not self.contiguous_gradients:
            return 0.0, 0.0
        return (2 if self.overlap(zero) else 1) * float(self.reduce_bucket_size) * elem, 0.0

    @classmethod
    def from_config(cls, zero_cfg: dict, hidden: int | None = None, source: str = "") -> "DeepSpeedZero":
        """From a ds_config ``zero_optimization`` dict; ``"auto"`` filled as HF transformers'
        HfTrainerDeepSpeedConfig does (hidden^2, 0.9 hidden^2, 10 hidden)."""
        auto = {"reduce_bucket_size": (hidden or 0) ** 2,
                "stage3_prefetch_bucket_size": 0.9 * (hidden or 0) ** 2,
                "stage3_param_persistence_threshold": 10 * (hidden or 0)}
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in zero_cfg and f.name != "source":
                v = zero_cfg[f.name]
                if v == "auto":
                    if f.name not in auto or not hidden:
                        raise SimcostError(f"ds_config '{f.name}': 'auto' needs the hidden size")
                    v = auto[f.name]
                kw[f.name] = v
        return cls(**kw, source=source or "ds_config")


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = 0
    micro_batch: int = 1          # samples per micro-batch (per dp rank)
    micro_batches: int = 1        # gradient-accumulation steps (= pipeline micro-batches)
    sp: bool = False              # Megatron sequence parallelism (needs tp > 1)
    tp_overlap: bool = False      # TP communication overlapped with the linears' GEMMs
    schedule: str = "1f1b"        # 1f1b | interleaved
    virtual_stages: int = 1       # interleaved: model chunks per device
    offload: str = "none"         # none | optimizer | params (ZeRO-Offload / ZeRO-Infinity)
    deepspeed: DeepSpeedZero | None = None   # ZeRO via DeepSpeed: its buffers (see module doc)
    ep: int = 1                   # expert parallelism (MoE): experts sharded over ep dp ranks

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["devices"] = self.devices
        d["global_batch"] = self.dp * self.micro_batch * self.micro_batches
        return d

    def label(self) -> str:
        s = f"dp{self.dp} tp{self.tp}{'+sp' if self.sp else ''} pp{self.pp} cp{self.cp} " \
            f"zero{self.zero} mb{self.micro_batch}x{self.micro_batches}"
        if self.schedule == "interleaved":
            s += f" v{self.virtual_stages}"
        if self.offload != "none":
            s += f" offload-{self.offload}"
        if self.deepspeed is not None and self.zero:
            s += " deepspeed"
        if self.ep > 1:
            s += f" ep{self.ep}"
        return s


# ---------------------------------------------------------------------------------------------
# per-op work on one device


def _role(rec, g) -> tuple[str, str | None]:
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
        if op.kind == "linear":          # lm_head: vocab-parallel (column)
            return "column_base", "column"
        if op.kind in ("embedding", "cross_entropy"):
            return "split", None
        return "hidden", None
    if style is not None:
        sub = op.name[len(parent):]
        if op.kind == "linear" and sub == "":
            return f"{style}_base", style
        if "lora_A" in sub:
            return ("replicated" if style == "column" else "row_base"), style
        if "lora_B" in sub:
            return ("column_base" if style == "column" else "replicated"), style
        if "cast_input" in sub:
            return ("replicated" if style == "column" else "split"), style
        return ("split" if style == "column" else "hidden"), style
    if op.kind in ("rms_norm", "layer_norm", "layernorm") or "residual" in op.name:
        return "hidden", None
    return "split", None


def _split_gemm(gemm, dim, tp):
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


def segment_times(tm: TimeModel, dtype: str, g, a, *, tp: int, sp: bool, cp: int,
                  fp8: bool, fp8_attention: bool, recompute) -> SegTimes:
    nseg = len(g.segments)
    out = SegTimes(*[[0.0] * nseg for _ in range(7)])
    for r in a.records:
        c = r.cost
        si = r.segment
        role, _ = _role(r, g) if tp > 1 or fp8 else ("replicated", None)
        f = 1.0
        gf, gb = c.gemms_fwd, c.gemms_bwd
        if tp > 1:
            if role in ("column_base", "row_base"):
                f = 1.0 / tp
                p = r.op.params[0] if r.op.params else None
                if p is not None and len(p.shape) == 2:
                    dim = p.shape[0] if role == "column_base" else p.shape[1]
                    gf = [_split_gemm(x, dim, tp) for x in gf]
                    gb = [_split_gemm(x, dim, tp) for x in gb]
            elif role == "split" or (role == "hidden" and sp):
                f = 1.0 / tp
                gf = [(x[0] / tp, *x[1:]) for x in gf]
                gb = [(x[0] / tp, *x[1:]) for x in gb]
        is_attn = r.op.kind in ("sdpa", "attention") or "attention" in r.op.name
        mult = cp if (is_attn and cp > 1) else 1.0
        base_linear = r.op.kind == "linear" and r.op.params and \
            not any(p.role == "adapter" for p in r.op.params)
        mdt = "fp8" if ((fp8 and base_linear) or (fp8_attention and is_attn)) else dtype
        sp_f = {k: v * f for k, v in c.special_fwd.items()} if c.special_fwd else c.special_fwd
        sp_b = {k: v * f for k, v in c.special_bwd.items()} if c.special_bwd else c.special_bwd
        tf = tb = 0.0
        mm = 0.0
        att = attention_kind(r)
        if c.fwd_kernels:
            tf = tm.phase_time(mdt, gf, c.fwd_matmul_flops * f, (c.fwd_flops - c.fwd_matmul_flops) * f,
                               c.fwd_bytes * f, c.fwd_kernels, sp_f,
                               attention=att and ("fwd", att[1])) * mult
            if fp8 and base_linear and gf:      # quantise the input (bf16 -> fp8)
                tf = tf + sum(3.0 * x[0] * x[1] * x[3] for x in gf) / tm.bandwidth
        if c.bwd_kernels:
            mm = c.bwd_act_matmul_flops + c.bwd_weight_matmul_flops
            other = c.bwd_act_flops + c.bwd_weight_flops - mm
            tb = tm.phase_time(mdt, gb, mm * f, other * f, c.bwd_bytes * f, c.bwd_kernels,
                               sp_b, attention=att and ("bwd", att[1])) * mult
            if fp8 and base_linear and gb:      # quantise the output gradient
                tb = tb + sum(3.0 * x[0] * x[1] * x[3] for x in gb[:1]) / tm.bandwidth
        out.fwd[si] += tf
        out.bwd[si] += tb
        if c.fwd_kernels and recomputed(r, recompute):
            out.bwd[si] += tf
        if role in ("column_base", "row_base") and r.op.kind == "linear":
            out.lin_fwd[si] += tf
            out.lin_bwd[si] += tb
            if mm > 0 and c.bwd_kernels:
                out.wgrad_bwd[si] += tb * c.bwd_weight_matmul_flops / mm
        if is_attn:
            out.attn_fwd[si] += tf
            out.attn_bwd[si] += tb
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


def comm_sm_fraction(device) -> float:
    """Fraction of the compute units a concurrent collective occupies: the profile's
    ``time_model.comm_overlap_sms`` (TransformerEngine userbuffers' default num_sm; NCCL
    likewise runs one CTA per channel on its own SM) over ``compute_units``. 0 when the
    profile gives no such number (overlap then costs the compute nothing)."""
    tm = device.time_model or {}
    sms, units = tm.get("comm_overlap_sms"), tm.get("compute_units")
    if not sms or not units:
        return 0.0
    return min(1.0, sms / units)


def overlap_slowdown(hidden_s: float, sm_fraction: float) -> float:
    """Extra compute time from running ``hidden_s`` of communication concurrently: for that
    long the compute has (1 - f) of the SMs, so the same work needs hidden_s·f more time
    (work conservation; the compute is longer than the hidden communication by definition)."""
    return max(0.0, hidden_s) * sm_fraction


def fp8_time_model(tm: TimeModel, device, profile_name: str) -> TimeModel:
    peak = device.peak_flops_per_s.get("fp8")
    if peak is None:
        raise SimcostError(f"{device.name} has no fp8 peak in its profile: --dtype fp8 needs one")
    if "fp8" in tm.mm_peak:           # the profile's measured fp8 efficiency (or its bf16 one)
        return tm
    mm = dict(tm.mm_peak)
    mm["fp8"] = peak * (device.time_model or {}).get("matmul_efficiency", 1.0)
    return dataclasses.replace(tm, mm_peak=mm)


# ---------------------------------------------------------------------------------------------
# one plan


@dataclass
class PlanResult:
    plan: Plan
    time_s: dict
    memory_bytes: dict
    communication: dict
    fits: bool
    tokens_per_s: float
    notes: list = field(default_factory=list)


class Context:
    """Everything a plan evaluation needs that does not depend on the plan (graphs cached per
    micro-batch shape, segment times cached per (shape, tp, sp, cp))."""

    def __init__(self, build, device, profile, topo, *, global_batch, seq, dtype, compute_dtype,
                 fp8, fp8_attention, optimizer, mixed, checkpointing, spec, loss_chunks=1,
                 optimizer_in_backward=False):
        self.build = build            # (micro_batch, seq_local) -> (g, a)
        self.loss_chunks = loss_chunks                      # simcost.sim.memory's docstring
        self.optimizer_in_backward = optimizer_in_backward
        self.device = device
        self.profile = profile
        self.topo = topo
        self.global_batch = global_batch
        self.seq = seq
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        self.fp8 = fp8
        self.fp8_attention = fp8_attention
        self.optimizer = optimizer
        self.mixed = mixed
        self.checkpointing = {"none": False, "full": "full", "selective": "selective"}[
            ckpt_mode(checkpointing)]
        self.spec = spec
        tm = TimeModel.from_device(device)
        self.tm = fp8_time_model(tm, device, profile.name) if (fp8 or fp8_attention) else tm
        self._graphs = {}
        self._times = {}
        self._mem = {}

    def graph(self, mb, cp):
        key = (mb, cp)
        if key not in self._graphs:
            self._graphs[key] = self.build(mb, self.seq // cp)
        return self._graphs[key]

    def times(self, mb, cp, tp, sp):
        key = (mb, cp, tp, sp)
        if key not in self._times:
            g, a = self.graph(mb, cp)
            self._times[key] = segment_times(self.tm, self.compute_dtype, g, a, tp=tp, sp=sp,
                                             cp=cp, fp8=self.fp8,
                                             fp8_attention=self.fp8_attention,
                                             recompute=self.checkpointing)
        return self._times[key]

    def base_memory(self, mb, cp):
        key = (mb, cp)
        if key not in self._mem:
            g, a = self.graph(mb, cp)
            mem = training_memory(g, a, optimizer=self.optimizer, mixed=self.mixed,
                                  checkpointing=self.checkpointing,
                                  runtime_overhead=self.device.runtime_overhead_bytes,
                                  foreach=self.device.kind != "cpu")
            self._mem[key] = (mem, _param_split(g), _act_split(g, a, self.checkpointing))
        return self._mem[key]


def _param_split(g) -> dict:
    """Bytes / numel of parameters by where they live: per block vs outside, TP-split or not."""
    d = dict(block_all=0.0, block_split=0.0, other_all=0.0, other_split=0.0,
             block_tr=0.0, block_tr_split=0.0, other_tr=0.0, other_tr_split=0.0,
             embed=0.0, head=0.0, layers=0, layer_bytes_max=0.0,
             block_expert=0.0, block_expert_tr=0.0, layer_expert_max=0.0, moe_layers=0, top_k=0)
    seen = set()
    layers = 0
    for seg in g.segments:
        blk = seg.first_layer is not None
        if blk:
            layers += seg.count
        seg_bytes = seg_expert = 0.0
        for op in seg.ops:
            expert = op.kind == "moe_experts"
            if expert and blk:
                d["moe_layers"] += seg.count
                d["top_k"] = max(d["top_k"], int(op.attrs.get("top_k", 1)))
            for p in (*op.params, *op.attrs.get("held_params", ())):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                split = len(p.shape) == 2 and (op.kind in ("linear", "embedding")) and \
                    p.role != "adapter" or (p.role == "adapter" and _adapter_split(op))
                nb = p.nbytes * seg.count
                n = p.numel * seg.count
                where = "block" if blk else "other"
                d[f"{where}_all"] += nb
                if split:
                    d[f"{where}_split"] += nb
                if p.trainable:
                    d[f"{where}_tr"] += n
                    if split:
                        d[f"{where}_tr_split"] += n
                if blk and expert and any(p is q for q in op.params):
                    d["block_expert"] += nb
                    seg_expert += p.nbytes
                    if p.trainable:
                        d["block_expert_tr"] += n
                if blk:
                    seg_bytes += p.nbytes
                elif seg is g.segments[0]:
                    d["embed"] += nb
                else:
                    d["head"] += nb
        if blk:
            d["layer_bytes_max"] = max(d["layer_bytes_max"], seg_bytes)
            d["layer_expert_max"] = max(d["layer_expert_max"], seg_expert)
    d["layers"] = layers
    return d


def _adapter_split(op) -> bool:
    parent = op.name.split(".")[0]
    return ("lora_B" in op.name and parent in COLUMN) or ("lora_A" in op.name and parent in ROW)


def _act_split(g, a, checkpointing) -> dict:
    """Activation bytes of one micro-batch: per block layer (summed) vs outside blocks."""
    block = 0.0
    other = a.saved_global
    local = a.saved_local
    if checkpointing == "selective":
        local = selective_activations(g, a)[1]
        checkpointing = False
    for seg, b in zip(g.segments, local):
        if seg.first_layer is None:
            other = other + b * seg.count
        elif checkpointing:
            block = block + g.tensors[seg.input_tid].nbytes * seg.count
        else:
            block = block + b * seg.count
    worst = 0.0
    if checkpointing:
        for seg, b in zip(g.segments, a.saved_local):
            if seg.first_layer is not None:
                worst = max(worst, float(b))
    return {"block": float(block), "other": float(other), "recompute_block": worst}


def evaluate_plan(ctx: Context, plan: Plan) -> PlanResult:
    tp, pp, cp, dp, m, mb = plan.tp, plan.pp, plan.cp, plan.dp, plan.micro_batches, plan.micro_batch
    sp = plan.sp and tp > 1
    topo = ctx.topo
    g, a = ctx.graph(mb, cp)
    st = ctx.times(mb, cp, tp, sp)
    seq_local = ctx.seq // cp
    hidden = ctx.spec.hidden
    elem = BYTES[ctx.compute_dtype]
    blocks = [i for i, s in enumerate(g.segments) if s.first_layer is not None]
    L = sum(g.segments[i].count for i in blocks)
    counts = [s.count for s in g.segments]

    def tot(lst, idx):
        return sum(lst[i] * counts[i] for i in idx)
    non = [i for i in range(len(g.segments)) if i not in blocks]
    first = [i for i in non if i < (blocks[0] if blocks else 0)]
    last = [i for i in non if i not in first]
    per_layer_f = tot(st.fwd, blocks) / max(L, 1)
    per_layer_b = tot(st.bwd, blocks) / max(L, 1)
    has_bwd = [st.bwd[i] > 0 for i in range(len(g.segments))]
    layers_stage = math.ceil(L / pp)
    # the slowest stage: its blocks plus the embedding (pp == 1: both ends)
    if pp == 1:
        ends_f, ends_b = tot(st.fwd, non), tot(st.bwd, non)
    else:
        ends_f = max(tot(st.fwd, first), tot(st.fwd, last))
        ends_b = max(tot(st.bwd, first), tot(st.bwd, last))
    comp_f = per_layer_f * layers_stage + ends_f
    comp_b = per_layer_b * layers_stage + ends_b
    # the block layers that run a backward at all (LoRA: all but possibly the first)
    bwd_layers = sum(g.segments[i].count for i in blocks if has_bwd[i])
    bwd_frac = bwd_layers / max(L, 1)

    # tensor-parallel communication, per micro-batch on the stage
    comm = {}
    tp_link = topo.link(tp, 1)
    act_bytes = mb * seq_local * hidden * elem
    t_ar = C.all_reduce(act_bytes, tp, tp_link)
    tp_f = 2 * t_ar * layers_stage + t_ar   # + the vocab-parallel embedding's all-reduce
    tp_b = 2 * t_ar * layers_stage * bwd_frac
    lin_f = tot(st.lin_fwd, blocks) / max(L, 1) * layers_stage
    lin_b = tot(st.lin_bwd, blocks) / max(L, 1) * layers_stage
    wg_b = tot(st.wgrad_bwd, blocks) / max(L, 1) * layers_stage
    if plan.tp_overlap:
        tp_exp_f, tp_exp_b = tp_overlap_exposed(tp_f, tp_b, lin_f, lin_b, wg_b, sp)
    else:
        tp_exp_f, tp_exp_b = tp_f, tp_b
    if tp == 1:
        tp_f = tp_b = tp_exp_f = tp_exp_b = 0.0
    comm["tensor_parallel"] = (tp_f + tp_b) * m, (tp_exp_f + tp_exp_b) * m

    # context-parallel ring exchange of K and V, overlapped with attention
    cp_exp_f = cp_exp_b = cp_tot = cp_tot_f = cp_tot_b = 0.0
    if cp > 1:
        kv = 2 * mb * seq_local * ctx.spec.kv_dim * elem / tp
        cp_link = topo.link(cp, tp)
        hop = C.p2p(kv, cp_link) * (cp - 1)
        attn_f = tot(st.attn_fwd, blocks) / max(L, 1)
        attn_b = tot(st.attn_bwd, blocks) / max(L, 1)
        cp_exp_f = max(0.0, hop - attn_f) * layers_stage
        cp_exp_b = max(0.0, 2 * hop - attn_b) * layers_stage * bwd_frac
        cp_tot_f, cp_tot_b = hop * layers_stage, 2 * hop * bwd_frac * layers_stage
        cp_tot = (cp_tot_f + cp_tot_b) * m
    comm["context_parallel"] = cp_tot, (cp_exp_f + cp_exp_b) * m

    # ZeRO-3 / FSDP: gather every parameter of the stage forward and backward
    ps = ctx.base_memory(mb, cp)[1]
    ep = plan.ep
    stage_param_bytes = _stage_bytes(ps, tp, pp, layers_stage, L, ep)
    z3_f = z3_b = z3_tot = z3_tot_f = z3_tot_b = 0.0
    dp_stride = tp * cp
    tr_numel_stage = _stage_trainable(ps, tp, pp, layers_stage, L, ep)
    tr_elem = _trainable_elem(g)
    grad_elem = 4 if ctx.mixed != "none" else tr_elem
    grad_bytes = tr_numel_stage * grad_elem
    # expert shards (ep > 1) synchronise over their dp/ep replicas only, spaced ep apart
    exp_param_bytes = ps["block_expert"] / ep / max(L, 1) * layers_stage
    exp_grad_bytes = ps["block_expert_tr"] / ep / max(L, 1) * layers_stage * grad_elem
    exp_tr_numel = ps["block_expert_tr"] / ep / max(L, 1) * layers_stage

    def dp_coll(fn, total, expert):
        if ep <= 1 or expert <= 0:
            return fn(total, dp, dp_stride)
        return fn(total - expert, dp, dp_stride) + fn(expert, dp // ep, dp_stride * ep)

    if plan.zero == 3 and dp > 1:
        ag = dp_coll(topo.all_gather, stage_param_bytes, exp_param_bytes)
        first_layer = ag / max(layers_stage, 1)
        rs = dp_coll(topo.reduce_scatter, grad_bytes, exp_grad_bytes)
        z3_f = max(0.0, ag - comp_f) + first_layer
        z3_b = max(0.0, ag + rs - comp_b) + first_layer
        z3_tot_f, z3_tot_b = ag, ag + rs
        z3_tot = (2 * ag + rs) * m
    comm["zero3_gather"] = z3_tot, (z3_f + z3_b) * m

    # expert parallelism: all-to-all dispatch + combine per MoE layer, forward and backward,
    # on the critical path (the experts wait for their tokens, the next layer for the outputs)
    ep_f = ep_b = a2a_bytes = 0.0
    if ep > 1 and ps["moe_layers"]:
        moe_stage = ps["moe_layers"] / max(L, 1) * layers_stage
        tokens = mb * seq_local / (tp if sp else 1)
        a2a_bytes = tokens * ps["top_k"] * hidden * elem
        t_a2a = topo.all_to_all(a2a_bytes, ep, dp_stride)
        ep_f = 2 * t_a2a * moe_stage
        ep_b = 2 * t_a2a * moe_stage * bwd_frac
    comm["expert_parallel"] = (ep_f + ep_b) * m, (ep_f + ep_b) * m

    # collectives that run concurrently with compute take SMs from it (see overlap_slowdown)
    sm_frac = comm_sm_fraction(ctx.device)
    slow_f = overlap_slowdown((tp_f - tp_exp_f) + (cp_tot_f - cp_exp_f)
                              + (z3_tot_f - z3_f if plan.zero == 3 and dp > 1 else 0.0), sm_frac)
    slow_b = overlap_slowdown((tp_b - tp_exp_b) + (cp_tot_b - cp_exp_b)
                              + (z3_tot_b - z3_b if plan.zero == 3 and dp > 1 else 0.0), sm_frac)
    slot_f = comp_f + tp_exp_f + cp_exp_f + z3_f + slow_f + ep_f
    slot_b = comp_b + tp_exp_b + cp_exp_b + z3_b + slow_b + ep_b

    # pipeline schedule
    v = plan.virtual_stages if plan.schedule == "interleaved" else 1
    if pp > 1:
        p2p_bytes = act_bytes / (tp if sp else 1)
        pp_link = topo.link(pp, tp * cp * dp)
        t_p2p = C.p2p(p2p_bytes, pp_link)
        slots = m + (pp - 1) / v
        pipe = slots * (slot_f + slot_b)
        bubble = (pp - 1) / v * (slot_f + slot_b)
        pp_exposed = 2 * (pp - 1) * t_p2p * v
        comm["pipeline_p2p"] = 2 * m * t_p2p * v, pp_exposed
    else:
        pipe = m * (slot_f + slot_b)
        bubble = 0.0
        pp_exposed = 0.0
        comm["pipeline_p2p"] = 0.0, 0.0

    # data-parallel gradient reduction (trainable gradients only)
    dp_exposed = dp_tot = 0.0
    if dp > 1 and plan.zero < 3:
        t_red = dp_coll(topo.all_reduce, grad_bytes, exp_grad_bytes)
        last = topo.all_reduce(min(grad_bytes, DDP_BUCKET_BYTES), dp, dp_stride)
        dp_exposed = max(t_red - slot_b, last) if grad_bytes > 0 else 0.0
        dp_tot = t_red
        if plan.zero in (1, 2):      # updated trainable params all-gathered after the step
            t_ag = dp_coll(topo.all_gather, tr_numel_stage * tr_elem, exp_tr_numel * tr_elem)
            dp_exposed += t_ag
            dp_tot += t_ag
    comm["data_parallel"] = dp_tot, dp_exposed

    # optimizer on this device's share
    n_opt = tr_numel_stage / (dp if plan.zero >= 1 else 1)
    if plan.zero >= 1 and ep > 1:      # expert optimizer states shard over dp/ep replicas
        n_opt += exp_tr_numel / (dp // ep) - exp_tr_numel / dp
    n_tensors = max(1, int(sum(c for p, c in g.params() if p.trainable) / pp))
    t_opt = optimizer_time(ctx.tm, ctx.optimizer, n_opt, n_tensors, ctx.mixed,
                           foreach=ctx.device.kind != "cpu", elem_bytes=tr_elem)
    off_exposed = 0.0
    if plan.offload != "none":
        # ZeRO-Offload: gradients down, updated params up over the host link; CPU Adam at
        # host-memory speed (~20 B/param/step at an assumed 100 GB/s host DRAM bandwidth)
        hl = topo.host
        t_opt = n_opt * 20 / 100e9
        off_exposed = C.p2p(grad_bytes / (dp if plan.zero >= 1 else 1), hl) + \
            C.p2p(n_opt * tr_elem, hl)
        if plan.offload == "params":
            off_exposed += 2 * m * C.p2p(stage_param_bytes / (dp if plan.zero == 3 else 1), hl)
    comm["offload"] = off_exposed, off_exposed

    step = pipe + pp_exposed + dp_exposed + t_opt + off_exposed + ctx.tm.step_overhead_s
    comm_total = sum(v[0] for v in comm.values())
    comm_exposed = sum(v[1] for v in comm.values())
    mem = plan_memory(ctx, plan, layers_stage, L)
    fits = bool(mem["peak"] <= ctx.device.memory_bytes)
    times = {"step": step, "forward": comp_f * m, "backward": comp_b * m, "optimizer": t_opt,
             "host_overhead": ctx.tm.step_overhead_s, "pipeline_bubble": bubble,
             "communication": comm_total, "communication_exposed": comm_exposed,
             "communication_hidden": max(0.0, comm_total - comm_exposed),
             "overlap_compute_slowdown": (slow_f + slow_b) * m,
             "micro_step_forward": slot_f, "micro_step_backward": slot_b}
    comm_d = {k: {"total_s": v[0], "exposed_s": v[1], "hidden_s": max(0.0, v[0] - v[1])}
              for k, v in comm.items()}
    comm_d["bytes"] = {"tp_allreduce_per_block": act_bytes, "dp_gradients": grad_bytes,
                       "zero3_params_per_gather": stage_param_bytes if plan.zero == 3 else 0.0,
                       "ep_all_to_all_per_layer": a2a_bytes}
    tokens = ctx.global_batch * ctx.seq
    return PlanResult(plan, times, mem, comm_d, fits, tokens / step)


def _trainable_elem(g) -> float:
    return max((BYTES[p.dtype] for p, _ in g.params() if p.trainable), default=4)


def _stage_bytes(ps, tp, pp, layers_stage, L, ep=1):
    block = (ps["block_all"] - ps["block_split"] + ps["block_split"] / tp) / max(L, 1) * layers_stage
    if ep > 1:
        block -= ps["block_expert"] * (1 - 1 / ep) / max(L, 1) * layers_stage
    o_rep = ps["other_all"] - ps["other_split"]
    other = o_rep + ps["other_split"] / tp
    if pp > 1:
        other = max(ps["embed"], ps["head"]) / tp + o_rep / 2
    return block + other


def _stage_trainable(ps, tp, pp, layers_stage, L, ep=1):
    block = (ps["block_tr"] - ps["block_tr_split"] + ps["block_tr_split"] / tp) / max(L, 1) * layers_stage
    if ep > 1:
        block -= ps["block_expert_tr"] * (1 - 1 / ep) / max(L, 1) * layers_stage
    other = ps["other_tr"] - ps["other_tr_split"] + ps["other_tr_split"] / tp
    if pp > 1:
        other = other / 2
    return block + other


def plan_memory(ctx: Context, plan: Plan, layers_stage: int, L: int) -> dict:
    tp, pp, dp, m = plan.tp, plan.pp, plan.dp, plan.micro_batches
    mem, ps, act = ctx.base_memory(plan.micro_batch, plan.cp)
    w_all = ps["block_all"] + ps["other_all"]
    ep = plan.ep
    w_stage = _stage_bytes(ps, tp, pp, layers_stage, L, ep)
    w_share = w_stage / w_all if w_all else 1.0
    tr_all = ps["block_tr"] + ps["other_tr"]
    tr_share = _stage_trainable(ps, tp, pp, layers_stage, L, ep) / tr_all if tr_all else 0.0
    weights = float(mem.weights) * w_share
    layer_max = ps["layer_bytes_max"] - ps["layer_expert_max"] * (1 - 1 / ep)
    # expert shards (ep > 1): their ZeRO partitions span the dp/ep replicas of the shard
    w_exp = float(mem.weights) * (ps["block_expert"] / ep / max(L, 1) * layers_stage) / w_all \
        if ep > 1 and w_all else 0.0
    tr_exp = ps["block_expert_tr"] / ep / max(L, 1) * layers_stage / tr_all \
        if ep > 1 and tr_all else 0.0

    def zdiv(total, share, exp_share, on):
        if not on:
            return total * share
        return total * (share - exp_share) / dp + total * exp_share / (dp // ep)

    if plan.zero == 3 and dp > 1:
        weights = (weights - w_exp) / dp + w_exp / (dp // ep) + 2 * layer_max / tp
    if plan.offload == "params":
        weights = 2 * layer_max / tp
    grads = zdiv(float(mem.gradients), tr_share, tr_exp, plan.zero >= 2)
    opt = zdiv(float(mem.optimizer), tr_share, tr_exp, plan.zero >= 1)
    master = zdiv(float(mem.master_weights), tr_share, tr_exp, plan.zero >= 1)
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
                                   _largest_outside_grad(ctx, plan, mem) / tp))
    sp = plan.sp and tp > 1
    tp_act = 1.0 / tp if sp else (TP_REPLICATED_ACT_FRACTION + (1 - TP_REPLICATED_ACT_FRACTION) / tp)
    inflight = min(m, pp) if pp > 1 else 1
    if plan.schedule == "interleaved" and pp > 1:
        inflight = min(m, pp) * (1 + (pp - 1) / (pp * plan.virtual_stages))
    block_act = act["block"] / max(L, 1) * layers_stage * inflight * tp_act
    other_act = act["other"] / tp
    activations = block_act + other_act + act["recompute_block"] * tp_act
    temps = float(mem.temporaries) / tp
    # logits (vocab-parallel) and the loss on the last stage; chunked cross-entropy and
    # optimizer-in-backward as simcost.sim.memory prices them. The latter frees gradients only
    # where each rank owns its shard (ZeRO-2/3, FSDP): DDP's reducer keeps gradient-sized
    # buckets whatever the optimizer does
    g, a = ctx.graph(plan.micro_batch, plan.cp)
    blocks = g.block_segments()
    flowing = float(g.tensors[blocks[0].input_tid].nbytes) / tp if blocks else 0.0
    loss = float(loss_peak(g, ctx.loss_chunks, flowing, tp))
    in_bwd = ctx.optimizer_in_backward and (plan.zero >= 2 or dp == 1)
    opt_temp = opt / 2 if ctx.optimizer != "sgd" else 0.0
    g_share = grads / float(mem.gradients) if float(mem.gradients) else 0.0
    o_share = opt / float(mem.optimizer) if float(mem.optimizer) else 0.0
    ds_bwd = ds_res = 0.0
    ds = plan.deepspeed
    if ds is not None and plan.zero >= 1 and dp > 1:
        weights, grads, opt, master, opt_temp, ds_bwd, ds_res = _deepspeed_memory(
            ctx, plan, g, ps, layers_stage, L, weights, opt)
    grad_term = grads + opt_temp
    steps = backward_step_terms(g, ctx.optimizer, ctx.mixed, ctx.device.kind != "cpu") \
        if in_bwd else []
    if steps:
        # one parameter's (sharded) gradient and update temporaries at a time, on top of the
        # activations still alive when its hook fires
        grad_term = float(in_backward_peak(steps, activations, logits_fp32_bytes(g, tp),
                                           float(prologue_saved(g, a)) / tp, g_share, o_share)
                          ) + 2 * flowing
        grads = max(gb * g_share for _, gb, _ in steps)
    dynamic = max(activations + loss + ds_bwd, grad_term) + temps
    runtime = float(mem.runtime_overhead)
    peak = runtime + weights + master + opt + ds_res + dynamic
    out = {"weights": weights, "gradients": grads, "optimizer": opt, "master_weights": master,
           "activations": activations, "temporaries": temps, "runtime_overhead": runtime,
           "peak": peak, "capacity": ctx.device.memory_bytes}
    if ds is not None and plan.zero >= 1 and dp > 1:
        out["deepspeed_buckets_backward"] = ds_bwd
        out["deepspeed_buffers_resident"] = ds_res
    return out


def _largest_outside_grad(ctx, plan, mem) -> float:
    """Gradient bytes of the largest trainable parameter outside the transformer blocks."""
    g, _ = ctx.graph(plan.micro_batch, plan.cp)
    numel = {id(p): (p, c) for p, c in g.params() if p.trainable}
    total = sum(p.numel * c for p, c in numel.values())
    outside = [p.numel for seg in g.segments if seg.first_layer is None for op in seg.ops
               for p in op.params if p.trainable]
    if not total or not outside:
        return 0.0
    return float(mem.gradients) / total * max(outside)


def _deepspeed_memory(ctx, plan, g, ps, layers_stage, L, weights, opt):
    """What DeepSpeed's ZeRO optimizers hold per device (see the module docstring); returns
    (weights, gradients, optimizer, master, optimizer temporaries, bucket bytes live in backward,
    resident buffer bytes)."""
    dp, zero, ds = plan.dp, plan.zero, plan.deepspeed
    n = _stage_trainable(ps, plan.tp, plan.pp, layers_stage, L, plan.ep)     # trainable numel
    elem = _trainable_elem(g)
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
    return weights, grads, opt, master, 0.0, bwd, res


# ---------------------------------------------------------------------------------------------
# plans: explicit and searched


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def make_plan(devices, global_batch, *, tp=None, pp=None, dp=None, cp=None, zero=0,
              micro_batch=None, sp=None, tp_overlap=False, schedule="1f1b", virtual_stages=1,
              offload="none", spec=None, seq=None, deepspeed=None, ep=None) -> Plan:
    tp, pp, cp = tp or 1, pp or 1, cp or 1
    if dp is None:
        if devices % (tp * pp * cp):
            raise SimcostError(f"--devices {devices} is not divisible by tp*pp*cp = {tp * pp * cp}")
        dp = devices // (tp * pp * cp)
    if dp * tp * pp * cp != devices:
        raise SimcostError(f"dp*tp*pp*cp = {dp * tp * pp * cp} != --devices {devices}")
    if global_batch % dp:
        raise SimcostError(f"global batch {global_batch} is not divisible by dp = {dp}")
    per = global_batch // dp
    if micro_batch is None:
        micro_batch = 1 if pp > 1 else per
    if per % micro_batch:
        raise SimcostError(f"per-replica batch {per} is not divisible by micro-batch {micro_batch}")
    if zero not in (0, 1, 2, 3):
        raise SimcostError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if spec is not None:
        if spec.heads % tp or spec.kv_heads % tp and tp % spec.kv_heads:
            raise SimcostError(f"tp = {tp} does not divide {spec.name}'s {spec.heads} heads")
        if pp > spec.layers:
            raise SimcostError(f"pp = {pp} exceeds {spec.name}'s {spec.layers} layers")
    ep = ep or 1
    if ep > 1:
        if spec is not None:
            check_ep(spec, ep)
        if dp % ep:
            raise SimcostError(f"--ep {ep} does not divide the data-parallel size dp = {dp}")
    if seq is not None and seq % cp:
        raise SimcostError(f"sequence {seq} is not divisible by cp = {cp}")
    if schedule not in ("1f1b", "interleaved"):
        raise SimcostError(f"unknown pipeline schedule '{schedule}'; valid: 1f1b, interleaved")
    if offload not in ("none", "optimizer", "params"):
        raise SimcostError(f"unknown offload '{offload}'; valid: none, optimizer, params")
    return Plan(dp=dp, tp=tp, pp=pp, cp=cp, zero=zero, micro_batch=micro_batch,
                micro_batches=per // micro_batch, sp=bool(sp if sp is not None else tp > 1),
                tp_overlap=tp_overlap, schedule=schedule,
                virtual_stages=virtual_stages if schedule == "interleaved" else 1, offload=offload,
                deepspeed=deepspeed, ep=ep)


def check_ep(spec, ep) -> None:
    """Expert parallelism needs a mixture-of-experts model whose expert count ep divides."""
    if ep is None or ep == 1:
        return
    if ep < 1:
        raise SimcostError(f"--ep must be >= 1, got {ep}")
    if not getattr(spec, "experts", 0):
        raise SimcostError(f"--ep {ep} needs a mixture-of-experts model; {spec.name} has no experts")
    if spec.experts % ep:
        raise SimcostError(f"--ep {ep} does not divide {spec.name}'s {spec.experts} experts")


def enumerate_plans(devices, global_batch, spec, seq, gpus_per_node, *, zeros=(0, 1, 2, 3),
                    tp_overlap=False, fixed: dict | None = None) -> list[Plan]:
    """Valid plans: tp within a node and dividing the heads, pp <= layers, cp dividing the
    sequence (into 2cp chunks, for load-balanced causal attention), dp dividing the batch; for
    mixture-of-experts models also ep dividing both dp and the expert count."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    experts = getattr(spec, "experts", 0) or 0
    plans = []
    for tp in _divisors(devices):
        if tp > gpus_per_node or spec.heads % tp or (spec.kv_heads % tp and tp % spec.kv_heads):
            continue
        for pp in _divisors(devices // tp):
            if pp > spec.layers:
                continue
            for cp in _divisors(devices // (tp * pp)):
                if cp > 1 and seq % (2 * cp):
                    continue
                dp = devices // (tp * pp * cp)
                if global_batch % dp:
                    continue
                cand = dict(tp=tp, pp=pp, cp=cp, dp=dp)
                if any(cand[k] != v for k, v in fixed.items() if k in cand):
                    continue
                per = global_batch // dp
                eps = [e for e in _divisors(dp) if e == 1 or (experts and experts % e == 0)]
                if "ep" in fixed:
                    eps = [e for e in eps if e == fixed["ep"]]
                for mb in _divisors(per):
                    if "micro_batch" in fixed and mb != fixed["micro_batch"]:
                        continue
                    for z in (zeros if dp > 1 else (0,)):
                        for ep in eps:
                            plans.append(Plan(dp=dp, tp=tp, pp=pp, cp=cp, zero=z, micro_batch=mb,
                                              micro_batches=per // mb, sp=tp > 1,
                                              tp_overlap=tp_overlap, ep=ep))
    return plans


def search(ctx: Context, plans: list[Plan], keep: int = 5) -> tuple[PlanResult, list[PlanResult]]:
    results = [evaluate_plan(ctx, p) for p in plans]
    fitting = [r for r in results if r.fits]
    if fitting:
        # fastest; ties (ZeRO stages cost the same for tiny LoRA gradients) go to less memory
        fitting.sort(key=lambda r: (round(r.time_s["step"], 6), r.memory_bytes["peak"]))
        return fitting[0], fitting[:keep]
    results.sort(key=lambda r: r.memory_bytes["peak"])
    return results[0], results[:keep]
