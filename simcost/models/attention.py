"""The attention core shared by the decoder families: RoPE, GQA head repeat, and either the
eager path (two batched matmuls around an fp32 softmax, as transformers' ``eager`` does) or a
fused kernel (``sdpa`` on CPU and GPU, ``flash``) that never materialises the s×s scores."""
from __future__ import annotations

from simcost.costs.formulas import device_kind
from simcost.models.builder import SegmentBuilder
from simcost.models.config import ModelSpec


def sdpa_uses_math(g, attn: str, dropout: float) -> bool:
    """Whether ``F.scaled_dot_product_attention`` falls back to its math path.

    On CPU the flash kernel (``_scaled_dot_product_flash_attention_for_cpu``) rejects
    ``dropout_p > 0`` (sdp_utils_cpp ``check_for_dropout``), so a training step of a model with
    attention dropout (GPT-2's ``attn_pdrop``, which transformers passes as ``dropout`` while
    training) runs ``_scaled_dot_product_attention_math``. CUDA's flash / memory-efficient
    kernels handle dropout themselves."""
    return attn == "sdpa" and dropout > 0 and device_kind(g) == "cpu"


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
    contiguous = False                 # q/k keep the projection's (B, S, H, hd) layout
    if rope is not None:
        cos, sin = rope
        qh = b.op("rope", "rope_q", [qh, cos, sin], (B, H, S, hd), dt)
        kh = b.op("rope", "rope_k", [kh, cos, sin], (B, Hkv, S, hd), dt)
        contiguous = True              # RoPE's output is a fresh contiguous (B, H, S, hd)

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
    elif sdpa_uses_math(g, attn, dropout):
        ctx = _sdpa_math(b, qh, kh, vh, (B, H, Hkv, S, hd), dt, dropout, contiguous)
        # transformers: attn_output.transpose(1, 2).contiguous() -> a copy
        ctx_t = b.op("view", "context_transpose", [ctx], (B, S, H, hd), dt, view=True)
        ctx_c = b.op("copy", "context_contiguous", [ctx_t], (B, S, H, hd), dt)
    else:
        kind = "sdpa"
        ctx = b.op(kind, "sdpa" if attn == "sdpa" else "flash_attention", [qh, kh, vh],
                   (B, H, S, hd), dt, attrs={"impl": attn, "causal": True, "dropout": dropout})
        # the fused kernels write (B, S, H, hd)-laid-out output, so transformers'
        # transpose(1, 2).contiguous() is a no-op
        ctx_c = b.op("view", "context_transpose", [ctx], (B, S, H, hd), dt, view=True)
    return b.op("view", "context_merge_heads", [ctx_c], (B, S, H * hd), dt, view=True)


def _sdpa_math(b: SegmentBuilder, qh: int, kh: int, vh: int, dims, dt: str, dropout: float,
               contiguous: bool) -> int:
    """aten ``_scaled_dot_product_attention_math`` as autograd sees it (torch 2.13):
    16-bit q/k/v are upcast to fp32 (the whole core then runs in fp32), q and k are each scaled
    by sqrt(scale), GQA repeats k/v (repeat_interleave), ``matmul(q, kᵀ)`` (its reshape copies
    a non-contiguous operand: that copy is what bmm saves), causal bias added,
    ``_safe_softmax`` (keeps its output), ``dropout`` (keeps its mask), ``matmul(probs, v)``,
    and the result is cast back to the input dtype."""
    g = b.g
    B, H, Hkv, S, hd = dims
    cdt = "fp32" if dt in ("bf16", "fp16") else dt
    if cdt != dt:   # .to(float) keeps the strides
        qh = b.like("copy", "sdpa_math.q_upcast", [qh], cdt)
        kh = b.like("copy", "sdpa_math.k_upcast", [kh], cdt)
        vh = b.like("copy", "sdpa_math.v_upcast", [vh], cdt)
    # ``contiguous``: q and k come from RoPE (contiguous); v is always a head view
    k_contig, v_contig = contiguous, False
    qs = b.like("scale", "sdpa_math.q_scale", [qh])
    if H != Hkv:    # enable_gqa: repeat_interleave (expand + clone: contiguous copies)
        kh = b.op("copy", "sdpa_math.repeat_k", [kh], (B, H, S, hd), cdt)
        vh = b.op("copy", "sdpa_math.repeat_v", [vh], (B, H, S, hd), cdt)
        k_contig = v_contig = True
    ks = b.like("scale", "sdpa_math.k_scale", [kh])   # mul keeps the (transposed) strides
    qc = qs if contiguous else b.like("copy", "sdpa_math.q_contiguous", [qs])
    if k_contig:
        kT = b.op("view", "sdpa_math.k_transpose", [ks], (B, H, hd, S), cdt, view=True)
    else:
        kT = b.op("copy", "sdpa_math.k_contiguous", [ks], (B, H, hd, S), cdt)
    vc = vh if v_contig else b.like("copy", "sdpa_math.v_contiguous", [vh])
    scores = b.op("matmul", "sdpa_math.scores", [qc, kT], (B, H, S, S), cdt)
    masked = b.like("add", "sdpa_math.causal_mask", [scores])
    probs = b.like("softmax", "sdpa_math.softmax", [masked])
    probs = b.dropout("sdpa_math.dropout", probs, dropout)
    if cdt != dt:   # the (discarded) attention-weights output, cast back: transient
        b.like("copy", "sdpa_math.weights_downcast", [probs], dt)
    ctx = b.op("matmul", "sdpa_math.context", [probs, vc], (B, H, S, hd), cdt)
    if cdt != dt:
        ctx = b.like("copy", "sdpa_math.downcast", [ctx], dt)
    return ctx
