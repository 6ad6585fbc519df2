"""peft ``adapter_config.json`` read with peft's own semantics (issue 12).

The truth tests build each tiny random HF model, wrap it with peft from the same config dict,
and require simcost's trainable parameters (through ``estimate_train(..., peft_config=PATH)``)
to equal peft's exactly, and the step's matmul FLOPs and saved activations to agree as the
``validate exact`` suite requires. The rest needs no torch: one-line errors for bad values and
files, peft's matching rules on real model sizes, and a fuzz of the parser.
"""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from simcost import api
from simcost.cli import main
from simcost.errors import SimcostError
from simcost.peft.spec import PeftSpec, from_peft_dict
from simcost.validate import exact

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "llama-gqa"

# (tiny model, LoRA config) pairs; each must give peft's numbers exactly
LORA_CASES = [
    (LLAMA, {"r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 16}}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj", "v_proj"], "alpha_pattern": {"q_proj": 16}}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "rank_pattern": {r"layers\.0\..*": 6, "o_proj": 3}, "alpha_pattern": {"k_proj": 1},
             "use_rslora": True}),
    (LLAMA, {"r": 4, "target_modules": ["model.layers.1.self_attn.q_proj", "v_proj"]}),
    # an exact name bypasses layers_to_transform, a suffix does not
    (LLAMA, {"r": 4, "target_modules": ["model.layers.1.self_attn.q_proj", "k_proj"],
             "layers_to_transform": [0]}),
    (LLAMA, {"r": 4, "target_modules": r".*layers\.1\..*(q|k)_proj"}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1],
             "layers_pattern": "layers"}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj"], "layers_to_transform": 0}),
    (LLAMA, {"r": 4, "target_modules": "all-linear", "exclude_modules": ["down_proj"]}),
    (LLAMA, {"r": 4, "target_modules": "ALL-LINEAR", "exclude_modules": r".*\.0\..*"}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["mlp"]}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"],
             "modules_to_save": ["model.layers.1.mlp"]}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True,
             "rank_pattern": {"model.layers.0.self_attn.v_proj": 2}}),
    (LLAMA, {"r": 4, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0],
             "use_dora": True, "lora_dropout": 0.1}),
    ("llama-mha-bias", {"r": 4, "target_modules": ["q_proj", "o_proj"], "bias": "all"}),
    ("llama-mha-bias", {"r": 4, "target_modules": ["q_proj", "o_proj"], "bias": "lora_only"}),
    ("qwen2", {"r": 4, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}),
    ("mixtral", {"r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 8},
                 "exclude_modules": ["model.layers.0.self_attn.q_proj"]}),
    ("gpt2", {"r": 4, "target_modules": ["c_attn", "c_proj", "c_fc"],
              "rank_pattern": {"c_fc": 8, "attn.c_proj": 2}}),
    ("gpt2", {"r": 4, "target_modules": ["c_attn"], "modules_to_save": ["wte", "lm_head"],
              "fan_in_fan_out": True}),
    ("gpt2", {"r": 4, "target_modules": ["c_attn", "mlp.c_proj"], "layers_to_transform": 0}),
    ("gpt2", {"r": 4, "target_modules": ["c_attn", "c_proj"], "bias": "all",
              "modules_to_save": ["ln_f"]}),
    ("gpt2", {"r": 4, "target_modules": r"transformer\.h\.1\.(attn|mlp)\.c_proj", "use_dora": True}),
    ("gpt2", {"r": 3, "target_modules": "all-linear", "exclude_modules": r"transformer\.h\.0\..*",
              "bias": "lora_only", "rank_pattern": {"c_attn": 5}}),
]
OTHER_CASES = [
    (LLAMA, {"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"]}),  # peft's default ff
    (LLAMA, {"peft_type": "IA3", "target_modules": r".*\.1\.(self_attn\.v_proj|mlp\.up_proj)",
             "feedforward_modules": r".*up_proj"}),
    (LLAMA, {"peft_type": "IA3", "exclude_modules": ["model.layers.0.mlp.down_proj"]}),
    ("gpt2", {"peft_type": "IA3", "target_modules": ["c_attn", "mlp.c_proj"],
              "feedforward_modules": ["mlp.c_proj"], "layers_to_transform": [0]}),  # ignored by peft
    (LLAMA, {"peft_type": "LN_TUNING", "exclude_modules": ["model.norm"]}),
    ("gpt2", {"peft_type": "LN_TUNING", "target_modules": ["transformer.h.1.ln_2", "ln_f"]}),
    (LLAMA, {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 64,
             "prompt_tuning_init": "RANDOM"}),
]


