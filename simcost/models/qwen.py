"""Qwen (v1, ``QWenLMHeadModel``, remote code): fused c_attn with bias, RoPE, RMSNorm,
SwiGLU as ``w1(x) * silu(w2(x))`` with w1/w2 each intermediate_size/2 wide, untied head.

Qwen v1 needs ``trust_remote_code``, so torch cannot check it here; the ops follow the
published modeling_qwen.py (eager attention path).
"""
from __future__ import annotations

from simcost.graph.ir import ModelGraph, Segment
from simcost.models.attention import attention_core
from simcost.models.builder import SegmentBuilder
from simcost.models.config import ModelSpec


def build_qwen(spec: ModelSpec, g: ModelGraph, attn: str) -> None:
    B, S, dt = g.batch, g.seq, g.dtype
    d = spec.hidden

    pro = Segment("embed", [])
    g.segments.append(pro)
    b = SegmentBuilder(g, pro, "transformer.")
    ids = g.new_tensor((B, S), "int64", is_global=True)
    g.meta["input_ids"] = ids
    wte = b.param("wte", "weight", (spec.vocab, d), dt, "embedding")
    pro.output_tid = b.op("embedding", "wte", [ids], (B, S, d), dt, params=[wte], module="wte")
    cos = g.new_tensor((1, S, spec.head_dim), dt, is_global=True)
    sin = g.new_tensor((1, S, spec.head_dim), dt, is_global=True)

    blk = Segment("h", [], count=spec.layers, first_layer=0)
    g.segments.append(blk)
    b = SegmentBuilder(g, blk, "transformer.h.{i}.")
    x = g.new_tensor((B, S, d), dt)
    blk.input_tid = x
    n1 = b.norm("rms_norm", "ln_1", "ln_1", x, d, dt)
    qkv = b.linear("c_attn", "attn.c_attn", n1, d, 3 * spec.q_dim, spec.attn_bias, dt)
    q = b.op("view", "q_split", [qkv], (B, S, spec.q_dim), dt, view=True)
    k = b.op("view", "k_split", [qkv], (B, S, spec.q_dim), dt, view=True)
    v = b.op("view", "v_split", [qkv], (B, S, spec.q_dim), dt, view=True)
    ctx = attention_core(b, spec, q, k, v, attn, rope=(cos, sin))
    o = b.linear("c_proj", "attn.c_proj", ctx, spec.q_dim, d, spec.o_bias, dt)
    h1 = b.like("add", "attn_residual", [x, o])
    n2 = b.norm("rms_norm", "ln_2", "ln_2", h1, d, dt)
    a1 = b.linear("w1", "mlp.w1", n2, d, spec.ffn, spec.mlp_bias, dt)
    a2 = b.linear("w2", "mlp.w2", n2, d, spec.ffn, spec.mlp_bias, dt)
    act = b.like("silu", "act", [a2])
    prod = b.like("mul", "w1_mul_act", [a1, act])
    mo = b.linear("mlp_c_proj", "mlp.c_proj", prod, spec.ffn, d, spec.mlp_bias, dt)
    blk.output_tid = b.like("add", "mlp_residual", [h1, mo])

    head = Segment("head", [])
    g.segments.append(head)
    b = SegmentBuilder(g, head, "transformer.")
    xh = g.new_tensor((B, S, d), dt)
    head.input_tid = xh
    nf = b.norm("rms_norm", "ln_f", "ln_f", xh, d, dt)
    b.prefix = ""
    lm = [wte] if spec.tie_embeddings else [b.param("lm_head", "weight", (spec.vocab, d), dt)]
    logits = b.op("linear", "lm_head", [nf], (B, S, spec.vocab), dt, params=lm, module="lm_head")
    head.output_tid = b.op("cross_entropy", "loss", [logits, ids], (), "fp32", module="loss")
