"""Training memory: weights, gradients, optimizer state, master weights, activations, peak.

Peak is taken over three instants of a step (the optimizer state exists from the first step
on, and ``zero_grad(set_to_none=True)`` frees gradients before forward):
- end of forward: everything autograd saved + the logits the model returns;
- start of backward: + the loss gradient w.r.t. the logits (fp32, plus its cast);
- end of backward: all gradients + the gradient flowing through the lowest block;
- optimizer step: all gradients + the update's temporaries (torch's for-loop AdamW on CPU
  allocates about two tensors the size of the largest parameter; the foreach implementation,
  the default on GPUs, one list as large as all exp_avg_sq states).
plus the largest transient an op allocates (DoRA's dense weight, NF4 dequantisation) and the
runtime's own reservation from the hardware profile.

Chunked cross-entropy (``loss_chunks`` = N > 1, torchtune's ``CEWithChunkedOutputLoss``: the
output projection returns the logits as N sequence chunks, each upcast to fp32 and
cross-entropy'd on its own, then ``del logits`` before backward). Measured in torch (live
storages, CPU): autograd still keeps every chunk's fp32 log-probabilities (the same total as
unchunked, inside the activations); the bf16 logits chunks are all alive at the end of forward
(the model returns them) but nothing saves them; what shrinks to one chunk is the fp32 upcast
(forward) and the loss gradient (backward: nll's and log_softmax's fp32 gradients of the chunk).
So, with L the logits bytes and F their fp32 size (c = ceil(S/N)/S of the tokens per chunk):
  end of forward:    act + L + c·F (upcast; 0 when the logits are fp32)
  start of backward: act + 2·c·F
(unchunked the HF formulas above give act + 2·F, the same as N = 1 here). With a trainable
LM head, its N chunk linears each make a weight-gradient contribution that autograd adds to
the previous ones out of place: act − F + (N−2)/N·L + 3·W + the hidden-state gradient, W the
head weight's gradient bytes (the log-probabilities are freed by then, the later chunks'
logits gradients still wait). Uneven splits take the largest chunk (an upper bound).

Optimizer step fused into backward (``optimizer_in_backward``, torchtune ``optimizer_in_bwd``:
one optimizer per parameter, stepped from ``register_post_accumulate_grad_hook``, then its
gradient set to None): a gradient lives from its accumulation to its own step, so the
gradient set never coexists; the end-of-backward and optimizer-step instants become, per
trainable parameter p, (activations still alive when p's hook fires) + grad(p) + the update's
temporaries for p alone + the gradient flowing through the lowest block. Alive activations: all
of them for block parameters (upper bound: the top instance's hook fires first), all but the
loss's fp32 log-probabilities for the head (freed before the LM head's backward), only the
prologue's own for the embedding. A parameter used in several segments (tied embeddings)
holds its first gradient contribution in the autograd engine's input buffer from its top use
down to its bottom one: (activations at the top use) + grad(p).

Fused losses (a training stack's ``linear_cross_entropy`` / ``cross_entropy_inplace``
fusions, :mod:`simcost.costs.fused`): what they keep is in the activations (Liger's fused
linear cross-entropy keeps grad_input and, with a trainable head, grad_weight; Unsloth's
in-place loss keeps the logits), and the loss transient is only their working memory (one
chunk's logits and the per-token loss; the per-row losses and logsumexp partials): they have
no fp32 log-probabilities, no separate logits gradient, and ``loss_chunks`` does not apply.

Offloaded checkpoints (``Stack.checkpoint_offload``, Unsloth's
``use_gradient_checkpointing="unsloth"``, unsloth_zoo ``Unsloth_Offloaded_Gradient_
Checkpointer``): under full checkpointing each block's input is copied to host memory
(``hidden_states.to("cpu", non_blocking=True)``) and back for its recomputation, so the
device keeps, besides the prologue's and head's saved tensors, one block input (the one
being recomputed) and that block's saved tensors. The copies' time is not priced: Unsloth
runs them on side streams (its docs: at most 0.1 % overhead), and one block input over a
PCIe link (B·S·d·2 bytes at ~25 GB/s) takes far less than the block's compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simcost.dtypes import BYTES
from simcost.errors import SimcostError
from simcost.graph import kinds as K
from simcost.stack.allocator import device_peak

OPTIMIZERS = ("adamw", "sgd", "adamw8bit", "mezo")
MIXED = ("none", "bf16", "fp16")


@dataclass
class Memory:
    weights: object
    gradients: object
    optimizer: object
    master_weights: object
    activations: object
    temporaries: object
    runtime_overhead: object
    peak: object
    # the transient part of the two candidate peak instants (see :func:`peak_rows`): at the
    # loss (the logits' loss/log-probabilities on top of all activations), and at the end of
    # backward / the optimizer step (input gradients, update temporaries on the gradients)
    loss_transient: object = 0.0
    gradient_transient: object = 0.0

    def breakdown(self, capacity: float, stack=None, device_kind: str = "gpu") -> dict:
        """The ``memory_bytes`` mapping of an estimate; ``peak_allocated``, ``peak_reserved``
        and the device-level ``peak`` from :func:`simcost.stack.allocator.device_peak`."""
        rows = device_peak(self.peak - self.runtime_overhead,
                           self.weights + self.master_weights + self.optimizer,
                           self.runtime_overhead, stack, device_kind)
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "master_weights": self.master_weights, "activations": self.activations,
                "temporaries": self.temporaries, "loss_transient": self.loss_transient,
                "gradient_transient": self.gradient_transient, **rows, "capacity": capacity}


RESIDENT_ROWS = ("weights", "master_weights", "optimizer", "deepspeed_buffers_resident",
                 "temporaries", "runtime_overhead")


def peak_rows(m: dict) -> tuple[str, dict]:
    """The peak instant of a ``memory_bytes`` mapping and the rows live at it, which add up to
    ``peak``: what stays resident all step, plus either the activations and the loss's
    transient (the loss instant) or the gradients and their transient (the end of backward or
    the optimizer step), whichever is larger; plus what the caching allocator holds above the
    allocated peak (``peak_reserved - peak_allocated``)."""
    resident = {k: m[k] for k in RESIDENT_ROWS if m.get(k)}
    at_loss = m["activations"] + m.get("loss_transient", 0.0) \
        + m.get("deepspeed_buckets_backward", 0.0)
    at_step = m["gradients"] + m.get("gradient_transient", 0.0)
    cache = {}
    if m.get("peak_reserved") is not None and m["peak_reserved"] > m["peak_allocated"]:
        cache = {"allocator_cache": m["peak_reserved"] - m["peak_allocated"]}
    if at_loss >= at_step:
        live = {"activations": m["activations"],
                "loss_transient": at_loss - m["activations"]}
        return "loss", {**resident, **live, **cache}
    return "gradients", {**resident, "gradients": m["gradients"],
                         "gradient_transient": m.get("gradient_transient", 0.0), **cache}


def optimizer_state_bytes(optimizer: str, trainable, mixed: str) -> float:
    """trainable: (numel of one tensor, dtype, how many such tensors) per trainable tensor."""
    if optimizer not in OPTIMIZERS:
        raise SimcostError(f"unknown optimizer '{optimizer}'; valid: {', '.join(OPTIMIZERS)}")
    if optimizer in ("sgd", "mezo"):   # torch.optim.SGD, momentum 0 / MeZO: no state
        return 0
    total = 0
    for n, dt, count in trainable:
        if optimizer == "adamw":    # exp_avg + exp_avg_sq in the param's dtype, fp32 step
            state = 4 if mixed != "none" else BYTES[dt]
            total += (2 * n * state + 4) * count
        else:                       # bitsandbytes 8-bit AdamW: 2 uint8 states + fp32 absmax per 2048
            total += (2 * n + 2 * math.ceil(n / 2048) * 4 + 4) * count
    return total


CHECKPOINTING = ("none", "full", "selective")


def ckpt_mode(checkpointing) -> str:
    """False/None/'none' -> 'none'; True/'full' -> 'full'; 'selective' (Korthikanti et al.
    2022: keep everything but the attention core, recompute that core in backward)."""
    if checkpointing in (False, None, "none"):
        return "none"
    if checkpointing is True or checkpointing == "full":
        return "full"
    if checkpointing == "selective":
        return "selective"
    raise SimcostError(f"unknown checkpointing '{checkpointing}'; valid: {', '.join(CHECKPOINTING)}")


@dataclass
class ParamMemory:
    """What the parameters hold: their bytes, their gradients (fp32 under AMP), the fp32 master
    copies of 16-bit trainable weights under AMP, the optimizer state, and the optimizer
    step's temporaries (torch's for-loop AdamW: two tensors the size of the largest gradient;
    foreach: one list as large as all exp_avg_sq states; a fused kernel: none)."""
    weights: object
    grads: object
    master: object
    opt: object
    opt_temp: object
    trainable: list          # (numel, dtype, count) per trainable tensor


def param_memory(g, *, optimizer: str, mixed: str, foreach: bool = True,
                 fused_optimizer: bool = False) -> ParamMemory:
    weights = 0
    grads = 0
    master = 0
    trainable = []
    for p, count in g.params():
        weights += p.nbytes * count
        if p.trainable:
            n = p.numel * count
            trainable.append((p.numel, p.dtype, count))
            grads += n * (4 if mixed != "none" else BYTES[p.dtype])
            if mixed != "none" and BYTES[p.dtype] < 4:
                master += 4 * n
    opt = optimizer_state_bytes(optimizer, trainable, mixed)
    if optimizer == "sgd" or not trainable or fused_optimizer:
        opt_temp = 0              # a fused AdamW kernel updates in place: no temporaries
    elif foreach:
        opt_temp = opt / 2
    else:
        opt_temp = 2 * max(n * (4 if mixed != "none" else BYTES[dt]) for n, dt, _ in trainable)
    return ParamMemory(weights, grads, master, opt, opt_temp, trainable)


def training_memory(g, analysis, *, optimizer: str, mixed: str, checkpointing,
                    runtime_overhead: float, foreach: bool = True, loss_chunks: int = 1,
                    optimizer_in_backward: bool = False, fused_optimizer: bool = False) -> Memory:
    """``loss_chunks``: 1 = HF's cross-entropy over the whole logits; N > 1 = torchtune's
    chunked cross-entropy. ``optimizer_in_backward``: per-parameter optimizer steps in the
    backward (gradients freed as they are applied). See the module docstring."""
    if int(loss_chunks) != loss_chunks or loss_chunks < 1:
        raise SimcostError(f"loss_chunks must be an integer >= 1, got {loss_chunks}")
    pm = param_memory(g, optimizer=optimizer, mixed=mixed, foreach=foreach,
                      fused_optimizer=fused_optimizer)
    weights, grads, master, opt, opt_temp = pm.weights, pm.grads, pm.master, pm.opt, pm.opt_temp
    trainable = pm.trainable

    act = analysis.activations_bytes
    mode = ckpt_mode(checkpointing)
    if mode == "full":
        act = checkpointed_activations(g, analysis)
    elif mode == "selective":
        act = selective_activations(g, analysis)[0]
    temps = 0
    for r in analysis.records:
        temps = np.maximum(temps, r.cost.temp_bytes)
    blocks = g.block_segments()
    lowest_grad = g.tensors[blocks[0].input_tid].nbytes if blocks else 0
    loss = loss_peak(g, loss_chunks, lowest_grad)
    if optimizer_in_backward and trainable:
        bwd_steps = backward_step_terms(g, optimizer, mixed, foreach)
        end_bwd = in_backward_peak(bwd_steps, act, logits_fp32_bytes(g),
                                   prologue_saved(g, analysis)) + 2 * lowest_grad
        opt_step = 0
        grads = max(gb for _, gb, _ in bwd_steps)   # the most gradient bytes live at once
    else:
        end_bwd = grads + 2 * lowest_grad
        opt_step = grads + opt_temp
    # the loss instants (end of forward, start of backward), the end of backward, the step
    dynamic = np.maximum(np.maximum(act + loss, end_bwd), opt_step) + temps
    peak = runtime_overhead + weights + master + opt + dynamic
    return Memory(weights, grads, opt, master, act, temps, runtime_overhead, peak,
                  loss_transient=loss,
                  gradient_transient=np.maximum(end_bwd, opt_step) - grads)


def logits_fp32_bytes(g, tp: int = 1):
    """The logits' fp32 size (the loss's log-probabilities), per device of a vocab split;
    0 for a fused loss (it keeps none)."""
    if _loss_op(g).kind != K.CROSS_ENTROPY:
        return 0
    lt = g.tensors[_logits_tid(g)]
    return lt.nbytes / BYTES[lt.dtype] * 4 / tp


def loss_peak(g, chunks: int, flowing, tp: int = 1):
    """Bytes above the activations at the loss's worst instant (end of forward or start of
    backward), per device when the LM head is vocabulary-parallel over ``tp``. Unchunked (HF):
    the logits, their fp32 log-probabilities and the fp32 gradient plus its cast. Chunked
    (``chunks`` > 1): see the module docstring; ``flowing`` is the hidden-state gradient
    entering the blocks. A fused loss: its own working memory (see the module docstring)."""
    loss_op = _loss_op(g)
    if loss_op.kind != K.CROSS_ENTROPY:
        from simcost.costs.fused import fused_loss_transient
        return fused_loss_transient(loss_op, g) / tp
    lt = g.tensors[_logits_tid(g)]
    logits = lt.nbytes / tp
    f32 = logits_fp32_bytes(g, tp)
    if chunks == 1:
        return logits + f32 + (logits if lt.dtype != "fp32" else 0)
    c = loss_chunk_fraction(g.seq, chunks)
    end_fwd = logits + (c * f32 if lt.dtype != "fp32" else 0)
    head = chunked_head_grad_peak(g, lt.nbytes, f32 * tp, chunks, flowing) / tp
    return np.maximum(end_fwd, np.maximum(2 * c * f32, head))


def in_backward_peak(bwd_steps, act, f32, prologue, g_share=1.0, o_share=1.0):
    """With the optimizer stepped inside the backward: the worst (activations alive at a
    parameter's hook) + its gradient + its update temporaries (shares: the device's part of
    them under ZeRO)."""
    base = {"head": act - f32, "act": act, "prologue": prologue}
    step = 0
    for kind, gb, tb in bwd_steps:
        step = np.maximum(step, base[kind] + gb * g_share + tb * o_share)
    return step


def loss_chunk_fraction(seq, chunks: int):
    """The share of the tokens in the largest of ``chunks`` chunks (``tensor_split`` along the
    sequence: the first chunks get ceil(S/N) positions)."""
    s = np.asarray(seq, dtype=np.float64)
    frac = np.ceil(s / chunks) / s
    return float(frac) if frac.ndim == 0 else frac


def chunked_head_grad_peak(g, logits, f32, chunks: int, flowing):
    """Above the activations, during the LM head's backward under a chunked loss: each chunk's
    linear adds a weight-gradient contribution to the first one out of place (old + new +
    sum live at once) while the later chunks' logits gradients wait and every chunk's fp32
    log-probabilities are already freed. Only when the head's weight is trainable."""
    w = _head_weight(g)
    if w is None or not w.trainable:
        return 0
    wgrad = w.numel * BYTES[g.tensors[_logits_tid(g)].dtype]
    return -f32 + (chunks - 2) / chunks * logits + 3 * wgrad + flowing


