"""Training stacks: profiles, resolution, and what a stack changes in an estimate."""
import json

import numpy as np
import pytest

from simcost import estimate_train, sweep_train
from simcost.cli import main
from simcost.errors import SimcostError
from simcost.stack import load_stack, stack_names
from simcost.stack.registry import STACK_DIR, profile_of

M, H = "llama-3.2-1b", "a100-80gb-sxm"
KW = dict(batch=2, seq=1024, peft="lora", attn="flash")


def _write(tmp_path, name="custom", **over):
    d = json.loads((STACK_DIR / "hf.json").read_text())
    d.update(name=name, **over)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(d))
    return str(p)


def test_every_bundled_profile_validates_with_provenance():
    names = stack_names()
    assert {"hf", "hf-liger", "unsloth", "torchtune", "torchtune-compile", "nemo",
            "deepspeed", "axolotl", "llama-factory"} <= set(names)
    for n in names:
        p = profile_of(n)
        if p.kind == "alias":
            assert load_stack(n).name == p.alias_of and load_stack(n).via == n
            for v, var in p.variants.items():
                assert load_stack(f"{n}:{v}").name == var.stack
            continue
        for q in (p.host.dispatch_s, p.allocator.fragmentation, p.allocator.round_bytes):
            assert q.source or q.fitted
        assert p.versions and p.description


def test_alias_variants_and_labels():
    st = load_stack("axolotl:liger")
    assert st.name == "hf-liger" and st.label()["via"] == "axolotl:liger"
    r = estimate_train(M, H, stack="llama-factory:unsloth", **KW)
    assert r.stack["name"] == "unsloth" and r.stack["via"] == "llama-factory:unsloth"
    assert estimate_train(M, H, **KW).stack["name"] == "hf"      # the default
    with pytest.raises(SimcostError, match="did you mean: liger"):
        load_stack("axolotl:ligr")
    with pytest.raises(SimcostError, match="no variants"):
        load_stack("hf:liger")
    with pytest.raises(SimcostError, match=r"did you mean: hf\b"):
        estimate_train(M, H, stack="hff", **KW)


