"""Cost formulas of the fused kernels training stacks run (the op kinds that
:mod:`simcost.stack.fusions` makes out of eager patterns).

Each follows its kernel's source: what ``ctx.save_for_backward`` keeps, how many kernels one
call launches each way, what the kernels read and write. Matmul FLOPs are the eager pattern's
(the same GEMMs run); element-wise FLOPs are counted as the eager ops count them. Shapes may be
numpy arrays (a batch x sequence sweep): every formula stays vectorised.
"""
from __future__ import annotations

import numpy as np

from simcost.costs.registry import OpCost, cost_of, register
from simcost.dtypes import BYTES
from simcost.graph import kinds as K
from simcost.graph.ir import numel


def _t(g, tid):
    return g.tensors[tid]


@register(K.RMS_NORM_FUSED)
def rms_norm_fused(op, g, rg, train):
    """One RMSNorm kernel each way; ``attrs['weight_grad']`` says how its weight gradient is
    made.

    - Liger ``LigerRMSNormFunction`` (ops/rms_norm.py, casting_mode 'llama'): forward one
      Triton kernel writing y and the fp32 rstd per row; ``save_for_backward(X, W, RSTD)``:
      the input itself (no fp32 copy) and rows x 4 bytes. Backward one kernel writing dX over
      dY, per-SM fp32 dW partials, then ``_dW.sum(dim=0).to(W.dtype)``: 2 more kernels (1 when W
      is fp32), whether or not W is trainable (``weight_grad='always'``). TransformerEngine's
      RMSNorm does the same (one kernel + the dgamma reduction).
    - Unsloth ``Fast_RMS_Layernorm`` (kernels/rms_layernorm.py): the same forward and saved
      tensors (X, W, r fp32), backward one kernel writing dX into dY and no weight gradient
      (``weight_grad='none'``: it returns None for W).
    """
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    n = numel(x.shape)
    h = x.shape[-1]
    rows = n / h
    w = op.params[0] if op.params else None
    w_bytes = w.nbytes if w is not None else 0
    cost = OpCost(fwd_flops=4 * n, fwd_bytes=x.nbytes + y.nbytes + w_bytes + rows * 4,
                  fwd_kernels=1)
    w_train = bool(train and train[0])
    if not (rg[0] or w_train):
        return cost
    cost.saved = [op.inputs[0], ("new", rows * 4)]
    # one kernel: reads dY, X, rstd, W; writes dX (over dY)
    cost.bwd_act_flops = 8 * n
    cost.bwd_bytes = 3 * x.nbytes + rows * 4 + w_bytes
    cost.bwd_kernels = 1
    if w is not None and op.attrs.get("weight_grad") == "always":
        cost.bwd_weight_flops = 2 * n
        cost.bwd_kernels += 1 + (1 if w.dtype != "fp32" else 0)
        cost.bwd_bytes += 2 * w_bytes
    return cost


@register(K.ROPE_FUSED)
def rope_fused(op, g, rg, train):
    """RoPE on ``attrs['tensors']`` tensors (q and k, or one) in one kernel, in place.

    Inputs: the tensors, then cos and sin. Liger ``LigerRopeFunction`` (ops/rope.py) rotates q
    and k in one launch over (batch x seq) rows and ``save_for_backward(cos, sin)``; its
    backward is the same kernel rotating dq, dk by -θ (one launch). Unsloth
    ``Fast_RoPE_Embedding`` (kernels/rope_embedding.py) and TransformerEngine's fused RoPE
    take one tensor per call: one kernel each way per tensor. Bytes: each tensor read and
    written once, cos and sin read once per launch."""
    m = op.attrs.get("tensors", 1)
    xs = [_t(g, t) for t in op.inputs[:m]]
    cos, sin = _t(g, op.inputs[m]), _t(g, op.inputs[m + 1])
    n = 0
    data = 0
    for x in xs:
        n = n + numel(x.shape)
        data = data + 2 * x.nbytes
    tables = cos.nbytes + sin.nbytes
    cost = OpCost(fwd_flops=3 * n, fwd_bytes=data + tables, fwd_kernels=1)
    if any(rg[:m]):
        cost.saved = [op.inputs[m], op.inputs[m + 1]]
        cost.bwd_act_flops = 3 * n
        cost.bwd_bytes = data + tables
        cost.bwd_kernels = 1
    return cost