def _head_weight(g):
    head = g.segments[-1]
    op = next((op for op in head.ops if op.module == "lm_head" and op.params), None)
    return op.params[0] if op is not None else None


def backward_step_terms(g, optimizer: str, mixed: str, foreach: bool) -> list:
    """Per kind of alive activations ('head': all but the loss's log-probabilities, 'act':
    all, 'prologue': the prologue's own), the worst (kind, gradient bytes, update
    temporaries) of one trainable parameter stepped inside the backward (see the module
    docstring)."""
    segs: dict[int, list] = {}
    first_block = next((i for i, s in enumerate(g.segments) if s.first_layer is not None), None)
    head = len(g.segments) - 1
    for si, seg in enumerate(g.segments):
        for op in seg.ops:
            for p in (*op.params, *op.attrs.get("held_params", ())):
                segs.setdefault(id(p), [p, set()])[1].add(si)

    def kind(si):
        if si == head:
            return "head"
        if first_block is not None and si < first_block:
            return "prologue"
        return "act"

    worst: dict[str, tuple] = {}
    for p, where in segs.values():
        if not p.trainable:
            continue
        elt = 4 if mixed != "none" else BYTES[p.dtype]
        gb = p.numel * elt
        if optimizer in ("sgd", "mezo"):
            tb = 0
        elif foreach:
            tb = optimizer_state_bytes(optimizer, [(p.numel, p.dtype, 1)], mixed) / 2
        else:
            tb = 2 * gb
        terms = [(kind(min(where)), gb, tb)]
        if len(where) > 1:      # first contribution held from the top use downwards
            terms.append((kind(max(where)), gb, 0))
        for k, a, b in terms:
            if k not in worst or a + b > worst[k][1] + worst[k][2]:
                worst[k] = (k, a, b)
    return list(worst.values())


