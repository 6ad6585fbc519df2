"""``linear_cross_entropy``: the LM head and the loss as Liger's fused linear cross-entropy.

Source: Liger ``src/liger_kernel/ops/fused_linear_cross_entropy.py``
(``LigerFusedLinearCrossEntropyFunction``), which ``apply_liger_kernel_to_llama`` (and the
other families) installs by default (``fused_linear_cross_entropy=True``): the hidden states
go straight into the fused op, the (B·S x V) logits are never materialised. Per chunk of
tokens (``chunk_size = min(next_power_of_2(cdiv(BT, cdiv(V, H))), BT)``) it makes the logits,
the loss and the logits gradient in place, then grad_input and grad_weight: all in the
forward. ``save_for_backward(grad_input, grad_weight)`` (BT x H, and V x H when the head is
trainable) is all it keeps; the backward only scales them. Cost:
:func:`simcost.costs.fused.linear_cross_entropy`; the loss instant's memory:
:func:`simcost.costs.fused.lce_transient_bytes` (read by :func:`simcost.sim.memory.loss_peak`).

Pattern: the head's ``lm_head`` linear whose output only feeds the ``cross_entropy`` loss.
A head with anything in between (an adapter on lm_head) is left alone.
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.graph.ir import Op
from simcost.stack.fusions import register
from simcost.stack.fusions._match import consumers


def fuse_head(g, kind: str) -> int:
    """Replace the head's ``lm_head`` linear and its ``cross_entropy`` loss by one op of
    ``kind`` reading the hidden states and the labels (0 when the pattern is absent)."""
    head = g.segments[-1]
    loss = next((op for op in head.ops if op.kind == K.CROSS_ENTROPY), None)
    if loss is None:
        return 0
    logits = loss.inputs[0]
    lin = next((op for op in head.ops if logits in op.outputs), None)
    if lin is None or lin.kind != K.LINEAR or lin.module != "lm_head" or len(lin.params) != 1 \
            or consumers(head, logits) != [loss] or lin.attrs.get("weight_input"):
        return 0
    fused = Op("lm_head+loss", kind, (lin.inputs[0], loss.inputs[1]),
               loss.outputs, lin.params, dict(lin.attrs), "lm_head")
    head.ops[head.ops.index(loss)] = fused
    head.ops.remove(lin)
    return 1


@register("linear_cross_entropy")
def linear_cross_entropy(g) -> int:
    return fuse_head(g, K.LINEAR_CROSS_ENTROPY)
