"""`simcost plan serve` (the cheapest fleet meeting a serving SLO) and the simulator's overload
flag. Small runs: a 0.5B model, one or two GPU profiles, a few hundred requests."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from simcost.cli import main
from simcost.plan.serve_search import plan_serve
from simcost.serve.api import simulate_serve
from simcost.serve.overload import detect_overload

SMALL = ["--model", "qwen2.5-0.5b", "--adapters", "20", "--ranks", "8,16",
         "--input-len", "64:512", "--output-len", "16:128", "--requests", "300",
         "--slo-ttft", "0.5"]
KW = dict(adapters=20, ranks="8,16", input_len="64:512", output_len="16:128", requests=300,
          slo_ttft=0.5)


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def two_replicas():
    """400 req/s on a10g needs more than one replica."""
    return plan_serve("qwen2.5-0.5b", rate=400, hardware="a10g", tp="1", max_devices=8, **KW)


def test_best_meets_slo_in_its_own_resimulation(two_replicas, capsys):
    b = two_replicas.best
    assert b is not None and b.meets_slo and not b.overloaded
    d = _json(capsys, ["simulate", "serve", *b.simulate_args, "--json"])
    for k in ("ttft_s", "tpot_s"):
        assert d[k]["p50"] == b.model_dump()[k]["p50"]
        assert d[k]["p99"] == b.model_dump()[k]["p99"]
    assert d["ttft_s"]["p99"] <= 0.5 and not d["overloaded"]
    assert d["devices"] == b.devices and d["replicas"] == b.replicas


def test_replicas_are_the_fewest_that_meet(two_replicas, capsys):
    b = two_replicas.best
    assert b.replicas >= 2
    args = list(b.simulate_args)
    i = args.index("--devices")
    args[i + 1] = str(b.tp * (b.replicas - 1))
    d = _json(capsys, ["simulate", "serve", *args, "--json"])
    assert d["overloaded"] or d["ttft_s"]["p99"] > 0.5


def test_best_reports_rate_cost_and_resident_adapters(two_replicas):
    b = two_replicas.best
    assert b.usd_per_hour == pytest.approx(1.006 * b.devices)   # a10g's price per hour
    m = b.usd_per_million_tokens
    assert 0 < m["total"] < m["output"]
    assert 0 < b.adapters_resident_per_gpu <= 20
    # one replica carries at least its share of the traffic at the bisected rate
    assert b.max_rate_per_replica is not None and b.max_rate_per_replica > 0


def test_json_keys_and_candidates_best_first(capsys, tmp_path):
    out = tmp_path / "c.csv"
    d = _json(capsys, ["plan", "serve", *SMALL, "--rate", "20", "--hardware",
                       "a10g,v100-sxm2-32gb,mi250x", "--tp", "1,2", "--json", "--csv", str(out)])
    b = d["best"]
    for k in ("hardware", "devices", "tp", "replicas", "ttft_s", "tpot_s", "usd_per_hour",
              "simulate_args", "adapters_resident_per_gpu", "max_rate_per_replica",
              "usd_per_million_tokens", "overloaded"):
        assert k in b, k
    for k in ("ttft_s", "tpot_s"):
        assert set(b[k]) >= {"p50", "p99"}
    assert isinstance(b["simulate_args"], list) and "--hardware" in b["simulate_args"]
    c = d["candidates"]
    assert c[0]["hardware"] == b["hardware"] and c[0]["devices"] == b["devices"]
    ok = [x["usd_per_hour"] for x in c if x["meets_slo"]]
    assert ok == sorted(ok) and ok[0] == b["usd_per_hour"]
    assert all(x["devices"] <= 16 for x in c)
    assert d["left_out"]["no_price"] == ["mi250x"]          # no price: left out, and said so
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(c) and rows[0]["hardware"] == b["hardware"]


def test_table_names_the_answer(capsys):
    assert main(["plan", "serve", *SMALL, "--rate", "20", "--hardware", "v100-sxm2-32gb",
                 "--tp", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 x v100-sxm2-32gb" in out and "one replica sustains up to" in out
    assert "reproduce: simcost simulate serve" in out


def test_progress_bar_when_asked_for(capsys):
    argv = ["plan", "serve", *SMALL, "--rate", "20", "--hardware", "v100-sxm2-32gb", "--tp", "1",
            "--json"]
    assert main(argv) == 0
    assert "plan serve" not in capsys.readouterr().err      # pytest's stderr is no terminal
    assert main([*argv, "--progress"]) == 0
    assert "simulations" in capsys.readouterr().err


def test_nothing_meets_names_the_nearest_miss(capsys):
    d = _json(capsys, ["plan", "serve", *SMALL[:-2], "--slo-ttft", "0.0001", "--rate", "20",
                       "--hardware", "a10g", "--tp", "1", "--max-devices", "2", "--json"])
    assert d["best"] is None
    assert d["nearest_miss"] is not None and not d["nearest_miss"]["meets_slo"]
    assert d["answer"].startswith("No fleet of at most 2 devices")
    assert "What would help" in d["answer"]


def test_overloaded_flag_on_an_overloaded_run_only(capsys):
    kw = dict(adapters=50, ranks=[8, 16], input_len="64:256", output_len="32:64", seed=1)
    heavy = simulate_serve("qwen2.5-0.5b", "a10g", merged=True, rate=200, duration=1, **kw)
    assert heavy.overloaded and "grows without bound" in heavy.overload_reason
    light = simulate_serve("qwen2.5-0.5b", "a10g", rate=2, duration=60, **kw)
    assert not light.overloaded and light.overload_reason is None
    # the CLI warns, and its table says so
    assert main(["simulate", "serve", "--model", "qwen2.5-0.5b", "--hardware", "a10g",
                 "--adapters", "50", "--ranks", "8,16", "--merged", "--rate", "200",
                 "--duration", "1", "--input-len", "64:256", "--output-len", "32:64",
                 "--seed", "1"]) == 0
    cap = capsys.readouterr()
    assert "overloaded yes" in cap.out
    assert "simcost: warning: overloaded:" in cap.err


def test_overload_criterion():
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 100, 1000))
    stable = rng.exponential(0.2, t.size)
    assert detect_overload(t, stable, completed_per_s=10.0) == (False, None)
    growing = 0.5 * t + rng.exponential(0.2, t.size)       # delay rises by 0.5 s per s
    over, why = detect_overload(t, growing, completed_per_s=6.7, offered_per_s=10.0)
    assert over and "10 req/s offered" in why
    # every request at t = 0 (offline), and too few requests: not judged
    assert detect_overload(np.zeros(100), np.arange(100.0), completed_per_s=1.0) == (False, None)
    assert detect_overload(t[:20], growing[:20], completed_per_s=1.0) == (False, None)


@pytest.mark.parametrize("extra, needle", [
    (["--rate", "0", "--slo-ttft", "1"], "--rate must be > 0"),
    (["--rate", "5", "--slo-ttft", "0"], "--slo-ttft must be > 0"),
    (["--rate", "5", "--slo-tpot", "-1"], "--slo-tpot must be > 0"),
    (["--rate", "5"], "give an SLO"),
    (["--rate", "5", "--slo-ttft", "1", "--hardware", "a100"], "did you mean"),
    (["--rate", "5", "--slo-ttft", "1", "--requests", "10", "--duration", "9s"],
     "--requests or --duration"),
    (["--rate", "5", "--slo-ttft", "1", "--adapters", "2", "--lora-kernels", "bgmv"],
     "unknown LoRA kernel"),
    (["--rate", "5", "--slo-ttft", "1", "--tp", "3"], "does not divide"),
    (["--rate", "5", "--slo-ttft", "1", "--hardware", "mi250x"], "no price: mi250x"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, extra, needle):
    assert main(["plan", "serve", "--model", "qwen2.5-0.5b", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simcost: error:") and needle in err[0], err


def test_replica_search_finds_the_fewest_from_any_guess():
    """The replica search against a stand-in simulator that meets the SLO from k replicas."""
    from types import SimpleNamespace

    from simcost.plan.serve_search import Search, Setting
    from simcost.request.plan_serve import ServePlanRequest
    req = ServePlanRequest.build(model="qwen2.5-0.5b", rate=5, slo_ttft=1)
    s = Setting("a10g", 1, False, "sgmv", 256, 1.0)
    for k in (1, 2, 3, 7, 16):
        calls = []

        class Sims:
            def run(self, setting, r, rate=None):
                calls.append(r)
                p99 = 0.5 if r >= k else 2.0
                return SimpleNamespace(overloaded=r < k - 1, ttft_s={"p99": p99},
                                       tpot_s={"p99": None})
        search = Search(req, Sims(), [s])
        for guess in (1, 2, 5, 9, 16):
            assert search.replicas(s, guess, 16) == k, (k, guess)
        assert search.replicas(s, 1, k - 1) is None if k > 1 else True
    assert max(calls) <= 16
