"""The attention core shared by the decoder families: RoPE, GQA head repeat, and either the
eager path (two batched matmuls around an fp32 softmax, as transformers' ``eager`` does) or a
fused kernel (``sdpa`` on CPU and GPU, ``flash``) that never materialises the s×s scores."""
from __future__ import annotations

from simcost.models.builder import SegmentBuilder
from simcost.models.config import ModelSpec


def attention_core(b: SegmentBuilder, spec: ModelSpec, q: int, k: int, v: int, attn: str, *,
                   rope=None, dropout: float = 0.0, fused_qkv: bool = False) -> int:
    """Return the attention output (B, S, H·hd), ready for the output projection.

    ``q``/``k``/``v`` are the projection outputs (B, S, ·). Heads are split by a view with a
    transpose, so every tensor below keeps the (B, S, H, hd) memory layout until a kernel
    needs it contiguous: matmul's reshape then makes a copy (a new storage that autograd keeps).
    ``fused_qkv``: q, k, v are views of one (B, S, 3·d) projection output (GPT-2's c_attn).
    """
    g = b.g
    dt = g.tensors[q].dtype
    B, S = g.tensors[q].shape[:2]
    H, Hkv, hd = spec.heads, spec.kv_heads, spec.head_dim
    rep = H // Hkv
    qh = b.op("view", "q_heads", [q], (B, H, S, hd), dt, view=True)
    kh = b.op("view", "k_heads", [k], (B, Hkv, S, hd), dt, view=True)
    vh = b.op("view", "v_heads", [v], (B, Hkv, S, hd), dt, view=True)
    if rope is not None:
        cos, sin = rope
        qh = b.op("rope", "rope_q", [qh, cos, sin], (B, H, S, hd), dt)
        kh = b.op("rope", "rope_k", [kh, cos, sin], (B, Hkv, S, hd), dt)

    if attn == "eager":
        # repeat_kv: expand + reshape of a (B,S,H,hd)-laid-out tensor -> contiguous copy
        if rep > 1:
            kh = b.op("copy", "repeat_k", [kh], (B, H, S, hd), dt)
            vh = b.op("copy", "repeat_v", [vh], (B, H, S, hd), dt)
            kT = b.op("view", "k_transpose", [kh], (B, H, hd, S), dt, view=True)
            vc = vh
        else:
            kT = b.op("copy", "k_contiguous", [kh], (B, H, hd, S), dt)
            vc = b.op("copy", "v_contiguous", [vh], (B, H, S, hd), dt)
        qc = b.op("copy", "q_contiguous", [qh], (B, H, S, hd), dt)
        scores = b.op("matmul", "scores", [qc, kT], (B, H, S, S), dt)
        scaled = b.like("scale", "scale", [scores])
        masked = b.like("add", "causal_mask", [scaled])
        if dt != "fp32" and spec.family != "gpt2":
            masked = b.like("copy", "softmax_upcast", [masked], "fp32")
        probs = b.like("softmax", "softmax", [masked])
        if g.tensors[probs].dtype != dt:
            probs = b.like("copy", "probs_cast", [probs], dt)
        probs = b.dropout("attn_dropout", probs, dropout)
        ctx = b.op("matmul", "context", [probs, vc], (B, H, S, hd), dt)
        ctx_t = b.op("view", "context_transpose", [ctx], (B, S, H, hd), dt, view=True)
        ctx_c = b.op("copy", "context_contiguous", [ctx_t], (B, S, H, hd), dt)
    else:
        kind = "sdpa"
        ctx = b.op(kind, "sdpa" if attn == "sdpa" else "flash_attention", [qh, kh, vh],
                   (B, H, S, hd), dt, attrs={"impl": attn, "causal": True})
        ctx_c = b.op("view", "context_transpose", [ctx], (B, S, H, hd), dt, view=True)
    return b.op("view", "context_merge_heads", [ctx_c], (B, S, H * hd), dt, view=True)
