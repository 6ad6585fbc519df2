"""The attention core shared by the decoder families: RoPE, GQA head repeat, and either the
eager path (two batched matmuls around an fp32 softmax, as transformers' ``eager`` does), a
fused kernel (``sdpa`` on CPU and GPU, ``flash``) that never materialises the s×s scores, or
SDPA's math fallback (CPU with attention dropout in training: GPT-2)."""
from __future__ import annotations

from simcost.costs.formulas import device_kind
from simcost.graph import kinds as K
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


UNIT_BATCH_LAYOUT = "unit_batch_layout"


def attention_core(b: SegmentBuilder, spec: ModelSpec, q: int, k: int, v: int, attn: str, *,
                   rope=None, dropout: float = 0.0, fused_qkv: bool = False) -> int:
    """Return the attention output (B, S, H·hd), ready for the output projection.

    ``q``/``k``/``v`` are the projection outputs (B, S, ·). Heads are split by a view with a
    transpose, so every tensor below keeps the (B, S, H, hd) memory layout until a kernel
    needs it contiguous: matmul's reshape then makes a copy (a new storage that autograd keeps)
    unless the batch is 1 (then the reshape is a view and autograd keeps the projection's
    storage). ``fused_qkv``: q, k, v are views of one (B, S, 3·d) projection output (GPT-2's c_attn).
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

    one = _is_one(B)
    if attn == "eager" or sdpa_uses_math(g, attn, dropout):
        # these paths lay a batch of one out differently (views, not copies): a graph built
        # for a batch vector prices its B == 1 points with the B > 1 layout
        g.meta[UNIT_BATCH_LAYOUT] = True
    core_from = len(b.seg.ops)   # the attention core (selective checkpointing recomputes it)
    if attn == "eager":
        # matmul folds (B, H) into bmm's batch with a reshape: a view when the operand is
        # contiguous in (B, H) (RoPE's output, a repeat_kv copy, or any operand when B == 1),
        # else a copy (head views of a projection keep the (B, S, H, hd) layout). What bmm
        # saves is that view (the base's storage) or that copy.
        if rep > 1 and (Hkv > 1 or not one):
            # repeat_kv: expand + reshape -> contiguous copy (with one KV head the reshape is
            # a stride-0 view and the copy happens in matmul's reshape instead: same bytes)
            kh = b.op("copy", "repeat_k", [kh], (B, H, S, hd), dt)
            vh = b.op("copy", "repeat_v", [vh], (B, H, S, hd), dt)
            kT = b.op("view", "k_transpose", [kh], (B, H, hd, S), dt, view=True)
            vc = vh
        else:
            if rep > 1:        # one KV head, B == 1: repeat_kv and matmul only make views
                kh = b.op("view", "repeat_k", [kh], (B, H, S, hd), dt, view=True)
                vh = b.op("view", "repeat_v", [vh], (B, H, S, hd), dt, view=True)
            if contiguous or one or rep > 1:
                kT = b.op("view", "k_transpose", [kh], (B, H, hd, S), dt, view=True)
            else:
                kT = b.op("copy", "k_contiguous", [kh], (B, H, hd, S), dt)
            # (named v_contiguous either way: prefix tuning re-shapes it by name)
            vc = b.op("view" if (one or rep > 1) else "copy", "v_contiguous", [vh],
                      (B, H, S, hd), dt, view=one or rep > 1)
        qc = qh if (contiguous or one) else b.op("copy", "q_contiguous", [qh], (B, H, S, hd), dt)
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
        ctx = _sdpa_math(b, qh, kh, vh, (B, H, Hkv, S, hd), dt, dropout, contiguous, one)
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
    _mark_core(b.seg.ops[core_from:])
    return b.op("view", "context_merge_heads", [ctx_c], (B, S, H * hd), dt, view=True)


def _mark_core(ops) -> None:
    """Mark the attention core that selective checkpointing recomputes: from QKᵀ (or the fused
    kernel) to the context. The layout copies before it (repeat_kv, the contiguous copies,
    the math path's upcasts and scales) stay outside: their outputs are the core's inputs,
    the tensors bmm saves anyway, so keeping them instead of the projections they view (a
    fused qkv output is 3x one of them) means selective checkpointing never keeps more than
    no checkpointing (Korthikanti et al. 2022 checkpoint the core from laid-out q, k, v)."""
    start = next(i for i, op in enumerate(ops) if op.kind in K.ATTENTION_MATMULS)
    for op in ops[start:]:
        op.attrs["attn_core"] = True


def _is_one(n) -> bool:
    """``n == 1`` for a plain int; a batch *vector* (a sweep) is built with the B > 1 layout."""
    try:
        return int(n) == 1
    except TypeError:
        return False


def _sdpa_math(b: SegmentBuilder, qh: int, kh: int, vh: int, dims, dt: str, dropout: float,
               contiguous: bool, one: bool) -> int:
    """aten ``_scaled_dot_product_attention_math`` as autograd sees it (torch 2.13):
    16-bit q/k/v are upcast to fp32 (the whole core then runs in fp32), q and kᵀ are each
    scaled by sqrt(scale), GQA repeats k/v (repeat_interleave), ``matmul(q, kᵀ)`` (its reshape
    copies a non-contiguous operand: that copy is what bmm saves), causal / padding bias added,
    ``_safe_softmax`` (keeps its output), ``dropout`` (keeps its mask), ``matmul(probs, v)``,
    and the result is cast back to the input dtype.

    The k and v upcasts are folded into the copy bmm needs (same storages saved, one kernel
    fewer), and the ops touching the key length carry the eager path's names (``repeat_k``,
    ``k_contiguous``, ``k_transpose``, ``scale``, ``v_contiguous``, ``scores``, ...) so prefix
    tuning can re-shape them to p + s keys."""
    B, H, Hkv, S, hd = dims
    cdt = "fp32" if dt in ("bf16", "fp16") else dt
    up = cdt != dt
    # ``contiguous``: q and k come from RoPE; v is a head view. With B == 1 every operand
    # folds into bmm's batch as a view (see attention_core).
    q_view = contiguous or one
    if up:   # .to(float) keeps the strides
        qh = b.like("copy", "sdpa_math.q_upcast", [qh], cdt)
    qs = b.like("scale", "sdpa_math.q_scale", [qh])
    qc = qs if q_view else b.like("copy", "q_contiguous", [qs])
    if H != Hkv:    # enable_gqa: repeat_interleave (expand + clone: contiguous copies)
        kh = b.op("copy", "repeat_k", [kh], (B, H, S, hd), cdt)
        vc = b.op("copy", "repeat_v", [vh], (B, H, S, hd), cdt)
        kT = b.op("view", "k_transpose", [kh], (B, H, hd, S), cdt, view=True)
    else:
        if q_view:  # kᵀ·s keeps k's (contiguous) strides: bmm reads it as a view
            kT = b.op("view", "k_transpose", [kh], (B, H, hd, S), dt, view=True)
        else:       # kᵀ·s keeps the head view's strides: matmul's reshape copies it
            kT = b.op("copy", "k_contiguous", [kh], (B, H, hd, S), cdt)
        if one and not up:
            vc = b.op("view", "v_contiguous", [vh], (B, H, S, hd), dt, view=True)
        else:       # the upcast copy (B == 1) or matmul's copy of the head view
            vc = b.op("copy", "v_contiguous", [vh], (B, H, S, hd), cdt)
    kT = b.like("scale", "scale", [kT], cdt)
    scores = b.op("matmul", "scores", [qc, kT], (B, H, S, S), cdt)
    masked = b.like("add", "causal_mask", [scores])
    probs = b.like("softmax", "softmax", [masked])
    probs = b.dropout("attn_dropout", probs, dropout)
    if up:   # the (discarded) attention-weights output, cast back: transient
        b.like("copy", "probs_cast", [probs], dt)
    ctx = b.op("matmul", "context", [probs, vc], (B, H, S, hd), cdt)
    if up:
        ctx = b.like("copy", "sdpa_math.downcast", [ctx], dt)
    return ctx
