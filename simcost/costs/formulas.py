"""Cost formulas per op kind.

Conventions (checked against torch in ``simcost.validate``):
- matmul FLOPs = 2·M·N·K, exactly as ``torch.utils.flop_counter`` counts mm/bmm/addmm;
  backward of ``A @ B`` is one GEMM per operand that requires grad.
- what an op saves follows autograd's derivative formulas: ``mm`` keeps its input only when
  the weight is trainable; ``mul`` keeps each factor only when the other one needs a gradient;
  ``pow``/``silu``/``gelu`` keep their input; ``softmax``/``tanh``/``rsqrt`` keep their output;
  views keep their base's storage.
"""
from __future__ import annotations

from simcost.costs.registry import OpCost, register
from simcost.dtypes import BYTES
from simcost.graph import kinds as K
from simcost.graph.ir import numel


def _t(g, tid):
    return g.tensors[tid]


def _bytes(g, tids):
    total = 0
    for t in tids:
        total = total + _t(g, t).nbytes
    return total


def device_kind(g) -> str:
    """Which aten kernels run the step: ``'cpu'`` (the default, what ``simcost.validate``
    measures) or ``'gpu'`` (CUDA/ROCm). A few kernels save different things per device
    (dropout's mask, layer_norm's statistics); ``g.meta['device_kind']`` picks the set."""
    return g.meta.get("device_kind", "cpu")


def _elementwise(op, g, rg, flops_per_elem: float, saved: list, *, bwd_flops_per_elem: float = 2.0,
                 bwd_reads: int = 1) -> OpCost:
    out = _t(g, op.outputs[0])
    n = numel(out.shape)
    fb = _bytes(g, op.inputs) + _bytes(g, op.outputs)
    needs_bwd = any(rg)
    return OpCost(
        fwd_flops=flops_per_elem * n, fwd_bytes=fb, fwd_kernels=1,
        bwd_act_flops=bwd_flops_per_elem * n * sum(rg) if needs_bwd else 0,
        bwd_bytes=(out.nbytes * (1 + bwd_reads) * sum(rg)) if needs_bwd else 0,
        bwd_kernels=sum(rg), saved=saved if needs_bwd else [])


# -- parameterised ops ----------------------------------------------------------------------

@register("linear")
def linear(op, g, rg, train):
    """y = x·Wᵀ (+ b). W may be stored quantised; the op then reads the dequantised copy."""
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    w = op.params[0]
    d_out, d_in = w.shape
    tokens = numel(x.shape) / d_in
    mm = 2 * tokens * d_in * d_out
    w_bytes = w.numel * BYTES[w.compute_dtype or w.dtype]
    cost = OpCost(fwd_flops=mm, fwd_matmul_flops=mm, fwd_bytes=x.nbytes + w_bytes + y.nbytes,
                  gemms_fwd=[(1, tokens, d_out, d_in)])
    w_train = train[0]
    b_train = len(train) > 1 and train[1]
    if op.attrs.get("weight_input"):
        # the weight is a tensor (peft's parametrised W + ΔW, see lora_params): it needs a
        # gradient when ΔW does, and it is kept (a fresh storage) for the input's gradient
        w_train = rg[1]
        if rg[0]:
            cost.saved.append(op.inputs[1])
    if rg[0]:
        cost.bwd_act_flops += mm
        cost.bwd_act_matmul_flops += mm
        cost.bwd_bytes += y.nbytes + w_bytes + x.nbytes
        cost.bwd_kernels += 1
        cost.gemms_bwd.append((1, tokens, d_in, d_out))          # dX = dY·W
        if w.compute_dtype and w.compute_dtype != w.dtype:   # quantised: dequantise again
            cost.bwd_act_flops += 2 * w.numel
            cost.bwd_bytes += w.nbytes + w_bytes
            cost.bwd_kernels += 1
    if w_train:
        cost.bwd_weight_flops += mm
        cost.bwd_weight_matmul_flops += mm
        cost.bwd_bytes += y.nbytes + x.nbytes + w_bytes
        cost.bwd_kernels += 1
        cost.gemms_bwd.append((1, d_out, d_in, tokens))          # dW = dYᵀ·X
        cost.saved.append(op.inputs[0])
    if b_train:
        cost.bwd_weight_flops += tokens * d_out
        cost.bwd_bytes += y.nbytes
        cost.bwd_kernels += 1
    return cost


