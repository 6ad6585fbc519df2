"""``pointwise``: TorchInductor's fusion of the element-wise and normalisation ops between the
GEMMs into one generated (Triton) kernel per group, forward and backward.

What Inductor does (torch/_inductor/scheduler.py, torch/_functorch/partitioners.py):

- ``Scheduler.fuse_nodes`` merges a pointwise or reduction node into a neighbour when the two
  share memory (``score_fusion_memory`` > 0: one reads what the other writes, or both read
  the same buffer with the same iteration size) and the merge does not create a cycle
  (``will_fusion_create_cycle``: no path from one to the other through a node outside the
  pair). Pointwise ops fuse with pointwise ops and as prologue / epilogue of reductions
  (RMSNorm's mean of squares and the scaling after it are one kernel).
- GEMMs (``aten.mm`` / ``addmm``) go to cuBLAS ``extern_kernels`` unless ``max_autotune``
  is on, so nothing fuses into them; SDPA (flash / efficient / flex attention), embeddings,
  the loss and collectives are their own kernels too.
- The compiled backward is partitioned by ``min_cut_rematerialization_partition``: pointwise
  intermediates that are not materialised anyway are recomputed in the backward kernel from
  what is saved, rather than saved (``ban_recompute_reductions``: a reduction whose output is
  over 4x smaller than its input, RMSNorm's rstd, is saved; random ops such as dropout keep
  their mask).
- torchtune ``training/_compile.py`` ``compile_model`` compiles each transformer layer on its
  own (``layer.compile()``), so no group crosses a decoder-layer boundary: groups are formed
  within one instance of a segment.

The rule: within each segment, fusible ops (:data:`FUSIBLE`) are grouped with a union-find
over producer -> consumer edges and shared reads of same-sized ops, skipping any merge that
would create a cycle through a non-fusible op; every group with a real (non-view) op becomes
one :data:`simcost.graph.kinds.POINTWISE_FUSED` op, whose inputs are the group's external
tensors, whose outputs are the tensors read outside it, and whose members are kept in
``attrs['members']`` for :func:`simcost.costs.fused.pointwise_fused`. The segment is then
re-ordered topologically (stable), so each fused op runs where its inputs exist.
"""
from __future__ import annotations

import heapq

from simcost.graph import kinds as K
from simcost.graph.ir import Op, numel
from simcost.stack.fusions import register

# element-wise and normalisation kinds Inductor generates kernels for (eager ones, and the
# hand-fused kernels other rules make out of them); views are free and transparent
FUSIBLE = frozenset({
    K.ADD, K.SUB, K.SCALE, K.NEG, K.COPY, K.VIEW, K.MUL, K.POW, K.SILU, K.GELU, K.TANH,
    K.RSQRT, K.SIGMOID, K.SOFTMAX, K.DROPOUT, K.REDUCE, K.RMS_NORM, K.LAYER_NORM, K.ROPE,
    K.GELU_NEW, K.MUL_PARAM, K.ADD_PARAM, K.RMS_NORM_FUSED, K.ROPE_FUSED, K.SWIGLU_FUSED,
    K.POINTWISE_FUSED,
})


def _fusible(op) -> bool:
    return op.kind in FUSIBLE and not op.attrs.get("sync")


