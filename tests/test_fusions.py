"""The training stacks' fusion rules (simcost.stack.fusions, simcost.costs.fused).

Per rule: kernel counts and saved bytes of one llama-3.2-1b layer against numbers derived by
hand from the kernels' sources (each rule module's docstring names the file and what its
``ctx.save_for_backward`` keeps). Across the zoo: a fused stack never keeps more than the
eager graph of the same step and runs the same matmul FLOPs; Liger's fused linear
cross-entropy never holds the B·S·V logits; Unsloth's offloaded checkpoints keep one block
input on the device.
"""
from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from simcost import estimate_train, sweep_train
from simcost.costs.fused import lce_chunks
from simcost.errors import SimcostError
from simcost.graph import kinds as K
from simcost.models.config import load_model
from simcost.peft import PeftSpec
from simcost.pipeline import build_graph
from simcost.sim.memory import checkpointed_activations
from simcost.stack import load_stack, stack_names
from simcost.stack.registry import STACK_DIR, _read

MIB = 2 ** 20
B, S = 1, 512                       # llama-3.2-1b: d 2048, 32 heads, 8 KV heads, ffn 8192
TOKENS, D, FFN, VOCAB, HD = B * S, 2048, 8192, 128256, 64


def _graph(stack, model="llama-3.2-1b", peft=None, batch=B, seq=S, attn="flash"):
    peft = peft or PeftSpec("lora", r=16, alpha=32, targets=("q_proj", "v_proj"))
    return build_graph(load_model(model), batch, seq, dtype="bf16", attn=attn, peft=peft,
                       device_kind="gpu", stack=load_stack(stack) if stack else None)


def _rec(a, seg, name):
    return next(r for r in a.records if r.segment == seg and r.op.name == name)


def _saved_bytes(g, saved):
    return sum(s[1] if isinstance(s, tuple) else g.tensors[g.tensors[s].storage].nbytes
               for s in saved)


# -- per rule, one layer (segment 2: layers 1..15, all of whose inputs require grad) ----------

def test_rms_norm_liger_and_unsloth():
    g0, a0 = _graph("hf")
    eager = _rec(a0, 2, "post_attention_layernorm")
    # HF: fp32 copy of x (4 bytes/element) + fp32 rsqrt per row; 8 kernels each way (bf16)
    assert _saved_bytes(g0, eager.cost.saved) == TOKENS * D * 4 + TOKENS * 4
    assert (eager.cost.fwd_kernels, eager.cost.bwd_kernels) == (8, 8)
    g, a = _graph("hf-liger")
    r = _rec(a, 2, "post_attention_layernorm")
    assert r.op.kind == K.RMS_NORM_FUSED
    # Liger save_for_backward(X, W, RSTD): X is the bf16 input itself, RSTD fp32 per row
    assert r.cost.saved[0] == r.op.inputs[0]
    assert _saved_bytes(g, r.cost.saved) == TOKENS * D * 2 + TOKENS * 4
    # forward 1 kernel; backward 1 kernel + _dW.sum(0) + .to(bf16)
    assert (r.cost.fwd_kernels, r.cost.bwd_kernels) == (1, 3)
    gu, au = _graph("unsloth")
    ru = _rec(au, 2, "post_attention_layernorm")
    assert _saved_bytes(gu, ru.cost.saved) == TOKENS * D * 2 + TOKENS * 4
    assert (ru.cost.fwd_kernels, ru.cost.bwd_kernels) == (1, 1)     # no weight gradient
    assert ru.cost.fwd_bytes == 2 * TOKENS * D * 2 + D * 2 + TOKENS * 4


def test_rope_one_kernel_for_q_and_k():
    g0, a0 = _graph("hf")
    q, k = _rec(a0, 2, "rope_q"), _rec(a0, 2, "rope_k")
    assert (q.cost.fwd_kernels + k.cost.fwd_kernels, q.cost.bwd_kernels + k.cost.bwd_kernels) \
        == (12, 12)
    g, a = _graph("hf-liger")
    r = _rec(a, 2, "rope_q+rope_k")
    assert r.op.kind == K.ROPE_FUSED and (r.cost.fwd_kernels, r.cost.bwd_kernels) == (1, 1)
    cos, sin = g.meta["rope"]
    assert r.cost.saved == [cos, sin]                     # save_for_backward(cos, sin)
    qk = TOKENS * D * 2 + TOKENS * 512 * 2                # q (32 heads) and k (8 heads), bf16
    assert r.cost.fwd_bytes == 2 * qk + 2 * S * HD * 2    # read + write in place, cos + sin
    assert not any(op.kind == K.ROPE for _, op in g.iter_ops())
    # the SDPA kernel still reads the rotated q and k
    sd = _rec(a, 2, "flash_attention")
    assert sd.op.inputs[:2] == r.op.outputs
    gu, au = _graph("unsloth")                            # one kernel per tensor
    assert (_rec(au, 2, "rope_q").cost.fwd_kernels, _rec(au, 2, "rope_k").cost.bwd_kernels) \
        == (1, 1)


