"""``rope`` / ``rope_per_tensor``: HF's eager RoPE (``q * cos + rotate_half(q) * sin``: six
kernels each way per tensor, priced by :func:`simcost.costs.formulas.rope`) as fused kernels.

- ``rope``: Liger ``src/liger_kernel/ops/rope.py`` ``LigerRopeFunction``: q and k rotated in
  place by one kernel, ``save_for_backward(cos, sin)``; the backward is the same kernel with
  -θ on dq, dk. The rule merges each layer's ``rope_q`` / ``rope_k`` pair (same cos and sin)
  into one op.
- ``rope_per_tensor``: Unsloth ``unsloth/kernels/rope_embedding.py``
  (``fast_rope_embedding`` calls ``Fast_RoPE_Embedding`` once for Q and once for K; cos and
  sin kept on ctx) and TransformerEngine's fused RoPE (one call per tensor): each rope op
  becomes one kernel each way.

What is kept is unchanged (cos and sin, shared by all layers). Liger and Unsloth rotate in
place, so the output is the projection's storage; it stays its own storage here, which is the
same bytes wherever nothing else keeps the projection's output.
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.graph.ir import Op
from simcost.stack.fusions import register
from simcost.stack.fusions._match import from_model


def _single(op) -> None:
    op.kind = K.ROPE_FUSED
    op.attrs = {**op.attrs, "tensors": 1}


def _pairs(seg) -> list:
    """(q op, k op) pairs: consecutive rope ops on the same cos and sin, the first one's
    output not read before the second runs."""
    out = []
    ropes = [op for op in seg.ops if op.kind == K.ROPE and from_model(op)]
    for a, b in zip(ropes[::2], ropes[1::2]):
        i, j = seg.ops.index(a), seg.ops.index(b)
        between = seg.ops[i + 1:j]
        if a.inputs[1:] == b.inputs[1:] and \
                not any(a.outputs[0] in o.inputs for o in between):
            out.append((a, b))
    return out


@register("rope")
def rope(g) -> int:
    n = 0
    for seg in g.segments:
        for a, b in _pairs(seg):
            cos, sin = a.inputs[1:]
            fused = Op(f"{a.name}+{b.name}", K.ROPE_FUSED, (a.inputs[0], b.inputs[0], cos, sin),
                       (a.outputs[0], b.outputs[0]), (), {**a.attrs, "tensors": 2}, a.module)
            seg.ops[seg.ops.index(b)] = fused
            seg.ops.remove(a)
            n += 1
        for op in seg.ops:       # a rope op left without a partner
            if op.kind == K.ROPE and from_model(op):
                _single(op)
                n += 1
    return n


@register("rope_per_tensor")
def rope_per_tensor(g) -> int:
    n = 0
    for _, op in g.iter_ops():
        if op.kind == K.ROPE and from_model(op):
            _single(op)
            n += 1
    return n
