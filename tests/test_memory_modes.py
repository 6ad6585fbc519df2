"""Memory-efficient PEFT modes (LST, MeZO, freeze-bottom-k), selective activation
checkpointing, multi-LoRA training (mLoRA BatchLoRA) and the single TrainEstimate builder."""
import json

import pytest

from simcost import pipeline
from simcost.api import estimate_multi_train, estimate_train, sweep_train
from simcost.cli import main
from simcost.errors import SimcostError
from simcost.models.config import load_model
from simcost.peft import PeftSpec

M, H = "llama-2-7b", "a100-80gb-sxm"
KW = dict(batch=2, seq=512)


# -- LST ------------------------------------------------------------------------------------

def _lst_graph(model=M, r=8):
    spec = load_model(model)
    return spec, *pipeline.build_graph(spec, 2, 256, dtype="bf16",
                                       peft=PeftSpec("lst", side_reduction=r), device_kind="gpu")


def test_lst_trains_only_the_side_network_and_ladders():
    spec, g, a = _lst_graph()
    ds, dff = spec.hidden // 8, spec.ffn // 8
    per_layer = spec.hidden * ds + 1 + ds + 2 * ds * dff      # ladder, gate, norm, up + down
    expected = spec.layers * per_layer + 2 * spec.hidden * ds  # + embed_down, side up
    trainable = sum(p.numel * c for p, c in g.params() if p.trainable)
    assert trainable == expected
    assert all(p.role == "adapter" for p, _ in g.params() if p.trainable)


def test_lst_has_no_backward_through_the_backbone():
    _, g, a = _lst_graph()
    for r in a.records:
        if r.op.attrs.get("adapter") or r.op.module in ("lm_head",) or \
                r.op.module.endswith("norm") and r.segment == len(g.segments) - 1 or \
                r.op.module == "loss":
            continue
        # every backbone op (embedding, attention, MLP, block norms) is forward only
        assert not r.rg_out, r.op.name
        assert r.cost.bwd_kernels == 0 or not any(r.rg_in)
        assert not r.cost.saved


