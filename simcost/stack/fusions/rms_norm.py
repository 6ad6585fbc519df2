"""``rms_norm`` / ``rms_norm_unsloth``: HF's eager RMSNorm as one fused kernel each way.

Eager (transformers ``LlamaRMSNorm``, priced by :func:`simcost.costs.formulas.rms_norm`):
``x.float()``, ``pow(2).mean(-1)``, ``+ eps``, ``rsqrt``, ``x * r``, ``.to(dtype)``,
``weight * n``: 6-8 kernels forward, 8 (+2 for the weight) backward, and it keeps the fp32
copy of x, the fp32 rsqrt per row and (weight trainable) the normalised tensor.

Fused (:func:`simcost.costs.fused.rms_norm_fused`):
- ``rms_norm``: Liger ``src/liger_kernel/ops/rms_norm.py`` ``LigerRMSNormFunction``
  (``save_for_backward(X, W, RSTD)``: the input itself and the fp32 rstd per row; dW from
  per-SM partials summed in torch, always); TransformerEngine's RMSNorm behaves the same.
- ``rms_norm_unsloth``: Unsloth ``unsloth/kernels/rms_layernorm.py`` ``Fast_RMS_Layernorm``
  (``save_for_backward(X, W, r)``, r fp32 per row; backward one kernel, no weight gradient).

Matches every ``rms_norm`` op of the model (peft's own ops excluded); GPT-2's LayerNorm is
untouched. Qwen v1's remote-code RMSNorm has the same eager pattern and is fused too.
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.stack.fusions import register
from simcost.stack.fusions._match import from_model


def _fuse(g, weight_grad: str) -> int:
    n = 0
    for _, op in g.iter_ops():
        if op.kind == K.RMS_NORM and from_model(op):
            op.kind = K.RMS_NORM_FUSED
            op.attrs = {**op.attrs, "weight_grad": weight_grad}
            n += 1
    return n


@register("rms_norm")
def rms_norm(g) -> int:
    return _fuse(g, "always")


@register("rms_norm_unsloth")
def rms_norm_unsloth(g) -> int:
    return _fuse(g, "none")
