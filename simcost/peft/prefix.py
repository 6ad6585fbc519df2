"""Prefix tuning: p trainable key/value vectors per layer (peft PREFIX_TUNING without the
reparameterisation MLP). peft expands them to the batch and hands them to the model as a KV
cache; each layer concatenates them in front of its keys and values, so attention runs over
p + s keys."""
from __future__ import annotations

from simcost.graph.ir import Op, Param
from simcost.peft.base import register


@register("prefix")
def apply(g, model, spec) -> None:
    p = spec.num_virtual_tokens
    L, kv = model.layers, model.kv_dim
    pro = g.segments[0]
    B = g.batch
    # peft expands one arange(p) over the batch: a (B, p) view of a p-element storage
    idx = g.new_tensor((B, p), "int64", view_of=g.new_tensor((p,), "int64", is_global=True))
    table = g.new_tensor((B, p, L * 2 * kv), "fp32", is_global=True)
    pro.ops.append(Op("prefix_encoder", "embedding", (idx,), (table,),
                      (Param("prompt_encoder.default.embedding.weight", (p, L * 2 * kv), "fp32",
                             True, "adapter"),), {"adapter": True}, "prompt_encoder"))
    dt = g.dtype
    # per layer: this layer's prefix keys and values (views of the table; a cast when 16-bit)
    for seg in g.block_segments():
        ops = seg.ops
        for name in ("k", "v"):
            heads = next(op for op in ops if op.name == f"{name}_heads")
            src = next((op for op in ops if op.name == f"rope_{name}"), heads) if name == "k" else heads
            t = g.tensors[src.outputs[0]]
            Bq, H, S, hd = t.shape
            pre = g.new_tensor((Bq, H, p, hd), "fp32", view_of=table)
            new_ops = [Op(f"prefix_{name}", "view", (table,), (pre,), (), {"adapter": True}, "")]
            if dt != "fp32":
                c = g.new_tensor((Bq, H, p, hd), dt)
                new_ops.append(Op(f"prefix_{name}_cast", "copy", (pre,), (c,), (), {"adapter": True}, ""))
                pre = c
            full = g.new_tensor((Bq, H, p + S, hd), dt)
            new_ops.append(Op(f"prefix_{name}_concat", "copy", (pre, src.outputs[0]), (full,), (),
                              {"adapter": True}, ""))
            g.insert_after(seg, src, new_ops, src.outputs[0], full)
        _retarget_shapes(g, seg, p)


def _retarget_shapes(g, seg, p) -> None:
    """Keys now span p + s positions: fix the shapes downstream of the concatenations."""
    for op in seg.ops:
        if op.name in ("repeat_k", "repeat_v", "k_contiguous", "v_contiguous"):
            t = g.tensors[op.outputs[0]]
            src = g.tensors[op.inputs[0]]
            if op.name == "k_contiguous":
                t.shape = t.shape[:-1] + (src.shape[-2],)
            else:
                t.shape = t.shape[:-2] + (src.shape[-2], t.shape[-1])
        elif op.name == "k_transpose":
            t = g.tensors[op.outputs[0]]
            src = g.tensors[op.inputs[0]]
            t.shape = t.shape[:-1] + (src.shape[-2],)
        elif op.name in ("scores", "scale", "causal_mask", "softmax_upcast", "softmax", "probs_cast",
                         "attn_dropout"):
            t = g.tensors[op.outputs[0]]
            src = g.tensors[op.inputs[0]]
            if op.name == "scores":
                t.shape = t.shape[:-1] + (g.tensors[op.inputs[1]].shape[-1],)
            else:
                t.shape = src.shape
