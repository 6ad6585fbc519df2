"""MLPerf llama2_70b_lora memory per device (issue 10): the submitted NeMo plan, fp8-stored
weights (NeMo fp8_params), fp8 fused attention's saved tensors, and every dev row that ran
predicted to fit."""
from __future__ import annotations

import pytest

from simcost import pipeline
from simcost.api import estimate_train
from simcost.errors import SimcostError
from simcost.graph import kinds as K
from simcost.models import load_model
from simcost.peft.spec import PeftSpec
from simcost.sim.parallel.stage import fp8_attention_saving
from simcost.sim.parallel_api import fp8_weights
from simcost.validate.published import load_rows
from simcost.validate.published.mlperf import NEMO_PLANS, submitted_plan
from simcost.validate.published.sources import map_row

LORA = PeftSpec("lora", r=16, alpha=32, dropout=0.1,
                targets=("q_proj", "k_proj", "v_proj", "o_proj"), adapter_dtype="bf16")
SPEC = load_model("llama-2-70b")


def _graph(seq=256):
    return pipeline.build_graph(SPEC, 1, seq, dtype="bf16", attn="flash", peft=LORA,
                                device_kind="gpu")


def test_fp8_attention_keeps_fp8_q_k_v_out_by_hand():
    # TE FusedAttnFunc (NVTE_FP8_DPA_BWD=1) saves fp8 q, k, v, out instead of bf16 ones: one
    # byte less per element. Llama-2-70B: 64 query heads, 8 KV heads, head dim 128.
    s = 256
    g, a = _graph(s)
    q = o = s * 64 * 128
    k = v = s * 8 * 128
    hand = (q + k + v + o) * (2 - 1)
    saving = fp8_attention_saving(g, a)
    for seg, d in zip(g.segments, saving):
        has_attn = any(op.kind == K.SDPA for op in seg.ops)
        assert d == (hand if has_attn else 0.0)


def test_fp8_attention_lowers_plan_activations_by_the_saving():
    kw = dict(batch=8, seq=8192, peft=LORA, dtype="fp8", attn="flash", devices=8, tp=4, dp=2,
              micro_batch=1, max_positions=8192, fp8_params=True)
    bf = estimate_train("llama-2-70b", "h100-sxm", fp8_attention=False, **kw)
    f8 = estimate_train("llama-2-70b", "h100-sxm", fp8_attention=True, **kw)
    # per layer (s/tp tokens under sequence parallelism): 8192 x (8192 + 2 x 1024 + 8192) / 4
    hand = 80 * 8192 * (8192 + 1024 + 1024 + 8192) / 4
    d = bf.memory_bytes["activations"] - f8.memory_bytes["activations"]
    assert d == pytest.approx(hand, rel=1e-9)


def test_fp8_params_store_the_frozen_linear_weights_in_one_byte():
    # Llama-2-70B block linears: q, o (h x h), k, v (h x kv), gate, up, down (h x ffn), 80 layers
    h, kv, ffn = 8192, 1024, 28672
    numel = 80 * (2 * h * h + 2 * h * kv + 3 * h * ffn)
    g, _ = _graph(64)
    before = sum(p.nbytes * c for p, c in g.params())
    assert fp8_weights(g) > 0
    after = sum(p.nbytes * c for p, c in g.params())
    assert before - after == numel            # bf16 -> fp8: one byte per weight
    # the embedding, the LM head, the norms and the adapters keep their dtype
    kept = {p.dtype for p, _ in g.params() if p.dtype != "fp8"}
    assert kept == {"bf16"}
    assert all(p.dtype == "bf16" for p, _ in g.params() if p.role == "adapter")


def test_fp8_params_need_fp8():
    with pytest.raises(SimcostError, match="--fp8-params"):
        estimate_train("llama-2-70b", "h100-sxm", batch=8, seq=1024, peft=LORA, devices=8,
                       tp=4, dtype="bf16", fp8_params=True)
    with pytest.raises(SimcostError, match="--fp8-activation"):
        estimate_train("llama-2-70b", "h100-sxm", batch=8, seq=1024, peft=LORA, devices=8,
                       tp=4, dtype="bf16", fp8_activation=True)


