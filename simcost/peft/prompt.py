"""Prompt tuning: p trainable soft tokens are prepended to the input embeddings, so every
layer runs on s + p tokens and the loss sees p more (ignored) positions (peft
``PeftModelForCausalLM`` with PROMPT_TUNING). The sequence growth happens when the graph is
built (:func:`tokens_added`); this transform adds the prompt embedding and the concatenation."""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.graph.ir import Op, Param
from simcost.peft.base import register


def tokens_added(spec) -> int:
    return spec.num_virtual_tokens


@register("prompt")
def apply(g, model, spec) -> None:
    p = spec.num_virtual_tokens
    pro = g.segments[0]
    emb = next(op for op in pro.ops if op.kind == K.EMBEDDING)
    h = emb.outputs[0]
    ht = g.tensors[h]
    B, S_tot, d = ht.shape
    S = S_tot - p
    # the base embedding sees only the real tokens
    g.tensors[h].shape = (B, S, d)
    # peft expands one arange(p) over the batch: a (B, p) view of a p-element storage
    idx = g.new_tensor((B, p), "int64", view_of=g.new_tensor((p,), "int64", is_global=True))
    prompts = g.new_tensor((B, p, d), "fp32")
    dt = ht.dtype
    ops = [Op("prompt_encoder", "embedding", (idx,), (prompts,),
              (Param("prompt_encoder.default.embedding.weight", (p, d), "fp32", True, "adapter"),),
              {"adapter": True}, "prompt_encoder")]
    if dt != "fp32":
        c = g.new_tensor((B, p, d), dt)
        ops.append(Op("prompt_cast", "copy", (prompts,), (c,), (), {"adapter": True}, "prompt_encoder"))
        prompts = c
    cat = g.new_tensor((B, S_tot, d), dt)
    ops.append(Op("prompt_concat", "copy", (prompts, h), (cat,), (), {"adapter": True}, "prompt_encoder"))
    g.insert_after(pro, emb, ops, h, cat)
    # labels of the virtual tokens are -100 (ignored) but still pass through the loss
    head = g.segments[-1]
    loss = next(op for op in head.ops if op.kind == K.CROSS_ENTROPY)
    labels = g.new_tensor((B, S_tot), "int64", is_global=True)
    loss.inputs = (loss.inputs[0], labels)