def test_swiglu_keeps_gate_and_up_only():
    g0, a0 = _graph("hf")
    g, a = _graph("hf-liger")
    r = _rec(a, 2, "gate_mul_up")
    assert r.op.kind == K.SWIGLU_FUSED and (r.cost.fwd_kernels, r.cost.bwd_kernels) == (1, 1)
    assert _saved_bytes(g, r.cost.saved) == 2 * TOKENS * FFN * 2       # gate and up, bf16
    assert not any(op.kind == K.SILU for _, op in g.iter_ops())
    # per layer: silu(gate) (8 MiB) no longer kept, each norm keeps bf16 x instead of fp32
    assert a0.saved_local[2] - a.saved_local[2] == TOKENS * FFN * 2 + 2 * TOKENS * D * 2
    assert a.saved_local[2] == 34738176


def test_swiglu_unsloth_only_on_fast_lora_mlps():
    _, a = _graph("unsloth")                              # q, v LoRA: HF's eager MLP
    assert any(r.op.kind == K.SILU for r in a.records)
    all_mlp = PeftSpec("lora", r=16, alpha=32, targets=("gate_proj", "up_proj", "down_proj"))
    _, a2 = _graph("unsloth", peft=all_mlp)
    assert not any(r.op.kind == K.SILU for r in a2.records)
    dropped = PeftSpec("lora", r=16, alpha=32, dropout=0.05,
                       targets=("gate_proj", "up_proj", "down_proj"))
    _, a3 = _graph("unsloth", peft=dropped)               # dropout: Unsloth does not patch
    assert any(r.op.kind == K.SILU for r in a3.records)


def test_linear_cross_entropy_chunks_and_saves():
    g, a = _graph("hf-liger")
    head = len(g.segments) - 1
    r = next(r for r in a.records if r.segment == head and r.op.kind == K.LINEAR_CROSS_ENTROPY)
    # inc_factor = cdiv(128256, 2048) = 63; cdiv(512, 63) = 9 -> next power of 2: 16 tokens
    assert lce_chunks(TOKENS, VOCAB, D) == (16.0, 32.0)
    # frozen head: per chunk mm + CE + grad_input mm; 4 setup, loss sum, 3 wrapper kernels
    assert r.cost.fwd_kernels == 4 + 32 * 3 + 1 + 3 and r.cost.bwd_kernels == 1
    assert r.cost.saved == [("new", TOKENS * D * 2)]        # grad_input only
    mm = 2 * TOKENS * D * VOCAB
    assert r.cost.fwd_matmul_flops == 2 * mm and r.cost.bwd_act_matmul_flops == 0
    g0, a0 = _graph("hf")
    eager_mm = sum(x.cost.fwd_matmul_flops + x.cost.bwd_act_matmul_flops
                   + x.cost.bwd_weight_matmul_flops for x in a0.records if x.segment == head)
    assert eager_mm == r.cost.fwd_matmul_flops              # the same GEMMs, all in forward
    full = _graph("hf-liger", peft=PeftSpec("full"))[1]     # trainable (tied) head
    rf = next(x for x in full.records if x.op.kind == K.LINEAR_CROSS_ENTROPY)
    assert rf.cost.saved == [("new", TOKENS * D * 2), ("new", VOCAB * D * 2)]
    assert rf.cost.fwd_matmul_flops == 3 * mm and rf.cost.fwd_kernels == 4 + 1 + 32 * 4 + 4


def _unsloth_inplace(tmp_path) -> str:
    """Unsloth as releases before cut cross-entropy ran it (fast_cross_entropy_loss)."""
    prof = json.loads((STACK_DIR / "unsloth.json").read_text())
    prof["fusions"] = [f if f != "cut_cross_entropy" else "cross_entropy_inplace"
                       for f in prof["fusions"]]
    p = tmp_path / "unsloth-inplace.json"
    p.write_text(json.dumps(prof))
    return str(p)


def test_cut_cross_entropy_never_holds_the_logits():
    g, a = _graph("unsloth")
    r = next(x for x in a.records if x.op.kind == K.CUT_CROSS_ENTROPY)
    hidden = r.op.inputs[0]
    # save_for_backward(e, c, lse, targets) + the division's item count
    assert r.cost.saved == [hidden, ("new", TOKENS * 4), ("new", TOKENS * 8), ("new", 8)]
    mm = 2 * TOKENS * D * VOCAB
    assert r.cost.fwd_matmul_flops == mm
    assert r.cost.bwd_act_matmul_flops == 2 * mm     # the tiles recomputed, then dE
    m = estimate_train("llama-3.2-1b", "a100-80gb-sxm", batch=B, seq=S, peft="lora",
                       targets="q_proj,v_proj", attn="flash", stack="unsloth").memory_bytes
    assert m["loss_transient"] == TOKENS * 4          # fp32 per-token losses only
    hf = estimate_train("llama-3.2-1b", "a100-80gb-sxm", batch=B, seq=S, peft="lora",
                        targets="q_proj,v_proj", attn="flash").memory_bytes
    assert hf["loss_transient"] >= TOKENS * VOCAB * 2