@register("embedding")
def embedding(op, g, rg, train):
    ids, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    cost = OpCost(fwd_bytes=ids.nbytes + 2 * y.nbytes)
    if train[0]:
        w = op.params[0]
        cost.bwd_weight_flops = numel(y.shape)
        cost.bwd_bytes = y.nbytes + w.nbytes
        cost.bwd_kernels = 2
        cost.saved.append(op.inputs[0])
    return cost


@register("mul_param")
def mul_param(op, g, rg, train):
    """x ⊙ v with a parameter vector v broadcast over tokens ((IA)³, norm weights)."""
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    n = numel(y.shape)
    cost = OpCost(fwd_flops=n, fwd_bytes=x.nbytes + y.nbytes)
    if rg[0]:
        cost.bwd_act_flops += n
        cost.bwd_bytes += 2 * y.nbytes
        cost.bwd_kernels += 1
    if train[0]:
        cost.bwd_weight_flops += 2 * n
        cost.bwd_bytes += 2 * y.nbytes
        cost.bwd_kernels += 2
        cost.saved.append(op.inputs[0])
    if rg[0] and op.attrs.get("vector_copy"):
        # peft multiplies by ``1 * vector`` (a fresh tensor, kept for the input's gradient)
        cost.saved.append(("new", op.params[0].nbytes))
    return cost


@register("add_param")
def add_param(op, g, rg, train):
    """x + b with a trainable bias vector (BitFit on a fused bias)."""
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    n = numel(y.shape)
    cost = OpCost(fwd_flops=n, fwd_bytes=x.nbytes + y.nbytes)
    if train[0]:
        cost.bwd_weight_flops += n
        cost.bwd_bytes += y.nbytes
        cost.bwd_kernels += 1
    return cost


# -- activation x activation ----------------------------------------------------------------

@register("matmul")
def matmul(op, g, rg, train):
    """Batched A[..., m, k] @ B[..., k, n] of two activations (attention scores, values)."""
    a, b, y = _t(g, op.inputs[0]), _t(g, op.inputs[1]), _t(g, op.outputs[0])
    m, k = a.shape[-2], a.shape[-1]
    n = b.shape[-1]
    batch = numel(y.shape) / (m * n)
    mm = 2 * batch * m * k * n
    cost = OpCost(fwd_flops=mm, fwd_matmul_flops=mm, fwd_bytes=a.nbytes + b.nbytes + y.nbytes,
                  gemms_fwd=[(batch, m, n, k)])
    grad_shapes = ((batch, m, k, n), (batch, k, n, m))            # dA = dY·Bᵀ, dB = Aᵀ·dY
    for i, other in ((0, 1), (1, 0)):
        if rg[i]:
            cost.bwd_act_flops += mm
            cost.bwd_act_matmul_flops += mm
            cost.bwd_bytes += y.nbytes + _t(g, op.inputs[other]).nbytes + _t(g, op.inputs[i]).nbytes
            cost.bwd_kernels += 1
            cost.gemms_bwd.append(grad_shapes[i])
            cost.saved.append(op.inputs[other])
    return cost


