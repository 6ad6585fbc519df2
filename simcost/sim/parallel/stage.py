"""What one pipeline stage holds and computes: the model's parameters and activations by where
they live (inside the blocks or outside, TP-split or replicated, expert or not), the slowest
stage's share of them, and its compute per micro-batch."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from simcost.dtypes import BYTES
from simcost.graph import kinds as K
from simcost.sim.memory import selective_activations
from simcost.sim.parallel.tensor import adapter_split


@dataclass
class ParamGroup:
    """Parameters of one place (the blocks, or outside them): bytes, and trainable numel, all
    and the TP-split part."""
    all_bytes: float = 0.0
    split_bytes: float = 0.0
    trainable: float = 0.0
    trainable_split: float = 0.0


@dataclass
class ParamSplit:
    """Bytes / numel of the parameters by where they live (counted over all layers)."""
    block: ParamGroup = field(default_factory=ParamGroup)
    other: ParamGroup = field(default_factory=ParamGroup)
    embed: float = 0.0                 # bytes of the first (embedding) segment
    head: float = 0.0                  # bytes outside the blocks after them (norm, LM head)
    layers: int = 0
    layer_bytes_max: float = 0.0       # the largest block layer's bytes
    block_expert: float = 0.0          # expert weights' bytes (MoE)
    block_expert_tr: float = 0.0       # trainable expert numel
    layer_expert_max: float = 0.0
    moe_layers: int = 0
    top_k: int = 0


@dataclass(frozen=True)
class ActSplit:
    """Saved-activation bytes of one micro-batch: the block layers (summed), outside them, and
    the largest block's while it is recomputed (checkpointing)."""
    block: float
    other: float
    recompute_block: float


def param_split(g) -> ParamSplit:
    d = ParamSplit()
    seen = set()
    layers = 0
    for seg in g.segments:
        blk = seg.first_layer is not None
        if blk:
            layers += seg.count
        seg_bytes = seg_expert = 0.0
        for op in seg.ops:
            expert = op.kind == K.MOE_EXPERTS
            if expert and blk:
                d.moe_layers += seg.count
                d.top_k = max(d.top_k, int(op.attrs.get("top_k", 1)))
            for p in (*op.params, *op.attrs.get("held_params", ())):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                split = len(p.shape) == 2 and (op.kind in (K.LINEAR, K.EMBEDDING, *K.FUSED_HEADS)) and \
                    p.role != "adapter" or (p.role == "adapter" and adapter_split(op))
                nb = p.nbytes * seg.count
                n = p.numel * seg.count
                _add(d.block if blk else d.other, nb, n, split, p.trainable)
                if blk and expert and any(p is q for q in op.params):
                    d.block_expert += nb
                    seg_expert += p.nbytes
                    if p.trainable:
                        d.block_expert_tr += n
                if blk:
                    seg_bytes += p.nbytes
                elif seg is g.segments[0]:
                    d.embed += nb
                else:
                    d.head += nb
        if blk:
            d.layer_bytes_max = max(d.layer_bytes_max, seg_bytes)
            d.layer_expert_max = max(d.layer_expert_max, seg_expert)
    d.layers = layers
    return d


def _add(grp: ParamGroup, nbytes, numel, split: bool, trainable: bool) -> None:
    grp.all_bytes += nbytes
    if split:
        grp.split_bytes += nbytes
    if trainable:
        grp.trainable += numel
        if split:
            grp.trainable_split += numel


def fp8_attention_saving(g, a) -> list[float]:
    """Per segment, the bytes per instance that fused fp8 attention keeps less than the
    graph's 16-bit attention. TransformerEngine's FusedAttnFunc with fp8 forward and backward
    (NeMo FP8_DPA=1, NVTE_FP8_DPA_BWD=1) saves fp8 copies of q, k, v and the output for the
    backward and no 16-bit ones (transformer_engine/pytorch/attention/dot_product_attention/
    backends.py, FusedAttnFunc.forward: ``fp8_tensors = (q_fp8, k_fp8, v_fp8, out_fp8) if
    is_bwd_fp8``, ``qkvo_tensors = (None,) * 4``); the softmax statistics stay fp32. A 16-bit
    storage another op also saves stays, and its fp8 copy comes on top."""
    out = []
    for si, _ in enumerate(g.segments):
        recs = [r for r in a.records if r.segment == si and r.cost.saved]
        others = {_storage(g, s) for r in recs if r.op.kind != K.SDPA for s in r.cost.saved
                  if not isinstance(s, tuple)}
        freed = fp8 = 0.0
        seen = set()
        for r in recs:
            if r.op.kind != K.SDPA:
                continue
            eb = BYTES[g.tensors[r.op.inputs[0]].dtype]
            for s in r.cost.saved[:4]:          # q, k, v, out (then the fp32 statistics)
                if isinstance(s, tuple):
                    freed, fp8 = freed + s[1], fp8 + s[1] / eb
                    continue
                base = _storage(g, s)
                fp8 += g.tensors[s].nbytes / BYTES[g.tensors[s].dtype]
                if base not in others and base not in seen:
                    freed += g.tensors[base].nbytes
                seen.add(base)
        out.append(float(freed - fp8))
    return out


def _storage(g, tid) -> int:
    return g.tensors[g.tensors[tid].storage].tid


