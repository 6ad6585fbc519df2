"""Parameter counts: the zoo's published sizes and peft's closed forms."""
import json
import re
from pathlib import Path

import pytest

from simcost.api import estimate_train
from simcost.errors import SimcostError
from simcost.models.config import load_model, zoo_entry, zoo_names
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


ZOO_README = Path(__file__).resolve().parents[1] / "models_zoo" / "README.md"
TRACED_SECTION = "## Models for the traced front end"


def readme_traced_totals() -> dict[str, int]:
    """name -> total params of the README's traced-front-end table (its fourth column)."""
    text = ZOO_README.read_text()
    section = text.split(TRACED_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \|[^|]*\|[^|]*\| ([\d,]+) \|", section, re.M)
    return {name: int(total.replace(",", "")) for name, total in rows}


TRACED_TOTAL = readme_traced_totals()


def test_zoo_is_complete():
    assert len(TRACED_TOTAL) == 19 and not set(TRACED_TOTAL) & set(EXPECTED_TOTAL)
    assert set(zoo_names()) == set(EXPECTED_TOTAL) | set(TRACED_TOTAL)


@pytest.mark.parametrize("name", sorted(EXPECTED_TOTAL) + sorted(TRACED_TOTAL))
def test_zoo_entry_front_end(name):
    e = zoo_entry(name)
    assert e["name"] == name and e["config"] == json.loads(
        (ZOO_README.parent / name / "config.json").read_text())
    assert e["frontend"] == ("analytic" if name in EXPECTED_TOTAL else "traced")
    assert e["library"] == ("diffusers" if "_class_name" in e["config"] else "transformers")
    if name in TRACED_TOTAL:
        with pytest.raises(SimcostError, match=r"unsupported architecture .*--frontend traced"):
            load_model(name)


def test_zoo_entry_unknown_names_the_nearest():
    with pytest.raises(SimcostError, match=r"unknown zoo model 'qwen3-8' .*qwen3-8b"):
        zoo_entry("qwen3-8")
    with pytest.raises(SimcostError, match="unknown zoo model"):
        zoo_entry("../models_zoo/gpt2")


def test_models_command_lists_every_zoo_model(capsys):
    from simcost.cli import main
    assert main(["models", "--json"]) == 0
    rows = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert set(rows) == set(zoo_names())
    assert rows["llama-2-7b"]["frontend"] == "analytic" and rows["llama-2-7b"]["layers"] == 32
    assert rows["sdxl-unet"] == {"name": "sdxl-unet", "architecture": "UNet2DConditionModel",
                                 "library": "diffusers", "frontend": "traced", "layers": None,
                                 "hidden": None}
    assert main(["models"]) == 0
    assert "deepseek-v2-lite" in capsys.readouterr().out


# transformers auto classes tried in order for an entry's class name (AutoModel last: the base
# model of a file that names no architecture, as deberta-v3-base)
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSeq2SeqLM",
                "AutoModelForImageClassification", "AutoModelForImageTextToText",
                "AutoModelForSpeechSeq2Seq", "AutoModel")


def build_on_meta(name):
    """The zoo model built from its config on the meta device (no weights, no download)."""
    import torch
    e = zoo_entry(name)
    if e["library"] == "diffusers":
        diffusers = pytest.importorskip("diffusers")
        with torch.device("meta"):
            return getattr(diffusers, e["class_name"]).from_config(e["config"])
    import transformers
    cfg = transformers.AutoConfig.for_model(**e["config"])
    auto = next(a for a in AUTO_CLASSES if a == "AutoModel" and e["class_name"] is None or
                e["class_name"] in getattr(transformers, a)._model_mapping._model_mapping.values())
    with torch.device("meta"):
        model = getattr(transformers, auto).from_config(cfg)
    assert e["class_name"] is None or type(model).__name__ == e["class_name"]
    return model


@pytest.mark.torch
@pytest.mark.parametrize("name", sorted(TRACED_TOTAL))
def test_traced_zoo_builds_with_the_readme_count(name):
    model = build_on_meta(name)
    assert sum(p.numel() for p in model.parameters()) == TRACED_TOTAL[name]


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