def _full(cfg: dict) -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", **cfg}


def _write(tmp_path: Path, name: str, cfg: dict) -> tuple[Path, Path]:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(exact.TINY_CONFIGS[name]))
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    return tmp_path / "model" / "config.json", tmp_path / "adapter_config.json"


def _ids(cases):
    return [f"{n}-{i}" for i, (n, _) in enumerate(cases)]


@pytest.mark.torch
@pytest.mark.parametrize("name,cfg", LORA_CASES + OTHER_CASES, ids=_ids(LORA_CASES + OTHER_CASES))
def test_matches_peft_exactly(tmp_path, name, cfg):
    from simcost.validate.torch_measure import measure_step

    cfg = _full(cfg)
    model_path, adapter_path = _write(tmp_path, name, cfg)
    est = api.estimate_train(str(model_path), "cpu-generic", batch=1, seq=16,
                             peft_config=str(adapter_path))
    config = exact.TINY_CONFIGS[name]
    m = measure_step(config, cfg, batch=2, seq=7, dtype="fp32", attn="eager")
    assert est.params["trainable"] == m.params_trainable
    s = exact.simcost_numbers(config, from_peft_dict(cfg), 2, 7, "fp32", "eager")
    res = exact.CaseResult(name, "cfg", "fp32", "eager", 2, 7, simcost=s, torch={
        "params_total": m.params_total, "params_trainable": m.params_trainable,
        "flops_matmul_forward": m.flops_matmul_forward,
        "flops_matmul_backward": m.flops_matmul_backward,
        "activations_bytes": m.activations_bytes})
    assert not res.mismatches(), res.mismatches()


@pytest.mark.torch
@pytest.mark.parametrize("cfg", [
    {"r": 4, "target_modules": ["q_proj"], "exclude_modules": ["q_proj"]},
    {"r": 4, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["self_attn"]},
    {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["proj"]},
    {"r": 4, "target_modules": ["input_layernorm"]},
    {"r": 4, "target_modules": "all-linear", "layers_to_transform": [0]},
    {"r": 4, "target_modules": ["q_proj"], "layers_pattern": "layers"},
])
def test_refused_where_peft_fails(tmp_path, cfg):
    """What peft refuses, simcost refuses in one line."""
    from simcost.validate.torch_measure import build_peft_model

    cfg = _full(cfg)
    with pytest.raises(Exception):
        build_peft_model(exact.TINY_CONFIGS[LLAMA], cfg, "fp32", "eager", meta=False)
    model_path, adapter_path = _write(tmp_path, LLAMA, cfg)
    with pytest.raises(SimcostError) as e:
        api.estimate_train(str(model_path), "cpu-generic", batch=1, seq=16,
                           peft_config=str(adapter_path))
    assert "\n" not in str(e.value)


def _trainable(model: str, cfg: dict) -> int:
    return api.estimate_train(model, "cpu-generic", batch=1, seq=16,
                              peft=from_peft_dict(_full(cfg))).params["trainable"]


def test_rank_pattern_changes_trainable_llama_2_7b():
    """32 layers x (q: 32 x (4096 + 4096) + v: 8 x (4096 + 4096))."""
    assert _trainable("llama-2-7b", {"r": 8, "target_modules": ["q_proj", "v_proj"]}) == 4_194_304
    assert _trainable("llama-2-7b", {"r": 8, "target_modules": ["q_proj", "v_proj"],
                                     "rank_pattern": {"q_proj": 32}}) == 10_485_760
    # the first matching key wins, in the file's order; alpha_pattern changes no count
    assert _trainable("llama-2-7b", {"r": 8, "target_modules": ["q_proj", "v_proj"],
                                     "rank_pattern": {r"layers\.0\.self_attn\.q_proj": 1,
                                                      "q_proj": 32},
                                     "alpha_pattern": {"q_proj": 64}}) == 10_485_760 - 31 * 8192
    spec = from_peft_dict(_full({"alpha_pattern": {"q_proj": 64}}))
    assert spec.alpha_pattern == (("q_proj", 64.0),)


TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}


