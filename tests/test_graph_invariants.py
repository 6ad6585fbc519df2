"""Structural truths of the graph that hold for any shape."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from simcost.api import estimate_train, sweep_train
from simcost.models.config import load_model
from simcost.pipeline import build_graph
from simcost.peft.spec import PeftSpec

LLAMA = load_model("llama-2-7b")


def _totals(peft, attn="eager", b=2, s=256, model=LLAMA):
    g, a = build_graph(model, b, s, dtype="bf16", attn=attn, peft=peft)
    return g, a


def test_full_finetune_backward_is_twice_forward_for_linears():
    g, a = _totals(PeftSpec("full"))
    lin_f = sum(r.cost.fwd_matmul_flops * r.count for r in a.records if r.op.kind == "linear")
    lin_b = sum((r.cost.bwd_act_matmul_flops + r.cost.bwd_weight_matmul_flops) * r.count
                for r in a.records if r.op.kind == "linear")
    emb_head = 2 * 2 * 256 * 4096 * 32000   # lm_head forward; its input grad is still needed
    assert lin_b == 2 * lin_f


def test_frozen_weights_cost_no_weight_gradient():
    g, a = _totals(PeftSpec("lora", r=8, alpha=16))
    for r in a.records:
        if r.op.kind == "linear" and not any(p.trainable for p in r.op.params):
            assert r.cost.bwd_weight_flops == 0
            assert r.op.inputs[0] not in r.cost.saved   # a frozen linear keeps no input


def test_nothing_below_lowest_trainable_tensor_runs_backward():
    g, a = _totals(PeftSpec("freeze", trainable_layers=4))
    top = set(range(28, 32))
    for r in a.records:
        seg = g.segments[r.segment]
        if seg.first_layer is not None and seg.first_layer not in top:
            assert r.cost.bwd_act_flops == 0 and r.cost.bwd_weight_flops == 0
            assert r.cost.saved == []
        if seg.name == "embed":
            assert not r.rg_out


def test_lora_first_layer_skips_key_gradient():
    # LoRA on q,v only: in layer 0 keys do not depend on anything trainable, so the
    # scores matmul needs no gradient for k (torch skips that bmm too)
    g, a = _totals(PeftSpec("lora", r=8, alpha=16))
    scores = [r for r in a.records if r.op.name == "scores"]
    assert len(scores) == 2 and scores[0].count == 1 and scores[1].count == 31
    assert scores[0].rg_in == (True, False) and scores[1].rg_in == (True, True)


def test_eager_keeps_probabilities_sdpa_does_not():
    _, eager = _totals(PeftSpec("full"), "eager")
    _, sdpa = _totals(PeftSpec("full"), "sdpa")
    probs_fp32 = 2 * 32 * 256 * 256 * 4
    assert eager.activations_bytes - sdpa.activations_bytes > 32 * probs_fp32 * 0.9


def test_prompt_tuning_grows_sequence():
    g, a = _totals(PeftSpec("prompt", num_virtual_tokens=20))
    g0, a0 = _totals(PeftSpec("full"))
    blk = g.block_segments()[0]
    assert g.tensors[blk.input_tid].shape[1] == 276


def test_checkpointing_reduces_activations():
    a = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=4, seq=1024, peft="lora", rank=8)
    b = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=4, seq=1024, peft="lora", rank=8,
                       grad_checkpointing=True)
    assert b.memory_bytes["activations"] < a.memory_bytes["activations"] / 4
    assert b.flops["recompute"] > 0 and b.time_s["backward"] > a.time_s["backward"]


def test_optimizer_states():
    full = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=128, peft="full", dtype="fp32")
    n = full.params["trainable"]
    assert full.memory_bytes["optimizer"] == 2 * 4 * n + 4 * 291   # 291 tensors, fp32 step each
    sgd = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=128, peft="full",
                         dtype="fp32", optimizer="sgd")
    assert sgd.memory_bytes["optimizer"] == 0
    mp = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=128, peft="full",
                        dtype="bf16", mixed_precision="bf16")
    assert mp.memory_bytes["master_weights"] == 4 * n


def test_qlora_weights_are_4bit():
    q = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=512, peft="qlora", rank=16)
    l = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=512, peft="lora", rank=16)
    assert q.memory_bytes["weights"] < 0.35 * l.memory_bytes["weights"]
    assert q.flops["forward"] > l.flops["forward"]       # dequantisation work


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 32), st.integers(16, 4096))
def test_sweep_matches_scalar_estimates(b, s):
    one = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=b, seq=s, peft="lora", rank=16)
    sw = sweep_train("llama-2-7b", "a100-80gb-sxm", batches=[b], seqs=[s], peft="lora", rank=16)
    assert np.isclose(sw["step_s"][0, 0], one.time_s["step"], rtol=1e-12)
    assert np.isclose(sw["peak_bytes"][0, 0], one.memory_bytes["peak"], rtol=1e-12)


def test_networkx_export():
    g, a = _totals(PeftSpec("lora", r=8, alpha=16))
    nx_g = g.to_networkx()
    assert nx_g.number_of_nodes() > 50
    import networkx as nx
    assert nx.is_directed_acyclic_graph(nx_g)


@pytest.mark.parametrize("model,peft", [("llama-2-7b", PeftSpec("lora", r=8, alpha=16)),
                                        ("mixtral-8x7b", PeftSpec("full")),
                                        ("gpt2", PeftSpec("prefix", num_virtual_tokens=8))])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemm_shapes_account_for_every_matmul_flop(model, peft, attn):
    """The time model prices GEMMs by shape; the shapes must add up to the FLOPs."""
    g, a = build_graph(load_model(model), 2, 64, dtype="bf16", attn=attn, peft=peft)
    for r in a.records:
        c = r.cost
        for gemms, flops in ((c.gemms_fwd, c.fwd_matmul_flops),
                             (c.gemms_bwd, c.bwd_act_matmul_flops + c.bwd_weight_matmul_flops)):
            if gemms:
                assert sum(2 * b * m * n * k for b, m, n, k in gemms) == pytest.approx(flops), r.op.name
            elif r.op.kind in ("linear", "matmul", "sdpa", "moe_experts"):
                assert flops == 0, r.op.name