def test_lst_saves_only_the_layer_outputs_the_ladders_read():
    spec, g, a = _lst_graph()
    lora = estimate_train(M, H, peft="lora", **KW)
    lst = estimate_train(M, H, peft="lst", **KW)
    assert lst.memory_bytes["activations"] < 0.25 * lora.memory_bytes["activations"]
    assert lst.flops["backward"] < 0.1 * lora.flops["backward"]
    assert lst.params["trainable"] == lst.params["added"]
    # per block, the saved bytes are the ladder's input (B, S, d) plus side-network tensors
    # of width d/8 and ffn/8
    hidden = 2 * 256 * spec.hidden * 2
    side = 2 * 256 * (4 * spec.hidden // 8 + 2 * spec.ffn // 8) * 2
    for seg, b in zip(g.segments, a.saved_local):
        if seg.first_layer is not None:
            assert hidden + side <= b < hidden + side + hidden / 2


def test_lst_reduction_scales_the_side_network_and_is_validated():
    a = estimate_train(M, H, peft="lst", side_reduction=8, **KW)
    b = estimate_train(M, H, peft="lst", side_reduction=16, **KW)
    assert b.params["trainable"] < a.params["trainable"]
    with pytest.raises(SimcostError):
        estimate_train(M, H, peft="lst", side_reduction=3, **KW)


def test_lst_gpt2_builds():
    r = estimate_train("gpt2", H, peft="lst", batch=2, seq=128)
    assert r.params["trainable"] > 0 and r.flops["backward_weight"] > 0


# -- MeZO -----------------------------------------------------------------------------------

def test_mezo_is_two_forwards_and_no_backward():
    lora = estimate_train(M, H, peft="lora", **KW)
    mezo = estimate_train(M, H, peft="lora", optimizer="mezo", **KW)
    assert mezo.flops["forward"] == pytest.approx(2 * lora.flops["forward"])
    assert mezo.flops["backward"] == 0 and mezo.time_s["backward"] == 0
    assert mezo.time_s["forward"] == pytest.approx(2 * lora.time_s["forward"])
    for k in ("gradients", "optimizer", "master_weights"):
        assert mezo.memory_bytes[k] == 0
    assert mezo.params["trainable"] == lora.params["trainable"]   # only LoRA is perturbed


def test_mezo_memory_is_about_inference():
    full = estimate_train(M, H, peft="full", **KW)
    mezo = estimate_train(M, H, peft="full", optimizer="mezo", **KW)
    w = mezo.memory_bytes["weights"]
    assert mezo.memory_bytes["activations"] < 0.05 * full.memory_bytes["activations"]
    assert mezo.memory_bytes["peak"] < w + mezo.memory_bytes["runtime_overhead"] + 0.1 * w
    assert full.memory_bytes["peak"] > 3 * mezo.memory_bytes["peak"]
    # the perturbation passes touch every trainable parameter
    assert mezo.flops["optimizer"] == 16 * mezo.params["trainable"]


def test_mezo_rejects_multi_device():
    with pytest.raises(SimcostError):
        estimate_train(M, "h100-sxm", peft="lora", optimizer="mezo", devices=2, **KW)


# -- freeze-bottom-k --------------------------------------------------------------------------

def test_freeze_bottom_k_backward_stops_at_the_lowest_trainable_layer():
    k2 = estimate_train(M, H, peft="freeze", trainable_layers=2, **KW)
    k8 = estimate_train(M, H, peft="freeze", trainable_layers=8, **KW)
    assert k2.flops["backward"] < k8.flops["backward"]
    assert k2.memory_bytes["activations"] < k8.memory_bytes["activations"]


# -- selective activation checkpointing -----------------------------------------------------

def test_selective_checkpointing_drops_the_attention_core():
    kw = dict(peft="lora", attn="eager", **KW)
    none = estimate_train(M, H, **kw)
    sel = estimate_train(M, H, grad_checkpointing="selective", **kw)
    full = estimate_train(M, H, grad_checkpointing="full", **kw)
    spec = load_model(M)
    # eager attention keeps (B, H, S, S) scores / probabilities; selective drops them
    scores = 2 * spec.heads * 512 * 512 * 2 * spec.layers
    assert none.memory_bytes["activations"] - sel.memory_bytes["activations"] >= scores
    assert full.memory_bytes["activations"] < sel.memory_bytes["activations"]
    # recompute: the attention core only, far less than full checkpointing
    assert 0 < sel.flops["recompute"] < 0.2 * full.flops["recompute"]
    assert sel.checkpointing == "selective" and sel.grad_checkpointing
    assert "checkpointing" not in none.model_dump_public()


def test_selective_checkpointing_with_sdpa_and_multi_device():
    sel = estimate_train(M, H, peft="lora", grad_checkpointing="selective", **KW)
    none = estimate_train(M, H, peft="lora", **KW)
    assert sel.memory_bytes["activations"] <= none.memory_bytes["activations"]
    kw = dict(peft="lora", attn="eager", batch=8, seq=512, devices=8, dp=8)
    a = estimate_train(M, "h100-sxm", **kw)
    b = estimate_train(M, "h100-sxm", grad_checkpointing="selective", **kw)
    assert b.memory_bytes["activations"] < a.memory_bytes["activations"]
    assert b.time_s["backward"] > a.time_s["backward"]


def test_unknown_checkpointing_mode():
    with pytest.raises(SimcostError):
        estimate_train(M, H, peft="lora", grad_checkpointing="partial", **KW)


# -- multi-LoRA -------------------------------------------------------------------------------

def test_one_job_equals_a_separate_run():
    r = estimate_multi_train(M, H, jobs=1, rank=16, **KW)
    for k in ("weights", "activations", "peak"):
        assert r.shared.memory_bytes[k] == pytest.approx(r.separate.memory_bytes[k], rel=1e-9)
    assert r.shared.time_s["step"] == pytest.approx(r.separate.time_s["step"], rel=1e-9)


def test_multi_lora_shares_the_base_weights():
    n = 4
    r = estimate_multi_train(M, H, jobs=n, rank=16, **KW)
    one = r.separate
    adapters = one.params["added"] * 4        # fp32 adapters
    assert r.shared.params["added"] == n * one.params["added"]
    assert r.shared.memory_bytes["weights"] == pytest.approx(
        one.memory_bytes["weights"] + (n - 1) * adapters)
    for k in ("gradients", "optimizer", "activations"):
        # (AdamW's 4-byte step counters are per tensor: rel 1e-4)
        assert r.shared.memory_bytes[k] == pytest.approx(n * one.memory_bytes[k], rel=1e-4)
    base = r.comparison["base_weight_bytes_shared"]
    assert r.comparison["memory_saved_bytes"] == pytest.approx((n - 1) * base, rel=0.02)


def test_multi_lora_speedup_comes_from_batching_the_base_gemms():
    n = 4
    r = estimate_multi_train(M, H, jobs=n, rank=16, batch=1, seq=256)
    p = r.phases_s
    # adapter work is not batched: N jobs' adapter ops cost N times one job's
    one = estimate_multi_train(M, H, jobs=1, rank=16, batch=1, seq=256).phases_s
    assert p["adapter_forward"] == pytest.approx(n * one["adapter_forward"])
    # the base ops over N*b rows beat N separate passes
    assert p["base_forward"] + p["base_backward"] < p["separate_base"]
    assert r.comparison["speedup"] > 1
    assert r.comparison["throughput_ratio"] == pytest.approx(r.comparison["speedup"])


def test_multi_job_rejects_methods_that_train_the_base():
    with pytest.raises(SimcostError):
        estimate_multi_train(M, H, jobs=2, peft="full", **KW)
    with pytest.raises(SimcostError):
        estimate_multi_train(M, H, jobs=0, **KW)


# -- CLI ------------------------------------------------------------------------------------

BASE = ["estimate", "train", "--model", M, "--hardware", H, "--batch", "2", "--seq", "512"]


@pytest.mark.parametrize("extra", [
    ["--peft", "lst", "--lst-reduction", "16"],
    ["--peft", "lora", "--optimizer", "mezo"],
    ["--peft", "lora", "--checkpointing", "selective"],
    ["--peft", "lora", "--jobs", "3"],
])
def test_cli_modes_json(extra, capsys):
    assert main([*BASE, *extra, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d


@pytest.mark.parametrize("extra", [
    ["--peft", "lst", "--lst-reduction", "3"],
    ["--peft", "full", "--jobs", "2"],
    ["--peft", "lora", "--jobs", "2", "--devices", "2"],
    ["--peft", "lora", "--optimizer", "mezo", "--devices", "2"],
    ["--peft", "lora", "--grad-checkpointing", "--checkpointing", "selective"],
    ["--peft", "lora", "--checkpointing", "partial"],
])
def test_cli_bad_input_one_line_exit_2(extra, capsys):
    assert main([*BASE, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err


# -- one TrainEstimate builder ---------------------------------------------------------------

def test_single_and_multi_device_share_the_builder():
    import inspect
    from simcost import api, result
    from simcost.sim import parallel_api
    assert "TrainEstimate(" not in inspect.getsource(parallel_api)
    assert " TrainEstimate(" not in inspect.getsource(api)
    assert inspect.getsource(result).count("TrainEstimate(\n") == 1


# -- chunked cross-entropy and optimizer in backward (torchtune) ------------------------------

L8 = "llama-3.1-8b"


def _logits(spec, b, s, elt=2):
    return b * s * spec.vocab * elt


def test_loss_chunks_lower_peak_by_the_logits_term_only():
    spec = load_model(L8)
    kw = dict(peft="lora", batch=2, seq=2048, grad_checkpointing=True)
    one = estimate_train(L8, H, **kw)
    assert estimate_train(L8, H, loss_chunks=1, **kw).memory_bytes == one.memory_bytes
    eight = estimate_train(L8, H, loss_chunks=8, **kw)
    for k in one.memory_bytes:
        if k not in ("peak", "peak_allocated", "peak_reserved", "loss_transient"):
            assert eight.memory_bytes[k] == one.memory_bytes[k], k
    # the peak is at the loss, so the whole change is the loss's transient (the tensors'
    # peak: the allocator cache above it grows with the transient bytes too)
    assert one.memory_bytes["loss_transient"] - eight.memory_bytes["loss_transient"] == \
        pytest.approx(one.memory_bytes["peak_allocated"] - eight.memory_bytes["peak_allocated"])
    L = _logits(spec, 2, 2048)            # bf16 logits
    F = 2 * L                             # their fp32 upcast / log-probabilities
    before = L + F + L                    # HF: logits + fp32 loss gradient + its bf16 cast
    after = max(L + F / 8, 2 * F / 8)     # all bf16 chunks + one chunk's upcast (forward)
    assert one.memory_bytes["peak_allocated"] - eight.memory_bytes["peak_allocated"] == \
        pytest.approx(before - after)
    assert one.memory_bytes["peak_reserved"] - eight.memory_bytes["peak_reserved"] > before - after
    assert eight.loss_chunks == 8 and one.loss_chunks is None


def test_loss_chunks_with_a_trainable_head_pay_the_weight_gradient_accumulation():
    # full FT: the head's N chunk linears add weight-gradient contributions out of place
    spec = load_model(L8)
    kw = dict(peft="full", batch=1, seq=256, optimizer_in_backward=True)
    r = estimate_train(L8, H, loss_chunks=8, **kw)
    lora = estimate_train(L8, H, loss_chunks=8, **{**kw, "peft": "lora"})
    W = spec.vocab * spec.hidden * 2
    assert r.memory_bytes["peak"] > lora.memory_bytes["peak"] + 3 * W


def test_optimizer_in_backward_frees_the_gradient_set():
    spec = load_model(L8)
    kw = dict(peft="full", batch=1, seq=256)
    r0 = estimate_train(L8, H, **kw)
    r1 = estimate_train(L8, H, optimizer_in_backward=True, **kw)
    m0, m1 = r0.memory_bytes, r1.memory_bytes
    for k in ("weights", "optimizer", "master_weights", "activations", "temporaries"):
        assert m1[k] == m0[k], k
    W = spec.vocab * spec.hidden * 2          # the LM head: the largest single gradient
    assert m1["gradients"] == W and m0["gradients"] == r0.params_trainable * 2
    # before: gradients + one foreach temporary per parameter (AdamW's exp_avg_sq size);
    # after: the head's gradient + its update temporary, over the activations left
    # (all but the fp32 log-probabilities) and the gradient flowing into the blocks
    L, act = _logits(spec, 1, 256), m0["activations"]
    F, flow = 2 * L, 256 * spec.hidden * 2
    static = m0["weights"] + m0["optimizer"] + m0["temporaries"]
    assert m0["peak_allocated"] == pytest.approx(static + 2 * m0["gradients"], rel=1e-6)
    assert m1["peak_allocated"] == pytest.approx(static + max(act + 2 * F,
                                                              act - F + 2 * W + 2 * flow))
    assert r1.time_s["optimizer"] == r0.time_s["optimizer"]
    assert r1.optimizer_in_backward is True and r0.optimizer_in_backward is None


def test_memory_modes_per_device_with_fsdp():
    spec = load_model(L8)
    kw = dict(batch=16, seq=2048, devices=8, zero=3, micro_batch=2, grad_checkpointing=True)
    one = estimate_train(L8, H, peft="lora", **kw)
    eight = estimate_train(L8, H, peft="lora", loss_chunks=8, **kw)
    L = _logits(spec, 2, 2048)
    F = 2 * L
    assert one.memory_bytes["peak_allocated"] - eight.memory_bytes["peak_allocated"] == \
        pytest.approx(2 * L + F - max(L + F / 8, F / 4))
    full = estimate_train(L8, H, peft="full", **kw)
    fib = estimate_train(L8, H, peft="full", optimizer_in_backward=True, **kw)
    assert fib.memory_bytes["gradients"] < full.memory_bytes["gradients"] / 10
    assert fib.memory_bytes["peak"] <= full.memory_bytes["peak"]
    # DDP (ZeRO-0/1) keeps gradient-sized buckets: stepping in the backward frees nothing
    ddp = dict(batch=16, seq=2048, devices=8, tp=2, dp=4, micro_batch=4, grad_checkpointing=True)
    a = estimate_train(L8, H, peft="full", **ddp)
    b = estimate_train(L8, H, peft="full", optimizer_in_backward=True, **ddp)
    assert b.memory_bytes["gradients"] == a.memory_bytes["gradients"]
    # no gradient accumulation under it: refused for an explicit plan, skipped by the search
    with pytest.raises(SimcostError, match="micro-batches"):
        estimate_train(L8, H, peft="full", optimizer_in_backward=True,
                       **dict(kw, micro_batch=1))
    auto = estimate_train(L8, H, peft="full", optimizer_in_backward=True, batch=16, seq=2048,
                          devices=8, parallel="auto", grad_checkpointing=True)
    assert auto.parallel["plan"]["micro_batches"] == 1


def test_memory_modes_reach_the_sweep_and_are_refused_where_not_modelled():
    r = sweep_train(M, H, batches=[1, 2], seqs=[64, 128], peft="lora", loss_chunks=4,
                    optimizer_in_backward=True)
    e = estimate_train(M, H, batch=2, seq=128, peft="lora", loss_chunks=4,
                       optimizer_in_backward=True)
    assert r["peak_bytes"][1, 1] == pytest.approx(e.memory_bytes["peak"])
    with pytest.raises(SimcostError, match="jobs"):
        estimate_multi_train(M, H, jobs=2, batch=1, seq=64, loss_chunks=4)
    with pytest.raises(SimcostError, match="mezo"):
        estimate_train(M, H, peft="lora", optimizer="mezo", loss_chunks=4, **KW)
    for bad in (None, "x", 1.5, True):
        with pytest.raises(SimcostError, match="loss-chunks"):
            estimate_train(M, H, loss_chunks=bad, **KW)


def test_memory_modes_validation():
    with pytest.raises(SimcostError, match="loss-chunks"):
        estimate_train(M, H, loss_chunks=0, **KW)
    with pytest.raises(SimcostError, match="backward"):
        estimate_train(M, H, peft="lora", optimizer="mezo", optimizer_in_backward=True, **KW)
    ds = {"stage": 2, "reduce_bucket_size": 5e8}
    with pytest.raises(SimcostError, match="DeepSpeed"):
        estimate_train(M, H, peft="lora", devices=2, zero=2, deepspeed=ds,
                       optimizer_in_backward=True, **KW)


def test_cli_memory_mode_flags_in_json(capsys):
    assert main([*BASE, "--peft", "full", "--loss-chunks", "8", "--optimizer-in-backward",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["loss_chunks"] == 8 and d["optimizer_in_backward"] is True
    assert main([*BASE, "--peft", "full", "--json"]) == 0
    d0 = json.loads(capsys.readouterr().out)
    assert "loss_chunks" not in d0 and "optimizer_in_backward" not in d0
    assert d["memory_bytes"]["peak"] < d0["memory_bytes"]["peak"]


@pytest.mark.parametrize("extra", [["--loss-chunks", "0"], ["--loss-chunks", "-1"],
                                   ["--loss-chunks", "two"],
                                   ["--peft", "lora", "--jobs", "2", "--loss-chunks", "4"]])
def test_cli_memory_mode_bad_values(extra, capsys):
    assert main([*BASE, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simcost: error:") and "\n" not in err


TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1001, "max_position_embeddings": 128}


def _torch_peak(cfg, *, chunks, in_bwd, dtype, batch, seq):
    """Live-storage peak of the second step of torchtune's loop on a tiny HF Llama: the
    model's final hidden state through the LM head in ``chunks`` sequence chunks,
    CEWithChunkedOutputLoss's per-chunk ``F.cross_entropy(chunk.float(), ...)``, ``del
    logits``, backward; AdamW per parameter from post-accumulate-grad hooks with in_bwd."""
    import torch
    import torch.nn.functional as F
    from simcost.validate.torch_measure import build_peft_model
    from simcost.validate.torch_peak import LiveMemory, _storage_bytes

    model = build_peft_model(cfg, None, dtype, "sdpa", meta=False)
    params = list(model.parameters())
    if in_bwd:
        opts = {p: torch.optim.AdamW([p], lr=1e-4, foreach=False) for p in params}

        def hook(p):
            opts[p].step()
            opts[p].zero_grad(set_to_none=True)
        for p in params:
            p.register_post_accumulate_grad_hook(hook)
        optims = list(opts.values())
    else:
        optims = [torch.optim.AdamW(params, lr=1e-4, foreach=False)]
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq),
                        generator=torch.Generator().manual_seed(0))
    labels = torch.hstack((ids[:, 1:], torch.full((batch, 1), -100)))

    def loss_fn(logits):
        total = (labels != -100).sum()
        loss = 0.0
        for lg, lb in zip(logits, labels.tensor_split(chunks, dim=1)):
            loss += F.cross_entropy(lg.reshape(-1, lg.size(-1)).float(), lb.reshape(-1),
                                    ignore_index=-100, reduction="sum")
        return loss / total

    def step():
        h = model.model(input_ids=ids, use_cache=False).last_hidden_state
        logits = [model.lm_head(c) for c in h.tensor_split(chunks, dim=1)]
        del h
        loss = loss_fn(logits)
        del logits
        loss.backward()
        if not in_bwd:
            optims[0].step()
            optims[0].zero_grad(set_to_none=True)

    step()
    state = [v for o in optims for s in o.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    static = _storage_bytes(params + list(model.buffers()) + state) + ids.untyped_storage().nbytes()
    tracker = LiveMemory(static)
    with tracker:
        step()
    return tracker.peak


@pytest.mark.torch
@pytest.mark.parametrize("tied,dtype,batch,seq,chunks,in_bwd", [
    (False, "bf16", 2, 64, 1, False),    # logits-bound, unchunked (today's HF numbers)
    (False, "bf16", 2, 64, 8, False),    # logits-bound, chunked (unchunked formula: +27 %)
    (True, "fp32", 1, 64, 8, False),     # head weight-gradient accumulation (without: -6 %)
    (True, "fp32", 1, 16, 1, True),      # gradients freed in backward (without: +11 %)
    (False, "bf16", 1, 32, 8, True),     # both (either one alone: about +-2.4 %)
])
def test_memory_modes_match_torch(tied, dtype, batch, seq, chunks, in_bwd):
    from simcost.models.config import spec_from_config
    from simcost.sim.memory import training_memory
    cfg = {**TINY, "tie_word_embeddings": tied}
    measured = _torch_peak(cfg, chunks=chunks, in_bwd=in_bwd, dtype=dtype, batch=batch,
                           seq=seq)
    g, a = pipeline.build_graph(spec_from_config(cfg), batch, seq, dtype=dtype, attn="sdpa",
                                peft=PeftSpec("full"), device_kind="cpu")
    m = training_memory(g, a, optimizer="adamw", mixed="none", checkpointing=False,
                        runtime_overhead=0, foreach=False, loss_chunks=chunks,
                        optimizer_in_backward=in_bwd)
    assert float(m.peak) == pytest.approx(measured, rel=0.01)
