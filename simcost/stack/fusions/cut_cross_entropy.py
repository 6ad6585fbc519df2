"""``cut_cross_entropy``: the LM head and the loss as Apple's cut cross-entropy.

Source: apple/ml-cross-entropy ``cut_cross_entropy.linear_cross_entropy`` (Wijmans et al.
2024, arXiv 2411.09009), which unsloth_zoo's ``loss_utils.fused_linear_cross_entropy``
calls when ``HAS_CUT_CROSS_ENTROPY`` (CUDA capability >= 7.5, torch >= 2.4, triton >= 3.0)
and ``UNSLOTH_ENABLE_CCE`` (which unsloth_zoo turns off for torch >= 2.8). The logits exist
only tile by tile in on-chip memory: the forward keeps the logsumexp, the backward
recomputes the tiles. Cost: :func:`simcost.costs.fused.cut_cross_entropy`; the loss
instant's memory: :func:`simcost.costs.fused.cce_transient_bytes`.

Pattern: as ``linear_cross_entropy`` (the head's ``lm_head`` linear feeding only the loss).
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.stack.fusions import register
from simcost.stack.fusions.linear_cross_entropy import fuse_head


@register("cut_cross_entropy")
def cut_cross_entropy(g) -> int:
    return fuse_head(g, K.CUT_CROSS_ENTROPY)