@pytest.mark.parametrize("rank_pattern,trainable", [({}, 1_126_400), ({"q_proj": 32}, 3_289_088)])
def test_issue_rank_pattern_case(tmp_path, capsys, rank_pattern, trainable):
    """The issue's case (a TinyLlama-1.1B-shaped model, r=8 on q_proj and v_proj): rank_pattern
    was ignored. 22 x (32 x (2048 + 2048) + 8 x (2048 + 256)) = 3,289,088."""
    (tmp_path / "config.json").write_text(json.dumps(TINYLLAMA))
    (tmp_path / "adapter_config.json").write_text(json.dumps(_full({
        "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": rank_pattern})))
    rc = main(["estimate", "train", "--model", str(tmp_path / "config.json"), "--hardware",
               "a100-80gb-sxm", "--batch", "1", "--seq", "512", "--peft-config",
               str(tmp_path / "adapter_config.json"), "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0 and json.loads(out)["params"]["trainable"] == trainable


def test_fully_qualified_and_layer_selection_llama_2_7b():
    one = 16 * (4096 + 4096)
    assert _trainable("llama-2-7b", {"r": 16, "target_modules": [
        "model.layers.0.self_attn.q_proj", "model.layers.31.self_attn.q_proj"]}) == 2 * one
    assert _trainable("llama-2-7b", {"r": 16, "target_modules": ["q_proj"],
                                     "layers_to_transform": [0, 5, 6, 7]}) == 4 * one
    assert _trainable("llama-2-7b", {"r": 16, "target_modules":
                                     r".*\.(1|2)\d\.self_attn\.q_proj"}) == 20 * one
    assert _trainable("llama-2-7b", {"r": 16, "target_modules": ["q_proj"],
                                     "exclude_modules": r".*\.[0-9]\.self_attn\.q_proj"}) == 22 * one


@pytest.mark.parametrize("cfg,needle", [
    ({"r": "sixteen"}, 'r must be a valid integer, got "sixteen"'),
    ({"target_modules": 5}, "target_modules must be a string (a regex) or a list of strings, got 5"),
    ({"lora_alpha": None}, "lora_alpha must be a valid number, got null"),
    ({"layers_to_transform": "x"}, 'layers_to_transform must be a layer index or a list'),
    ({"peft_type": "LOHA"}, "unknown peft_type"),
    ({"peft_type": 7}, "unknown peft_type"),
    ({"r": 0}, "r must be greater than or equal to 1, got 0"),
    ({"r": 10 ** 7}, "r must be less than or equal to 1000000"),
    ({"r": True}, "r must be a valid integer, got true"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"lora_dropout": 1.0}, "lora_dropout must be less than 1"),
    ({"lora_dropout": -0.1}, "lora_dropout must be greater than or equal to 0"),
    ({"bias": "some"}, "bias must be 'none', 'all' or 'lora_only'"),
    ({"use_dora": "yes"}, "use_dora must be a valid boolean"),
    ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern['q_proj'] must be a valid integer"),
    ({"rank_pattern": [1]}, "rank_pattern must be an object"),
    ({"rank_pattern": {"(": 4}}, "not a valid regular expression"),
    ({"target_modules": "("}, "target_modules is not a valid regular expression"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of module names"),
    ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters is not supported"),
    ({"lora_bias": True}, "lora_bias"),
    ({"layer_replication": [[0, 1]]}, "layer_replication is not supported"),
    ({"use_qalora": True}, "use_qalora"),
    ({"target_modules": "all-linear", "layers_to_transform": [0]},
     "cannot be used when target_modules is a string"),
    ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
    ({"peft_type": "PREFIX_TUNING"}, "num_virtual_tokens is required"),
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "prefix_projection": True},
     "prefix_projection"),
    ({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]},
     "must be a subset of target_modules"),
])
def test_bad_adapter_config_one_line(tmp_path, capsys, cfg, needle):
    (tmp_path / "adapter_config.json").write_text(json.dumps(_full(cfg)))
    rc = main(["estimate", "train", "--model", "llama-2-7b", "--hardware", "a100-80gb-sxm",
               "--batch", "1", "--seq", "64", "--peft-config", str(tmp_path),
               "--frontend", "analytic"])    # the hand-built path's own parser
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert needle in err, err