def test_cross_entropy_inplace_keeps_the_logits(tmp_path):
    inplace = _unsloth_inplace(tmp_path)
    g, a = _graph(inplace)
    r = next(x for x in a.records if x.op.kind == K.CROSS_ENTROPY_INPLACE)
    logits = r.op.inputs[0]
    # save_for_backward(logits, logsumexp, labels): the bf16 logits, fp32 and int64 per row;
    # loss.sum() / n_items keeps the int64 count
    assert r.cost.saved == [logits, ("new", TOKENS * 4), ("new", TOKENS * 8), ("new", 8)]
    assert g.tensors[logits].nbytes == TOKENS * VOCAB * 2
    # V = 128256 > 65536: chunked kernel + logsumexp + add + mask + masked_fill; labels shift 3,
    # sum / count_nonzero / div 4
    assert (r.cost.fwd_kernels, r.cost.bwd_kernels) == (3 + 5 + 4, 2)
    m = estimate_train("llama-3.2-1b", "a100-80gb-sxm", batch=B, seq=S, peft="lora",
                       targets="q_proj,v_proj", attn="flash", stack=inplace).memory_bytes
    assert m["loss_transient"] == TOKENS * 4 + TOKENS * 2 * 4


# -- registry ----------------------------------------------------------------------------------

def test_unknown_fusion_names_the_nearest(tmp_path):
    prof = json.loads((STACK_DIR / "hf-liger.json").read_text())
    prof["fusions"] = ["rms_nrom"]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(prof))
    with pytest.raises(SimcostError) as e:
        _read(str(p), "bad.json")
    msg = str(e.value)
    assert "\n" not in msg and "rms_nrom" in msg and "rms_norm" in msg and "bad.json" in msg


def test_profiles_list_only_known_fusions_and_eager_stacks_stay_unfused():
    for name in ("hf", "torchtune", "deepspeed"):
        assert load_stack(name).fusions == ()
    assert set(load_stack("hf-liger").fusions) == {"rms_norm", "rope", "swiglu",
                                                   "linear_cross_entropy"}
    for name in stack_names():
        prof = json.loads((STACK_DIR / f"{name}.json").read_text())
        if prof.get("kind") == "alias":
            continue
        planned = prof.get("planned_fusions")
        assert planned is None or (planned and not set(planned) & set(prof["fusions"]))


# -- across models, methods, checkpointing and stacks ------------------------------------------

MODELS = ("llama-3.2-1b", "qwen-1.8b", "gpt2", "mistral-7b", "mixtral-8x7b")
PEFTS = ("lora", "full", "dora", "ia3", "prefix")
CKPT = ("none", "full", "selective")


def _lce_grad_weight(r, stack, model, peft):
    """The V x H weight gradient Liger's fused loss allocates in the forward (and keeps) when
    the head is trainable: the one thing a fused graph keeps that the eager one does not
    (eager makes that gradient in backward)."""
    if "linear_cross_entropy" not in load_stack(stack).fusions or peft != "full":
        return 0.0
    spec = load_model(model)
    return spec.vocab * spec.hidden * 2


def _recompute(stack, model, kw):
    """The matmul FLOPs a stack's fused kernels recompute on top of eager's: Unsloth's fused
    LoRA recomputes x·Aᵀ and dY·B for its weight gradients (2·tokens·r·(d_in + d_out) per
    projection), cut cross-entropy the head's logits tiles in backward (its forward GEMM)."""
    fus = set(load_stack(stack).fusions)
    if not {"lora_qkv", "lora_o", "lora_mlp", "cut_cross_entropy"} & fus:
        return 0.0
    from simcost.api import _build, _model
    from simcost.graph.ir import numel
    from simcost.hardware import load_profile
    from simcost.request.train import TrainRequest, request_peft
    req = TrainRequest.from_call(model, "a100-80gb-sxm", stack=stack, **kw)
    g, a = _build(_model(model), req, request_peft(req),
                  load_profile("a100-80gb-sxm").device(), req.batch, req.seq)
    extra = 0.0
    for r in a.records:
        if r.op.kind == K.LORA_FUSED and any(p.trainable for p in r.op.params):
            (ar, d_in), d_out = r.op.params[0].shape, r.op.params[1].shape[0]
            tokens = numel(g.tensors[r.op.inputs[0]].shape) / d_in
            extra += 2 * tokens * ar * (d_in + d_out) * r.count
        if r.op.kind == K.CUT_CROSS_ENTROPY and r.cost.bwd_kernels:
            extra += r.cost.fwd_matmul_flops * r.count
    return extra