@register(K.SWIGLU_FUSED)
def swiglu_fused(op, g, rg, train):
    """``silu(a) * b`` in one kernel (Liger ``LigerSiLUMulFunction``, ops/swiglu.py; Unsloth
    ``swiglu_fg_kernel`` / ``swiglu_DWf_DW_dfg_kernel``, kernels/swiglu.py; Megatron
    ``fused_bias_swiglu``). Inputs: gate output a, up output b.

    Saves a and b only (``save_for_backward(a, b)``): silu(a) is recomputed in backward, where
    one kernel reads dc, a, b and writes da, db (over a and b). Eager silu + mul keep a,
    silu(a) and b. With ``g.meta["fp8_activation_store"]`` (Megatron
    ``megatron/core/fusions/fused_bias_swiglu.py``, ``fp8_input_store=True``: the forward
    saves ``input.to(torch.float8_e4m3fn)`` and the backward casts it back) a and b are kept
    as one-byte copies written by the forward kernel."""
    a, b = _t(g, op.inputs[0]), _t(g, op.inputs[1])
    c = _t(g, op.outputs[0])
    n = numel(c.shape)
    cost = OpCost(fwd_flops=6 * n, fwd_bytes=a.nbytes + b.nbytes + c.nbytes, fwd_kernels=1,
                  special_fwd={"exp": n})
    if rg[0] or rg[1]:
        cost.saved = [op.inputs[0], op.inputs[1]]
        if g.meta.get("fp8_activation_store"):
            na, nb = numel(a.shape), numel(b.shape)
            cost.saved = [("new", na), ("new", nb)]          # float8_e4m3fn: 1 byte each
            cost.fwd_bytes = cost.fwd_bytes + na + nb
        cost.bwd_act_flops = 10 * n
        cost.bwd_bytes = c.nbytes + 2 * (a.nbytes + b.nbytes)
        cost.bwd_kernels = 1
        cost.special_bwd = {"exp": n}
    return cost