@pytest.mark.parametrize("cfg,needle", [
    ({"target_modules": ["q_proj", "w_gate"]}, "'w_gate' is not in this model"),
    ({"target_modules": ["lm_head"]}, "the output head"),
    ({"target_modules": ["embed_tokens"]}, "an embedding"),
    ({"target_modules": r"model\.layers\.0\.mlp"}, "a container of modules"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["nothing_here"]},
     "modules_to_save 'nothing_here' matches no module"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["mlp", "down_proj"]}, "inside it"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [99]}, "match no module"),
])
def test_unmatched_targets_one_line(tmp_path, capsys, cfg, needle):
    (tmp_path / "adapter_config.json").write_text(json.dumps(_full(cfg)))
    rc = main(["estimate", "train", "--model", "llama-2-7b", "--hardware", "a100-80gb-sxm",
               "--batch", "1", "--seq", "64", "--peft-config", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


@pytest.mark.parametrize("content,needle", [
    (b'{"peft_type": "LORA", "r": 8, "x": "\xff\xfe"}', "is not UTF-8"),
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    (b'{"peft_type": "LORA",', "malformed JSON"),
    (b'[1, 2]', "is not a JSON object"),
])
def test_bad_adapter_file_one_line(tmp_path, capsys, content, needle):
    (tmp_path / "adapter_config.json").write_bytes(content)
    rc = main(["estimate", "train", "--model", "llama-2-7b", "--hardware", "a100-80gb-sxm",
               "--batch", "1", "--seq", "64", "--peft-config", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_what_peft_writes_is_read_without_warnings():
    """The keys ``save_pretrained`` writes that do not change the cost are ignored quietly;
    an unknown key and a non-causal task type are named in one warning line each."""
    saved = {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "x/y",
             "bias": "none", "corda_config": None, "eva_config": None, "exclude_modules": None,
             "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
             "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
             "loftq_config": {}, "lora_alpha": 32, "lora_bias": False, "lora_dropout": 0.05,
             "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
             "peft_type": "LORA", "peft_version": "0.21.2", "r": 16, "rank_pattern": {},
             "revision": None, "target_modules": ["v_proj", "q_proj"], "target_parameters": None,
             "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_dora": False,
             "use_qalora": False, "qalora_group_size": 16, "use_rslora": False,
             "alora_invocation_tokens": None, "arrow_config": None, "ensure_weight_tying": False,
             "lora_ga_config": None, "runtime_config": {"ephemeral_gpu_offload": False}}
    spec = from_peft_dict(saved)
    assert spec.warnings == () and spec.r == 16 and spec.alpha == 32.0
    assert spec.targets == ("v_proj", "q_proj") and spec.modules_to_save == ()
    w = from_peft_dict({**saved, "task_type": "SEQ_CLS", "frobnicate": 1}).warnings
    assert len(w) == 2 and "frobnicate" in w[0] and "SEQ_CLS" in w[1]


def test_to_peft_dict_round_trip():
    cfg = _full({"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"],
                 "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 2.0},
                 "exclude_modules": ["model.layers.0.self_attn.q_proj"],
                 "layers_to_transform": [0, 1], "layers_pattern": "layers",
                 "modules_to_save": ["lm_head"]})
    from simcost.peft.spec import to_peft_dict
    back = to_peft_dict(from_peft_dict(cfg), None)
    for k in ("r", "rank_pattern", "alpha_pattern", "exclude_modules", "layers_to_transform",
              "layers_pattern", "modules_to_save", "target_modules"):
        assert back[k] == cfg[k], k


def test_registry_refuses_duplicates():
    from simcost.peft.base import register
    with pytest.raises(ValueError, match="registered twice"):
        register("lora")(lambda g, m, s: None)


def _peft_imports(path: Path, mods: set[str]) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "simcost.peft":
                out |= {a.name for a in node.names if a.name in mods}
            elif node.module.startswith("simcost.peft."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("simcost.peft.")}
    return out


def test_peft_modules_import_no_cycle():
    """Dependencies inside simcost.peft point one way (base <-> modules_to_save was a cycle)."""
    files = {p.stem: p for p in (ROOT / "simcost" / "peft").glob("*.py") if p.stem != "__init__"}
    deps = {m: _peft_imports(p, set(files)) - {m} for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in deps[m]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join(stack + [m, d])
            if d not in state:
                visit(d, stack + [m])
        state[m] = 2

    for m in deps:
        if m not in state:
            visit(m, [])
    assert "base" not in deps["modules_to_save"]


# -- fuzz: junk configs give a spec or one SimcostError line, never another exception --------

KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
        "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias",
        "use_dora", "use_rslora", "modules_to_save", "feedforward_modules", "num_virtual_tokens",
        "target_parameters", "lora_bias", "task_type", "inference_mode", "init_lora_weights",
        "fan_in_fan_out", "prefix_projection", "token_dim", "layer_replication", "junk"]
NAMES = st.sampled_from(["q_proj", "v_proj", "k_proj", "o_proj", "down_proj", "mlp", "lm_head",
                         "model.layers.0.self_attn.q_proj", "all-linear", ".*", r".*\.1\..*",
                         "layers", "(", "", "norm", "embed_tokens", "self_attn", "h"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True),
                    NAMES, st.text(max_size=6))
JSONISH = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=4),
                                                    st.dictionaries(NAMES, c, max_size=3)),
                       max_leaves=8)