@pytest.mark.parametrize("model", MODELS)
def test_fused_never_keeps_more_than_eager(model):
    stacks = [s for s in stack_names() if s != "hf"]
    for i, (peft, ck) in enumerate(itertools.product(PEFTS, CKPT)):
        kw = dict(batch=2, seq=256, peft=peft, grad_checkpointing=ck, attn="sdpa",
                  dtype="bf16" if i % 2 == 0 else "fp32",
                  mixed_precision="none" if i % 2 == 0 else "bf16")
        if model == "gpt2":
            kw["seq"] = 128
        hf = estimate_train(model, "a100-80gb-sxm", stack="hf", **kw)
        hm = hf.memory_bytes
        for st in stacks:
            r = estimate_train(model, "a100-80gb-sxm", stack=st, **kw)
            m = r.memory_bytes
            gw = _lce_grad_weight(r, st, model, peft)
            where = f"{model} {peft} {ck} {kw['dtype']} {st}"
            assert m["activations"] - gw <= hm["activations"] * (1 + 1e-12), where
            assert m["activations"] + m["loss_transient"] - gw <= \
                (hm["activations"] + hm["loss_transient"]) * (1 + 1e-12), where
            assert m["peak_allocated"] - gw <= hm["peak_allocated"] * (1 + 1e-12), where
            # the same GEMMs (Liger's loss runs the head's gradient GEMMs in the forward),
            # plus what fused kernels recompute
            assert r.flops["matmul_forward"] + r.flops["matmul_backward"] == pytest.approx(
                hf.flops["matmul_forward"] + hf.flops["matmul_backward"]
                + _recompute(st, model, kw), rel=1e-12), where


def test_eager_and_gpt2_graphs_unchanged_where_nothing_matches():
    _, a = _graph("hf-liger", model="gpt2", peft=PeftSpec("lora"), attn="sdpa")
    kinds = {r.op.kind for r in a.records}
    assert K.LAYER_NORM in kinds and K.GELU_NEW in kinds
    assert not kinds & {K.RMS_NORM_FUSED, K.ROPE_FUSED, K.SWIGLU_FUSED}
    assert K.LINEAR_CROSS_ENTROPY in kinds           # the head pattern matches any LM head


# -- the loss: Liger never holds B·S·V logits --------------------------------------------------

def _with_vocab(vocab):
    return dataclasses.replace(load_model("llama-3.2-1b"), vocab=vocab)


def test_fused_linear_cross_entropy_never_holds_the_logits():
    batch, seq = 2, 1024
    bt = batch * seq
    rows = {}
    for st in ("hf", "hf-liger"):
        for v in (VOCAB, 2 * VOCAB):
            m = estimate_train(_with_vocab(v), "a100-80gb-sxm", batch=batch, seq=seq,
                               peft="lora", targets="q_proj,v_proj", attn="flash",
                               stack=st).memory_bytes
            rows[st, v] = m["activations"] + m["loss_transient"]
    logits_growth = bt * VOCAB * 2          # B·S·ΔV bf16 logits
    assert rows["hf", 2 * VOCAB] - rows["hf", VOCAB] >= logits_growth
    assert rows["hf-liger", 2 * VOCAB] - rows["hf-liger", VOCAB] < logits_growth
    # exact: Liger's chunk (cdiv(2048, 63) = 33 -> 64 tokens; cdiv(2048, 126) = 17 -> 32) x V
    assert lce_chunks(bt, VOCAB, D)[0] == 64 and lce_chunks(bt, 2 * VOCAB, D)[0] == 32
    for v, chunk in ((VOCAB, 64), (2 * VOCAB, 32)):
        m = estimate_train(_with_vocab(v), "a100-80gb-sxm", batch=batch, seq=seq, peft="lora",
                           targets="q_proj,v_proj", attn="flash", stack="hf-liger").memory_bytes
        assert m["loss_transient"] == chunk * v * 2 + bt * (4 + 1)


def test_huge_vocab_bound():
    v = 1_000_000
    m = estimate_train(_with_vocab(v), "a100-80gb-sxm", batch=4, seq=2048, peft="lora",
                       attn="flash", stack="hf-liger").memory_bytes
    bt = 4 * 2048
    chunk = lce_chunks(bt, v, D)[0]                   # cdiv(8192, 489) = 17 -> 32
    assert chunk == 32
    assert m["loss_transient"] == chunk * v * 2 + bt * 5
    assert m["loss_transient"] < bt * v * 2 / 100


def test_sweep_points_equal_estimates_under_fused_stacks():
    for st in ("hf-liger", "unsloth"):
        s = sweep_train("llama-3.2-1b", "a100-80gb-sxm", batches=[1, 3], seqs=[100, 1000, 3000],
                        peft="lora", attn="flash", stack=st)
        for i, b in enumerate((1, 3)):
            for j, q in enumerate((100, 1000, 3000)):
                r = estimate_train("llama-3.2-1b", "a100-80gb-sxm", batch=b, seq=q, peft="lora",
                                   attn="flash", stack=st)
                assert s["step_s"][i, j] == pytest.approx(r.time_s["step"], rel=1e-9)
                assert s["peak_bytes"][i, j] == pytest.approx(r.memory_bytes["peak"], rel=1e-9)


# -- Unsloth's offloaded checkpoints -----------------------------------------------------------