def prologue_saved(g, analysis):
    """Saved bytes of the segments before the first block (the embedding's), alive when the
    embedding's gradient is made."""
    total = 0
    for seg, b in zip(g.segments, analysis.saved_local):
        if seg.first_layer is not None:
            break
        total = total + b * seg.count
    return total


def inference_memory(g, analysis, *, runtime_overhead: float) -> Memory:
    """MeZO's memory: forward passes under ``torch.no_grad`` only. Nothing is kept for a
    backward; what is live is the residual stream entering the current block plus the op at
    hand (its distinct input and output storages), or, at the end, the logits with the loss's
    fp32 upcast; plus one z (MeZO regenerates z per parameter tensor from the seed)."""
    weights = 0
    z = 0
    for p, count in g.params():
        weights += p.nbytes * count
        if p.trainable:
            z = max(z, p.nbytes)
    work = 0
    for seg in g.segments:
        resid = g.tensors[seg.input_tid].nbytes if seg.input_tid is not None else 0
        for op in seg.ops:
            if op.kind == K.VIEW:
                continue
            st = {g.tensors[t].storage for t in (*op.inputs, *op.outputs)}
            work = np.maximum(work, resid + sum(g.tensors[s].nbytes for s in st))
    loss_op = _loss_op(g)
    if loss_op.kind == K.CROSS_ENTROPY:
        lt = g.tensors[_logits_tid(g)]
        logits = lt.nbytes + lt.nbytes / BYTES[lt.dtype] * 4
    else:       # a fused loss: its working memory, plus the logits it keeps (Unsloth's)
        from simcost.costs.fused import fused_loss_transient
        logits = fused_loss_transient(loss_op, g) + (
            g.tensors[loss_op.inputs[0]].nbytes if loss_op.kind == K.CROSS_ENTROPY_INPLACE else 0)
    act = np.maximum(work, logits)
    temps = 0
    for r in analysis.records:
        temps = np.maximum(temps, r.cost.temp_bytes)
    temps = temps + z
    peak = runtime_overhead + weights + act + temps
    return Memory(weights, 0, 0, 0, act, temps, runtime_overhead, peak)


