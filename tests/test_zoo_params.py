"""Parameter counts: the zoo's published sizes and peft's closed forms."""
import pytest

from simcost.api import estimate_train
from simcost.models.config import load_model, zoo_names
from simcost.pipeline import build_graph
from simcost.peft.spec import PeftSpec

# total parameters of the HF models (meta-device builds; Qwen v1 by hand from its modules)
EXPECTED_TOTAL = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800, "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824, "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704, "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-72b": 72_706_203_648, "gpt2": 124_439_808, "gpt2-xl": 1_557_611_200,
    "qwen-1.8b": 1_836_828_672, "qwen-7b": 7_721_324_544, "qwen-14b": 14_167_290_880,
    "qwen-72b": 72_287_920_128,
}


def test_zoo_is_complete():
    assert set(zoo_names()) == set(EXPECTED_TOTAL)


@pytest.mark.parametrize("name", sorted(EXPECTED_TOTAL))
def test_total_params(name):
    g, _ = build_graph(load_model(name), 1, 16, dtype="bf16", peft=PeftSpec("full"))
    assert sum(p.numel * c for p, c in g.params()) == EXPECTED_TOTAL[name]


def test_issue_anchor_llama2_7b_lora16():
    r = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=2048, peft="lora", rank=16,
                       dtype="bf16")
    assert r.params["total"] == 6_738_415_616
    assert r.params["trainable"] == 8_388_608


@pytest.mark.parametrize("targets,expected", [(None, 4_194_304), ("all-linear", 19_988_480)])
def test_lora_r8_closed_form(targets, expected):
    # peft_methods.md: LLaMA-7B, r=8: q,v = 4,194,304; all-linear = 19,988,480
    r = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=128, peft="lora", rank=8,
                       targets=targets)
    assert r.params["trainable"] == expected


def test_gqa_lora_uses_kv_width():
    # llama-3.1-8b: d=4096, kv=1024; q,v: 32 * 8 * ((4096+4096) + (4096+1024))
    r = estimate_train("llama-3.1-8b", "h100-sxm", batch=1, seq=128, peft="lora", rank=8)
    assert r.params["trainable"] == 32 * 8 * (8192 + 5120)


def test_prefix_params_use_kv_heads():
    r = estimate_train("llama-3.1-8b", "h100-sxm", batch=1, seq=128, peft="prefix",
                       num_virtual_tokens=20)
    assert r.params["trainable"] == 20 * 32 * 2 * 1024


def test_freeze_last_layers():
    m = load_model("llama-2-7b")
    g, a = build_graph(m, 1, 64, peft=PeftSpec("freeze", trainable_layers=2))
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    head = 4096 + 32000 * 4096
    assert sum(p.numel * c for p, c in g.params() if p.trainable) == 2 * block + head