def test_offloaded_checkpoints_keep_one_block_input():
    g, a = _graph("unsloth", seq=2048)
    assert g.meta["checkpoint_offload"]
    on = checkpointed_activations(g, a)
    g.meta["checkpoint_offload"] = False
    off = checkpointed_activations(g, a)
    layer_in = 2048 * D * 2
    assert off - on == (16 - 1) * layer_in
    r = estimate_train("llama-3.2-1b", "a100-80gb-sxm", batch=1, seq=2048, peft="lora",
                       rank=16, attn="flash", stack="unsloth", grad_checkpointing="full")
    assert r.memory_bytes["activations"] == pytest.approx(on)


def test_offload_copies_hide_behind_the_block():
    """The assumption behind pricing no copy time: one block input over the profile's host
    link takes less than the block's forward (the copies run on a side stream)."""
    from simcost.hardware import load_profile
    from simcost.sim.timing import TimeModel, phase_times
    prof = load_profile("a100-80gb-sxm")
    host_bw = prof.host_link.bandwidth_bytes_per_s.value
    for model, seq in (("llama-3.2-1b", 512), ("llama-3.1-8b", 2048)):
        g, a = _graph("unsloth", model=model, seq=seq)
        per_op = []
        phase_times(TimeModel.from_device(prof.device(), load_stack("unsloth")), "bf16", a,
                    per_op=per_op)
        seg = len(g.segments) - 2           # the last block group
        block_fwd = sum(tf for r, tf, *_ in per_op if r.segment == seg)
        copy = g.tensors[g.segments[seg].input_tid].nbytes / host_bw
        assert copy < block_fwd, (model, copy, block_fwd)


def test_fused_losses_vectorise():
    g, a = _graph("hf-liger", batch=np.array([1, 2, 4]), seq=np.array([512, 512, 512]))
    r = next(x for x in a.records if x.op.kind == K.LINEAR_CROSS_ENTROPY)
    assert np.shape(r.cost.fwd_kernels) == (3,)
    chunk, n = lce_chunks(np.array([512, 1024, 2048]), VOCAB, D)
    assert list(chunk) == [16, 32, 64] and list(n) == [32, 32, 32]


# -- against torch: HF models patched with Functions that keep what the sources keep ------------
#
# Liger's and Unsloth's kernels are Triton (GPU only), so the check runs HF's own model on the
# CPU with its RMSNorm, RoPE, MLP and loss replaced by torch.autograd.Functions that compute the
# same values and call ``ctx.save_for_backward`` with exactly what each source saves (the
# docstrings of simcost.stack.fusions name them). The saved-tensor hooks of
# simcost.validate.torch_measure then give the bytes a fused step keeps and FlopCounterMode its
# matmul FLOPs per phase; simcost's fused graph must agree.

