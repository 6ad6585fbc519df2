"""The planning CLI: the main job, JSON contract, and one-line errors with exit code 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simcost.cli import main

ROOT = Path(__file__).resolve().parents[1]
MAIN = ["estimate", "train", "--model", "llama-2-7b", "--peft", "lora", "--rank", "16",
        "--hardware", "a100-80gb-sxm", "--batch", "1", "--seq", "2048", "--dtype", "bf16"]


def run(args, capsys):
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_main_job_json(capsys):
    rc, out, err = run(MAIN + ["--json"], capsys)
    assert rc == 0 and err == ""
    d = json.loads(out)
    for key in ("params.total", "params.trainable", "flops.forward", "flops.backward",
                "flops.optimizer", "flops.matmul_forward", "flops.matmul_backward",
                "memory_bytes.weights", "memory_bytes.gradients", "memory_bytes.optimizer",
                "memory_bytes.activations", "memory_bytes.peak", "time_s.step", "time_s.forward",
                "time_s.backward", "time_s.optimizer"):
        a, b = key.split(".")
        assert b in d[a], key
    assert d["params"]["total"] == 6_738_415_616 and d["params"]["trainable"] == 8_388_608
    assert d["fits"] is True and d["tokens_per_s"] > 0


def test_main_job_table(capsys):
    rc, out, _ = run(MAIN, capsys)
    assert rc == 0 and "6,738,415,616" in out and "8,388,608" in out and "fits" in out


def test_cli_without_torch_import():
    code = ("import sys; from simcost.cli import main; main(%r); "
            "assert 'torch' not in sys.modules, 'torch imported'" % (MAIN + ["--json"],))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--model", "llama-2-7x"], "did you mean: llama-2-7b"),
    (["--hardware", "a100-80gb"], "did you mean: a100-80gb-sxm"),
    (["--rank", "0"], "--rank must be >= 1, got 0"),
    (["--rank", "-3"], "--rank must be >= 1, got -3"),
    (["--targets", "q_proj,w_gate"], "'w_gate' is not in this model"),
    (["--model", "gpt2", "--peft", "full", "--seq", "1025"],
     "sequence length 1025 exceeds gpt2's 1024 learned positions"),
    (["--peft", "lorra"], "invalid choice"),
    (["--batch", "0"], "batch must be >= 1"),
])
def test_bad_input_one_line_exit_2(args, needle, capsys):
    base = dict(zip(MAIN[2::2], MAIN[3::2]))
    argv = MAIN[:2]
    over = dict(zip(args[::2], args[1::2]))
    for k, v in {**base, **over}.items():
        argv += [k, v]
    rc, out, err = run(argv, capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and needle in err, err


def test_rope_model_beyond_trained_positions_warns(capsys):
    # transformers runs rotary models past max_position_embeddings (MLPerf trains
    # Llama-2-70B, 4096 positions, at 8192): estimated, with one warning line on stderr
    argv = [x if x != "2048" else "5000" for x in MAIN] + ["--json"]
    rc, out, err = run(argv, capsys)
    d = json.loads(out)
    assert rc == 0 and d["seq"] == 5000
    assert err.count("\n") == 1 and "beyond llama-2-7b's 4096 trained positions" in err
    assert d["warnings"] == [err.strip().removeprefix("simcost: warning: ")]
    rc, out, err = run([*argv, "--max-positions", "8192"], capsys)
    assert rc == 0 and err == "" and "warnings" not in json.loads(out)


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"],
                                                      "model_type": "bert"}))
    rc, out, err = run(["estimate", "train", "--model", str(tmp_path), "--hardware", "l40s",
                        "--batch", "1", "--seq", "8", "--frontend", "analytic"], capsys)
    assert rc == 2 and "unsupported architecture 'BertForMaskedLM'" in err
    assert "LlamaForCausalLM" in err and err.count("\n") == 1


@pytest.mark.parametrize("what", ["model", "peft"])
def test_malformed_json(tmp_path, capsys, what):
    bad = tmp_path / ("config.json" if what == "model" else "adapter_config.json")
    bad.write_text('{"hidden_size": 64,')
    argv = ["estimate", "train", "--model", str(tmp_path) if what == "model" else "llama-2-7b",
            "--hardware", "l40s", "--batch", "1", "--seq", "8"]
    if what == "peft":
        argv += ["--peft-config", str(tmp_path)]
    rc, out, err = run(argv, capsys)
    assert rc == 2 and "malformed JSON" in err and err.count("\n") == 1


def test_peft_config_file_matches_flags(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.05, "task_type": "CAUSAL_LM", "bias": "none", "use_dora": False}))
    rc, out, _ = run(["estimate", "train", "--model", "llama-2-7b", "--hardware", "a100-80gb-sxm",
                      "--batch", "1", "--seq", "2048", "--peft-config", str(tmp_path), "--json"], capsys)
    assert rc == 0 and json.loads(out)["params"]["trainable"] == 8_388_608


def test_config_path_and_directory(tmp_path, capsys):
    src = ROOT / "models_zoo" / "gpt2" / "config.json"
    (tmp_path / "config.json").write_text(src.read_text())
    for m in (str(tmp_path), str(tmp_path / "config.json")):
        rc, out, _ = run(["estimate", "train", "--model", m, "--hardware", "rtx-4090", "--batch", "2",
                          "--seq", "512", "--json"], capsys)
        assert rc == 0 and json.loads(out)["params"]["total"] == 124_439_808


def test_hardware_commands(capsys):
    rc, out, _ = run(["hardware", "list"], capsys)
    assert rc == 0 and "a100-80gb-sxm" in out
    rc, out, _ = run(["hardware", "show", "h100-sxm", "--json"], capsys)
    assert rc == 0 and json.loads(out)["memory_bytes"]["source"]


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "simcost.cli", "estimate", "train", "--model", "nope",
                        "--hardware", "l40s", "--batch", "1", "--seq", "1"], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ})
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_run_cost_from_profile_price(capsys):
    rc, out, _ = run(MAIN + ["--json"], capsys)
    d = json.loads(out)
    c = d["cost_usd"]                      # a100-80gb-sxm carries a price per device-hour
    assert c["per_hour"] == c["price_per_device_hour"] > 0
    assert c["per_step"] == pytest.approx(c["per_hour"] * d["time_s"]["step"] / 3600)
    assert c["per_million_tokens"] == pytest.approx(c["per_hour"] / (d["tokens_per_s"] * 3600) * 1e6)
    rc, out, _ = run(["estimate", "train", "--model", "gpt2", "--hardware", "mi250x", "--batch", "1",
                      "--seq", "64", "--json"], capsys)
    assert "cost_usd" not in json.loads(out)   # price_basis none: no price in that profile


def test_profile_without_measured_matmul_efficiency_warns(capsys):
    argv = ["estimate", "train", "--model", "llama-2-7b", "--peft", "lora", "--hardware",
            "tpu-v5e", "--batch", "1", "--seq", "256", "--json"]
    rc, out, err = run(argv, capsys)
    assert rc == 0 and "'tpu-v5e' has no measured matmul efficiency" in err
    assert any("datasheet peak" in w for w in json.loads(out)["warnings"])
    argv[argv.index("tpu-v5e")] = "l40s"          # the NVIDIA median stands in, and it says so
    rc, out, err = run(argv, capsys)
    assert rc == 0 and "'l40s' has no measurement of its own for matmul_efficiency" in err
    assert any("stands in" in w for w in json.loads(out)["warnings"])
    rc, out, err = run([*MAIN, "--json"], capsys)           # a100-80gb-sxm: measured (MAMF)
    assert rc == 0 and err == "" and "warnings" not in json.loads(out)


def _all_parsers(parser, path=("simcost",)):
    import argparse
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_option_has_a_description():
    from simcost.cli import build_parser
    missing = [f"{' '.join(path)} {a.option_strings[0] if a.option_strings else a.dest}"
               for path, p in _all_parsers(build_parser()) for a in p._actions
               if not a.help and a.dest != "help" and a.__class__.__name__ != "_SubParsersAction"]
    assert not missing, missing


def test_help_shows_defaults_and_bare_simcost_prints_help(capsys):
    rc, out, err = run([], capsys)
    assert rc == 0 and "usage: simcost" in out and err == ""
    from simcost.cli import build_parser
    text = next(p for path, p in _all_parsers(build_parser())
                if path == ("simcost", "estimate", "train")).format_help()
    assert "(default: bf16)" in text and "(default: sdpa)" in text and "(default: adamw)" in text


def test_one_error_prefix(capsys):
    rc, out, err = run(["estimate", "train", "--model", "gpt2"], capsys)
    assert rc == 2 and err.startswith("simcost: error: estimate train: ")
    assert err.count("simcost") == 1
    rc, out, err = run(["estimat"], capsys)
    assert rc == 2 and err.count("simcost") == 1 and err.count("\n") == 1