class _Groups:
    """Union-find over op indices."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(j)] = self.find(i)


def _edges(seg) -> tuple[dict, dict]:
    """(producer index of each tensor, successors of each op index) within one instance."""
    prod = {}
    for i, op in enumerate(seg.ops):
        for t in op.outputs:
            prod[t] = i
    succ: dict[int, set] = {i: set() for i in range(len(seg.ops))}
    for j, op in enumerate(seg.ops):
        for t in op.inputs:
            if t in prod:
                succ[prod[t]].add(j)
    return prod, succ


def _creates_cycle(uf: _Groups, succ: dict, a: int, b: int) -> bool:
    """Whether merging the groups of ops ``a`` and ``b`` puts a non-member on a path between
    them (Inductor's ``will_fusion_create_cycle``)."""
    ga, gb = uf.find(a), uf.find(b)
    members = {i for i in succ if uf.find(i) in (ga, gb)}
    # from any member, leave the union through a non-member, and see whether it comes back
    stack = [j for i in members for j in succ[i] if j not in members]
    seen = set(stack)
    while stack:
        i = stack.pop()
        for j in succ[i]:
            if j in members:
                return True
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return False


def _size(g, op):
    return numel(g.tensors[op.outputs[0]].shape) if op.outputs else None


def _same_size(g, a, b) -> bool:
    sa, sb = _size(g, a), _size(g, b)
    try:
        return bool(sa == sb)
    except ValueError:          # a vectorised sweep: same shape expressions
        return bool((sa == sb).all())


def _groups(g, seg) -> list[list[int]]:
    ops = seg.ops
    prod, succ = _edges(seg)
    uf = _Groups(len(ops))
    cand = []
    for j, op in enumerate(ops):                           # producer -> consumer
        if not _fusible(op):
            continue
        for t in op.inputs:
            i = prod.get(t)
            if i is not None and _fusible(ops[i]):
                cand.append((i, j))
    readers: dict[int, list[int]] = {}
    for j, op in enumerate(ops):                           # shared reads, same loop size
        if _fusible(op) and op.kind != K.VIEW:
            for t in set(op.inputs):
                readers.setdefault(t, []).append(j)
    for rs in readers.values():
        for i, j in zip(rs, rs[1:]):
            if _same_size(g, ops[i], ops[j]):
                cand.append((i, j))
    for i, j in cand:
        if uf.find(i) != uf.find(j) and not _creates_cycle(uf, succ, i, j):
            uf.union(i, j)
    out: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        if _fusible(op):
            out.setdefault(uf.find(i), []).append(i)
    return [m for m in out.values() if any(ops[i].kind != K.VIEW for i in m)]


def _fused_op(g, seg, idx: list[int], n: int) -> Op:
    members = [seg.ops[i] for i in idx]
    made = {t for op in members for t in op.outputs}
    inputs: list[int] = []
    for op in members:
        for t in op.inputs:
            if t not in made and t not in inputs:
                inputs.append(t)
    inside = set(idx)
    read_outside = {t for k, op in enumerate(seg.ops) if k not in inside for t in op.inputs}
    carried = {seg.output_tid, seg.aux_out}
    outputs = tuple(t for op in members for t in op.outputs
                    if t in read_outside or t in carried or g.tensors[t].is_global)
    params: list = []
    for op in members:
        for p in op.params:
            if not any(p is q for q in params):
                params.append(p)
    first = next(op for op in members if op.kind != K.VIEW)
    return Op(f"pointwise{n}:{first.name}", K.POINTWISE_FUSED, tuple(inputs), outputs,
              tuple(params), {"members": tuple(members), "inductor": True}, first.module)


def _reorder(seg, groups: list[list[int]], fused: list[Op]) -> None:
    """Replace each group by its fused op and re-sort the segment topologically, keeping the
    original order wherever dependencies allow."""
    owner = {i: k for k, m in enumerate(groups) for i in m}
    nodes: list = []               # (key, op)
    done_groups = set()
    for i, op in enumerate(seg.ops):
        k = owner.get(i)
        if k is None:
            nodes.append((i, op))
        elif k not in done_groups:
            done_groups.add(k)
            nodes.append((min(groups[k]), fused[k]))
    prod = {t: n for n, (_, op) in enumerate(nodes) for t in op.outputs}
    deps = {n: {prod[t] for t in op.inputs if t in prod and prod[t] != n}
            for n, (_, op) in enumerate(nodes)}
    users: dict[int, list[int]] = {n: [] for n in deps}
    for n, ds in deps.items():
        for d in ds:
            users[d].append(n)
    left = {n: len(ds) for n, ds in deps.items()}
    heap = [(nodes[n][0], n) for n, c in left.items() if c == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, n = heapq.heappop(heap)
        order.append(nodes[n][1])
        for u in users[n]:
            left[u] -= 1
            if left[u] == 0:
                heapq.heappush(heap, (nodes[u][0], u))
    assert len(order) == len(nodes), "pointwise fusion made a cycle"
    seg.ops[:] = order


@register("pointwise")
def pointwise(g) -> int:
    n = 0
    for seg in g.segments:
        groups = _groups(g, seg)
        if not groups:
            continue
        fused = [_fused_op(g, seg, m, n + k) for k, m in enumerate(groups)]
        n += len(groups)
        _reorder(seg, groups, fused)
    return n