def test_bad_profile_files_are_one_line(tmp_path, capsys):
    bad = _write(tmp_path, "bad", fusions=["rms_nrom"])
    with pytest.raises(SimcostError, match="fusion"):
        load_stack(bad)
    unsourced = _write(tmp_path, "unsourced", host={"dispatch_s": {"value": 1e-5}})
    with pytest.raises(SimcostError, match="source or a fitted record"):
        load_stack(unsourced)
    neg = _write(tmp_path, "neg", host={"dispatch_s": {"value": -1, "source": "x"}})
    with pytest.raises(SimcostError, match="dispatch_s"):
        load_stack(neg)
    rc = main(["estimate", "train", "--model", M, "--hardware", H, "--batch", "1", "--seq",
               "64", "--stack", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "missing.json" in err


def test_peak_reserved_covers_allocated_and_fits_uses_the_device_peak(tmp_path):
    for stack in ("hf", "unsloth", "nemo", "torchtune-compile"):
        for kw in (KW, dict(KW, grad_checkpointing=True), dict(KW, peft="full"),
                   dict(KW, devices=4, batch=8, zero=3)):
            m = estimate_train(M, H, stack=stack, **kw).memory_bytes
            assert m["peak_reserved"] >= m["peak_allocated"] > 0
            assert m["peak"] == pytest.approx(m["peak_reserved"] + m["runtime_overhead"])
    # a step whose tensors fit but whose reserved memory does not: fits is False
    alloc = json.loads((STACK_DIR / "hf.json").read_text())["allocator"]
    m = estimate_train(M, H, **KW).memory_bytes
    room = m["capacity"] - m["peak_allocated"] - m["runtime_overhead"]
    transient = m["peak_allocated"] - m["weights"] - m["master_weights"] - m["optimizer"]
    frag = _write(tmp_path, "frag", allocator={
        **alloc, "fragmentation": {"value": 1.01 * room / transient, "source": "test"}})
    r = estimate_train(M, H, stack=frag, **KW).memory_bytes
    assert r["peak_allocated"] + r["runtime_overhead"] < r["capacity"] < r["peak"]
    assert not estimate_train(M, H, stack=frag, **KW).fits


def test_cpu_devices_keep_their_own_dispatch_and_no_caching_allocator(tmp_path):
    slow = _write(tmp_path, "slow", host={"dispatch_s": {"value": 1e-3, "source": "test"}})
    kw = dict(batch=1, seq=64, peft="lora")
    a = estimate_train(M, "cpu-generic", **kw)
    b = estimate_train(M, "cpu-generic", stack=slow, **kw)
    assert a.time_s == b.time_s
    assert a.memory_bytes["peak_reserved"] == a.memory_bytes["peak_allocated"]
    g = estimate_train(M, H, stack=slow, **KW)
    assert g.time_s["step"] > 3 * estimate_train(M, H, **KW).time_s["step"]


def test_cuda_graphs_remove_the_host_cost(tmp_path):
    graphs = _write(tmp_path, "graphs", host={"dispatch_s": {"value": 2e-5, "source": "t"},
                                              "cuda_graphs": True})
    kw = dict(batch=1, seq=128, peft="lora", attn="flash")
    eager = estimate_train(M, H, **kw)
    replay = estimate_train(M, H, stack=graphs, **kw)
    assert replay.time_s["step"] < eager.time_s["step"] / 2    # host-bound at this size
    assert replay.flops == eager.flops


def test_fused_optimizer_has_no_temporaries_and_fewer_passes(tmp_path):
    fused = _write(tmp_path, "fusedopt", optimizer="fused")
    kw = dict(batch=1, seq=256, peft="full", attn="flash")
    a = estimate_train(M, H, **kw)
    b = estimate_train(M, H, stack=fused, **kw)
    assert b.time_s["optimizer"] < a.time_s["optimizer"] / 2
    assert b.memory_bytes["gradient_transient"] < a.memory_bytes["gradient_transient"]
    assert b.memory_bytes["optimizer"] == a.memory_bytes["optimizer"]


def test_sweep_equals_the_estimate_under_a_stack():
    r = sweep_train(M, H, batches=[1, 2], seqs=[256, 1024], stack="unsloth", peft="lora",
                    attn="flash")
    for i, b in enumerate([1, 2]):
        for j, s in enumerate([256, 1024]):
            e = estimate_train(M, H, batch=b, seq=s, stack="unsloth", peft="lora", attn="flash")
            assert r["step_s"][i, j] == pytest.approx(e.time_s["step"], rel=1e-9)
            assert r["peak_bytes"][i, j] == pytest.approx(e.memory_bytes["peak"], rel=1e-9)
            assert bool(r["fits"][i, j]) == e.fits


def test_intervals_say_why_when_there_are_none():
    r = estimate_train(M, H, stack="unsloth", **KW)
    assert "Unsloth" in r.intervals["step_s"]["note"]
    c = estimate_train(M, "cpu-generic", batch=1, seq=64, peft="lora")
    for v in c.intervals.values():
        assert "p10" in v or "note" in v
        if "p10" in v:
            assert v["p10"] <= v["p90"]


def test_stand_in_efficiencies_widen_the_step_interval():
    """The L40S's GEMM and bandwidth fractions are the NVIDIA medians: its step interval is
    the residual one widened by the spread of the measured fractions, memory's is not."""
    from simcost.stack.intervals import interval
    from simcost.stack import load_stack
    r = estimate_train("llama-2-7b", "l40s", batch=1, seq=2048, peft="lora", stack="hf")
    iv = r.intervals["step_s"]
    lo_f, hi_f = iv["stand_in_factors"]
    assert 0.8 < lo_f < 1.0 < hi_f < 1.2
    lo, hi = interval(r.time_s["step"], load_stack("hf").interval("gpu", "step_time"))
    assert iv["p10"] == pytest.approx(lo * lo_f) and iv["p90"] == pytest.approx(hi * hi_f)
    assert "stand_in_factors" not in r.intervals["peak_bytes"]
    m = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=2048, peft="lora", stack="hf")
    assert "stand_in_factors" not in m.intervals["step_s"]          # measured: not widened


def test_cli_names_the_stack(capsys):
    rc = main(["estimate", "train", "--model", M, "--hardware", H, "--batch", "1", "--seq",
               "128", "--stack", "axolotl:liger", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert rc == 0 and d["stack"]["name"] == "hf-liger" and d["stack"]["via"] == "axolotl:liger"
    assert main(["stacks"]) == 0 and "hf-liger" in capsys.readouterr().out
    assert main(["stacks", "nemo", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "nemo"
    assert np.isfinite(d["memory_bytes"]["peak_reserved"])


def test_the_table_shows_the_error_bars_or_says_why(capsys):
    argv = ["estimate", "train", "--model", "qwen-7b", "--peft", "lora", "--hardware",
            "a100-80gb-sxm", "--batch", "1", "--seq", "2048", "--attn", "flash"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("[p10 ") == 2 and "stack: hf" in out        # step time and peak memory
    assert main([*argv, "--stack", "unsloth"]) == 0
    out = capsys.readouterr().out
    assert "[p10 " not in out and "no error bars for step time" in out


def test_sweeps_carry_the_same_error_bars():
    r = sweep_train("qwen-7b", H, batches=[1, 2], seqs=[512, 2048], peft="lora", attn="flash")
    e = estimate_train("qwen-7b", H, batch=2, seq=2048, peft="lora", attn="flash")
    assert r["stack"]["name"] == "hf"
    for k in ("step_s", "peak_bytes"):
        assert r["intervals"][k]["p10"][1, 1] == pytest.approx(e.intervals[k]["p10"], rel=1e-9)
        assert r["intervals"][k]["p90"][1, 1] == pytest.approx(e.intervals[k]["p90"], rel=1e-9)
    u = sweep_train(M, H, batches=[1], seqs=[256], stack="unsloth", peft="lora")
    assert "note" in u["intervals"]["step_s"]