@register("sdpa")
def sdpa(op, g, rg, train):
    """Fused attention (FlashAttention / CPU flash kernel / memory-efficient).

    FLOPs follow torch's ``sdpa_flop_count`` (dense, causal masking ignored): 4·b·h·s_q·s_k·d
    forward; backward 2.5x forward (the kernel recomputes QKᵀ).

    Saves q, k, v *as passed* (views of the projections/RoPE outputs, so they share those
    storages), the output and the fp32 log-sum-exp (b·h·s_q), never the s×s probabilities.
    GQA: without a mask transformers passes ``enable_gqa=True`` and the kernel reads the
    Hkv-head k/v directly. With keys longer than queries (a prefix-tuning KV prefix)
    transformers builds an explicit bool mask instead of ``is_causal``; then
    (``use_gqa_in_sdpa`` needs no mask) it repeats k/v to H heads first (``repeat_kv`` copies:
    the kernel saves those), and SDPA converts the bool mask to an additive float mask in the
    query dtype on every call, which the backward keeps too (b·1·s_q·s_k per layer).
    """
    q, k, v = (_t(g, t) for t in op.inputs[:3])
    y = _t(g, op.outputs[0])
    b_h = numel(q.shape[:-2])
    s_q, d = q.shape[-2], q.shape[-1]
    s_k = k.shape[-2]
    d_v = v.shape[-1]
    fwd = 2 * b_h * s_q * s_k * d + 2 * b_h * s_q * s_k * d_v
    cost = OpCost(fwd_flops=fwd + 5 * b_h * s_q * s_k, fwd_matmul_flops=fwd,
                  fwd_bytes=q.nbytes + k.nbytes + v.nbytes + y.nbytes,
                  gemms_fwd=[(b_h, s_q, s_k, d), (b_h, s_q, d_v, s_k)],
                  special_fwd={"exp": b_h * s_q * s_k})
    if any(rg):
        bwd = 2 * b_h * s_q * s_k * d * 3 + 2 * b_h * s_q * s_k * d_v * 2  # = 2.5x fwd when d == d_v
        cost.bwd_act_flops = bwd + 5 * b_h * s_q * s_k
        cost.bwd_act_matmul_flops = bwd
        # recomputed QKᵀ, dV = Pᵀ·dO, dP = dO·Vᵀ, dQ = dS·K, dK = dSᵀ·Q
        cost.special_bwd = {"exp": b_h * s_q * s_k}        # probabilities recomputed
        cost.gemms_bwd = [(b_h, s_q, s_k, d), (b_h, s_k, d_v, s_q), (b_h, s_q, s_k, d_v),
                          (b_h, s_q, d, s_k), (b_h, s_k, d, s_q)]
        cost.bwd_bytes = 2 * (q.nbytes + k.nbytes + v.nbytes + y.nbytes)
        cost.bwd_kernels = 1
        lse = b_h * s_q * 4
        saved_k, saved_v = op.inputs[1], op.inputs[2]
        extra = []
        if _is_true(s_k != s_q):        # explicit mask (KV prefix)
            eb = BYTES[q.dtype]
            h_kv = k.shape[-3]
            if h_kv != q.shape[-3] and h_kv > 1:   # repeat_kv copies instead of enable_gqa
                # (with one KV head, repeat_kv's expand + reshape stays a view: no copy)
                saved_k = ("new", b_h * s_k * d * BYTES[k.dtype])
                saved_v = ("new", b_h * s_k * d_v * BYTES[v.dtype])
            extra.append(("new", q.shape[0] * s_q * s_k * eb))
        cost.saved = [op.inputs[0], saved_k, saved_v, op.outputs[0], ("new", lse)] + extra
    return cost


def _is_true(x) -> bool:
    """A shape comparison that may be vectorised over a batch x sequence sweep."""
    try:
        return bool(x)
    except ValueError:   # numpy array
        return bool(x.any())


# -- element-wise ---------------------------------------------------------------------------

@register("add", "sub", "scale", "neg")
def add(op, g, rg, train):
    return _elementwise(op, g, rg, 1, [], bwd_flops_per_elem=0, bwd_reads=0)


@register("copy")
def copy_(op, g, rg, train):
    """dtype casts, .contiguous(), repeat_kv's expand+reshape: a new storage, nothing saved."""
    return _elementwise(op, g, rg, 0, [], bwd_flops_per_elem=0, bwd_reads=0)


@register("view")
def view(op, g, rg, train):
    return OpCost(fwd_kernels=0)


@register("mul")
def mul(op, g, rg, train):
    saved = []
    if rg[1]:
        saved.append(op.inputs[0])
    if rg[0]:
        saved.append(op.inputs[1])
    return _elementwise(op, g, rg, 1, saved, bwd_flops_per_elem=1)


@register("pow", "silu", "gelu")
def saves_input(op, g, rg, train):
    per = {"pow": 1, "silu": 5, "gelu": 8}[op.kind]
    c = _elementwise(op, g, rg, per, [op.inputs[0]], bwd_flops_per_elem=per + 2)
    if op.kind != K.POW:   # sigmoid / erf per element, again in backward
        n = numel(_t(g, op.outputs[0]).shape)
        c.special_fwd = {"exp": n}
        c.special_bwd = {"exp": n} if any(rg) else {}
    return c


@register("tanh", "rsqrt", "sigmoid")
def saves_output(op, g, rg, train):
    c = _elementwise(op, g, rg, 4, [op.outputs[0]], bwd_flops_per_elem=3)
    c.special_fwd = {"exp": numel(_t(g, op.outputs[0]).shape)}
    return c


@register("softmax")
def softmax(op, g, rg, train):
    """Softmax over the last dim (optionally in fp32: the input is cast first, a new storage)."""
    c = _elementwise(op, g, rg, 5, [op.outputs[0]], bwd_flops_per_elem=4)
    c.special_fwd = {"exp": numel(_t(g, op.outputs[0]).shape)}
    return c