def _reference_functions():
    import torch
    import torch.nn.functional as F

    def rot(x, sign):
        h = x.shape[-1] // 2
        return torch.cat((-sign * x[..., h:], sign * x[..., :h]), dim=-1)

    class RMSNormFn(torch.autograd.Function):      # save_for_backward(X, W, RSTD fp32)
        @staticmethod
        def forward(ctx, x, w, eps):
            rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps)
            ctx.save_for_backward(x, w, rstd)
            return (x.float() * rstd[..., None]).to(x.dtype) * w

        @staticmethod
        def backward(ctx, dy):
            x, w, rstd = ctx.saved_tensors
            with torch.enable_grad():
                xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
                y = (xx.float() * rstd[..., None]).to(x.dtype) * ww
                gx, gw = torch.autograd.grad(y, (xx, ww), dy)
            return gx, gw, None

    class RopeFn(torch.autograd.Function):         # save_for_backward(cos, sin)
        @staticmethod
        def forward(ctx, q, k, cos, sin):
            ctx.save_for_backward(cos, sin)
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            return q * c + rot(q, 1) * s, k * c + rot(k, 1) * s

        @staticmethod
        def backward(ctx, dq, dk):
            cos, sin = ctx.saved_tensors
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            return dq * c + rot(dq, -1) * s, dk * c + rot(dk, -1) * s, None, None

    class SiLUMulFn(torch.autograd.Function):      # save_for_backward(a, b)
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return F.silu(a) * b

        @staticmethod
        def backward(ctx, dc):
            a, b = ctx.saved_tensors
            sg = torch.sigmoid(a.float())
            da = (dc.float() * b.float() * sg * (1 + a.float() * (1 - sg))).to(a.dtype)
            return da, (dc.float() * a.float() * sg).to(b.dtype)

    class LCEFn(torch.autograd.Function):          # save_for_backward(grad_input, grad_weight)
        @staticmethod
        def forward(ctx, x, w, target):
            bt, h = x.shape
            chunk = int(lce_chunks(bt, w.shape[0], h)[0])
            gi = torch.zeros_like(x) if x.requires_grad else None
            gw = torch.zeros_like(w) if (x.requires_grad and w.requires_grad) else None
            keep = target != -100
            n = keep.sum()
            loss = torch.zeros((), dtype=torch.float32)
            for s in range(0, bt, chunk):
                xc, t, m = x[s:s + chunk], target[s:s + chunk], keep[s:s + chunk]
                lf = (xc @ w.t()).float()
                loss = loss + ((lf.logsumexp(-1) - lf.gather(1, t.clamp(min=0)[:, None])[:, 0])
                               * m).sum()
                g = lf.softmax(-1)
                g[torch.arange(len(t)), t.clamp(min=0)] -= 1
                g = (g * (m[:, None] / n)).to(x.dtype)
                if gi is not None:
                    gi[s:s + chunk] = g @ w
                if gw is not None:
                    gw += g.t() @ xc
            ctx.save_for_backward(gi, gw)
            return loss / n

        @staticmethod
        def backward(ctx, dloss):
            gi, gw = ctx.saved_tensors
            return (gi * dloss if gi is not None else None,
                    gw * dloss if gw is not None else None, None)

    class InplaceCEFn(torch.autograd.Function):    # save_for_backward(logits, logsumexp, labels)
        @staticmethod
        def forward(ctx, logits, labels):
            lf = logits.float()
            lse = lf.logsumexp(-1)
            ctx.save_for_backward(logits, lse, labels)
            picked = lf.gather(1, labels.clamp(min=0)[:, None])[:, 0]
            return (lse - picked) * (labels != -100)

        @staticmethod
        def backward(ctx, dl):
            logits, lse, labels = ctx.saved_tensors
            g = (logits.float() - lse[:, None]).exp()
            g[torch.arange(len(labels)), labels.clamp(min=0)] -= 1
            g = g * (dl * (labels != -100))[:, None]
            return logits.copy_(g.to(logits.dtype)), None

    class CCEFn(torch.autograd.Function):          # save_for_backward(e, c, lse, targets)
        @staticmethod
        def forward(ctx, e, c, targets):
            lse = (e @ c.t()).float().logsumexp(-1)      # the tiles' GEMM (never kept)
            picked = (e * c[targets.clamp(min=0)]).sum(-1).float()
            ctx.save_for_backward(e, c, lse, targets)
            return ((lse - picked) * (targets != -100)).sum()

        @staticmethod
        def backward(ctx, dloss):
            e, c, lse, targets = ctx.saved_tensors
            p = ((e @ c.t()).float() - lse[:, None]).exp()          # recomputed tiles
            p[torch.arange(len(targets)), targets.clamp(min=0)] -= 1
            gl = (p * ((targets != -100) * dloss)[:, None]).to(e.dtype)
            de = gl @ c if ctx.needs_input_grad[0] else None
            dc = gl.t() @ e if ctx.needs_input_grad[1] else None
            return de, dc, None

    def lora_dx(dy, w, a, b, s):          # dX of matmul_lora: dY·W + s·(dY·B)·A
        return dy @ w + s * ((dy @ b) @ a)

    def lora_dab(x, dy, a, b, s):         # (dA, dB) as fast_lora.py makes them
        return s * (x.t() @ (dy @ b)).t(), s * ((a @ x.t()) @ dy).t()

    def lora_mm(x, w, a, b, s):           # matmul_lora: X·Wᵀ + s·(X·Aᵀ)·Bᵀ, in X's dtype
        return torch.addmm(x @ w.t(), x @ a.t(), b.t(), alpha=s)

    class LoRAWFn(torch.autograd.Function):         # save_for_backward(A, B, X)
        @staticmethod
        def forward(ctx, x, w, a, b, s):
            ctx.save_for_backward(a, b, x)
            ctx.s, ctx.w = s, w
            x2 = x.reshape(-1, x.shape[-1])
            return lora_mm(x2, w, a.to(x.dtype), b.to(x.dtype), s).view(*x.shape[:-1], -1)

        @staticmethod
        def backward(ctx, dy):
            a, b, x = ctx.saved_tensors
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            ad, bd = a.to(x.dtype), b.to(x.dtype)
            da, db = lora_dab(x2, dy2, ad, bd, ctx.s)
            dx = lora_dx(dy2, ctx.w, ad, bd, ctx.s).view(x.shape)   # made unconditionally
            return dx, None, da.to(a.dtype), db.to(b.dtype), None

    class LoRAMLPFn(torch.autograd.Function):       # save_for_backward(A, B x 3, X, e, g)
        @staticmethod
        def forward(ctx, x, *p):
            (gw, ga, gb, gs), (uw, ua, ub, us), (dw, da_, db_, ds) = p[0:4], p[4:8], p[8:12]
            x2 = x.reshape(-1, x.shape[-1])
            c = lambda t: t.to(x.dtype)                              # noqa: E731
            e, g = lora_mm(x2, gw, c(ga), c(gb), gs), lora_mm(x2, uw, c(ua), c(ub), us)
            i = lora_mm(F.silu(e) * g, dw, c(da_), c(db_), ds)
            ctx.save_for_backward(ga, gb, ua, ub, da_, db_, x, e, g)
            ctx.w, ctx.s = (gw, uw, dw), (gs, us, ds)
            return i.view(*x.shape[:-1], -1)

        @staticmethod
        def backward(ctx, dy):
            ga, gb, ua, ub, da_, db_, x, e, g = ctx.saved_tensors
            (gw, uw, dw), (gs, us, ds) = ctx.w, ctx.s
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
            c = lambda t: t.to(x.dtype)                              # noqa: E731
            dh = lora_dx(dy2, dw, c(da_), c(db_), ds)
            sg = torch.sigmoid(e.float())
            h = (e.float() * sg * g.float()).to(x.dtype)             # recomputed
            de = (dh.float() * g.float() * sg * (1 + e.float() * (1 - sg))).to(x.dtype)
            dg = (dh.float() * e.float() * sg).to(x.dtype)
            gda, gdb = lora_dab(h, dy2, c(da_), c(db_), ds)
            uda, udb = lora_dab(x2, dg, c(ua), c(ub), us)
            gga, ggb = lora_dab(x2, de, c(ga), c(gb), gs)
            dx = lora_dx(dg, uw, c(ua), c(ub), us) + lora_dx(de, gw, c(ga), c(gb), gs)
            return (dx.view(x.shape), None, gga.to(ga.dtype), ggb.to(gb.dtype), None,
                    None, uda.to(ua.dtype), udb.to(ub.dtype), None,
                    None, gda.to(da_.dtype), gdb.to(db_.dtype), None)

    return RMSNormFn, RopeFn, SiLUMulFn, LCEFn, InplaceCEFn, LoRAWFn, LoRAMLPFn, CCEFn