TYPES = st.sampled_from(["LORA", "IA3", "PREFIX_TUNING", "PROMPT_TUNING", "LN_TUNING", "lora",
                         "LOHA", None, 3])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ptype=TYPES, body=st.dictionaries(st.sampled_from(KEYS), JSONISH, max_size=6))
def test_fuzz_parser_and_graph(ptype, body):
    from simcost.models.config import spec_from_config
    from simcost import pipeline

    cfg = {**body, "peft_type": ptype} if "peft_type" not in body else body
    try:
        spec = from_peft_dict(cfg)
    except SimcostError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(spec, PeftSpec) and spec.r >= 1 and math.isfinite(spec.alpha)
    model = spec_from_config(exact.TINY_CONFIGS[LLAMA])
    try:
        g, a = pipeline.build_graph(model, 1, 8, dtype="fp32", peft=spec)
    except SimcostError as e:
        assert "\n" not in str(e)
        return
    trainable = sum(p.numel * c for p, c in g.params() if p.trainable)
    assert trainable >= 0 and math.isfinite(float(a.total("fwd_matmul_flops")))


MODULES = st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj", "self_attn.q_proj", "model.layers.1.mlp.down_proj",
                           "model.layers.0.self_attn.v_proj"])
WELL_TYPED = st.fixed_dictionaries({"peft_type": st.just("LORA"), "r": st.integers(1, 9)}, optional={
    "target_modules": st.one_of(st.lists(MODULES, min_size=1, max_size=4),
                                st.sampled_from(["all-linear", r".*\.1\..*_proj", r".*q_proj"])),
    "exclude_modules": st.one_of(st.lists(MODULES, max_size=2), st.just(r".*\.0\.mlp\..*")),
    "layers_to_transform": st.one_of(st.integers(0, 2), st.lists(st.integers(0, 2), max_size=2)),
    "rank_pattern": st.dictionaries(st.one_of(MODULES, st.just(r"layers\.1\..*")),
                                    st.integers(1, 9), max_size=3),
    "modules_to_save": st.lists(st.sampled_from(["lm_head", "embed_tokens", "model.norm",
                                                 "post_attention_layernorm"]), max_size=2),
    "bias": st.sampled_from(["none", "all", "lora_only"]), "use_dora": st.booleans()})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=WELL_TYPED)
def test_fuzz_well_typed_configs(cfg):
    """Well-typed configs build or fail in one line; a rank_pattern naming r itself, or an
    alpha_pattern, changes no number."""
    from simcost.models.config import spec_from_config
    from simcost import pipeline

    model = spec_from_config(exact.TINY_CONFIGS["llama-mha-bias"])

    def numbers(c):
        g, a = pipeline.build_graph(model, 1, 8, dtype="fp32", peft=from_peft_dict(c))
        return (sum(p.numel * n for p, n in g.params() if p.trainable),
                float(a.total("fwd_matmul_flops")), float(a.activations_bytes))

    try:
        base = numbers(cfg)
    except SimcostError as e:
        assert "\n" not in str(e)
        return
    same = {**cfg, "rank_pattern": {k: cfg["r"] for k in cfg.get("rank_pattern", {})},
            "alpha_pattern": {"q_proj": 99.0}}
    plain = {k: v for k, v in cfg.items() if k != "rank_pattern"}
    assert numbers(same) == numbers(plain)
    assert all(math.isfinite(x) and x >= 0 for x in base)