def test_the_250_gib_plan_is_the_b200_submitted_plan_with_bf16_weights():
    # v4.1 DGX B200, config_DGXB200_1x8x2xtp1pp1cp2: weights were priced bf16 (128.6 GiB a
    # device at tp1); NeMo's fp8_params halves the frozen linears
    kw = dict(batch=8, seq=8192, peft=LORA, dtype="fp8", attn="flash", devices=8, tp=1, cp=2,
              dp=4, micro_batch=1, fp8_attention=True, max_positions=8192)
    old = estimate_train("llama-2-70b", "b200", **kw).memory_bytes
    new = estimate_train("llama-2-70b", "b200", fp8_params=True, **kw).memory_bytes
    assert old["peak"] > 250 * 2 ** 30
    h, kv, ffn = 8192, 1024, 28672
    assert old["weights"] - new["weights"] == pytest.approx(
        80 * (2 * h * h + 2 * h * kv + 3 * h * ffn), rel=1e-6)


def test_qkv_lora_is_one_adapter_on_the_fused_projection_by_hand():
    # NeMo: one dropout, one A (hidden x r), one B (r x (q + 2 kv)) on linear_qkv; peft on HF:
    # three of each. Per layer the rule removes two A's (2 x r x hidden trainable weights), two
    # dropped bf16 copies of the block input with their bool masks (the first layer, whose
    # input needs no gradient, keeps no masks), and two of the three bf16 A outputs the B's
    # keep for their weight gradients (now one tensor)
    from simcost.models import build_model_graph
    from simcost.peft import apply_peft
    from simcost.sim.analysis import analyse
    from simcost.stack.fusions import FUSIONS
    s, h, r = 512, 8192, 16

    def build(fuse):
        g = build_model_graph(SPEC, 1, s, "bf16", "flash", "gpu")
        apply_peft(g, SPEC, LORA)
        n = FUSIONS["qkv_lora"](g) if fuse else 0
        return g, analyse(g), n

    g0, a0, _ = build(False)
    g1, a1, n = build(True)
    assert n == 1                                   # the one block group (80 layers)
    trainable = lambda g: sum(p.numel * c for p, c in g.params() if p.trainable)  # noqa: E731
    assert trainable(g0) - trainable(g1) == 80 * 2 * r * h
    blocks = [i for i, seg in enumerate(g1.segments) if seg.first_layer is not None]
    first, rest = blocks
    assert a0.saved_local[rest] - a1.saved_local[rest] == 2 * (1 + 2) * s * h + 2 * 2 * s * r
    assert a0.saved_local[first] - a1.saved_local[first] == 2 * 2 * s * h + 2 * 2 * s * r
    names = {op.name for op in g1.segments[blocks[-1]].ops}
    assert {"k_proj.lora_A", "v_proj.lora_A", "k_proj.lora_dropout"}.isdisjoint(names)
    assert {"q_proj.lora_A", "k_proj.lora_B", "v_proj.lora_B"} <= names


def test_qkv_lora_leaves_other_adapters_alone():
    from simcost.models import build_model_graph
    from simcost.peft import apply_peft
    from simcost.stack.fusions import FUSIONS
    g = build_model_graph(SPEC, 1, 64, "bf16", "flash", "gpu")
    apply_peft(g, SPEC, PeftSpec("lora", r=16, targets=("q_proj", "v_proj")))
    assert FUSIONS["qkv_lora"](g) == 0              # no k_proj adapter: nothing to fuse


def _step_rows():
    return [r for r in load_rows() if r["id"].startswith("MLPERF") and
            r["metric"] == "step_time_s"]


