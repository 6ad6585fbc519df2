"""GPT-2 as transformers computes it: learned positions, pre-LayerNorm blocks, fused c_attn
(Conv1D), GELU (python tanh form), dropout after embeddings, attention probabilities and both
residual branches, tied LM head."""
from __future__ import annotations

from simcost.graph.ir import ModelGraph, Segment
from simcost.models.attention import attention_core
from simcost.models.builder import SegmentBuilder
from simcost.models.common import embed_segment, head_segment
from simcost.models.config import ModelSpec


def build_gpt2(spec: ModelSpec, g: ModelGraph, attn: str) -> None:
    B, S, dt = g.batch, g.seq, g.dtype
    d = spec.hidden

    b, ids, wte, tok = embed_segment(g, spec, "transformer.", "wte")
    pro = b.seg
    pos = g.new_tensor((1, S), "int64", is_global=True)
    pe = b.op("embedding", "wpe", [pos], (1, S, d), dt,
              params=[b.param("wpe", "weight", (spec.max_positions, d), dt, "embedding")], module="wpe")
    h = b.op("add", "embed_sum", [tok, pe], (B, S, d), dt)
    pro.output_tid = b.dropout("embd_dropout", h, spec.dropout_embd)

    blk = Segment("h", [], count=spec.layers, first_layer=0)
    g.segments.append(blk)
    b = SegmentBuilder(g, blk, "transformer.h.{i}.")
    x = g.new_tensor((B, S, d), dt)
    blk.input_tid = x
    n1 = b.norm("layer_norm", "ln_1", "ln_1", x, d, dt, bias=True)
    qkv = b.linear("c_attn", "attn.c_attn", n1, d, 3 * d, True, dt)
    q = b.op("view", "q_split", [qkv], (B, S, d), dt, view=True)
    k = b.op("view", "k_split", [qkv], (B, S, d), dt, view=True)
    v = b.op("view", "v_split", [qkv], (B, S, d), dt, view=True)
    ctx = attention_core(b, spec, q, k, v, attn, dropout=spec.dropout_attn)
    o = b.linear("c_proj", "attn.c_proj", ctx, d, d, True, dt)
    o = b.dropout("resid_dropout", o, spec.dropout_resid)
    h1 = b.like("add", "attn_residual", [x, o])
    n2 = b.norm("layer_norm", "ln_2", "ln_2", h1, d, dt, bias=True)
    fc = b.linear("c_fc", "mlp.c_fc", n2, d, spec.ffn, True, dt)
    act = b.like("gelu_new" if spec.act == "gelu_new" else "gelu", "act", [fc])
    mo = b.linear("mlp_c_proj", "mlp.c_proj", act, spec.ffn, d, True, dt)
    mo = b.dropout("mlp_dropout", mo, spec.dropout_resid)
    blk.output_tid = b.like("add", "mlp_residual", [h1, mo])

    head_segment(g, spec, norm_kind="layer_norm", norm_prefix="transformer.", norm_module="ln_f",
                 norm_bias=True, embedding=wte, ids=ids)