@register("dropout")
def dropout(op, g, rg, train):
    """Training-mode dropout, p > 0 (p == 0 is built as a view: torch returns the input).

    Saves one mask of the input's shape, nothing else (not the input, not the output):
    - CPU: ``at::dropout`` takes the fused ``native_dropout`` only on CUDA/XPU/lazy tensors;
      elsewhere ``_dropout_impl`` computes ``input * noise`` with
      ``noise = bernoulli_(1-p) / (1-p)`` in the *input dtype*, and MulBackward keeps ``noise``;
    - GPU: ``native_dropout`` keeps its bool mask (1 byte per element)."""
    y = _t(g, op.outputs[0])
    el = BYTES["bool"] if device_kind(g) == "gpu" else BYTES[_t(g, op.inputs[0]).dtype]
    c = _elementwise(op, g, rg, 2, [("new", numel(y.shape) * el)], bwd_flops_per_elem=2)
    c.special_fwd = {"rng": numel(y.shape)}   # one random number per element
    return c


@register("reduce")
def reduce_(op, g, rg, train):
    """mean/sum over the last dim: nothing saved."""
    x = _t(g, op.inputs[0])
    return OpCost(fwd_flops=numel(x.shape), fwd_bytes=x.nbytes + _bytes(g, op.outputs),
                  bwd_act_flops=numel(x.shape) if rg[0] else 0,
                  bwd_bytes=(x.nbytes + _bytes(g, op.outputs)) if rg[0] else 0,
                  bwd_kernels=1 if rg[0] else 0)


# -- composites -----------------------------------------------------------------------------

@register("rms_norm")
def rms_norm(op, g, rg, train):
    """HF RMSNorm: x.float(); pow(2).mean(-1); rsqrt(+eps); x·r; .to(dtype); weight·n.

    Saves the fp32 input (the input itself when it is fp32), the per-row rsqrt and, when the
    weight is trainable, the normalised tensor in the input dtype."""
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    n = numel(x.shape)
    rows = n / x.shape[-1]
    half = x.dtype != "fp32"
    f32 = n * 4
    fwd_bytes = x.nbytes + (f32 * 2 if half else 0) + f32 + f32 * 2 + y.nbytes * 2
    cost = OpCost(fwd_flops=4 * n, fwd_bytes=fwd_bytes, fwd_kernels=6 + (2 if half else 0))
    w_train = bool(train and train[0])
    if rg[0]:
        x32 = ("new", f32) if half else op.inputs[0]
        cost.saved += [x32, ("new", rows * 4)]
        cost.bwd_act_flops += 8 * n
        cost.bwd_bytes += 6 * f32
        cost.bwd_kernels += 8
    if w_train:
        cost.saved.append(("new", y.nbytes) if (half or rg[0]) else ("new", y.nbytes))
        cost.bwd_weight_flops += 2 * n
        cost.bwd_bytes += 2 * y.nbytes
        cost.bwd_kernels += 2
    return cost


@register("layer_norm")
def layer_norm(op, g, rg, train):
    """aten.native_layer_norm: saves the input (and weight/bias, parameters) plus its per-row
    ``mean`` and ``rstd`` outputs (shape rows x 1). Their dtype is the kernel's: on CPU
    ``layer_norm_cpu`` allocates them in the parameters' dtype unless input and parameters
    differ (a 16-bit input with fp32 parameters gets fp32), so a bf16 model keeps bf16
    statistics; CUDA allocates them in the accumulate type (fp32 for 16-bit inputs)."""
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    n = numel(x.shape)
    rows = n / x.shape[-1]
    cost = OpCost(fwd_flops=7 * n, fwd_bytes=x.nbytes + y.nbytes)
    if rg[0] or any(train):
        w_dt = op.params[0].dtype if op.params else x.dtype
        mixed = w_dt != x.dtype
        stat_dt = "fp32" if (device_kind(g) == "gpu" or mixed or x.dtype == "fp32") else x.dtype
        stat = rows * BYTES[stat_dt]
        cost.saved = [op.inputs[0], ("new", stat), ("new", stat)]
        cost.bwd_act_flops = 10 * n if rg[0] else 0
        cost.bwd_weight_flops = 4 * n if any(train) else 0
        cost.bwd_bytes = 3 * x.nbytes
        cost.bwd_kernels = 1
    return cost


