"""Llama-family decoders as HF transformers computes them: Llama, Mistral, Qwen2, Mixtral.

Op for op the graph follows ``modeling_llama.py`` (transformers 5): RMSNorm in fp32,
q/k/v projections, RoPE, eager attention (scores, fp32 softmax, values) or a fused SDPA/flash
kernel, o_proj, SwiGLU MLP (or Mixtral's routed experts), final norm, LM head and the shifted
token cross-entropy.
"""
from __future__ import annotations

from simcost.graph.ir import ModelGraph, Segment
from simcost.models.attention import attention_core
from simcost.models.builder import SegmentBuilder
from simcost.models.common import embed_segment, head_segment, rope_tables
from simcost.models.config import ModelSpec


def build_llama(spec: ModelSpec, g: ModelGraph, attn: str) -> None:
    B, S, dt = g.batch, g.seq, g.dtype
    d = spec.hidden

    _, ids, emb_param, _ = embed_segment(g, spec, "model.", "embed_tokens")
    cos, sin = rope_tables(g, spec)

    blk = Segment("layers", [], count=spec.layers, first_layer=0)
    g.segments.append(blk)
    b = SegmentBuilder(g, blk, "model.layers.{i}.")
    x = g.new_tensor((B, S, d), dt)
    blk.input_tid = x
    n1 = b.norm("rms_norm", "input_layernorm", "input_layernorm", x, d, dt)
    q = b.linear("q_proj", "self_attn.q_proj", n1, d, spec.q_dim, spec.attn_bias, dt)
    k = b.linear("k_proj", "self_attn.k_proj", n1, d, spec.kv_dim, spec.attn_bias, dt)
    v = b.linear("v_proj", "self_attn.v_proj", n1, d, spec.kv_dim, spec.attn_bias, dt)
    ctx = attention_core(b, spec, q, k, v, attn, rope=(cos, sin), dropout=spec.dropout_attn)
    o = b.linear("o_proj", "self_attn.o_proj", ctx, spec.q_dim, d, spec.o_bias, dt)
    h1 = b.like("add", "attn_residual", [x, o])
    n2 = b.norm("rms_norm", "post_attention_layernorm", "post_attention_layernorm", h1, d, dt)
    if spec.experts:
        mlp = _moe(b, spec, n2, dt)
    else:
        gate = b.linear("gate_proj", "mlp.gate_proj", n2, d, spec.ffn, spec.mlp_bias, dt)
        act = b.like("silu", "act_fn", [gate])
        up = b.linear("up_proj", "mlp.up_proj", n2, d, spec.ffn, spec.mlp_bias, dt)
        prod = b.like("mul", "gate_mul_up", [act, up])
        mlp = b.linear("down_proj", "mlp.down_proj", prod, spec.ffn, d, spec.mlp_bias, dt)
    blk.output_tid = b.like("add", "mlp_residual", [h1, mlp])

    head_segment(g, spec, norm_kind="rms_norm", norm_prefix="model.", norm_module="norm",
                 norm_bias=False, embedding=emb_param, ids=ids)


def _moe(b: SegmentBuilder, spec: ModelSpec, x: int, dt: str) -> int:
    """Mixtral sparse MoE block: router linear, softmax/top-k, routed experts."""
    g = b.g
    d = spec.hidden
    shape = g.tensors[x].shape
    tokens = shape[0] * shape[1]
    flat = b.op("view", "moe_flatten", [x], (tokens, d), dt, view=True)
    logits = b.linear("router", "mlp.gate", flat, d, spec.experts, False, dt)
    weights = b.op("moe_router", "router_topk", [logits], (tokens, spec.top_k), "fp32",
                   attrs={"top_k": spec.top_k})
    params = [b.param("mlp.experts", "gate_up_proj", (spec.experts, 2 * spec.ffn, d), dt),
              b.param("mlp.experts", "down_proj", (spec.experts, d, spec.ffn), dt)]
    y = b.op("moe_experts", "experts", [flat, weights], (tokens, d), dt, params=params,
             module="mlp.experts", attrs={"top_k": spec.top_k})
    return b.op("view", "moe_unflatten", [y], shape, dt, view=True)
