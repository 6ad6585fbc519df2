"""``--trace-out``: Chrome/Perfetto traces of a training step and a serving run.

Every trace is validated against the Trace Event Format schema of the events simcost writes
(:data:`simcost.perfetto.TRACE_SCHEMA`), and its spans are checked against the estimate they
come from: the critical-path spans of each device process lie end to end and add up to
``time_s['step']``; a replica's iteration spans follow each other and end at its last finish,
and the request spans give the reported TTFT and latency."""
from __future__ import annotations

import copy
import json

import jsonschema
import numpy as np
import pytest

from simcost import perfetto
from simcost.cli import main
from simcost.perfetto import CRITICAL_CATS, TRACE_SCHEMA, US

M, H = "llama-2-7b", "a100-80gb-sxm"
ONE = ["estimate", "train", "--model", M, "--hardware", H, "--batch", "1", "--seq", "2048",
       "--peft", "lora", "--rank", "16", "--dtype", "bf16"]
SERVE = ["simulate", "serve", "--model", M, "--hardware", H, "--adapters", "4", "--rate", "4",
         "--duration", "8s", "--input-len", "16:256", "--output-len", "8:128", "--seed", "3"]


def run(argv, tmp_path, capsys, name="trace.json"):
    """(the --json result, the trace) of one CLI call."""
    path = tmp_path / name
    assert main([*argv, "--json", "--trace-out", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    trace = json.loads(path.read_text())
    jsonschema.validate(trace, TRACE_SCHEMA)
    return out, trace


def spans(trace, pid=None, cats=None):
    return [e for e in trace["traceEvents"] if e["ph"] == "X"
            and (pid is None or e["pid"] == pid) and (cats is None or e["cat"] in cats)]


def check_nesting(trace):
    """On every track, as Perfetto reads the file (ts and dur truncated to integer ns), a span
    either ends before the next begins or encloses it: nothing misnested."""
    tracks = {}
    for e in spans(trace):
        a = int(e["ts"] * 1000.0)
        tracks.setdefault((e["pid"], e["tid"]), []).append((a, a + int(e["dur"] * 1000.0)))
    for t in tracks.values():
        t.sort(key=lambda x: (x[0], -x[1]))
        open_ = []
        for a, b in t:
            while open_ and open_[-1] <= a:
                open_.pop()
            assert not open_ or b <= open_[-1], "misnested span"
            open_.append(b)


def check_step(trace, step_s):
    """Per device process: the critical spans tile [0, step] and add up to the step."""
    check_nesting(trace)
    pids = sorted({e["pid"] for e in spans(trace)})
    assert pids
    for pid in pids:
        crit = sorted(spans(trace, pid, CRITICAL_CATS), key=lambda e: e["ts"])
        assert crit[0]["ts"] == 0
        for a, b in zip(crit, crit[1:]):
            assert b["ts"] == pytest.approx(a["ts"] + a["dur"], rel=1e-12, abs=1e-6)
        assert sum(e["dur"] for e in crit) / US == pytest.approx(step_s, rel=1e-9)
        assert (crit[-1]["ts"] + crit[-1]["dur"]) / US == pytest.approx(step_s, rel=1e-9)
    return pids


# ---- the schema ------------------------------------------------------------------------------
def test_schema_refuses_what_trace_viewers_cannot_read(tmp_path, capsys):
    _, trace = run(ONE, tmp_path, capsys)
    x = next(e for e in trace["traceEvents"] if e["ph"] == "X")
    for bad in ({"dur": -1.0}, {"ts": "0"}, {"pid": 0.5}, {"ph": "Q"}):
        t = copy.deepcopy(trace)
        t["traceEvents"].append({**x, **bad})
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(t, TRACE_SCHEMA)
    t = copy.deepcopy(trace)
    del next(e for e in t["traceEvents"] if e["ph"] == "X")["dur"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(t, TRACE_SCHEMA)
    t = copy.deepcopy(trace)
    t["traceEvents"].append({"name": "thread_name", "ph": "M", "pid": 0, "args": {"name": "x"}})
    with pytest.raises(jsonschema.ValidationError):        # a thread name needs its tid
        jsonschema.validate(t, TRACE_SCHEMA)


# ---- training, one device -----------------------------------------------------------------
def test_one_device_lora_step_is_the_sum_of_its_op_spans(tmp_path, capsys):
    est, trace = run(ONE, tmp_path, capsys)
    step = est["time_s"]["step"]
    assert trace["displayTimeUnit"] == "ms"
    assert trace["otherData"]["time_s"]["step"] == step
    assert check_step(trace, step) == [0]
    fwd = spans(trace, cats=("forward",))
    bwd = spans(trace, cats=("backward",))
    assert sum(e["dur"] for e in fwd) / US == pytest.approx(est["time_s"]["forward"], rel=1e-9)
    assert sum(e["dur"] for e in bwd) / US == pytest.approx(est["time_s"]["backward"], rel=1e-9)
    # every one of the 32 layers appears, forward and backward, with the same ops
    per_layer = {}
    for e in fwd:
        if "layer" in e["args"]:
            per_layer.setdefault(e["args"]["layer"], []).append(e["name"])
    assert sorted(per_layer) == list(range(32))
    assert all(v == per_layer[1] for k, v in per_layer.items() if k > 0)
    assert "q_proj.lora_A" in per_layer[5]
    layers = [e["args"]["layer"] for e in bwd if "layer" in e["args"]]
    assert layers[0] == 31 and layers[-1] == 0           # backward from the last layer down
    assert len(spans(trace, cats=("optimizer",))) == 1
    # the layer overview spans enclose their ops: they add up to the step too
    assert sum(e["dur"] for e in spans(trace, cats=("layer",))) / US + \
        sum(e["dur"] for e in spans(trace, cats=("optimizer", "host", "page_faults"))) / US \
        == pytest.approx(step, rel=1e-9)


@pytest.mark.parametrize("extra,cat", [
    (["--grad-checkpointing"], "recompute"),
    (["--checkpointing", "selective"], "recompute"),
    (["--optimizer", "mezo"], "forward"),
])
def test_checkpointed_and_mezo_steps_add_up(tmp_path, capsys, extra, cat):
    est, trace = run([*ONE, *extra], tmp_path, capsys)
    check_step(trace, est["time_s"]["step"])
    assert spans(trace, cats=(cat,))
    if "mezo" in extra:           # two forward passes, each the whole model
        assert {e["args"].get("forward_pass", 0) for e in spans(trace, cats=("layer",))} \
            == {0, 1}


def test_host_overhead_and_page_faults_on_the_host_track(tmp_path, capsys):
    """A CPU profile with a measured page-fault cost and per-step host work: both are spans
    on the host track."""
    from simcost.hardware.profile import PROFILE_DIR
    d = json.loads((PROFILE_DIR / "cpu-generic.json").read_text())
    for k, v in {"host_allocator": "glibc", "fresh_alloc_bytes_per_s": 3e9,
                 "host_alloc_return_threshold_bytes": 2 ** 20, "step_overhead_s": 2e-3}.items():
        d.setdefault("time_model", {})[k] = {"value": v, "source": "test", "derived": False}
    hw = tmp_path / "cpu.json"
    hw.write_text(json.dumps(d))
    argv = ["estimate", "train", "--model", "qwen2.5-0.5b", "--hardware", str(hw), "--batch",
            "1", "--seq", "128", "--peft", "lora", "--dtype", "fp32"]
    est, trace = run(argv, tmp_path, capsys)
    check_step(trace, est["time_s"]["step"])
    host = spans(trace, cats=("page_faults", "host"))
    assert {e["tid"] for e in host} == {perfetto.HOST}
    assert est["time_s"]["page_faults"] > 0
    pf = sum(e["dur"] for e in host if e["cat"] == "page_faults") / US
    assert pf == pytest.approx(est["time_s"]["page_faults"], rel=1e-9)
    oh = sum(e["dur"] for e in host if e["cat"] == "host") / US
    assert oh == pytest.approx(est["time_s"]["host_overhead"], rel=1e-12) and oh > 0


# ---- training, several devices ------------------------------------------------------------
@pytest.mark.parametrize("plan,stages", [
    (["--batch", "8", "--devices", "8", "--tp", "2", "--dp", "4"], 1),
    (["--batch", "16", "--devices", "8", "--tp", "2", "--pp", "4", "--micro-batch", "1"], 4),
    (["--batch", "16", "--devices", "8", "--tp", "2", "--pp", "4", "--micro-batch", "1",
      "--pp-schedule", "interleaved", "--virtual-stages", "2"], 4),
    (["--batch", "8", "--devices", "8", "--dp", "8", "--zero", "3"], 1),
    (["--batch", "8", "--devices", "8", "--parallel", "auto"], None),
])
def test_multi_device_plan_adds_up_per_stage(tmp_path, capsys, plan, stages):
    argv = ["estimate", "train", "--model", M, "--hardware", "h100-sxm", "--seq", "2048",
            "--peft", "lora", "--rank", "16", *plan]
    est, trace = run(argv, tmp_path, capsys)
    t = est["time_s"]
    pids = check_step(trace, t["step"])
    pp = est["parallel"]["plan"]["pp"]
    assert len(pids) == pp and (stages is None or pp == stages)
    assert trace["otherData"]["plan"] == est["parallel"]["plan_label"]
    m = est["parallel"]["plan"]["micro_batches"]
    for pid in pids:
        f = spans(trace, pid, ("forward",))
        b = spans(trace, pid, ("backward",))
        assert len(f) == len(b) == m
        assert sum(e["dur"] for e in f) / US == pytest.approx(t["forward"], rel=1e-9)
        assert sum(e["dur"] for e in b) / US == pytest.approx(t["backward"], rel=1e-9)
        bubble = sum(e["dur"] for e in spans(trace, pid, ("bubble",))) / US
        assert bubble == pytest.approx(t["pipeline_bubble"], rel=1e-9, abs=1e-12)
    # exposed communication on the first stage: the estimate's exposed total
    exp = sum(e["dur"] for e in spans(trace, 0, ("communication.exposed",))) / US
    assert exp == pytest.approx(t["communication_exposed"], rel=1e-9, abs=1e-12)
    hidden = sum(e["dur"] for e in spans(trace, 0, ("communication.hidden",))) / US
    comm = est["parallel"]["communication"]
    drawn = sum(v["hidden_s"] for k, v in comm.items() if k not in ("bytes", "pipeline_p2p"))
    assert hidden == pytest.approx(drawn, rel=1e-9, abs=1e-12)
    if sum(v["total_s"] for k, v in comm.items() if k != "bytes") > 0:
        names = {e["args"]["name"] for e in trace["traceEvents"]
                 if e["ph"] == "M" and e["name"] == "thread_name"}
        assert any(n.startswith("communication: ") for n in names)


def test_1f1b_schedule_respects_dependencies():
    from simcost.sim.parallel import Plan
    f, b = 1.0, 2.0
    for p, m in ((4, 8), (4, 2), (3, 1), (1, 5)):
        plan = Plan(pp=p, micro_batches=m)
        pipe = (m + p - 1) * (f + b)
        sched = perfetto._schedule(plan, f, b, pipe)
        start = {(k, s, i): t for s, ops in enumerate(sched) for k, i, t in ops}
        assert len(start) == 2 * p * m
        for (k, s, i), t in start.items():
            if k == "F" and s > 0:
                assert t >= start[("F", s - 1, i)] + f - 1e-12
            if k == "B":
                dep = start[("B", s + 1, i)] + b if s < p - 1 else start[("F", s, i)] + f
                assert t >= dep - 1e-12
        assert max(t + (f if k == "F" else b) for (k, _, _), t in start.items()) \
            == pytest.approx(pipe)


# ---- serving ------------------------------------------------------------------------------
@pytest.mark.parametrize("devices", [1, 2])
def test_serving_trace_matches_the_simulation(tmp_path, capsys, devices):
    sim, trace = run([*SERVE, "--devices", str(devices)], tmp_path, capsys)
    check_nesting(trace)
    assert sorted({e["pid"] for e in spans(trace)}) == list(range(devices))
    ttft = {}
    dec = {}
    for e in spans(trace, cats=("request.ttft",)):
        ttft[e["args"]["request"]] = e["dur"] / US
    for e in spans(trace, cats=("request.decode",)):
        dec[e["args"]["request"]] = e["dur"] / US
    assert len(ttft) == sim["n_requests"]
    assert np.mean(list(ttft.values())) == pytest.approx(sim["ttft_s"]["mean"], rel=1e-9)
    lat = [ttft[i] + dec.get(i, 0.0) for i in ttft]
    assert np.mean(lat) == pytest.approx(sim["latency_s"]["mean"], rel=1e-9)
    assert np.percentile(lat, 90) == pytest.approx(sim["latency_s"]["p90"], rel=1e-9)
    its = spans(trace, cats=("iteration",))
    assert len(its) == sim["iterations"]
    ends = []
    for pid in range(devices):
        it = sorted(spans(trace, pid, ("iteration",)), key=lambda e: e["ts"])
        for a, b in zip(it, it[1:]):        # one iteration at a time
            assert b["ts"] >= a["ts"] + a["dur"] - 1e-6
        req = spans(trace, pid, ("request.ttft", "request.decode"))
        last = max(e["ts"] + e["dur"] for e in req)
        assert (it[-1]["ts"] + it[-1]["dur"]) == pytest.approx(last, rel=1e-12)
        ends.append(last / US)
        # requests on one slot never overlap
        by_slot = {}
        for e in sorted(req, key=lambda e: e["ts"]):
            prev = by_slot.get(e["tid"])
            assert prev is None or e["ts"] >= prev - 1e-6
            by_slot[e["tid"]] = e["ts"] + e["dur"]
        assert all(e["args"]["batch"] >= 1 and e["args"]["tokens"] >= 1
                   for e in spans(trace, pid, ("iteration",)))
    assert max(ends) == pytest.approx(sim["makespan_s"], rel=1e-12)


def test_simulation_without_trace_records_nothing():
    from simcost.serve.api import simulate_serve
    from simcost.sim import breakdown
    from simcost.sim.breakdown import recording
    with recording() as rec:
        a = simulate_serve(M, H, adapters=2, rate=4, duration=4, seed=1)
    b = simulate_serve(M, H, adapters=2, rate=4, duration=4, seed=1)
    assert breakdown.recorder() is None
    assert a.model_dump() == b.model_dump()          # recording changes no number
    assert len(rec.replicas) == 1 and len(rec.replicas[0].iterations) == a.iterations


# ---- the time model's per-op shares -------------------------------------------------------
@pytest.mark.parametrize("ck", [False, "full", "selective"])
@pytest.mark.parametrize("hw", [H, "cpu-generic"])
def test_per_op_shares_add_up_to_the_phases(ck, hw):
    from simcost.api import graph
    from simcost.hardware import load_profile
    from simcost.peft import PeftSpec
    from simcost.sim.timing import TimeModel, phase_times
    dev = load_profile(hw).device()
    g, a = graph(M, batch=1, seq=512, peft=PeftSpec("lora", r=16, alpha=32),
                 device_kind="cpu" if dev.kind == "cpu" else "gpu")
    per: list = []
    fwd, bwd = phase_times(TimeModel.from_device(dev), g.dtype, a, recompute_blocks=ck,
                           per_op=per)
    assert sum(f * r.count for r, f, _, _ in per) == pytest.approx(fwd, rel=1e-12)
    assert sum((b + rc) * r.count for r, _, b, rc in per) == pytest.approx(bwd, rel=1e-12)
    assert any(rc > 0 for *_, rc in per) == bool(ck)


# ---- the flag -----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["missing-dir/x.json", "."])
def test_unwritable_trace_out_is_refused_before_running(tmp_path, capsys, where, monkeypatch):
    import simcost.api
    monkeypatch.setattr(simcost.api, "run_train",
                        lambda *a, **k: pytest.fail("the estimate ran"))
    path = tmp_path / where
    assert main([*ONE, "--json", "--trace-out", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith("simcost: error: --trace-out") and out.err.count("\n") == 1
    assert main([*SERVE, "--trace-out", str(path)]) == 2
    assert capsys.readouterr().err.startswith("simcost: error: --trace-out")


def test_trace_out_refuses_jobs(tmp_path, capsys):
    assert main([*ONE, "--jobs", "2", "--trace-out", str(tmp_path / "t.json")]) == 2
    assert "--jobs" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


def test_trace_out_with_table_output(tmp_path, capsys):
    path = tmp_path / "step.json"
    assert main([*ONE, "--trace-out", str(path)]) == 0
    assert "step" in capsys.readouterr().out
    jsonschema.validate(json.loads(path.read_text()), TRACE_SCHEMA)


@pytest.mark.torch
def test_traced_front_end_step_adds_up(tmp_path, capsys):
    pytest.importorskip("transformers")
    argv = ["estimate", "train", "--model", M, "--hardware", H, "--batch", "1", "--seq", "64",
            "--peft", "lora", "--frontend", "traced"]
    est, trace = run(argv, tmp_path, capsys)
    assert est["frontend"] == "traced"
    check_step(trace, est["time_s"]["step"])
    assert any(e["name"].startswith("aten.mm") for e in spans(trace, cats=("backward",)))
    assert main([*argv, "--devices", "2", "--trace-out", str(tmp_path / "x.json")]) == 2
    assert "traced front end" in capsys.readouterr().err
