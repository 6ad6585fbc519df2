"""The time model's physics, and the calibration fit on synthetic measurements."""
import numpy as np
import pytest

from simcost.hardware import load_profile
from simcost.hardware.calibrate import fit, gemm_saturation
from simcost.sim.timing import TimeModel


def gpu_model(**over):
    dev = load_profile("a100-80gb-sxm").device()
    tm = dict(dev.time_model or {})
    tm.update({"compute_units": 108, "matmul_efficiency": 0.87, **over})
    import dataclasses
    return TimeModel.from_device(dataclasses.replace(dev, time_model=tm))


def test_skinny_gemm_runs_far_below_peak():
    tm = gpu_model()
    big = tm.gemm_efficiency(1, 4096, 4096, 4096)
    lora_a = tm.gemm_efficiency(1, 4096, 16, 4096)      # x (T x d) @ A^T (d x r)
    # the rank-16 side runs on a 64-wide tile: at most a quarter of it is useful work
    assert big > 0.9 and lora_a < 0.25


def test_wave_quantisation():
    tm = gpu_model()
    full_wave = tm.gemm_efficiency(1, 128 * 108, 128, 4096)
    one_more = tm.gemm_efficiency(1, 128 * 109, 128, 4096)   # one tile spills into a 2nd wave
    k0 = tm.gemm.tile_fixed_k
    assert full_wave > 0.99 * 4096 / (4096 + k0) and one_more < 0.55


def test_launch_bound_vs_sync_dispatch():
    gpu = gpu_model()
    t = gpu.phase_time("bf16", [], 0, 10, 10, 4)           # tiny op: host-bound
    assert t == pytest.approx(4 * (gpu.dispatch_s + gpu.launch_s))
    big = gpu.phase_time("bf16", [(1, 8192, 8192, 8192)], 2 * 8192 ** 3, 0, 0, 1)
    assert big == pytest.approx(gpu.gemm_time("bf16", 1, 8192, 8192, 8192))   # launch hidden
    cpu = TimeModel.from_device(load_profile("cpu-generic").device())
    t = cpu.phase_time("fp32", [], 0, 0, 1e6, 3)
    assert t == pytest.approx(1e6 / cpu.bandwidth + 3 * cpu.dispatch_s)


def test_split_k_fills_the_device_for_few_tiles():
    tm = gpu_model()
    # one token through a 11008 -> 4096 projection: 32 output tiles on 108 SMs, long K:
    # split 3 ways, the three partial products run on 96 SMs at once (one row: 64-row tiles)
    no_split = (1 * 4096) / (108 * 64 * 128)
    k_part = 11008 / 3
    assert tm.gemm_efficiency(1, 1, 4096, 11008) == pytest.approx(
        3 * no_split * k_part / (k_part + tm.gemm.tile_fixed_k), rel=1e-9)


def test_calibration_fit_recovers_known_parameters():
    rng = np.random.default_rng(0)
    P = {"fp32": 300e9, "bf16": 800e9}
    half, sharp, bw, o = (40.0, 20.0, 25.0), (1.0, 1.5, 1.2), 40e9, 2e-6
    gemm = []
    for dt in P:
        for m in (16, 128, 512, 2048):
            for n in (8, 64, 512, 2048):
                for k in (8, 64, 512, 2048):
                    sat = gemm_saturation(m, n, k, half, sharp)
                    e = 4 if dt == "fp32" else 2
                    t = o + max(2 * m * n * k / (P[dt] * sat), (m * k + k * n + m * n) * e / bw)
                    gemm.append({"dtype": dt, "m": m, "n": n, "k": k,
                                 "s": t * (1 + 0.02 * rng.standard_normal())})
    stream = [{"kind": "copy", "bytes": b, "s": b / bw} for b in (2 ** 28, 2 ** 29)]
    f = fit({"gemm": gemm, "stream": stream, "overhead_s": o})
    for dt in P:
        assert f["matmul_flops_per_s"][dt] == pytest.approx(P[dt], rel=0.1)
    assert f["bandwidth_bytes_per_s"] == pytest.approx(bw)
    assert f["fit_gemm_median_abs_error"] < 0.05


@pytest.mark.parametrize("hw", ["a100-80gb-sxm", "h100-sxm", "h200"])
@pytest.mark.parametrize("m", [1, 16, 128])
def test_skinny_gemm_never_beats_its_bytes_over_bandwidth(hw, m):
    """A decode-sized GEMM (few rows, a 4096 x 11008 weight) is priced no faster than streaming
    its operands and result once at the profile's sustained bandwidth (the roofline's max)."""
    tm = TimeModel.from_device(load_profile(hw).device())
    n, k = 4096, 11008
    nbytes = 2.0 * (m * k + k * n + m * n)
    t = tm.device_time("fp16", [(1, m, n, k)], 2.0 * m * n * k, 0.0, nbytes)
    assert t >= nbytes / tm.bandwidth
    if m <= 16:     # memory-bound: the bytes set the time, the imperfectly hidden compute adds
        assert t == pytest.approx(nbytes / tm.bandwidth, rel=0.1)


def test_h200_bandwidth_is_the_measured_stream_rate():
    """h200's sustained bandwidth is the cited STREAM Triad measurement over the datasheet
    (derived), not the datasheet peak and not another device's figure."""
    dev = load_profile("h200").device()
    eff = dev.params.bandwidth_efficiency
    assert eff == pytest.approx(4.15e12 / dev.memory_bandwidth_bytes_per_s, abs=5e-4)
    assert eff != load_profile("h100-sxm").device().params.bandwidth_efficiency
    tm = TimeModel.from_device(dev)
    assert tm.bandwidth == pytest.approx(4.15e12, rel=1e-3)