def _loss_op(g):
    """The head's loss op (eager cross-entropy, or a stack's fused loss)."""
    head = g.segments[-1]
    return next(op for op in head.ops if op.kind in K.LOSSES)


def _logits_tid(g):
    """The logits the loss reads (an eager or in-place cross-entropy; Liger's fused linear
    cross-entropy reads the hidden states instead and has none)."""
    return _loss_op(g).inputs[0]


def checkpointed_activations(g, analysis):
    """HF gradient checkpointing per decoder layer: each block keeps only its input; backward
    recomputes one block at a time, so one block's saved tensors are live at once. With
    ``g.meta['checkpoint_offload']`` (the stack's offloaded checkpoints, see the module
    docstring) the block inputs live in host memory and the device holds one at a time."""
    offload = bool(g.meta.get("checkpoint_offload"))
    total = analysis.saved_global
    worst_block = 0
    worst_input = 0
    for seg, b in zip(g.segments, analysis.saved_local):
        if seg.first_layer is None:
            total = total + b * seg.count
        else:
            layer_in = g.tensors[seg.input_tid].nbytes
            if offload:
                worst_input = np.maximum(worst_input, layer_in)
            else:
                total = total + layer_in * seg.count
            worst_block = np.maximum(worst_block, b)
    return total + worst_input + worst_block