@register("rope")
def rope(op, g, rg, train):
    """q·cos + rotate_half(q)·sin: keeps cos and sin (shared by every layer)."""
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    n = numel(y.shape)
    cost = OpCost(fwd_flops=3 * n, fwd_bytes=5 * x.nbytes + 2 * _t(g, op.inputs[1]).nbytes,
                  fwd_kernels=6)
    if rg[0]:
        cost.saved = [op.inputs[1], op.inputs[2]]
        cost.bwd_act_flops = 3 * n
        cost.bwd_bytes = 5 * y.nbytes
        cost.bwd_kernels = 6
    return cost


@register("gelu_new")
def gelu_new(op, g, rg, train):
    """GPT-2's python GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), eight kernels, keeps
    x, tanh(·), 0.5·x and 1 + tanh(·)."""
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    n = numel(y.shape)
    cost = OpCost(fwd_flops=9 * n, fwd_bytes=15 * x.nbytes, fwd_kernels=8, special_fwd={"exp": n})
    if rg[0]:
        cost.saved = [op.inputs[0], ("new", x.nbytes), ("new", x.nbytes), ("new", x.nbytes)]
        cost.bwd_act_flops = 12 * n
        cost.bwd_bytes = 16 * x.nbytes
        cost.bwd_kernels = 10
    return cost


@register("cross_entropy")
def cross_entropy(op, g, rg, train):
    """HF ForCausalLMLoss: logits.float(), labels shifted, log_softmax + nll_loss (sum / n).

    Keeps the fp32 log-probabilities (tokens x vocab), the shifted int64 targets and the fp32
    total weight. The targets are ``pad(labels, (0, 1))[..., 1:].contiguous()``: with more
    than one row the slice is strided and ``contiguous()`` copies B·S labels, but a single row
    is already contiguous, so the kept storage is the whole padded (1, S+1) tensor."""
    logits, labels = _t(g, op.inputs[0]), _t(g, op.inputs[1])
    n = numel(logits.shape)
    batch = labels.shape[0]
    tokens = numel(labels.shape) + (batch == 1)
    f32 = n * 4
    up = logits.dtype != "fp32"
    cost = OpCost(fwd_flops=5 * n, fwd_bytes=logits.nbytes + (f32 * 2 if up else 0) + 2 * f32,
                  fwd_kernels=6 + (1 if up else 0))
    cost.special_fwd = {"exp": n}
    if rg[0]:
        cost.saved = [("new", f32), ("new", tokens * 8), ("new", 4)]
        cost.bwd_act_flops = 4 * n
        cost.bwd_bytes = 3 * f32 + (f32 + logits.nbytes if up else 0)
        cost.bwd_kernels = 4
        cost.special_bwd = {"log_softmax_bwd": n}
    return cost


@register("moe_router")
def moe_router(op, g, rg, train):
    """Mixtral router after the gate linear (``MixtralTopKRouter``):
    ``softmax(logits.float())`` → ``topk`` → ``top /= top.sum(-1, keepdim=True)``.

    Keeps the fp32 probabilities (softmax's output, T·E), the top-k indices (``TopkBackward``,
    int64, T·k), and for the in-place division a clone of the dividend (autograd copies
    ``self`` before an in-place op whose derivative reads it: fp32 T·k) plus the divisor
    (fp32 T·1)."""
    logits = _t(g, op.inputs[0])
    experts = logits.shape[-1]
    tokens = numel(logits.shape) / experts
    k = op.attrs["top_k"]
    cost = OpCost(fwd_flops=8 * tokens * experts, fwd_bytes=logits.nbytes * 3, fwd_kernels=5)
    if rg[0]:
        cost.saved = [("new", tokens * experts * 4), ("new", tokens * k * 8), ("new", tokens * 4),
                      ("new", tokens * k * 4)]
        cost.bwd_act_flops = 6 * tokens * experts
        cost.bwd_bytes = logits.nbytes * 4
        cost.bwd_kernels = 5
    return cost


