"""QLoRA: NF4 base weights with double quantisation, bf16 compute, LoRA on top.

Each quantised linear gets a ``dequantize`` op in forward; its backward dequantises again
when the input needs a gradient (the ``linear`` formula charges that). Storage per weight:
4 bits + one fp8 absmax per 64 weights + one fp32 constant per 256 absmax blocks
(QLoRA §2: 4 + 0.127 bits).
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.graph.ir import Op
from simcost.peft.base import register
from simcost.peft import lora


@register("qlora")
def apply(g, model, spec) -> None:
    lora.apply(g, model, spec)
    for seg, op in list(g.iter_ops()):
        if op.kind != K.LINEAR or op.module == "lm_head" or op.attrs.get("adapter"):
            continue
        w = op.params[0]
        w.compute_dtype = w.dtype
        w.dtype = "nf4"
        deq = g.new_tensor(w.shape, w.compute_dtype)
        i = seg.ops.index(op)
        seg.ops.insert(i, Op(f"{op.name}.dequantize", "dequantize", (), (deq,), (w,),
                             {"adapter": False}, op.module))