def _patch_family(monkeypatch, model_type: str, loss: str, fused_mlp: bool):
    """Patch transformers' ``model_type`` modeling module the way Liger (``loss='lce'``) or
    Unsloth (``loss='inplace'``) patch it; ``fused_mlp``: the MLP's silu * up too."""
    import importlib

    import torch.nn.functional as F
    from transformers.modeling_outputs import CausalLMOutputWithPast

    (RMSNormFn, RopeFn, SiLUMulFn, LCEFn, InplaceCEFn, LoRAWFn, LoRAMLPFn,
     CCEFn) = _reference_functions()
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    pre = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[model_type]
    monkeypatch.setattr(getattr(mod, f"{pre}RMSNorm"), "forward",
                        lambda self, x: RMSNormFn.apply(x, self.weight, self.variance_epsilon))
    monkeypatch.setattr(mod, "apply_rotary_pos_emb",
                        lambda q, k, cos, sin, *a, **kw: RopeFn.apply(q, k, cos, sin))
    if fused_mlp:
        monkeypatch.setattr(getattr(mod, f"{pre}MLP"), "forward", lambda self, x: self.down_proj(
            SiLUMulFn.apply(self.gate_proj(x), self.up_proj(x))))
    if loss in ("inplace", "cce") and fused_mlp:   # Unsloth, LoRA on every (bias-free) MLP
        _patch_fast_lora(monkeypatch, mod, pre, LoRAWFn, LoRAMLPFn)

    def forward(self, input_ids=None, labels=None, **kw):
        kw.pop("logits_to_keep", None)
        h = self.model(input_ids=input_ids, **kw).last_hidden_state
        shift = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous().view(-1)
        if loss == "lce":
            out = LCEFn.apply(h.reshape(-1, h.shape[-1]), self.lm_head.weight, shift)
        elif loss == "cce":        # unsloth_zoo: reduction sum, then / num_items_in_batch
            n_items = (shift != -100).sum()
            out = CCEFn.apply(h.reshape(-1, h.shape[-1]), self.lm_head.weight, shift) / n_items
        else:
            logits = self.lm_head(h)
            per = InplaceCEFn.apply(logits.view(-1, logits.shape[-1]), shift)
            out = per.sum() / (shift != -100).sum()
        return CausalLMOutputWithPast(loss=out)

    monkeypatch.setattr(getattr(mod, f"{pre}ForCausalLM"), "forward", forward)


def _patch_fast_lora(monkeypatch, mod, pre, LoRAWFn, LoRAMLPFn):
    """Unsloth's fast_lora: each bias-free LoRA projection of the attention through LoRA_W's
    saves (X once for q, k and v: the same tensor), the MLP through LoRA_MLP's."""
    from peft.tuners.lora.layer import Linear

    def parts(lin):
        return (lin.base_layer.weight, lin.lora_A["default"].weight,
                lin.lora_B["default"].weight, lin.scaling["default"])

    plain = Linear.forward

    def forward(self, x, *a, **kw):
        if self.base_layer.bias is not None or getattr(self.lora_dropout["default"], "p", 0):
            return plain(self, x, *a, **kw)
        w, la, lb, s = parts(self)
        return LoRAWFn.apply(x, w, la, lb, s)

    monkeypatch.setattr(Linear, "forward", forward)
    monkeypatch.setattr(getattr(mod, f"{pre}MLP"), "forward", lambda self, x: LoRAMLPFn.apply(
        x, *parts(self.gate_proj), *parts(self.up_proj), *parts(self.down_proj)))


