"""Qwen (v1, ``QWenLMHeadModel``, remote code): fused c_attn with bias, RoPE, RMSNorm,
SwiGLU as ``w1(x) * silu(w2(x))`` with w1/w2 each intermediate_size/2 wide, untied head.

Qwen v1 needs ``trust_remote_code``, so torch cannot check it here; the ops follow the
published modeling_qwen.py (eager attention path).
"""
from __future__ import annotations

from simcost.graph.ir import ModelGraph, Segment
from simcost.models.attention import attention_core
from simcost.models.builder import SegmentBuilder
from simcost.models.common import embed_segment, head_segment, rope_tables
from simcost.models.config import ModelSpec


def build_qwen(spec: ModelSpec, g: ModelGraph, attn: str) -> None:
    B, S, dt = g.batch, g.seq, g.dtype
    d = spec.hidden

    _, ids, wte, _ = embed_segment(g, spec, "transformer.", "wte")
    cos, sin = rope_tables(g, spec)

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

    head_segment(g, spec, norm_kind="rms_norm", norm_prefix="transformer.", norm_module="ln_f",
                 norm_bias=False, embedding=wte, ids=ids)
