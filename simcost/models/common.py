"""Pieces every decoder family shares: the token embedding, RoPE tables, and the head
(final norm → LM head → the shifted token cross-entropy)."""
from __future__ import annotations

from simcost.graph.ir import ModelGraph, Param, Segment
from simcost.models.builder import SegmentBuilder
from simcost.models.config import ModelSpec


def embed_segment(g: ModelGraph, spec: ModelSpec, prefix: str, module: str):
    """The prologue segment with the token embedding; returns (builder, ids, weight, hidden)."""
    pro = Segment("embed", [])
    g.segments.append(pro)
    b = SegmentBuilder(g, pro, prefix)
    ids = g.new_tensor((g.batch, g.seq), "int64", is_global=True)
    g.meta["input_ids"] = ids
    weight = b.param(module, "weight", (spec.vocab, spec.hidden), g.dtype, "embedding")
    h = b.op("embedding", module, [ids], (g.batch, g.seq, spec.hidden), g.dtype, params=[weight],
             module=module)
    pro.output_tid = h
    return b, ids, weight, h


def rope_tables(g: ModelGraph, spec: ModelSpec):
    """cos/sin are computed once per forward and shared by every layer."""
    cos = g.new_tensor((1, g.seq, spec.head_dim), g.dtype, is_global=True)
    sin = g.new_tensor((1, g.seq, spec.head_dim), g.dtype, is_global=True)
    g.meta["rope"] = (cos, sin)
    return cos, sin


def head_segment(g: ModelGraph, spec: ModelSpec, *, norm_kind: str, norm_prefix: str,
                 norm_module: str, norm_bias: bool, embedding: Param, ids: int) -> None:
    """Final norm, LM head (tied to ``embedding`` when the config says so) and the loss."""
    head = Segment("head", [])
    g.segments.append(head)
    b = SegmentBuilder(g, head, norm_prefix)
    x = g.new_tensor((g.batch, g.seq, spec.hidden), g.dtype)
    head.input_tid = x
    normed = b.norm(norm_kind, norm_module, norm_module, x, spec.hidden, g.dtype, bias=norm_bias)
    b.prefix = ""
    params = [embedding] if spec.tie_embeddings else \
        [b.param("lm_head", "weight", (spec.vocab, spec.hidden), g.dtype)]
    logits = b.op("linear", "lm_head", [normed], (g.batch, g.seq, spec.vocab), g.dtype,
                  params=params, module="lm_head", attrs={"tied": spec.tie_embeddings})
    head.output_tid = b.op("cross_entropy", "loss", [logits, ids], (), "fp32", module="loss")