# every family x method once, the dtype alternating (both dtypes meet every family and method)
TORCH_CASES = [(m, meth, ("fp32", "bf16")[(i + j) % 2])
               for i, m in enumerate(("llama-gqa", "llama-mha-bias", "mistral", "qwen2"))
               for j, meth in enumerate(("full", "lora-qv", "lora-all", "dora", "ia3"))]


@pytest.mark.torch
@pytest.mark.parametrize("stack,loss", [("hf-liger", "lce"), ("unsloth", "cce"),
                                        ("unsloth-inplace", "inplace")])
def test_fused_graph_matches_torch_with_the_sources_saves(monkeypatch, tmp_path, stack, loss):
    if stack == "unsloth-inplace":
        stack = _unsloth_inplace(tmp_path)
    from simcost.models.config import spec_from_config
    from simcost.validate.exact import METHODS, TINY_CONFIGS, harness_peft
    from simcost.validate.torch_measure import measure_step
    bad = []
    for name, meth, dt in TORCH_CASES:
        cfg = TINY_CONFIGS[name]
        with monkeypatch.context() as mp:
            # Unsloth fuses the MLP only where its fast LoRA MLP runs (LoRA on gate, up and
            # down, no dropout): lora-all here
            _patch_family(mp, cfg["model_type"], loss, loss == "lce" or (
                meth == "lora-all" and not cfg.get("mlp_bias")))
            m = measure_step(cfg, harness_peft(cfg, METHODS[meth]), batch=2, seq=7, dtype=dt,
                             attn="sdpa")
        g, a = build_graph(spec_from_config(cfg), 2, 7, dtype=dt, attn="sdpa",
                           peft=METHODS[meth], device_kind="cpu", stack=load_stack(stack))
        ours = (a.activations_bytes, a.total("fwd_matmul_flops"),
                a.total("bwd_act_matmul_flops") + a.total("bwd_weight_matmul_flops"))
        theirs = (m.activations_bytes, m.flops_matmul_forward, m.flops_matmul_backward)
        if tuple(float(x) for x in ours) != tuple(float(x) for x in theirs):
            bad.append((name, meth, dt, ours, theirs))
    assert not bad, bad


# -- Unsloth's fused LoRA (fast_lora.py) ------------------------------------------------------

def test_unsloth_lora_keeps_x_once_and_no_fp32_copies():
    """One llama-3.2-1b layer, LoRA r=16 on all seven projections, no dropout, bf16: peft
    keeps an fp32 copy of each projection's input for lora_A (4 bytes x tokens x d_in, the
    q/k/v ones share it: 5 copies) and each lora_A output (fp32, tokens x r); Unsloth keeps
    the bf16 inputs only (x of q/k/v once, o's input, the MLP's X; the down projection's input
    is recomputed)."""
    spec = load_model("llama-3.2-1b")
    peft = PeftSpec("lora", r=16, alpha=32, dropout=0.0,
                    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"))
    s = 512
    g, a = _graph("unsloth", peft=peft, batch=1, seq=s)
    kinds = [r.op.kind for r in a.records if r.segment == 1]
    assert kinds.count(K.LORA_FUSED) == 7 and K.COPY not in kinds
    fused = [r for r in a.records if r.segment == 1 and r.op.kind == K.LORA_FUSED]
    saved = {t for r in fused for t in r.cost.saved}
    h, f = spec.hidden, spec.ffn
    assert sum(g.tensors[t].nbytes for t in saved) == 3 * s * h * 2   # qkv's x, o's x, MLP's X
    down = next(r for r in fused if r.op.name.startswith("down_proj"))
    assert down.cost.saved == [] and down.op.attrs["recomputed_input"]
    q = next(r for r in fused if r.op.name.startswith("q_proj"))
    assert q.cost.fwd_matmul_flops == 2 * s * 16 * (h + h)
    assert q.cost.bwd_weight_matmul_flops == 4 * s * 16 * (h + h)
    assert q.cost.fwd_kernels == 4
    # dropout > 0: Unsloth keeps peft's path (no fused LoRA anywhere)
    _, a2 = _graph("unsloth", peft=PeftSpec("lora", r=16, dropout=0.05,
                                            targets=("q_proj", "v_proj")), seq=s)
    assert not any(r.op.kind == K.LORA_FUSED for r in a2.records)


def test_unsloth_lora_needs_every_projection_of_the_group():
    """LoRA on q and v only: LoRA_QKV needs q, k and v adapted, so peft's branches stay."""
    _, a = _graph("unsloth", peft=PeftSpec("lora", r=8, dropout=0.0,
                                           targets=("q_proj", "v_proj", "o_proj")), seq=256)
    fused = {r.op.name for r in a.records if r.op.kind == K.LORA_FUSED}
    assert fused == {"o_proj.lora_fused"}
