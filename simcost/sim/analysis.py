"""Gradient-flow analysis and per-op costs over a :class:`ModelGraph`.

Walks the segments in execution order and decides, per op, which inputs require grad
(a tensor requires grad when anything it depends on is trainable). That one fact gives the
backward work (an activation-gradient GEMM only where an input needs a gradient, a
weight-gradient GEMM only for trainable weights, nothing at all below the lowest trainable
tensor) and what autograd saves. A repeated block group whose first instance sees a different
gradient state than the rest (LoRA above a frozen embedding) is split into 1 + (n-1).
"""
from __future__ import annotations

from dataclasses import dataclass

from simcost.costs import OpCost, cost_of
from simcost.graph import kinds as K
from simcost.graph.ir import ModelGraph, Op, Segment


@dataclass(slots=True)
class OpRecord:
    segment: int
    op: Op
    count: int
    rg_in: tuple
    rg_out: bool
    cost: OpCost


@dataclass
class Analysis:
    records: list[OpRecord]
    saved_local: list          # per segment: bytes saved per instance (local storages)
    saved_global: object       # bytes of storages shared by all segments (saved once)
    activations_bytes: object  # total bytes autograd keeps for backward
    layer_input_bytes: object  # bytes of one block's input (gradient checkpointing keeps these)

    def total(self, field: str):
        s = 0
        for r in self.records:
            s = s + getattr(r.cost, field) * r.count
        return s


def _run(g: ModelGraph, seg: Segment, entry, rg: dict):
    """Propagate requires-grad through one instance; ``entry`` and the result are the
    (hidden, side) states (the side state is LST's carried side-network tensor)."""
    if seg.input_tid is not None:
        rg[seg.input_tid] = entry[0]
    if seg.aux_in is not None:
        rg[seg.aux_in] = entry[1]
    for op in seg.ops:
        r = (any(rg.get(t, False) for t in op.inputs) or any(p.trainable for p in op.params)) \
            and not op.attrs.get("detached")
        for t in op.outputs:
            rg[t] = r
    return _out_state(seg, rg, entry)


def _out_state(seg: Segment, rg: dict, entry):
    h = rg.get(seg.output_tid, False) if seg.output_tid is not None else False
    side = rg.get(seg.aux_out, False) if seg.aux_out is not None else entry[1]
    return (h, side)


def split_for_gradient_flow(g: ModelGraph) -> None:
    """Split block groups whose first instance sees a different gradient state."""
    rg: dict[int, bool] = {}
    state = (False, False)
    i = 0
    while i < len(g.segments):
        seg = g.segments[i]
        out = _run(g, seg, state, rg)
        if seg.first_layer is not None and seg.count > 1 and out != state:
            g.split_segment(seg, seg.first_layer + 1)
            out = _run(g, seg, state, rg)
        state = out
        i += 1


def analyse(g: ModelGraph) -> Analysis:
    split_for_gradient_flow(g)
    rg: dict[int, bool] = {}
    state = (False, False)
    records: list[OpRecord] = []
    saved_local = []
    global_storages: dict[int, object] = {}
    for si, seg in enumerate(g.segments):
        if seg.input_tid is not None:
            rg[seg.input_tid] = state[0]
        if seg.aux_in is not None:
            rg[seg.aux_in] = state[1]
        local: dict[object, object] = {}
        for op in seg.ops:
            rin = tuple(rg.get(t, False) for t in op.inputs)
            train = tuple(p.trainable for p in op.params)
            rout = (any(rin) or any(train)) and not op.attrs.get("detached")
            for t in op.outputs:
                rg[t] = rout
            cost = cost_of(op, g, rin, train) if op.kind != K.VIEW else OpCost(fwd_kernels=0)
            if not rout:
                cost.saved = []
            for s in cost.saved:
                if isinstance(s, tuple):
                    local[(op.name, len(local))] = s[1]
                else:
                    t = g.tensors[s]
                    base = g.tensors[t.storage]
                    if base.is_global:
                        global_storages[base.tid] = base.nbytes
                    else:
                        local[base.tid] = base.nbytes
            records.append(OpRecord(si, op, seg.count, rin, rout, cost))
        saved_local.append(sum(local.values()) if local else 0)
        h = rg.get(seg.output_tid, False) if seg.output_tid is not None else state[0]
        state = (h, rg.get(seg.aux_out, False) if seg.aux_out is not None else state[1])
    total_global = sum(global_storages.values()) if global_storages else 0
    act = total_global
    for seg, b in zip(g.segments, saved_local):
        act = act + b * seg.count
    blocks = g.block_segments()
    layer_in = g.tensors[blocks[0].input_tid].nbytes if blocks else 0
    return Analysis(records, saved_local, total_global, act, layer_in)