def act_split(g, a, checkpointing, fp8_attention: bool = False) -> ActSplit:
    """Saved activations by place; ``fp8_attention``: attention keeps fp8 copies
    (:func:`fp8_attention_saving`; selective checkpointing saves no attention tensors)."""
    block = 0.0
    other = a.saved_global
    local = a.saved_local
    if checkpointing == "selective":       # attention recomputed: none of it is saved
        local = selective_activations(g, a)[1]
        checkpointing = False
    elif fp8_attention:
        local = [b - d for b, d in zip(local, fp8_attention_saving(g, a))]
    for seg, b in zip(g.segments, local):
        if seg.first_layer is None:
            other = other + b * seg.count
        elif checkpointing:
            block = block + g.tensors[seg.input_tid].nbytes * seg.count
        else:
            block = block + b * seg.count
    worst = 0.0
    if checkpointing:
        for seg, b in zip(g.segments, local):
            if seg.first_layer is not None:
                worst = max(worst, float(b))
    return ActSplit(float(block), float(other), worst)


def trainable_params(g) -> tuple:
    """(param, multiplicity) of the graph's trainable parameters, listed once per graph (a
    plan search reads them for every plan; graphs are not changed once analysed)."""
    hit = g.meta.get("_trainable_params")
    if hit is None:
        hit = g.meta["_trainable_params"] = tuple((p, c) for p, c in g.params() if p.trainable)
    return hit


def trainable_elem(g) -> float:
    return max((BYTES[p.dtype] for p, _ in trainable_params(g)), default=4)


def stage_bytes(ps: ParamSplit, tp, pp, layers_stage, L, ep=1):
    """Parameter bytes of the slowest stage on one TP rank (one of ep expert shards)."""
    b, o = ps.block, ps.other
    block = (b.all_bytes - b.split_bytes + b.split_bytes / tp) / max(L, 1) * layers_stage
    if ep > 1:
        block -= ps.block_expert * (1 - 1 / ep) / max(L, 1) * layers_stage
    o_rep = o.all_bytes - o.split_bytes
    other = o_rep + o.split_bytes / tp
    if pp > 1:
        other = max(ps.embed, ps.head) / tp + o_rep / 2
    return block + other


def stage_trainable(ps: ParamSplit, tp, pp, layers_stage, L, ep=1):
    """Trainable numel of the slowest stage on one TP rank (one of ep expert shards)."""
    b, o = ps.block, ps.other
    block = (b.trainable - b.trainable_split + b.trainable_split / tp) / max(L, 1) * layers_stage
    if ep > 1:
        block -= ps.block_expert_tr * (1 - 1 / ep) / max(L, 1) * layers_stage
    other = o.trainable - o.trainable_split + o.trainable_split / tp
    if pp > 1:
        other = other / 2
    return block + other


@dataclass(slots=True)
class StageWork:
    """One micro-batch on the slowest pipeline stage: its compute and what can hide
    communication."""
    layers: int                 # L: block layers of the whole model
    layers_stage: int           # ceil(L / pp)
    fwd_s: float
    bwd_s: float
    bwd_fraction: float         # of the block layers that run a backward at all
    linear_fwd_s: float         # TP-split linears of the stage's blocks
    linear_bwd_s: float
    wgrad_bwd_s: float
    attn_fwd_per_layer_s: float
    attn_bwd_per_layer_s: float


def _stage_layout(g) -> tuple:
    """(block segment indices, L, counts, prologue indices, epilogue indices) of a graph, kept
    on it (asked for every plan shape of a search)."""
    hit = g.meta.get("_stage_layout")
    if hit is None:
        blocks = [i for i, s in enumerate(g.segments) if s.first_layer is not None]
        L = sum(g.segments[i].count for i in blocks)
        counts = [s.count for s in g.segments]
        non = [i for i in range(len(g.segments)) if i not in blocks]
        first = [i for i in non if i < (blocks[0] if blocks else 0)]
        last = [i for i in non if i not in first]
        hit = g.meta["_stage_layout"] = (blocks, L, counts, non, first, last)
    return hit


def stage_work(g, st, pp: int) -> StageWork:
    """The slowest stage: ceil(L/pp) blocks plus the embedding or the head (pp == 1: both)."""
    blocks, L, counts, non, first, last = _stage_layout(g)

    def tot(lst, idx):
        return sum(lst[i] * counts[i] for i in idx)
    layers_stage = math.ceil(L / pp)
    if pp == 1:
        ends_f, ends_b = tot(st.fwd, non), tot(st.bwd, non)
    else:
        ends_f = max(tot(st.fwd, first), tot(st.fwd, last))
        ends_b = max(tot(st.bwd, first), tot(st.bwd, last))
    # the block layers that run a backward at all (LoRA: all but possibly the first)
    bwd_layers = sum(counts[i] for i in blocks if st.bwd[i] > 0)
    per_stage = lambda lst: tot(lst, blocks) / max(L, 1) * layers_stage  # noqa: E731
    return StageWork(
        layers=L, layers_stage=layers_stage,
        fwd_s=tot(st.fwd, blocks) / max(L, 1) * layers_stage + ends_f,
        bwd_s=tot(st.bwd, blocks) / max(L, 1) * layers_stage + ends_b,
        bwd_fraction=bwd_layers / max(L, 1),
        linear_fwd_s=per_stage(st.lin_fwd), linear_bwd_s=per_stage(st.lin_bwd),
        wgrad_bwd_s=per_stage(st.wgrad_bwd),
        attn_fwd_per_layer_s=tot(st.attn_fwd, blocks) / max(L, 1),
        attn_bwd_per_layer_s=tot(st.attn_bwd, blocks) / max(L, 1))