@register("moe_experts")
def moe_experts(op, g, rg, train):
    """Top-k routed SwiGLU experts as transformers 5 runs them by default
    (``experts_implementation="grouped_mm"``, ``integrations/moe.py``): sort the T·k
    (token, expert) pairs by expert, gather the hidden states and routing weights in that order,
    one ``_grouped_mm`` for every expert's gate_up, ``silu(gate) * up`` on the two halves, one
    ``_grouped_mm`` for down, scale by the routing weight, un-permute, sum the k copies.

    Every token visits k experts, so all totals depend only on R = tokens·k, not on the
    routing. Inputs: hidden (T, d), router weights (T, k) fp32. Params: gate_up (E, 2f, d),
    down (E, d, f).

    Saved (``eb`` = activation bytes; each only when its backward needs it):
    - ``hidden[perm // k]`` keeps its int64 indices (R) when the hidden states need a gradient;
      ``weights[perm]`` keeps ``perm`` (R) when the routing weights do;
    - both ``_grouped_mm`` keep the int32 expert offsets (E, one storage);
    - gate_up keeps its gathered input (R·d) when gate_up is trainable;
    - the (R, 2f) gate_up output, once: ``silu`` keeps the gate half, the product keeps the up
      half (views of one storage), and the product keeps silu's output (R·f);
    - down keeps its input, the product (R·f), when down is trainable;
    - ``out * w`` keeps ``out`` (R·d) when the routing weights need a gradient and the fp32
      gathered weights (R) when ``out`` does;
    - ``weighted[inv_perm]`` keeps ``inv_perm`` (int64, R).
    """
    x, w = _t(g, op.inputs[0]), _t(g, op.inputs[1])
    gate_up, down = op.params
    n_exp, two_f, d = gate_up.shape
    f = two_f // 2
    tokens = numel(x.shape) / d
    k = op.attrs["top_k"]
    routed = tokens * k
    eb = BYTES[x.dtype]
    mm_fwd = 2 * routed * d * two_f + 2 * routed * f * d
    cost = OpCost(fwd_flops=mm_fwd + routed * (8 * f + 2 * d), fwd_matmul_flops=mm_fwd,
                  fwd_bytes=gate_up.nbytes + down.nbytes + routed * eb * (2 * d + 4 * f + 2 * d),
                  fwd_kernels=14)
    cost.gemms_fwd = [(n_exp, routed / n_exp, two_f, d), (n_exp, routed / n_exp, d, f)]
    w_gu, w_dn, wt = _expert_weight_grads(op, rg, train)
    if rg[0] or rg[1] or w_gu or w_dn:
        _moe_backward(cost, routed, n_exp, d, f, rg, w_gu, w_dn)
        cost.saved = _moe_saved(routed, n_exp, d, f, eb, BYTES[w.dtype], rg, w_gu, w_dn, wt)
    return cost


def _expert_weight_grads(op, rg, train):
    """Whether gate_up and down need weight gradients, and their parametrised-weight inputs.

    peft's LoRA on the expert parameters (lora_params): the weights are parametrised tensors
    W + ΔW read as extra inputs; each needs a gradient when its ΔW does, and is kept for the
    gradient of its grouped_mm's input."""
    w_gu, w_dn = bool(train[0]), bool(train[1])
    slots = op.attrs.get("weight_inputs", (False, False))
    wt, j = [None, None], 2
    for i in (0, 1):
        if slots[i]:
            wt[i] = op.inputs[j]
            j += 1
    if wt[0] is not None:
        w_gu = w_gu or bool(rg[op.inputs.index(wt[0])])
    if wt[1] is not None:
        w_dn = w_dn or bool(rg[op.inputs.index(wt[1])])
    return w_gu, w_dn, wt


def _moe_backward(cost, routed, n_exp, d, f, rg, w_gu, w_dn) -> None:
    """The routed experts' backward GEMMs and FLOPs (activation and weight gradients)."""
    two_f = 2 * f
    per = routed / n_exp      # tokens per expert on average (the totals do not depend on it)
    proj = rg[0] or w_gu               # the gate_up output needs a gradient
    # down's input gradient only when the product needs one (not when only the routing
    # weights or only down's weight do)
    cost.gemms_bwd = ([(n_exp, per, f, d)] if proj else []) + \
        ([(n_exp, per, d, two_f)] if rg[0] else [])
    act = (2 * routed * f * d if proj else 0) + (2 * routed * d * two_f if rg[0] else 0)
    cost.bwd_act_flops = act + (routed * 10 * f if proj else 0)
    cost.bwd_act_matmul_flops = act
    if w_gu or w_dn:
        wmm = (2 * routed * d * two_f if w_gu else 0) + (2 * routed * f * d if w_dn else 0)
        cost.gemms_bwd += ([(n_exp, two_f, d, per)] if w_gu else []) + \
            ([(n_exp, d, f, per)] if w_dn else [])
        cost.bwd_weight_flops = wmm
        cost.bwd_weight_matmul_flops = wmm
    cost.bwd_bytes = 2 * cost.fwd_bytes
    cost.bwd_kernels = 14


