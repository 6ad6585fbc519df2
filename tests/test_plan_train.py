"""``simcost plan train``, whole-job numbers, ``--find`` and the memory savers."""
from __future__ import annotations

import csv
import json
import math

import pytest

from simcost.api import estimate_train
from simcost.cli import main
from simcost.plan.train import PlanTrainRequest, plan_train

SMALL = dict(model="llama-3.2-1b", peft=("lora", "qlora"), samples=2000, seq=1024,
             epochs=2.0, global_batch=8, hardware=("a100-80gb-sxm", "h100-sxm"), max_devices=2)


@pytest.fixture(scope="module")
def small_plan():
    return plan_train(PlanTrainRequest.build(**SMALL))


def _estimate_json(args, capsys) -> dict:
    assert main(["estimate", "train", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_best_equals_estimate_train(small_plan, capsys):
    best = small_plan["best"]
    assert best is not None and best["fits"]
    for e in [best, *small_plan["candidates"][1:3], *small_plan["frontier"]]:
        r = _estimate_json(e["estimate_args"], capsys)
        assert r["fits"] is True
        assert r["time_s"]["step"] == pytest.approx(e["step_s"], rel=1e-12)
        assert r["memory_bytes"]["peak"] == pytest.approx(e["peak_bytes"], rel=1e-12)
        assert r["job"]["job_s"] == pytest.approx(e["job_s"], rel=1e-12)
        assert r["job"]["job_usd"] == pytest.approx(e["job_usd"], rel=1e-12)
        assert r["job"]["energy_j"] == pytest.approx(e["energy_j"], rel=1e-12)
        assert r["parallel"]["plan_label"] == e["plan"]


def test_plan_candidates_fit_and_are_ranked(small_plan):
    cands = small_plan["candidates"]
    assert len(cands) >= 4
    for e in cands:
        assert e["fits"] and e["peak_bytes"] <= e["capacity_bytes"]
        assert e["steps"] == math.ceil(2000 * 2 / 8)
        assert e["job_s"] == pytest.approx(e["steps"] * e["step_s"])
        assert e["micro_batch"] * e["grad_accum"] * int(e["plan"].split()[0][2:]) == 8
        assert sum(e["time_breakdown_s"].values()) == pytest.approx(e["step_s"], rel=1e-9)
        assert sum(e["memory_breakdown_bytes"].values()) == pytest.approx(e["peak_bytes"],
                                                                          rel=1e-9)
    # the cheapest first, where plans within 1 % of the cheapest count as equal and the
    # fastest of those leads; the rest by cost
    cheapest = min(e["job_usd"] for e in cands)
    near = [e for e in cands if e["job_usd"] <= cheapest * 1.01]
    assert cands[:len(near)] == near
    assert [e["job_s"] for e in near] == sorted(e["job_s"] for e in near)
    rest = [e["job_usd"] for e in cands[len(near):]]
    assert rest == sorted(rest) and all(c > cheapest * 1.01 for c in rest)
    assert small_plan["best"] is cands[0]


def test_plan_frontier_is_pareto(small_plan):
    front = small_plan["frontier"]
    assert front
    for f in front:
        for e in small_plan["candidates"]:
            dominated = (e["job_s"] <= f["job_s"] and e["job_usd"] <= f["job_usd"]
                         and (e["job_s"] < f["job_s"] or e["job_usd"] < f["job_usd"]))
            assert not dominated
    times = [f["job_s"] for f in front]
    assert times == sorted(times)


def test_plan_objective_time_ranks_by_job_time():
    p = plan_train(PlanTrainRequest.build(**{**SMALL, "objective": "time"}))
    cands = p["candidates"]
    fastest = min(e["job_s"] for e in cands)
    near = [e for e in cands if e["job_s"] <= fastest * 1.01]
    assert cands[:len(near)] == near
    assert [e["job_usd"] for e in near] == sorted(e["job_usd"] for e in near)
    rest = [e["job_s"] for e in cands[len(near):]]
    assert rest == sorted(rest)
    assert p["best"]["devices"] == 2


def test_plan_near_ties_go_to_the_faster_plan():
    """A plan 0.1 % cheaper but much slower does not win a cost ranking."""
    from simcost.plan.rank import rank

    def e(usd, s, n):
        return {"job_usd": usd, "job_s": s, "devices": n, "hardware": "h", "plan": "p",
                "peft": "lora", "checkpointing": "none", "job_s_interval": None}
    ok, _ = rank([e(100.0, 4000.0, 1), e(100.5, 1000.0, 4), e(150.0, 500.0, 8)],
                 objective="cost", deadline_s=None, budget_usd=None)
    assert [x["devices"] for x in ok] == [4, 1, 8]


def test_plan_nothing_fits_names_the_nearest_miss(capsys):
    code = main(["plan", "train", "--model", "llama-2-70b", "--peft", "lora", "--samples", "100",
                 "--seq", "4096", "--hardware", "a100-80gb-sxm", "--max-devices", "1",
                 "--checkpointing", "none", "--json"])
    assert code == 0
    p = json.loads(capsys.readouterr().out)
    assert p["best"] is None and p["candidates"] == []
    # one A100's 80 GiB cannot hold 70B bf16 weights: skipped before any estimate
    assert p["skipped"] and "weights alone" in p["skipped"][0]["why"]
    miss = p["nearest_miss"]
    assert "needs 12" in miss["why"] and "80 GiB" in miss["why"]
    assert any("--max-devices 2" in a for a in miss["advice"])


def test_plan_nearest_miss_with_advice():
    p = plan_train(PlanTrainRequest.build(
        model="llama-2-7b", peft=("lora",), samples=100, seq=4096, global_batch=8,
        hardware=("a10g",), max_devices=1, checkpointing=("none",)))
    assert p["best"] is None
    miss = p["nearest_miss"]
    assert "needs" in miss["why"] and "24 GiB" in miss["why"]
    assert any("qlora" in a for a in miss["advice"])
    assert any("--checkpointing" in a for a in miss["advice"])


def test_plan_deadline_and_budget():
    p = plan_train(PlanTrainRequest.build(**{**SMALL, "deadline_s": 1.0}))
    assert p["best"] is None and p["over_constraints"]
    assert "deadline" in p["nearest_miss"]["why"]
    p = plan_train(PlanTrainRequest.build(**{**SMALL, "budget_usd": 1e-6}))
    assert p["best"] is None and "budget" in p["nearest_miss"]["why"]


def test_plan_deadline_risk_flag():
    base = plan_train(PlanTrainRequest.build(**SMALL))
    e = base["best"]
    iv = e["job_s_interval"]
    deadline = (e["job_s"] + iv["p90"]) / 2        # met by the estimate, not by its p90
    p = plan_train(PlanTrainRequest.build(**{**SMALL, "deadline_s": deadline}))
    flagged = [c for c in p["candidates"] if c["deadline_risk"]]
    assert flagged and all(c["job_s"] <= deadline < c["job_s_interval"]["p90"] for c in flagged)


def test_plan_leaves_out_devices_without_a_price(tmp_path):
    from simcost.hardware.profile import PROFILE_DIR
    prof = json.loads((PROFILE_DIR / "a100-80gb-sxm.json").read_text())
    prof["name"] = "my-a100"
    prof["price_usd_per_hour"] = None
    prof["price_basis"] = "none"
    path = tmp_path / "my-a100.json"
    path.write_text(json.dumps(prof))
    p = plan_train(PlanTrainRequest.build(**{**SMALL, "hardware": (str(path), "h100-sxm")}))
    assert [x["hardware"] for x in p["excluded"]] == [str(path)]
    assert all(e["hardware"] == "h100-sxm" for e in p["candidates"])
    t = plan_train(PlanTrainRequest.build(**{**SMALL, "hardware": (str(path),),
                                             "objective": "time"}))
    assert t["best"]["hardware"] == str(path) and t["best"]["job_usd"] is None


def test_plan_price_override():
    p = plan_train(PlanTrainRequest.build(**{**SMALL, "hardware": ("h100-sxm",), "price": 1.0}))
    e = p["best"]
    assert e["job_usd"] == pytest.approx(e["devices"] * e["job_s"] / 3600)
    assert "--price" in e["estimate_args"]


def test_plan_price_by_name(capsys):
    assert main(["plan", "train", "--model", "llama-3.2-1b", "--samples", "500", "--seq", "512",
                 "--hardware", "h100-sxm,a100-80gb-sxm", "--max-devices", "1",
                 "--price", "a100-80gb-sxm=0", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["best"]["hardware"] == "a100-80gb-sxm" and p["best"]["job_usd"] == 0
    assert p["assumptions"]["profiles"]["a100-80gb-sxm"]["price_source"] == "--price"
    assert p["assumptions"]["profiles"]["h100-sxm"]["price_source"] != "--price"
    h100 = [e for e in p["candidates"] if e["hardware"] == "h100-sxm"]
    assert h100 and all(e["job_usd"] > 0 for e in h100)
    assert main(["plan", "train", "--model", "llama-3.2-1b", "--samples", "500", "--seq", "512",
                 "--hardware", "h100-sxm", "--price", "h100-sxn=1"]) == 2
    assert "h100-sxm" in capsys.readouterr().err


def test_plan_csv_and_json(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    args = ["plan", "train", "--model", "llama-3.2-1b", "--peft", "lora", "--samples", "500",
            "--seq", "512", "--hardware", "h100-sxm", "--max-devices", "2", "--global-batch", "4",
            "--csv", str(out), "--json"]
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["schema_version"] >= 2 and d["kind"] == "train"
    for k in ("best", "candidates", "frontier", "nearest_miss", "excluded", "assumptions"):
        assert k in d
    for k in ("hardware", "devices", "plan", "peft", "micro_batch", "grad_accum", "checkpointing",
              "step_s", "job_s", "job_usd", "energy_j", "peak_bytes", "fits", "job_s_interval",
              "estimate_args"):
        assert k in d["best"]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(d["candidates"]) and rows[0]["rank"] == "1"
    assert float(rows[0]["job_s"]) == pytest.approx(d["best"]["job_s"])


def test_plan_table_output(capsys):
    assert main(["plan", "train", "--model", "llama-3.2-1b", "--samples", "500", "--seq", "512",
                 "--hardware", "h100-sxm", "--max-devices", "1", "--global-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "best by cost" in out and "reproduce: simcost estimate train" in out
    assert "plan notation" in out


@pytest.mark.parametrize("args, message", [
    (["--hardware", "h100-sxn"], "h100-sxm"),
    (["--peft", "lorra"], "lora"),
    (["--seq", None], "--tokens needs --seq"),
    (["--samples", "10"], "either --tokens"),
    (["--price", "2", "--hardware", "h100-sxm,a100-80gb-sxm"], "one --hardware"),
    (["--deadline", "soon"], "--deadline"),
    (["--checkpointing", "some"], "checkpointing"),
    (["--csv", "/nonexistent/dir/x.csv"], "does not exist"),
    (["--jobs", "0"], "--jobs must be in [1, 4096]"),
    (["--jobs", "x"], "expected an integer"),
    (["--jobs", "2", "--workers", "2"], "--jobs sets local processes"),
])
def test_plan_bad_input_is_one_line(args, message, capsys):
    base = {"--model": "llama-3.2-1b", "--tokens": "100000", "--seq": "512"}
    extra = dict(zip(args[::2], args[1::2]))
    merged = {**base, **extra}
    argv = ["plan", "train"]
    for k, v in merged.items():
        if v is not None:
            argv += [k, v]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_plan_on_ray_ranks_as_local():
    from simcost.plan.distributed import run_groups
    from simcost.plan.train import groups_of
    req = PlanTrainRequest.build(**{**SMALL, "peft": ("lora",)})
    groups, _ = groups_of(req)
    local = run_groups(groups)
    remote = run_groups(groups, workers=2)
    assert [r.as_dict() for r in remote] == [r.as_dict() for r in local]
    a = plan_train(req)
    b = plan_train(req, workers=2)
    key = [(e["hardware"], e["devices"], e["plan"], e["peft"], e["checkpointing"], e["job_usd"])
           for e in a["candidates"]]
    assert key == [(e["hardware"], e["devices"], e["plan"], e["peft"], e["checkpointing"],
                    e["job_usd"]) for e in b["candidates"]]


def test_plan_in_local_processes_ranks_as_in_one():
    """--jobs 2 splits the profiles over two processes; the results, and so the ranking, are
    those of one process (the elapsed time and where it ran aside)."""
    from simcost.plan.distributed import local_processes, run_groups
    from simcost.plan.train import groups_of
    req = PlanTrainRequest.build(**{**SMALL, "peft": ("lora",)})
    groups, _ = groups_of(req)
    assert local_processes(groups, 2) == 2 and local_processes(groups, 1) == 1
    one = run_groups(groups, jobs=1)
    two = run_groups(groups, jobs=2)
    assert [r.as_dict() for r in two] == [r.as_dict() for r in one]
    a, b = plan_train(req, jobs=1), plan_train(req, jobs=2)
    assert (a["searched"]["ran_on"], b["searched"]["ran_on"]) == ("this process",
                                                                  "2 local processes")
    for d in (a, b):
        d.pop("elapsed_s"), d["searched"].pop("ran_on")
    assert a == b


def test_unreachable_cluster_is_one_line_at_once(capsys):
    pytest.importorskip("ray")
    import socket
    with socket.socket() as s:                  # a local port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["plan", "train", "--model", "llama-3.2-1b", "--peft", "lora", "--tokens", "100000",
            "--seq", "512", "--hardware", "a100-80gb-sxm", "--max-devices", "2",
            "--cluster", f"ray://127.0.0.1:{port}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not reach the Ray cluster" in err


def test_progress_bar_when_asked_for_even_off_a_terminal(capsys):
    argv = ["plan", "train", "--model", "llama-3.2-1b", "--peft", "lora", "--tokens", "100000",
            "--seq", "512", "--hardware", "a100-80gb-sxm", "--max-devices", "2", "--json"]
    assert main(argv) == 0
    assert "planning" not in capsys.readouterr().err       # pytest's stderr is no terminal
    assert main([*argv, "--progress"]) == 0
    assert "planning" in capsys.readouterr().err


# ------------------------------------------------------------- estimate train: the job

def test_estimate_whole_job_numbers():
    r = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=4, seq=2048, peft="lora",
                       samples=10_000, epochs=3)
    j = r.job
    assert j["steps"] == 7500 and j["tokens"] == 10_000 * 3 * 2048
    assert j["job_s"] == pytest.approx(7500 * r.time_s["step"])
    assert j["job_usd"] == pytest.approx(r.cost_usd["price_per_device_hour"] * j["job_s"] / 3600)
    assert j["job_s_interval"]["p10"] < j["job_s"] < j["job_s_interval"]["p90"]
    tdp = r.energy["tdp_w"]
    assert 0.15 * tdp * j["job_s"] <= j["energy_j"] <= tdp * j["job_s"] * (1 + 1e-12)
    t = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=4, seq=2048, peft="lora",
                       tokens=10_000 * 2048, epochs=3)
    assert t.job["steps"] == j["steps"]
    assert 0 < r.mfu < 1


def test_estimate_price_override_and_partial_last_step():
    r = estimate_train("llama-2-7b", "h100-sxm", batch=16, seq=1024, peft="lora", samples=100,
                       price=2.5)
    assert r.cost_usd["price_per_device_hour"] == 2.5 and r.cost_usd["price_source"] == "--price"
    assert r.job["steps"] == 7                     # ceil(100 / 16)
    assert r.job["job_usd"] == pytest.approx(2.5 * 7 * r.time_s["step"] / 3600)


def test_estimate_job_needs_seq_and_one_size(capsys):
    base = ["estimate", "train", "--model", "llama-2-7b", "--hardware", "h100-sxm",
            "--batch", "4", "--seq", "512"]
    assert main([*base, "--tokens", "1000", "--samples", "10"]) == 2
    assert "either --tokens or --samples" in capsys.readouterr().err
    assert main([*base, "--epochs", "2"]) == 0
    assert "--epochs 2 has no effect" in capsys.readouterr().err


def test_devices_without_plan_say_so(capsys):
    assert main(["estimate", "train", "--model", "llama-2-7b", "--hardware", "h100-sxm",
                 "--batch", "8", "--seq", "512", "--peft", "lora", "--devices", "8",
                 "--json"]) == 0
    assert "no plan given for 8 devices" in capsys.readouterr().err


# ------------------------------------------------------------- --find and the savers

@pytest.mark.parametrize("what, field", [("max-batch", "batch"), ("max-seq", "seq")])
def test_find_max_is_the_fitting_edge(what, field, capsys):
    args = ["--model", "llama-2-7b", "--hardware", "a100-80gb-sxm", "--peft", "lora"]
    args += ["--seq", "2048"] if field == "batch" else ["--batch", "2"]
    r = _estimate_json([*args, "--find", what], capsys)
    f = r["find"]
    n = f["value"]
    assert r["fits"] and r[field] == n
    nxt = f["first_not_fitting"]
    assert nxt["value"] == n + 1
    other = {"batch": 2, "seq": 2048}
    over = estimate_train("llama-2-7b", "a100-80gb-sxm", peft="lora",
                          **{**{k: v for k, v in other.items() if k != field}, field: n + 1})
    assert not over.fits and over.memory_bytes["peak"] == nxt["peak_bytes"]


def test_find_refuses_the_size_it_searches(capsys):
    assert main(["estimate", "train", "--model", "llama-2-7b", "--hardware", "h100-sxm",
                 "--batch", "4", "--seq", "512", "--find", "max-batch"]) == 2
    assert "leave --batch out" in capsys.readouterr().err
    assert main(["estimate", "train", "--model", "llama-2-7b", "--hardware", "h100-sxm",
                 "--seq", "512"]) == 2
    assert "--batch is required" in capsys.readouterr().err


def test_savers_when_it_does_not_fit(capsys):
    r = _estimate_json(["--model", "llama-2-7b", "--hardware", "rtx-4090", "--peft", "lora",
                        "--batch", "4", "--seq", "2048"], capsys)
    assert not r["fits"]
    advice = r["advice"]
    changes = [a["change"] for a in advice]
    assert "--checkpointing full" in changes and "--peft qlora" in changes
    fitting = [a for a in advice if a["fits"]]
    assert fitting and all(a["peak_bytes"] <= a["capacity_bytes"] for a in fitting)
    ck = next(a for a in advice if a["change"] == "--checkpointing full")
    direct = estimate_train("llama-2-7b", "rtx-4090", batch=4, seq=2048, peft="lora",
                            grad_checkpointing="full")
    assert ck["peak_bytes"] == direct.memory_bytes["peak"]


def test_request_args_round_trip():
    from simcost.cli import _train_request, build_parser
    from simcost.request.args import train_args
    from simcost.request.train import TrainRequest
    cases = [
        dict(batch=4, seq=512, peft="lora", rank=16, alpha=8.0, targets="all-linear"),
        dict(batch=8, seq=1024, peft="lora", dora=True, grad_checkpointing="full",
             samples=100, epochs=2.5, price=1.25),
        dict(batch=16, seq=2048, peft="qlora", devices=8, tp=2, dp=4, zero=1, micro_batch=2,
             sequence_parallel=False, loss_chunks=4, stack="unsloth"),
        dict(batch=2, seq=256, peft="prefix", num_virtual_tokens=10, mixed_precision="bf16",
             dtype="fp32", tokens=10 ** 6),
    ]
    for kw in cases:
        req = TrainRequest.from_call("llama-2-7b", "h100-sxm", **kw)
        args = build_parser().parse_args(["estimate", "train", *train_args(req)])
        again = _train_request(args)

        def fields(r):     # checkpointing False and 'none' are the same request
            return {**r.model_dump(), "grad_checkpointing": r.checkpointing}
        assert fields(again) == fields(req), kw


@pytest.mark.parametrize("argv, message", [
    (["plan", "train", "--model", "llama-3.2-1b", "--samples", "100", "--seq", "128",
      "--hardware", "h100-sxm", "--csv", "/tmp"], "is a folder"),
    (["plan", "train", "--model", "nosuchmodel", "--samples", "100", "--seq", "128",
      "--hardware", "h100-sxm"], "unknown model 'nosuchmodel'"),
    (["plan", "train", "--model", "llama-3.2-1b", "--samples", "100", "--hardware",
      "h100-sxm"], "--seq is required"),
    (["plan", "train", "--model", "llama-3.2-1b", "--samples", "100", "--seq", "128",
      "--workers", "0"], "--workers must be in [1, 4096]"),
    (["plan", "train", "--model", "llama-3.2-1b", "--samples", "100", "--seq", "128",
      "--price", "h100-sxm=1,h100-sxm=2", "--hardware", "h100-sxm"], "twice"),
    (["estimate", "train", "--model", "llama-2-7b", "--hardware", "h100-sxm", "--batch", "4",
      "--seq", "512", "--jobs", "4", "--price", "3"], "--price prices one job"),
    (["estimate", "train", "--model", "llama-2-7b", "--hardware", "h100-sxm", "--batch", "4",
      "--seq", "512", "--jobs", "4", "--find", "max-seq"], "--find prices one job"),
    (["estimate", "train", "--model", "llama-3.2-1b", "--hardware", "h100-sxm", "--seq", "512",
      "--find", "max-batch", "--devices", "8", "--parallel", "auto"], "gradient accumulation"),
])
def test_refused_before_anything_runs(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_plan_report_of_a_memory_miss(tmp_path, capsys):
    page = tmp_path / "miss.html"
    assert main(["plan", "train", "--model", "llama-2-70b", "--samples", "100", "--seq", "512",
                 "--hardware", "rtx-4090", "--max-devices", "1", "--html", str(page),
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["best"] is None and "weights" in plan["nearest_miss"]["entry"][
        "memory_breakdown_bytes"]
    assert "No plan fits" in page.read_text()


def test_a_job_smaller_than_one_step_says_so():
    r = estimate_train("llama-2-7b", "h100-sxm", batch=16, seq=512, peft="lora", samples=4)
    assert r.job["steps"] == 1
    assert any("smaller than one step" in w for w in r.warnings)