def test_the_mapper_uses_the_submitted_plan_where_nvidia_published_it():
    rows = {r["id"]: r for r in _step_rows()}
    h100 = map_row(rows["MLPERF-022"])          # v4.0 eos: config_DGXH100_1x8x4xtp4pp1cp1
    assert {k: h100.distributed[k] for k in ("tp", "pp", "cp", "dp")} == \
        dict(tp=4, pp=1, cp=1, dp=2)
    assert "parallel" not in h100.distributed and h100.stack == "nemo"
    assert h100.distributed["fp8_params"] is True
    h200 = map_row(rows["MLPERF-080"])          # v4.1: config_DGXH200_1x8x2xtp1pp1cp2, FP8_DPA=0
    assert (h200.distributed["tp"], h200.distributed["cp"]) == (1, 2)
    assert h200.distributed["fp8_attention"] is False
    assert submitted_plan(rows["MLPERF-024"], "h200", 2).tp == 2     # v4.0: tp2 cp1
    assert submitted_plan(rows["MLPERF-044"], "h200", 8) is None     # no NVIDIA config
    assert map_row(rows["MLPERF-044"]).distributed["parallel"] == "auto"
    assert all(p.tp * p.pp * p.cp == mp for (_, _, mp), p in NEMO_PLANS.items())


def test_a_plan_the_row_text_names_is_used():
    row = dict(next(r for r in _step_rows() if r["id"] == "MLPERF-072"),
               notes="config_DGXB200_1x8x2xtp2pp1cp1.sh (hypothetical)")
    mp = map_row(row)
    assert (mp.distributed["tp"], mp.distributed["cp"]) == (2, 1)
    assert any("the row's notes: config_DGXB200_1x8x2xtp2pp1cp1.sh" in n for n in mp.notes)
    # a named plan of another model-parallel size than the row's (8 / dp 4 = 2) is not used
    odd = map_row(dict(row, notes="config_DGXB200_1x8x1xtp1pp1cp1.sh"))
    assert (odd.distributed["tp"], odd.distributed["cp"]) == (1, 2)     # NVIDIA's v4.1 config


# The v4.1 H200 submitted plan (tp1 cp2, bf16 attention, config_DGXH200_1x8x2xtp1pp1cp2.sh)
# still prices above the device: simcost's saved activations there are HF eager's norms and
# SwiGLU, and NeMo's TransformerEngine kernels keep less (fused RMSNorm: its bf16 input, not
# the fp32 upcast; fused SwiGLU: its input only, and in fp8 under the config's
# FP8_ACTIVATION=True). Strict: once the nemo stack models those these rows must fit and the
# marks go.
@pytest.mark.parametrize("row", [pytest.param(r, id=r["id"]) for r in _step_rows()])
def test_every_mlperf_row_that_ran_fits(row):
    mp = map_row(row)
    r = estimate_train(mp.model, mp.hardware, max_positions=mp.max_positions,
                       **mp.estimate_kwargs())
    m = r.memory_bytes
    assert r.fits, (f"{row['id']}: {r.parallel['plan_label']} needs {m['peak'] / 2 ** 30:.1f} "
                    f"GiB of {m['capacity'] / 2 ** 30:.1f}")


def test_fp8_activation_store_halves_the_fused_swiglu_saves_by_hand():
    """Megatron fused_bias_swiglu with fp8_input_store: the fused SwiGLU keeps gate and up
    (b x s x ffn each, 2 bytes in bf16) as float8 copies (1 byte): per layer the activations
    drop by 2 x b x s x ffn bytes, per device of a cp split."""
    from simcost.models.config import load_model
    spec = load_model("llama-2-70b")
    kw = dict(batch=8, seq=8192, peft="lora", dtype="fp8", devices=8, tp=1, cp=2, dp=4,
              micro_batch=1, fp8_params=True, stack="nemo", attn="flash")
    a = estimate_train("llama-2-70b", "h200", **kw)
    b = estimate_train("llama-2-70b", "h200", fp8_activation=True, **kw)
    tokens = 8192 // 2
    drop = spec.layers * 2 * tokens * spec.ffn
    assert a.memory_bytes["activations"] - b.memory_bytes["activations"] == \
        pytest.approx(drop, rel=1e-9)
    hf = estimate_train("llama-2-70b", "h200", fp8_activation=True, **{**kw, "stack": "hf"})
    assert any("--fp8-activation has no effect" in w for w in hf.warnings)