def _moe_saved(routed, n_exp, d, f, eb, w_bytes, rg, w_gu, w_dn, wt) -> list:
    """What autograd keeps for the routed experts' backward (see :func:`moe_experts`)."""
    proj = rg[0] or w_gu               # the gate_up output needs a gradient
    out = proj or w_dn                 # the down output needs a gradient
    idx = routed * BYTES["int64"]
    saved = []
    if rg[0]:
        saved.append(("new", idx))                       # perm // k
    if rg[1]:
        saved.append(("new", idx))                       # perm
    if out:
        saved.append(("new", n_exp * BYTES["int32"]))    # offsets
    if w_gu:
        saved.append(("new", routed * d * eb))           # gathered hidden states
    if proj:
        saved += [("new", routed * 2 * f * eb), ("new", routed * f * eb)]  # gate_up out, silu
    if w_dn:
        saved.append(("new", routed * f * eb))           # silu(gate) * up
    if rg[1]:
        saved.append(("new", routed * d * eb))           # down output
    if out:
        saved.append(("new", routed * w_bytes))          # gathered routing weights
    if out or rg[1]:
        saved.append(("new", idx))                       # inv_perm
    if wt[0] is not None and rg[0]:
        saved.append(wt[0])                              # W' gate_up (for dX)
    if wt[1] is not None and proj:
        saved.append(wt[1])                              # W' down (for d(product))
    return saved


@register("lora_param_delta")
def lora_param_delta(op, g, rg, train):
    """peft's ParamWrapper delta (``lora_params``): with E experts of (out, in) and rank r per
    expert, ``B`` (out, r·E) and ``A`` (r·E, in) give ΔW = s·B_e·A_e per expert: one matmul of
    2·E·out·r·in, run ``evals`` times in forward (the experts' baddbmm is evaluated once more when
    the parametrisation is registered), and in backward once per trainable factor. On a 16-bit
    base the experts' factors are cast copies (E·out·r and E·r·in), which baddbmm keeps."""
    a = op.attrs
    e, r, o, i = a["experts"], a["rank"], a["out"], a["in"]
    y = _t(g, op.outputs[0])
    mm = 2 * e * o * r * i
    fb = sum(p.nbytes for p in op.params) + y.nbytes
    cost = OpCost(fwd_flops=a["evals"] * mm, fwd_matmul_flops=a["evals"] * mm,
                  fwd_bytes=a["evals"] * fb, fwd_kernels=a["evals"] + (2 if a["factor_copies"] else 0),
                  gemms_fwd=[(e, o, i, r)] * a["evals"])
    n = int(bool(train[0])) + int(bool(train[1]))
    if n:
        cost.bwd_weight_flops = cost.bwd_weight_matmul_flops = n * mm
        cost.bwd_bytes = n * (y.nbytes + fb)
        cost.bwd_kernels = 2 * n
        cost.gemms_bwd = ([(e, o, r, i)] if train[1] else []) + ([(e, r, i, o)] if train[0] else [])
        if a["factor_copies"]:
            eb = BYTES[y.dtype]
            cost.saved = [("new", e * o * r * eb), ("new", e * r * i * eb)]
    return cost


@register("dequantize")
def dequantize(op, g, rg, train):
    """NF4 → bf16 dequantisation of one weight (bitsandbytes): reads the packed 4-bit codes and
    the double-quantised absmax constants, writes a transient bf16 weight."""
    w = op.params[0]
    out_bytes = w.numel * BYTES[w.compute_dtype or "bf16"]
    return OpCost(fwd_flops=2 * w.numel, fwd_bytes=w.nbytes + out_bytes, fwd_kernels=1,
                  temp_bytes=out_bytes)


@register("dora_weight_norm")
def dora_weight_norm(op, g, rg, train):
    """DoRA's per-step ‖W + s·(B·A)ᵀ‖ per output row. Params: base W, lora_A, lora_B.

    peft's ``get_lora_weight`` materialises B·A by pushing a (d_in x d_in) identity through
    lora_A and lora_B *with grad enabled* (so the forward FLOPs count), but only
    ``lora_weight.detach()`` feeds the norm, and the norm itself is detached: nothing of it is
    reachable from the loss, and that little graph (the identity, the (d_in x r) intermediate)
    is freed when the layer returns. Saves nothing; the identity and the dense W + s·B·A are
    forward temporaries. (A stock ``FlopCounterMode`` keeps such dropped graphs alive through
    its module-tracker grad hooks; ``simcost.validate`` measures without those hooks.)"""
    w = op.params[0]
    d_out, d_in = w.shape
    r = op.attrs["r"]
    mm = 2 * d_in * d_in * r + 2 * d_in * r * d_out
    dense = d_out * d_in
    ad = op.params[1].dtype
    return OpCost(fwd_flops=mm + 5 * dense, fwd_matmul_flops=mm,
                  fwd_bytes=w.nbytes + 4 * dense * BYTES[ad] + d_in * d_in * BYTES[ad],
                  fwd_kernels=8, temp_bytes=2 * dense * BYTES[ad] + d_in * d_in * BYTES[ad])


