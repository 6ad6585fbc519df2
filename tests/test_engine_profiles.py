"""Serving-engine profiles (stack_profiles/serving/*.json): schema and provenance, the loader's
one-line errors, --engine PATH.json, vLLM V1's defaults and scheduler, and the S-LoRA fit."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from simcost.errors import SimcostError
from simcost.serve import simulate_serve
from simcost.serve.engine_profile import ServingEngine, numbers
from simcost.serve.engines import (DEFAULT_ENGINE, ENGINE_DIR, default_limits, engine_names,
                                   get_engine, load_engine)
from simcost.validate.published import default_csv, load_rows

ROOT = Path(__file__).resolve().parents[1]
M, H = "llama-2-7b", "a100-80gb-sxm"
DEV_IDS = {r["id"] for r in load_rows(default_csv())}


def _profile(name: str) -> dict:
    return json.loads((ENGINE_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", engine_names())
def test_every_profile_validates_and_every_number_has_provenance(name):
    prof = ServingEngine.model_validate(_profile(name))
    assert prof.name == name and prof.versions
    nums = numbers(prof)
    assert nums, name
    for path, n in nums:
        if n.fitted is None:
            assert n.source and len(n.source) > 10, f"{name}.{path}"
        else:
            f = n.fitted
            assert (ROOT / f.script).is_file(), f.script
            assert set(f.rows) <= DEV_IDS and set(f.held_out) <= DEV_IDS
            assert not set(f.rows) & set(f.held_out)
            assert "held_out_mape" in f.residual
    for fact in ("scheduler", "lora_kernel", "cuda_graphs", "adapter_residency"):
        assert getattr(prof, fact).source, f"{name}.{fact}"


def test_the_engines_and_the_default():
    assert {"vllm", "vllm-v0", "slora", "trtllm", "hf-peft", "sglang", "lorax"} \
        <= set(engine_names())
    assert DEFAULT_ENGINE == "vllm"
    v1, v0 = get_engine("vllm"), get_engine("vllm-v0")
    assert (v1.scheduler, v1.graph_mode, v1.chunked_prefill, v1.prefix_caching) == \
        ("v1", "piecewise", True, True)
    assert (v0.scheduler, v0.graph_mode) == ("fcfs", "decode")
    r = simulate_serve(M, H, rate=2, duration=5, seed=1)
    assert r.engine == "vllm" and r.scheduler == "v1" and "vllm" in r.engine_versions
    assert simulate_serve(M, H, rate=2, duration=5, scheduler="fcfs").engine == "vllm-v0"


def test_vllm_v1_batch_defaults_follow_the_device():
    """vLLM's get_batch_defaults (API server): 1024 / 8192 on >= 70 GiB devices other than
    A100s, 256 / 2048 elsewhere."""
    from simcost.hardware import load_profile
    e = get_engine("vllm")
    for hw, want in (("a100-80gb-sxm", (256, 2048)), ("h100-sxm", (1024, 8192)),
                     ("h200", (1024, 8192))):
        dev = load_profile(hw).device()
        assert default_limits(e, dev.memory_bytes, f"{hw} {dev.name}") == want, hw
    v0 = get_engine("vllm-v0")
    assert default_limits(v0, 200 * 2 ** 30, "h200") == (256, 2048)


def test_unknown_engine_names_the_nearest():
    with pytest.raises(SimcostError, match=r"unknown serving engine 'vlm' \(did you mean: vllm"):
        get_engine("vlm")
    for described in ("sglang", "lorax", "hf-peft"):
        with pytest.raises(SimcostError, match="described but not simulated"):
            get_engine(described)
    from simcost.cli import main
    assert main(f"simulate serve --model {M} --hardware {H} --rate 1 --duration 1 "
                "--engine slorra".split()) == 2


@pytest.mark.parametrize("edit,field", [
    (lambda p: p["limits"]["max_num_seqs"].update(value=-1), "limits.max_num_seqs.value"),
    (lambda p: p["limits"]["max_num_seqs"].pop("source"), "limits.max_num_seqs"),
    (lambda p: p["scheduler"].update(value="fcfss"), "scheduler.value"),
    (lambda p: p.update(cuda_graphs={"value": "always", "source": "x"}), "cuda_graphs.value"),
    (lambda p: p.pop("limits"), "limits is missing"),
    (lambda p: p.update(colour="red"), "colour"),
])
def test_bad_profile_file_is_one_line_naming_the_field(tmp_path, edit, field, capsys):
    prof = _profile("vllm")
    edit(prof)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(prof))
    with pytest.raises(SimcostError) as ei:
        get_engine(str(f))
    msg = str(ei.value)
    assert "\n" not in msg and field in msg and "bad.json" in msg, msg
    from simcost.cli import main
    assert main(f"simulate serve --model {M} --hardware {H} --rate 1 --duration 1 "
                f"--engine {f}".split()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]


def test_malformed_profile_json_is_one_line(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text("{")
    with pytest.raises(SimcostError) as ei:
        get_engine(str(f))
    assert "\n" not in str(ei.value) and "broken.json" in str(ei.value)


def test_the_table_and_json_name_the_engine_and_its_versions(capsys):
    from simcost.cli import main
    base = f"simulate serve --model {M} --hardware {H} --rate 2 --duration 3 --engine vllm-v0"
    assert main(base.split()) == 0
    out = capsys.readouterr().out
    assert "vLLM v0" in out and "vllm >=" in out
    assert main((base + " --json").split()) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["engine"] == "vllm-v0" and js["engine_versions"]["vllm"].startswith(">=")
    assert js["engine_display_name"].startswith("vLLM v0")


def test_engine_path_json_is_accepted(tmp_path):
    f = tmp_path / "my-vllm.json"
    f.write_text(json.dumps(_profile("vllm")))
    kw = dict(adapters=4, rate=3, duration=10, seed=2)
    a, b = simulate_serve(M, H, engine=str(f), **kw), simulate_serve(M, H, engine="vllm", **kw)
    assert a.makespan_s == b.makespan_s and a.iterations == b.iterations
    assert load_engine(str(f)).name == "vllm"
    with pytest.raises(SimcostError, match="no serving engine profile file"):
        get_engine(str(tmp_path / "missing.json"))


def _scheduler_only(tmp_path, name):
    """The profile with the paged-attention overhead removed, so that two vLLM profiles differ
    in their scheduler (and graph mode) alone."""
    prof = _profile(name)
    prof.pop("decode_attn_overhead", None)
    f = tmp_path / f"{name}.json"
    f.write_text(json.dumps(prof))
    return str(f)


def test_v1_and_v0_differ_where_the_scheduler_differs(tmp_path):
    """A request decoding when a 3000-token prompt arrives: v0 runs the prompt as a prefill-only
    iteration (the decoding request waits for it), V1 chunks it into the 2048-token budget next
    to the decode token. So V1 gives the running request a token in every iteration and its
    latency is lower; the new request's first token comes later (it shares its iterations)."""
    t = tmp_path / "trace.csv"
    t.write_text("time,adapter,prompt_len,output_len\n0,0,16,300\n1.0,0,3000,8\n")
    res = {n: simulate_serve(M, H, trace=str(t), engine=_scheduler_only(tmp_path, n))
           for n in ("vllm", "vllm-v0")}
    v1, v0 = res["vllm"], res["vllm-v0"]
    assert v1.scheduler == "v1" and v0.scheduler == "fcfs"
    # v0 adds a prefill-only iteration for the prompt; V1 carries its two chunks (2047 tokens
    # next to the decode token, then the rest) in iterations that decode the first request
    assert v1.iterations == v0.iterations - 1
    # the first request (finishing last) is not stalled by the prefill: an earlier finish
    assert v1.makespan_s < v0.makespan_s
    # the 3000-token prompt's first token comes later: its chunks share iterations
    assert v1.ttft_s["p99"] > v0.ttft_s["p99"]


