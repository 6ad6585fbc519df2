"""`simcost calibrate`: a bounded run, the dtype probe, and a fit that stays finite and bounded
on any timings."""
import json
import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simcost.errors import SimcostError
from simcost.hardware import load_profile
from simcost.hardware.calibrate import (FIT_MAX_MEDIAN_ERROR, PEAK_MAX_OVER_BEST, GemmBench,
                                        fit, gemm_saturation, main, parse_dtypes, tables)

SIZES = (1, 8, 16, 64, 128, 512, 2048)
timing = st.one_of(st.just(0.0), st.just(1e-12), st.floats(1e-9, 1e3),
                   st.just(float("nan")), st.just(float("inf")), st.just(-1.0))
row = st.fixed_dictionaries({"dtype": st.sampled_from(["fp32", "bf16"]),
                             "m": st.sampled_from(SIZES), "n": st.sampled_from(SIZES),
                             "k": st.sampled_from(SIZES), "s": timing})
stream = st.fixed_dictionaries({"kind": st.just("copy"), "bytes": st.sampled_from([2 ** 16, 2 ** 28]),
                                "s": timing})


def _check(f):
    for dt, v in f["matmul_flops_per_s"].items():
        assert math.isfinite(v) and v > 0
    for key in ("bandwidth_bytes_per_s", "op_overhead_s", "fit_gemm_median_abs_error"):
        v = f[key]
        assert v is None or (math.isfinite(v) and v >= 0)
    if f["matmul_half"]:
        assert all(math.isfinite(x) and x > 0 for x in (*f["matmul_half"], *f["matmul_sharpness"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gemm=st.lists(row, min_size=0, max_size=40), streams=st.lists(stream, max_size=4),
       overhead=st.one_of(st.none(), timing))
def test_fit_any_timings_finite_positive_no_warning(gemm, streams, overhead):
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        f = fit({"gemm": gemm, "stream": streams, "overhead_s": overhead})
        _check(f)
        raw = {"gemm": gemm, "stream": streams}
        g, s, _ = tables(raw, f)
    ok = [r for r in gemm if math.isfinite(r["s"]) and r["s"] >= 0]
    for dt, v in f["matmul_flops_per_s"].items():     # never above 2x the best measured rate
        best = max(2 * r["m"] * r["n"] * r["k"] / max(r["s"], 1e-9) for r in ok if r["dtype"] == dt)
        assert v <= PEAK_MAX_OVER_BEST * best * (1 + 1e-9)
    for t in g.values():
        assert all(v > 0 and math.isfinite(v) for a in t["flops_per_s"] for b in a for v in b)


@settings(max_examples=60, deadline=None)
@given(P=st.floats(1e9, 1e13), noise=st.floats(0, 0.5), seed=st.integers(0, 2 ** 16))
def test_fit_noisy_grid_bounded(P, noise, seed):
    rng = np.random.default_rng(seed)
    gemm = []
    for m in (16, 128, 512, 2048):
        for n in (8, 64, 512, 2048):
            for k in (8, 64, 512):
                t = 2 * m * n * k / (P * gemm_saturation(m, n, k, (40, 20, 25), (1, 1.5, 1.2)))
                gemm.append({"dtype": "fp32", "m": m, "n": n, "k": k,
                             "s": t * math.exp(noise * rng.standard_normal())})
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        f = fit({"gemm": gemm, "stream": [], "overhead_s": 2e-6})
    _check(f)
    best = max(2 * r["m"] * r["n"] * r["k"] / r["s"] for r in gemm)
    assert best <= f["matmul_flops_per_s"]["fp32"] <= PEAK_MAX_OVER_BEST * best
    if f["fit_model"] == "best-measured":
        assert f["matmul_flops_per_s"]["fp32"] == best and f["matmul_half"] is None


def test_fit_one_point_and_zero_time():
    f = fit({"gemm": [{"dtype": "fp32", "m": 64, "n": 64, "k": 64, "s": 0.0}], "stream": [],
             "overhead_s": 0.0})
    _check(f)
    assert f["fit_model"] == "best-measured" and "too few" in f["fit_note"]
    assert f["op_overhead_s"] is None and f["bandwidth_bytes_per_s"] is None


def test_fit_falls_back_when_model_cannot_explain_timings():
    # times that grow with shrinking size: no saturation curve fits them
    gemm = [{"dtype": "fp32", "m": m, "n": n, "k": k, "s": 1.0 / (m * n * k)}
            for m in (16, 128, 512, 2048) for n in (8, 64, 512) for k in (8, 64, 512)]
    f = fit({"gemm": gemm, "stream": [], "overhead_s": None})
    assert f["fit_model"] == "best-measured"
    assert f["fit_gemm_median_abs_error"] > FIT_MAX_MEDIAN_ERROR
    best = max(2 * r["m"] * r["n"] * r["k"] / r["s"] for r in gemm)
    assert f["matmul_flops_per_s"]["fp32"] == best


def test_tables_fill_skipped_cells_from_measured():
    gemm = [{"dtype": "bf16", "m": m, "n": n, "k": k, "s": 1e-3}
            for m in (16, 128) for n in (8, 64) for k in (8, 64) if (m, n, k) != (128, 64, 64)]
    g, s, filled = tables({"gemm": gemm, "stream": []}, {"matmul_half": None})
    assert filled == 1 and s is None
    grid = np.array(g["bf16"]["flops_per_s"])
    assert grid.shape == (2, 2, 2) and np.all(grid > 0)


class FakeBench(GemmBench):
    """The prediction and the start rule, without torch."""

    def __init__(self, rows):
        self.rows = [dict(r, flops=2.0 * r["m"] * r["n"] * r["k"]) for r in rows]
        self.started = []

    def run(self, dt, m, n, k, max_s):
        self.started.append((dt, m, n, k))


def test_predict_is_pessimistic_and_refuses_what_does_not_fit():
    # emulated bf16: the rate falls with size (3.4 GFLOP/s at 64^3, 2 GFLOP/s at 512^3)
    rows = [{"dtype": "bf16", "m": 64, "n": 64, "k": 64, "s": 2 * 64 ** 3 / 3.4e9},
            {"dtype": "bf16", "m": 512, "n": 512, "k": 512, "s": 2 * 512 ** 3 / 2.0e9}]
    b = FakeBench(rows)
    p = b.predict_s("bf16", 2048, 2048, 2048)
    assert p >= 2 * 2048 ** 3 / 2.0e9 * 8 - 1e-9        # sqrt(64) slower than the last rate
    assert b.predict_s("fp32", 16, 16, 16) is None
    why = b.try_run("bf16", (2048, 2048, 2048), time.perf_counter() + 60.0)
    assert why and "predicted" in why and b.started == []
    assert b.try_run("bf16", (128, 128, 128), time.perf_counter() + 60.0) is None
    assert b.started == [("bf16", 128, 128, 128)]


def test_bad_options_one_line(capsys, tmp_path):
    with pytest.raises(SimcostError, match="--dtypes"):
        parse_dtypes("fp32,fp64")
    for argv in (["--budget=-5s"], ["--budget", "soon"], ["--budget", "nan"],
                 ["--dtypes", "int4"], ["--threads", "0"]):
        rc = main(argv + ["--out", str(tmp_path / "c.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("simcost: error: "), (argv, err)


@pytest.mark.torch
def test_small_budget_run_is_bounded_and_valid(tmp_path, capsys):
    out = tmp_path / "cal.json"
    t = time.perf_counter()
    assert main(["--budget", "8s", "--dtypes", "fp32,bf16", "--out", str(out)]) == 0
    wall = time.perf_counter() - t
    assert wall < 8 + 10           # the bound itself, with generous slack for a loaded machine
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"wrote {out}")
    prof = load_profile(str(out))
    cal = prof.time_model.model_extra["calibration"]
    assert cal["budget_s"] == 8.0 and cal["skipped"]          # 8 s cannot hold everything
    assert any(line.startswith("skipped (") for line in lines)
    assert {"fp32", "bf16"} <= set(cal["probe"])
    assert cal["probe"]["fp32"]["rate_over_fp32"] == 1.0
    raw = json.loads(out.with_suffix(".raw.json").read_text())
    assert raw["probe"] == cal["probe"] and raw["gemm"]
    d = prof.device()
    assert all(v > 0 and math.isfinite(v) for v in d.peak_flops_per_s.values())
    from simcost.api import estimate_train
    r = estimate_train("gpt2", str(out), batch=1, seq=64)
    assert r.time_s["step"] > 0 and math.isfinite(r.time_s["step"])
    assert not r.warnings          # a calibrated profile has a measured GEMM table