def selective_activations(g, analysis):
    """Selective activation checkpointing (Korthikanti et al. 2022, arXiv 2205.05198): the
    attention core (QKᵀ, softmax, dropout, ·V, or the fused SDPA kernel) keeps only its inputs
    (q, k, v) and is recomputed in backward; every other op keeps what autograd saves.
    Returns (total bytes, per-segment bytes of one instance)."""
    by_seg: dict[int, list] = {}
    for r in analysis.records:
        by_seg.setdefault(r.segment, []).append(r)
    glob: dict[int, object] = {}
    per_seg = []
    for si, seg in enumerate(g.segments):
        local: dict[object, object] = {}
        for r in by_seg.get(si, ()):
            if not r.rg_out:
                continue
            kept = list(r.op.inputs) if r.op.attrs.get("attn_core") else r.cost.saved
            for s in kept:
                if isinstance(s, tuple):
                    local[(r.op.name, len(local))] = s[1]
                    continue
                base = g.tensors[g.tensors[s].storage]
                # the core's inputs made inside the core (views, copies) are recomputed too
                if r.op.attrs.get("attn_core") and _made_in_core(seg, s):
                    continue
                if base.is_global:
                    glob[base.tid] = base.nbytes
                else:
                    local[base.tid] = base.nbytes
        per_seg.append(sum(local.values()) if local else 0)
    total = sum(glob.values()) if glob else 0
    for seg, b in zip(g.segments, per_seg):
        total = total + b * seg.count
    return total, per_seg


def _made_in_core(seg, tid) -> bool:
    for op in seg.ops:
        if tid in op.outputs:
            return bool(op.attrs.get("attn_core"))
    return False