@register("dora_base_linear")
def dora_base_linear(op, g, rg, train):
    """DoRA with ``lora_dropout > 0``: peft cannot reuse the layer's output (it saw the
    undropped x), so ``DoraLinearLayer.forward`` recomputes ``F.linear(dropout(x), W.to(x.dtype))``
    without bias. Param: the frozen base W (read, not trained).

    One GEMM forward, one for the input gradient. Saves only the weight that gradient
    multiplies by, and only when it is a cast copy: a 16-bit base with fp32 adapters makes
    ``W.to(float32)`` a new (d_out x d_in) fp32 storage that autograd keeps; in the base dtype
    it is the parameter itself (not an activation).

    ``attrs['param_leaf']`` (a Conv1D base, fan_in_fan_out, not cast): peft's
    ``transpose(W, True)`` returns ``nn.Parameter(W.T)``, a fresh leaf that *requires grad*,
    so autograd also computes (and discards) a weight gradient: one more GEMM backward, and
    the dropped input is kept for it. ``inputs[1]`` is then a tensor that requires grad (the
    LoRA output) standing for that leaf, so the output requires grad even where x does not."""
    x, y = _t(g, op.inputs[0]), _t(g, op.outputs[0])
    w = op.params[0]
    d_out, d_in = w.shape
    tokens = numel(x.shape) / d_in
    mm = 2 * tokens * d_in * d_out
    w_bytes = w.numel * BYTES[x.dtype]
    cast = w.dtype != x.dtype
    cost = OpCost(fwd_flops=mm + (w.numel if cast else 0), fwd_matmul_flops=mm,
                  fwd_bytes=x.nbytes + w_bytes + y.nbytes + ((w.nbytes + w_bytes) if cast else 0),
                  fwd_kernels=2 if cast else 1)
    if rg[0]:
        cost.bwd_act_flops = mm
        cost.bwd_act_matmul_flops = mm
        cost.bwd_bytes = y.nbytes + w_bytes + x.nbytes
        cost.bwd_kernels = 1
        if cast:
            cost.saved = [("new", w_bytes)]
    if op.attrs.get("param_leaf") and not cast:
        cost.bwd_weight_flops = mm
        cost.bwd_weight_matmul_flops = mm
        cost.bwd_bytes += y.nbytes + x.nbytes + w_bytes
        cost.bwd_kernels += 1
        cost.saved.append(op.inputs[0])
    return cost


@register("dora_combine")
def dora_combine(op, g, rg, train):
    """peft's ``(m/‖·‖ - 1)·base + (m/‖·‖)·lora·s`` with ``m/‖·‖`` a (1, d_out) row (the
    norm is detached). Inputs: base output (the layer's own, or ``dora_base_linear``'s when
    lora_dropout > 0), LoRA output, norm. Param: the magnitude m.

    Saves, for m's gradient, the norm (``m / norm``), the base output and the LoRA output (the
    two products' other operands); for the base output's gradient the (1, d_out) ``m/‖·‖ - 1``;
    for the LoRA output's gradient the (1, d_out) ``m/‖·‖``."""
    y, lo, norm = (_t(g, t) for t in op.inputs)
    out = _t(g, op.outputs[0])
    n = numel(out.shape)
    d_out = op.params[0].shape[0]
    cost = OpCost(fwd_flops=4 * n, fwd_bytes=y.nbytes + lo.nbytes + 2 * out.nbytes, fwd_kernels=6)
    vec = d_out * BYTES[op.params[0].dtype]
    saved = []
    if train[0]:
        saved += [op.inputs[2], op.inputs[0], op.inputs[1]]
        cost.bwd_weight_flops = 4 * n
    if rg[0]:
        saved.append(("new", vec))
    if rg[1]:
        saved.append(("new", vec))
        cost.bwd_act_flops = 2 * n
    if rg[0]:
        cost.bwd_act_flops += 2 * n
    cost.saved = saved
    cost.bwd_bytes = 4 * out.nbytes
    cost.bwd_kernels = 6
    return cost