def lce_chunks(tokens, vocab: int, hidden: int):
    """Liger's token chunking (ops/fused_linear_cross_entropy.py): ``inc_factor =
    cdiv(V, H)``, ``chunk_size = min(next_power_of_2(cdiv(BT, inc_factor)), BT)``,
    ``num_chunks = cdiv(BT, chunk_size)``: the transient logits stay about BT x H elements.
    Returns (chunk_size, num_chunks), vectorised over ``tokens``."""
    bt = np.asarray(tokens, dtype=np.float64)
    inc = -(-vocab // hidden)
    per = np.ceil(bt / inc)
    chunk = np.minimum(2.0 ** np.ceil(np.log2(np.maximum(per, 1))), bt)
    n = np.ceil(bt / chunk)
    if chunk.ndim == 0:
        return float(chunk), float(n)
    return chunk, n


def _head(op, g):
    """A fused head's hidden states, weight, vocabulary, width, tokens and weight bytes read."""
    x = _t(g, op.inputs[0])
    w = op.params[0]
    vocab, h = w.shape
    return x, w, vocab, h, numel(x.shape) / h, w.numel * BYTES[w.compute_dtype or w.dtype]


@register(K.LINEAR_CROSS_ENTROPY)
def linear_cross_entropy(op, g, rg, train):
    """Liger ``LigerFusedLinearCrossEntropyFunction`` (ops/fused_linear_cross_entropy.py):
    the LM head and the loss in chunks of tokens, gradients made in the forward.

    Inputs: hidden states (BT x H), labels. Param: the head weight W (V x H). Per chunk of
    :func:`lce_chunks` tokens: ``x_chunk @ W.T`` into a (chunk x V) logits buffer (input
    dtype), the cross-entropy kernel writing the loss and, in place, the logits gradient, then
    ``grad_input[chunk] = dlogits @ W`` and, with a trainable W, ``grad_weight.addmm_``. So
    the three GEMMs of eager lm_head forward + backward all run in the forward (the same
    matmul FLOPs), and ``save_for_backward(grad_input, grad_weight)`` keeps BT x H (input
    dtype) plus V x H (W's dtype) when W is trainable: never the logits, nor the input. The
    backward only scales them by the loss gradient (``element_mul_kernel`` on grad_input and
    grad_weight; run unless grad_output is exactly 1.0: HF's loss / num_items_in_batch makes
    it not).

    Kernels forward: grad_input / grad_weight / loss_1d zeros, the ``target != ignore_index``
    mask and its sum (``.item()``), per chunk 2 (mm, CE) + 1 per gradient GEMM, the loss sum;
    the transformers wrapper's label shift (pad, contiguous slice) and ``/ num_items``.
    The CE kernel's traffic (3 x chunk x V) is priced as overlapping the GEMMs of its phase.
    """
    x, w, vocab, h, bt, w_bytes = _head(op, g)
    eb = BYTES[x.dtype]
    chunk, nch = lce_chunks(bt, vocab, h)
    logits = bt * vocab
    mm = 2 * bt * h * vocab
    # the forward makes gradients only when the input requires one (``input_requires_grad``
    # gates grad_weight too)
    w_train = bool(train and train[0]) and bool(rg[0])
    grads = int(bool(rg[0])) + int(w_train)
    per = bt / chunk                 # chunk GEMMs in sequence (the last one may be partial)
    gemms = [(per, chunk, vocab, h)]
    fbytes = nch * w_bytes + x.nbytes + 3 * logits * eb        # logits GEMM + CE in place
    if rg[0]:
        gemms.append((per, chunk, h, vocab))                   # grad_input = dlogits @ W
        fbytes = fbytes + logits * eb + nch * w_bytes + x.nbytes
    if w_train:
        gemms.append((per, vocab, h, chunk))                   # grad_weight += dlogitsᵀ @ x
        fbytes = fbytes + logits * eb + x.nbytes + 2 * nch * w.nbytes
    cost = OpCost(fwd_flops=mm * (1 + grads) + 9 * logits, fwd_matmul_flops=mm * (1 + grads),
                  fwd_bytes=fbytes + bt * (4 + 1 + 8),
                  fwd_kernels=4 + int(w_train) + nch * (2 + grads) + 1 + 3,
                  gemms_fwd=gemms, special_fwd={"exp": 2 * logits})
    if grads:
        cost.saved = []
        if rg[0]:
            cost.saved.append(("new", x.nbytes))
        if w_train:
            cost.saved.append(("new", w.nbytes))
        cost.bwd_act_flops = numel(x.shape) if rg[0] else 0
        cost.bwd_weight_flops = w.numel if w_train else 0
        cost.bwd_bytes = 2 * (x.nbytes if rg[0] else 0) + 2 * (w.nbytes if w_train else 0)
        cost.bwd_kernels = grads
    return cost


def lce_transient_bytes(op, g):
    """Bytes above the saved tensors while Liger's fused linear + cross-entropy runs: one
    chunk's logits (chunk x V in the input dtype; the CE kernel writes the gradient over them)
    plus the fp32 per-token loss and the bool ``target != ignore_index`` mask. The backward
    only scales the saved gradients in place."""
    x = _t(g, op.inputs[0])
    vocab, h = op.params[0].shape
    bt = numel(x.shape) / h
    chunk, _ = lce_chunks(bt, vocab, h)
    return chunk * vocab * BYTES[x.dtype] + bt * (4 + 1)


def _lse_chunks(vocab: int) -> int:
    """Unsloth's ``Fast_CrossEntropyLoss``: vocabularies above MAX_FUSED_SIZE = 65536 are
    reduced in ceil(V / 65536) column chunks, each writing its own logsumexp."""
    return -(-vocab // 65536)


@register(K.CROSS_ENTROPY_INPLACE)
def cross_entropy_inplace(op, g, rg, train):
    """Unsloth ``fast_cross_entropy_loss`` (kernels/cross_entropy_loss.py): the logits stay
    in their dtype (no fp32 copy); the forward kernel writes the fp32 loss and logsumexp per
    row, and ``save_for_backward(logits, logsumexp, labels)`` keeps the logits themselves
    (the LM head's output storage), the fp32 logsumexp (rows) and the shifted int64 labels;
    the final ``loss.sum() / n_items`` keeps the int64 count.
    The backward kernel writes the gradient into the logits buffer and returns it: no
    log-probabilities, no separate gradient.

    Kernels forward: the shifted labels (empty_like + 2 slice copies), the CE kernel (V <=
    65536) or the chunked kernel + ``torch.logsumexp`` + ``losses +=`` + the ``labels ==
    -100`` mask and ``masked_fill_``; then ``loss.sum()``, ``count_nonzero(labels != -100)``
    and the division. Backward: the division's gradient, one CE kernel."""
    logits, labels = _t(g, op.inputs[0]), _t(g, op.inputs[1])
    n = numel(logits.shape)
    rows = numel(labels.shape)
    ch = _lse_chunks(logits.shape[-1])
    ce_k = 1 if ch == 1 else 5
    cost = OpCost(fwd_flops=5 * n, fwd_bytes=logits.nbytes + rows * (4 + 4 * ch + 8 * 2),
                  fwd_kernels=3 + ce_k + 4, special_fwd={"exp": n})
    if rg[0]:
        # + the int64 item count ``loss.sum() / n_items`` keeps (a 0-d tensor)
        cost.saved = [op.inputs[0], ("new", rows * 4), ("new", rows * 8), ("new", 8)]
        cost.bwd_act_flops = 4 * n
        cost.bwd_bytes = 2 * logits.nbytes + rows * (4 + 8)
        cost.bwd_kernels = 2
        cost.special_bwd = {"exp": n}
    return cost


def ce_inplace_transient_bytes(op, g):
    """Above the saved tensors (which hold the logits): the fp32 per-row losses and, for a
    vocabulary above 65536, the (rows x chunks) fp32 partial logsumexps."""
    labels = _t(g, op.inputs[1])
    rows = numel(labels.shape)
    ch = _lse_chunks(_t(g, op.inputs[0]).shape[-1])
    return rows * 4 + (rows * ch * 4 if ch > 1 else 0)


def fused_loss_transient(op, g):
    """Bytes above the saved tensors at a fused loss's worst instant (the loss op of the
    head: :data:`simcost.graph.kinds.LINEAR_CROSS_ENTROPY`, ``CUT_CROSS_ENTROPY`` or
    ``CROSS_ENTROPY_INPLACE``)."""
    if op.kind == K.LINEAR_CROSS_ENTROPY:
        return lce_transient_bytes(op, g)
    if op.kind == K.CUT_CROSS_ENTROPY:
        return cce_transient_bytes(op, g)
    return ce_inplace_transient_bytes(op, g)


@register(K.CUT_CROSS_ENTROPY)
def cut_cross_entropy(op, g, rg, train):
    """Cut cross-entropy (Wijmans et al. 2024, arXiv 2411.09009; apple/ml-cross-entropy
    ``cut_cross_entropy.linear_cross_entropy``, which unsloth_zoo's
    ``fused_linear_cross_entropy`` calls): the LM head and the loss with the logits computed
    tile by tile in on-chip memory, never in device memory.

    Inputs: hidden states e (BT x H), labels. Param: the head weight C (V x H). Forward: one
    kernel computes the logsumexp over the (BT x V) logits tiles (the e·Cᵀ GEMM), one the
    target logit (an indexed dot, BT·H); ``save_for_backward(e, c, lse, targets)``: e's
    storage (already alive), the fp32 lse (BT) and the int64 targets. Backward: one kernel
    recomputes each logits tile, forms the softmax gradient and accumulates dE = G·C and, with
    a trainable head, dC = Gᵀ·e: the head's forward GEMM again plus the eager backward's
    GEMMs (gradient filtering, which skips tiles whose softmax is below ``filter_eps``, is not
    priced: an upper bound on its work)."""
    x, w, vocab, h, bt, w_bytes = _head(op, g)
    mm = 2 * bt * h * vocab
    logits = bt * vocab
    cost = OpCost(fwd_flops=mm + 2 * bt * h + 5 * logits, fwd_matmul_flops=mm,
                  fwd_bytes=x.nbytes + w_bytes + bt * (4 + 8 + 4), fwd_kernels=3,
                  gemms_fwd=[(1, bt, vocab, h)], special_fwd={"exp": logits})
    w_train = bool(train and train[0])
    if rg[0] or w_train:
        # + the int64 item count unsloth_zoo's ``loss / num_items_in_batch`` keeps
        cost.saved = [op.inputs[0], ("new", bt * 4), ("new", bt * 8), ("new", 8)]
        grads = int(bool(rg[0])) + int(w_train)
        cost.bwd_act_flops = (mm if rg[0] else 0) + mm + 6 * logits   # recompute in the act part
        cost.bwd_act_matmul_flops = (mm if rg[0] else 0) + mm
        cost.bwd_weight_flops = mm if w_train else 0
        cost.bwd_weight_matmul_flops = mm if w_train else 0
        cost.bwd_bytes = x.nbytes * (1 + grads) + w_bytes * (1 + grads) + bt * (4 + 8)
        cost.bwd_kernels = 1 + grads
        cost.gemms_bwd = [(1, bt, vocab, h)] + ([(1, bt, h, vocab)] if rg[0] else []) \
            + ([(1, vocab, h, bt)] if w_train else [])
        cost.special_bwd = {"exp": logits}
    return cost


def cce_transient_bytes(op, g):
    """Above the saved tensors while cut cross-entropy runs: its fp32 per-token losses (the
    logits live only in on-chip tiles)."""
    x = _t(g, op.inputs[0])
    return numel(x.shape) / op.params[0].shape[1] * 4


@register(K.LORA_FUSED)
def lora_fused(op, g, rg, train):
    """Unsloth's ``matmul_lora`` inside ``LoRA_QKV`` / ``LoRA_W`` / ``LoRA_MLP``
    (unsloth/kernels/fast_lora.py, utils.py): ``out = y + s·(x·Aᵀ)·Bᵀ`` in x's dtype (A and B
    cast to it on the fly, ``out.addmm_``), inputs x and the base output y, params A (r x
    d_in), B (d_out x r).

    Forward: the two rank-r GEMMs (x·Aᵀ, then the addmm into y) and the casts of A and B.
    Backward (hand-written): dA = s·xᵀ·(dY·B) and dB = s·(A·xᵀ)·dY, so x·Aᵀ and dY·B are
    recomputed (four rank-r GEMMs for the weights), and dX gets (dY·B)·A (two more). Saved:
    x alone (``save_for_backward(A, B, X)``; LoRA_QKV saves its X once for q, k and v, the
    same storage here), or nothing when ``attrs["recomputed_input"]`` (LoRA_MLP's down
    projection: its input h is recomputed from the saved gate and up outputs)."""
    x, y, out = _t(g, op.inputs[0]), _t(g, op.inputs[1]), _t(g, op.outputs[0])
    a, b = op.params[0], op.params[1]
    r, d_in = a.shape
    d_out = b.shape[0]
    tokens = numel(x.shape) / d_in
    mac = tokens * r * (d_in + d_out)
    w_bytes = (a.numel + b.numel) * BYTES[x.dtype]
    cost = OpCost(fwd_flops=2 * mac, fwd_matmul_flops=2 * mac, fwd_kernels=4,
                  fwd_bytes=x.nbytes + y.nbytes + out.nbytes + a.nbytes + b.nbytes + w_bytes,
                  gemms_fwd=[(1, tokens, r, d_in), (1, tokens, d_out, r)])
    trains = train[0] or train[1]
    if rg[0] or trains:
        # dX += (dY·B)·A; the hand-written backward makes dX even when x needs no gradient
        # (the first block's q/k/v input), base GEMM dY·W included: that waste is priced here
        cost.bwd_act_flops += 2 * mac
        cost.bwd_act_matmul_flops += 2 * mac
        cost.bwd_bytes += out.nbytes + x.nbytes
        cost.bwd_kernels += 2
        cost.gemms_bwd += [(1, tokens, r, d_out), (1, tokens, d_in, r)]
        if not rg[0]:
            base = 2 * tokens * d_in * d_out
            cost.bwd_act_flops += base
            cost.bwd_act_matmul_flops += base
            cost.bwd_kernels += 1
            cost.gemms_bwd.append((1, tokens, d_in, d_out))
    if trains:
        cost.bwd_weight_flops += 4 * mac
        cost.bwd_weight_matmul_flops += 4 * mac
        cost.bwd_bytes += out.nbytes + 2 * x.nbytes + 2 * w_bytes
        cost.bwd_kernels += 6                  # 4 GEMMs, 2 casts of A and B
        cost.gemms_bwd += [(1, tokens, r, d_out), (1, d_in, r, tokens),
                           (1, r, tokens, d_in), (1, r, d_out, tokens)]
        if not op.attrs.get("recomputed_input"):
            cost.saved.append(op.inputs[0])
    return cost


def _member_needs(m, mc) -> list:
    """What one member's backward needs, recomputation allowed: its eager saves, except that
    an eager composite's materialised intermediates become what they are computed from (HF /
    torchtune RMSNorm keeps an fp32 copy of x and the normalised tensor: x and the fp32 rstd
    per row suffice; GPT-2's GELU keeps four tensors: x suffices)."""
    if not mc.saved:
        return []
    if m.kind == K.RMS_NORM:
        return [m.inputs[0], ("new", mc.saved[1][1])]
    if m.kind == K.GELU_NEW:
        return [m.inputs[0]]
    return list(mc.saved)


def _frontier(g, tid, made_by: dict, stop: set) -> list:
    """The tensors ``tid`` is recomputed from inside a group: walking producers back to the
    group's inputs or its materialised outputs."""
    out, stack, seen = [], [tid], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t != tid and (t in stop or t not in made_by):
            out.append(t)
            continue
        if t not in made_by:
            out.append(t)
            continue
        stack.extend(made_by[t].inputs)
    return out


def _storage_bytes(g, tids) -> float:
    seen = {}
    for t in tids:
        s = g.tensors[t].storage
        seen[s] = g.tensors[s].nbytes
    return sum(seen.values()) if seen else 0


def _le(a, b) -> bool:
    return bool(np.all(np.asarray(a) <= np.asarray(b)))


@register(K.POINTWISE_FUSED)
def pointwise_fused(op, g, rg, train):
    """A TorchInductor kernel for a group of element-wise / normalisation ops
    (:mod:`simcost.stack.fusions.inductor_pointwise`; ``attrs['members']`` are the eager ops).

    Forward, one kernel: reads each external input and parameter once, writes each output
    read outside the group once (intermediates stay in registers), plus what the group saves
    for backward that is not already an input or output. FLOPs and transcendentals are the
    members' own.

    Saved (``min_cut_rematerialization_partition``): per tensor a member's backward needs, the
    tensor itself when it is an input or output of the group (materialised anyway), else the
    cheaper of itself and the inputs / outputs it is recomputed from; reductions' per-row
    statistics and random masks as the members keep them. Never more than the members keep.

    Backward, one kernel for the activation gradients (reads the output gradients, the saved
    tensors and the parameters; writes the input gradients; recomputes the forward in
    registers) plus, per trainable parameter, Inductor's two-stage split reduction of its
    gradient over the tokens (``ir.Reduction`` ``num_splits``): two kernels.
    """
    members = op.attrs["members"]
    rgt = dict(zip(op.inputs, rg))
    made_by, costs = {}, []
    for m in members:
        rin = tuple(rgt.get(t, False) for t in m.inputs)
        tr = tuple(p.trainable for p in m.params)
        rout = (any(rin) or any(tr)) and not m.attrs.get("detached")
        for t in m.outputs:
            rgt[t] = rout
            made_by[t] = m
        mc = cost_of(m, g, rin, tr) if m.kind != K.VIEW else OpCost(fwd_kernels=0)
        if not rout:
            mc.saved = []
        costs.append((m, mc, rout))
    ext_out = set(op.outputs)
    stop = set(op.inputs) | ext_out
    p_bytes = sum(p.numel * BYTES[p.compute_dtype or p.dtype] for p in op.params)
    special_f: dict = {}
    special_b: dict = {}
    fflops = bflops_a = bflops_w = 0
    saved_t: list = []
    saved_new: list = []
    for m, mc, rout in costs:
        fflops = fflops + mc.fwd_flops
        for k, v in mc.special_fwd.items():
            special_f[k] = special_f.get(k, 0) + v
        if not rout:
            continue
        bflops_a = bflops_a + mc.bwd_act_flops + mc.fwd_flops      # recomputed in registers
        bflops_w = bflops_w + mc.bwd_weight_flops
        for k, v in mc.special_bwd.items():
            special_b[k] = special_b.get(k, 0) + v
        for s in _member_needs(m, mc):
            if isinstance(s, tuple):
                saved_new.append(s)
            elif s in stop or s not in made_by:
                saved_t.append(s)
            else:
                fr = [t for t in _frontier(g, s, made_by, stop) if t not in saved_t]
                own = g.tensors[g.tensors[s].storage].nbytes
                saved_t.extend(fr if _le(_storage_bytes(g, fr), own) else [s])
    saved_t = list(dict.fromkeys(saved_t))
    materialised = [t for t in saved_t if t in made_by and t not in ext_out]
    new_bytes = sum(b for _, b in saved_new)
    fbytes = (_storage_bytes(g, op.inputs) + p_bytes + _storage_bytes(g, op.outputs)
              + _storage_bytes(g, materialised) + new_bytes)
    cost = OpCost(fwd_flops=fflops, fwd_bytes=fbytes, fwd_kernels=1, special_fwd=special_f)
    if not any(r for _, _, r in costs):
        return cost
    trained = [p for p in op.params if p.trainable]
    grads_in = _storage_bytes(g, [t for t in op.outputs if rgt.get(t)])
    grads_out = _storage_bytes(g, [t for t, r in zip(op.inputs, rg) if r])
    cost.saved = saved_t + saved_new
    cost.bwd_act_flops = bflops_a
    cost.bwd_weight_flops = bflops_w
    cost.bwd_bytes = (grads_in + _storage_bytes(g, saved_t) + new_bytes + p_bytes + grads_out
                      + sum(p.nbytes for p in trained))
    cost.bwd_kernels = 1 + 2 * len(trained)
    # a group the eager backward prices lower (residual adds: the gradient passes through)
    eager_b = sum(mc.bwd_bytes for _, mc, _ in costs)
    eager_k = sum(mc.bwd_kernels for _, mc, _ in costs)
    if eager_k and _le(eager_b, cost.bwd_bytes):
        cost.bwd_bytes = eager_b
        cost.bwd_kernels = min(cost.bwd_kernels, eager_k)
    cost.special_bwd = special_b
    return cost
