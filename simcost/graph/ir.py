"""The op IR.

A model is a chain of *segments* (embedding prologue, decoder-block groups, head epilogue).
A segment holds the ops of one instance in execution order and a ``count``: how many
consecutive identical instances it stands for (an 80-layer model is built from one block
template, so building it stays cheap). Tensors live in one table; views share a *storage* id,
which is what autograd's saved-tensor accounting de-duplicates on.

Shape entries are ints or numpy arrays (batch and sequence may be vectors, so one graph
prices a whole sweep of batch x sequence at once).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any


from simcost.graph.kinds import ALL as KINDS

from simcost.dtypes import BYTES


def numel(shape) -> Any:
    n = 1
    for s in shape:
        n = n * s
    return n


@dataclass(slots=True)
class Tensor:
    tid: int
    shape: tuple
    dtype: str
    storage: int                 # id of the storage (views share their base's)
    is_global: bool = False      # produced once per step (prologue), shared by all segments

    @property
    def nbytes(self):
        return numel(self.shape) * BYTES[self.dtype]


@dataclass(slots=True)
class Param:
    name: str                    # HF parameter name; '{i}' stands for the layer index
    shape: tuple[int, ...]
    dtype: str                   # storage dtype (nf4 for QLoRA base weights)
    trainable: bool = False
    role: str = "weight"         # weight | bias | norm | embedding | adapter | quant_state
    compute_dtype: str | None = None  # dtype the op computes in (dequantised NF4 -> bf16)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> float:
        return self.numel * BYTES[self.dtype]


@dataclass(slots=True)
class Op:
    name: str                    # unique within its segment, e.g. 'attn.q_proj'
    kind: str                    # key into simcost.costs.registry
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    params: tuple[Param, ...] = ()
    attrs: dict = field(default_factory=dict)
    module: str = ""             # HF module path, '{i}' = layer index

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"op {self.name!r}: unknown op kind {self.kind!r} "
                             f"(see simcost.graph.kinds)")


@dataclass(slots=True)
class Segment:
    name: str
    ops: list[Op]
    count: int = 1
    first_layer: int | None = None   # layer index of the first instance (blocks only)
    input_tid: int | None = None     # the hidden state entering each instance
    output_tid: int | None = None    # the hidden state leaving each instance
    aux_in: int | None = None        # a second carried state (LST's side network) entering
    aux_out: int | None = None       # ... and leaving each instance

    @property
    def layers(self) -> range:
        if self.first_layer is None:
            return range(0)
        return range(self.first_layer, self.first_layer + self.count)


class ModelGraph:
    """Segments of ops over a shared tensor table, plus the step's global facts."""

    def __init__(self, batch, seq, dtype: str):
        self.batch = batch
        self.seq = seq
        self.dtype = dtype
        self.tensors: dict[int, Tensor] = {}
        self.segments: list[Segment] = []
        self.meta: dict[str, Any] = {}
        self._next = 0

    # -- tensors -------------------------------------------------------------------------
    def new_tensor(self, shape, dtype: str, *, view_of: int | None = None,
                   is_global: bool = False) -> int:
        tid = self._next
        self._next += 1
        storage = self.tensors[view_of].storage if view_of is not None else tid
        glob = self.tensors[view_of].is_global if view_of is not None else is_global
        self.tensors[tid] = Tensor(tid, tuple(shape), dtype, storage, glob)
        return tid

    def storage_nbytes(self, storage: int):
        return self.tensors[storage].nbytes

    # -- structure -----------------------------------------------------------------------
    def block_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.first_layer is not None]

    def iter_ops(self):
        for seg in self.segments:
            for op in seg.ops:
                yield seg, op

    def params(self):
        """(param, multiplicity) over the whole model; a tensor shared by several ops (tied
        embeddings, DoRA's norm reading the LoRA factors) is listed once."""
        seen: set[int] = set()
        for seg in self.segments:
            for op in seg.ops:
                for p in (*op.params, *op.attrs.get("held_params", ())):
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield p, seg.count

    def split_segment(self, seg: Segment, at_layer: int) -> tuple[Segment, Segment]:
        """Split a block group at ``at_layer``; the upper part gets its own copies of ops and
        local tensors, so a transform may change one part only."""
        assert seg.first_layer is not None and seg.first_layer < at_layer < seg.first_layer + seg.count
        idx = self.segments.index(seg)
        n_low = at_layer - seg.first_layer
        upper = self._clone_segment(seg)
        upper.first_layer = at_layer
        upper.count = seg.count - n_low
        seg.count = n_low
        self.segments.insert(idx + 1, upper)
        return seg, upper

    def split_layers(self, layers: set[int]) -> None:
        """Split block groups so each group is entirely inside or outside ``layers``."""
        for seg in list(self.block_segments()):
            cuts = sorted({lay for lay in range(seg.first_layer + 1, seg.first_layer + seg.count)
                           if (lay in layers) != (lay - 1 in layers)})
            cur = seg
            for c in cuts:
                _, cur = self.split_segment(cur, c)

    def _clone_segment(self, seg: Segment) -> Segment:
        mapping: dict[int, int] = {}
        globals_ = {t for t, ten in self.tensors.items() if ten.is_global}

        def remap(tid: int) -> int:
            if tid in globals_:
                return tid
            if tid not in mapping:
                src = self.tensors[tid]
                new = self._next
                self._next += 1
                mapping[tid] = new
                # a view shares its (cloned, or global) base's storage
                storage = new if src.storage == tid else self.tensors[remap(src.storage)].storage
                self.tensors[new] = Tensor(new, src.shape, src.dtype, storage, False)
            return mapping[tid]

        pmap: dict[int, Param] = {}

        def pcopy(p: Param) -> Param:   # a parameter read by two ops stays one parameter
            if id(p) not in pmap:
                pmap[id(p)] = copy.copy(p)
            return pmap[id(p)]

        def clone(op: Op) -> Op:
            attrs = dict(op.attrs)
            if "held_params" in attrs:
                attrs["held_params"] = tuple(pcopy(p) for p in attrs["held_params"])
            if "members" in attrs:          # a fused group's own ops (stack fusions)
                attrs["members"] = tuple(clone(m) for m in attrs["members"])
            return Op(op.name, op.kind, tuple(remap(t) for t in op.inputs),
                      tuple(remap(t) for t in op.outputs),
                      tuple(pcopy(p) for p in op.params), attrs, op.module)

        ops = [clone(op) for op in seg.ops]
        return Segment(seg.name, ops, seg.count, seg.first_layer,
                       remap(seg.input_tid) if seg.input_tid is not None else None,
                       remap(seg.output_tid) if seg.output_tid is not None else None,
                       remap(seg.aux_in) if seg.aux_in is not None else None,
                       remap(seg.aux_out) if seg.aux_out is not None else None)

    # -- editing (used by PEFT transforms) ---------------------------------------------------
    def insert_after(self, seg: Segment, op: Op, new_ops: list[Op], rewire_from: int, rewire_to: int):
        """Insert ``new_ops`` after ``op``; later consumers of tensor ``rewire_from`` read
        ``rewire_to`` instead (the new ops themselves keep reading the original)."""
        i = seg.ops.index(op)
        seg.ops[i + 1:i + 1] = new_ops
        for later in seg.ops[i + 1 + len(new_ops):]:
            if rewire_from in later.inputs:
                later.inputs = tuple(rewire_to if t == rewire_from else t for t in later.inputs)
        if seg.output_tid == rewire_from:
            seg.output_tid = rewire_to
        if seg.aux_out == rewire_from:
            seg.aux_out = rewire_to

    def insert_before(self, seg: Segment, op: Op, new_ops: list[Op], rewire_from: int, rewire_to: int):
        """Insert ``new_ops`` before ``op``; ``op`` and later ops read ``rewire_to``."""
        i = seg.ops.index(op)
        seg.ops[i:i] = new_ops
        for later in seg.ops[i + len(new_ops):]:
            if rewire_from in later.inputs:
                later.inputs = tuple(rewire_to if t == rewire_from else t for t in later.inputs)

    # -- export --------------------------------------------------------------------------
    def to_networkx(self):
        """One node per op instance group: ``'<segment>[<layers>]/<op>'`` with the op, its
        multiplicity and, once analysed, its costs; edges follow tensors."""
        import networkx as nx   # only here: keeps `import simcost` light

        g = nx.DiGraph()
        producer: dict[int, str] = {}
        prev_out: str | None = None
        for si, seg in enumerate(self.segments):
            tag = seg.name if seg.first_layer is None else \
                f"{seg.name}[{seg.first_layer}:{seg.first_layer + seg.count}]"
            local_prod: dict[int, str] = {}
            for op in seg.ops:
                node = f"{tag}/{op.name}"
                g.add_node(node, op=op, count=seg.count, segment=si, kind=op.kind)
                for t in op.inputs:
                    src = local_prod.get(t) or producer.get(t)
                    if src is None and t == seg.input_tid and prev_out is not None:
                        src = prev_out
                    if src is not None:
                        g.add_edge(src, node, tensor=t)
                for t in op.outputs:
                    local_prod[t] = node
            for t, n in local_prod.items():
                if self.tensors[t].is_global:
                    producer[t] = n
            out = seg.output_tid
            if out is not None and out in local_prod:
                prev_out = local_prod[out]
            elif seg.ops:
                prev_out = local_prod.get(seg.ops[-1].outputs[0], prev_out)
            if seg.output_tid is not None:
                producer[seg.output_tid] = prev_out
        return g
