"""``cross_entropy_inplace``: HF's cross-entropy as Unsloth's ``fast_cross_entropy_loss``.

Source: Unsloth ``unsloth/kernels/cross_entropy_loss.py`` (``Fast_CrossEntropyLoss``), which
Unsloth's patched causal-LM forward calls on the LM head's logits. The logits are still
materialised in the model dtype, but there is no fp32 upcast and no log-softmax: the forward
kernel writes the fp32 loss and logsumexp per row and ``save_for_backward(logits, logsumexp,
labels)`` keeps the logits themselves; the backward kernel writes the gradient into the
logits buffer and returns it. Cost: :func:`simcost.costs.fused.cross_entropy_inplace`; the
loss instant's memory: :func:`simcost.costs.fused.ce_inplace_transient_bytes`.

Newer Unsloth releases can also run a chunked fused linear + loss (unsloth_zoo
``fused_losses``); this rule prices the ``fast_cross_entropy_loss`` path.
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.stack.fusions import register


@register("cross_entropy_inplace")
def cross_entropy_inplace(g) -> int:
    head = g.segments[-1]
    n = 0
    for op in head.ops:
        if op.kind == K.CROSS_ENTROPY:
            op.kind = K.CROSS_ENTROPY_INPLACE
            n += 1
    return n