def test_v1_preempts_when_blocks_run_out():
    r = simulate_serve(M, H, engine="vllm", rate=40, duration=5, input_len="1000:2000",
                       output_len="1000:2000", max_total_tokens=20000, seed=3)
    assert r.preemptions > 0 and np.isfinite(r.latency_s["mean"])
    m = simulate_serve(M, H, engine="trtllm", rate=40, duration=5, input_len="1000:2000",
                       output_len="1000:2000", max_total_tokens=20000, seed=3)
    assert m.preemptions == 0                      # GUARANTEED_NO_EVICT reserves instead


def _fit_module():
    spec = importlib.util.spec_from_file_location("fit_engines",
                                                  ROOT / "validation/fit/fit_engines.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fit_engines"] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("engine", ["slora", "trtllm"])
def test_fit_script_reproduces_the_committed_values(engine):
    """fit_engines.fit on its named rows gives the value and residuals the profile holds (a
    bounded scalar fit over the engine's benchmark replays: about 10 s for S-LoRA, 5 s for
    TensorRT-LLM)."""
    fe = _fit_module()
    f = fe.BY_ENGINE[engine]
    result = fe.fit(f, fe.dev_rows())
    rec = _profile(engine)["host"][f.param]
    assert result["values"][f.param] == pytest.approx(rec["value"], rel=1e-6)
    assert rec["fitted"]["rows"] == list(f.rows) and rec["fitted"]["script"] == fe.SCRIPT
    assert rec["fitted"]["held_out"] == result["held_out_ids"]
    assert not set(f.rows) & set(result["held_out_ids"])
    got = fe.residuals(result)
    assert set(got) == set(rec["fitted"]["residual"])
    for k, v in rec["fitted"]["residual"].items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    lo, hi = f.bounds
    assert lo < result["values"][f.param] < hi             # not pinned at a bound
    assert getattr(get_engine(engine), f.param) == rec["value"]
