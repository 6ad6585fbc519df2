"""The GPU tile model's fitted constants (validation/fit/fit_gemm.py) and its invariants."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simcost.hardware import load_profile
from simcost.sim.timing import GPU_GEMM_FILE, GemmTileParams, TimeModel

ROOT = Path(__file__).resolve().parents[1]
SHAPES = list(itertools.product((1, 16, 64, 65, 128, 512, 4096), (16, 128, 4096, 22016),
                                (16, 256, 4096, 11008)))


def test_fit_script_reproduces_the_committed_values():
    r = subprocess.run([sys.executable, str(ROOT / "validation/fit/fit_gemm.py"), "--check"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "committed values reproduced" in r.stdout


def test_committed_values_carry_their_fit():
    data = json.loads(GPU_GEMM_FILE.read_text())
    for name in ("tile_fixed_k", "overlap_exponent"):
        e = data[name]
        assert e["fitted"] and e["rows"] and e["held_out"]
        assert not set(e["rows"]) & set(e["held_out"])
        assert e["residual"]["held_out_mape"] <= 0.10
    g = GemmTileParams.load()
    assert 0 <= g.tile_fixed_k <= 1024 and 1 <= g.overlap_exponent <= 8


@pytest.mark.parametrize("hw", ["a100-80gb-sxm", "h100-sxm", "h200"])
def test_scalar_and_array_paths_agree(hw):
    tm = TimeModel.from_device(load_profile(hw).device())
    m, n, k = (np.array(x, dtype=float) for x in zip(*SHAPES))
    eff = tm.gemm_efficiency(1, m, n, k)
    extra = tm.gemm_splitk_bytes(1, m, n, k)
    for i, (a, b, c) in enumerate(SHAPES):
        assert tm.gemm_efficiency(1, a, b, c) == eff[i]
        assert tm.gemm_splitk_bytes(1, a, b, c) == extra[i]
        nbytes = 2.0 * (a * c + c * b + a * b)
        t_s = tm.device_time("bf16", [(1, a, b, c)], 2.0 * a * b * c, 0.0, nbytes)
        t_a = tm.device_time("bf16", [(1, m[i:i + 1], n[i:i + 1], k[i:i + 1])],
                             2.0 * a * b * c, 0.0, np.array([nbytes]))
        assert t_s == pytest.approx(float(t_a[0]), rel=1e-12)


@pytest.mark.parametrize("hw", ["a100-80gb-sxm", "h100-sxm"])
def test_efficiency_at_most_one_and_rises_with_k(hw):
    tm = TimeModel.from_device(load_profile(hw).device())
    ks = np.arange(16, 32768, 16, dtype=float)
    for m, n in itertools.product((1, 64, 128, 512, 4096), (128, 4096, 11008)):
        e = tm.gemm_efficiency(1, np.full_like(ks, m), np.full_like(ks, n), ks)
        assert np.all(e <= 1.0) and np.all(e > 0)
        assert np.all(np.diff(e) >= -1e-12), (m, n)


@pytest.mark.parametrize("hw", ["a100-80gb-sxm", "h100-sxm"])
def test_overlap_lies_between_max_and_sum(hw):
    """The p-norm of compute and streaming time: never below the roofline's max, never above
    running the two one after the other."""
    tm = TimeModel.from_device(load_profile(hw).device())
    for m, n, k in SHAPES:
        nbytes = 2.0 * (m * k + k * n + m * n) + tm.gemm_splitk_bytes(1, m, n, k)
        tc, tb = tm.gemm_time("fp16", 1, m, n, k), tm.stream_time(nbytes)
        t = tm.device_time("fp16", [(1, m, n, k)], 2.0 * m * n * k, 0.0,
                           2.0 * (m * k + k * n + m * n))
        assert max(tc, tb) * (1 - 1e-12) <= t <= (tc + tb) * (1 + 1e-12)


def test_fused_attention_pays_no_per_tile_k_cost():
    """A fused attention kernel (no measured attention rate on the profile) keeps one output
    tile per query block over the whole key loop, so the per-tile fixed K-steps fitted on
    cuBLAS GEMMs do not apply to its QK^T product (K = head dim): priced as a GEMM it would run
    at 128 / (128 + 192) of its tile rate."""
    tm = TimeModel.from_device(load_profile("a100-80gb-sxm").device())
    assert tm.attention_rate("bf16", "fwd") is None and tm.tiled
    gemms = [(32, 4096, 4096, 128), (32, 4096, 128, 4096)]       # QK^T, PV of 32 heads
    flops = sum(2.0 * b * m * n * k for b, m, n, k in gemms)
    plain = tm.device_time("bf16", gemms, flops, 0.0, 1e8)
    fused = tm.device_time("bf16", gemms, flops, 0.0, 1e8, attention=("fwd", True))
    assert fused < plain
    qk = TimeModel.gemm_time(tm, "bf16", *gemms[0])
    no_fixed = 2.0 * 32 * 4096 * 4096 * 128 / (tm.matmul_peak("bf16") * float(
        tm._tile_plan(32, 4096, 4096, 128, (np.ceil, np.floor, np.maximum, np.minimum),
                      0.0)[0]))
    assert no_fixed < qk * 0.6                    # the fixed K-steps would cost ~2.5x here
