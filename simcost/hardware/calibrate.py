"""``simcost calibrate``: microbenchmarks on the local device, fitted into a profile.

Measures (with torch, on ``cpu`` or ``cuda``), all within one wall-time budget (``--budget``):
- a probe: a few small GEMMs per dtype, so that each dtype's real cost on this device is known
  before anything large runs (without AVX512-BF16 or AMX a CPU emulates bf16 GEMMs, hundreds
  of times slower than fp32: the probe records the ratio);
- memory-bound element-wise kernels (copy, add) from cache-sized to DRAM-sized buffers;
- the fixed cost of one dispatched op (a tiny add with autograd recording);
- special element-wise kernels (exp, random numbers, log-softmax backward, AdamW);
- the host time per kernel of a tiny eager HF + peft training step;
- (CPU) the host allocator: its name, the page-fault cost of a fresh block and the block size
  it returns to the OS from (:mod:`simcost.hardware.host_allocator`);
- GEMMs over a grid of shapes, skinny ones included (LoRA's rank-r products), per dtype, in
  ascending size, with whatever time is left.

No measurement starts whose predicted time (from the probe and the shapes measured so far, with
a pessimistic extrapolation) exceeds the time left to its stage; what does not fit is skipped and
listed in the profile's ``time_model.calibration.skipped`` and in one printed line.

The fit (least squares on log time, bounded parameters):
  GEMM:        t = o + max(2mnk / (P · s(m) s(n) s(k)), bytes / BW),  s(x) = 1 / (1 + (h/x)^a)
  element-wise t = o + bytes / BW
P (achievable matmul FLOP/s per dtype, at most 2x the best measured rate), per dimension a
half-saturation size h and a sharpness a. A fit whose median error exceeds
``FIT_MAX_MEDIAN_ERROR`` is replaced by the simpler model: P = the best measured rate, the
measured table for the shape dependence.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simcost.errors import SimcostError
from simcost.hardware import host_allocator
from simcost.hardware.profile import load_profile
from simcost.paths import check_output_file

GEMM_M = (16, 128, 512, 2048)
GEMM_NK = (8, 64, 512, 2048)
PROBE_SHAPES = ((128, 64, 64), (128, 512, 512), (512, 512, 512))   # on the grid above
DTYPES = ("fp32", "bf16", "fp16")
ESIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_BUDGET = "150s"
FIT_MAX_MEDIAN_ERROR = 0.25
PEAK_MAX_OVER_BEST = 2.0        # a fitted peak never exceeds 2x the best measured rate
TIMER_FLOOR_S = max(time.get_clock_info("perf_counter").resolution, 1e-9)
# shares of the budget per stage (upper bounds; what a stage leaves goes to the GEMM grid)
SHARES = {"probe": 0.05, "stream": 0.08, "overhead": 0.01, "special": 0.08, "dispatch": 0.15}
DISPATCH_MIN_S = 8.0            # the dispatch step (imports, a tiny model, 18 steps) needs this
STARTUP_MAX_S = 15.0           # interpreter start + imports counted in the budget up to this
RESERVE_S = 4.0                 # kept for the fit and the file writing


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere), so that the budget
    bounds the whole command, interpreter start and imports included. Anything but the
    ``calibrate`` command itself (a test, a notebook, ``validate steps``), or a process older
    than STARTUP_MAX_S, counts from the call."""
    import sys

    command = sys.argv[1:2] == ["calibrate"] or sys.argv[0].endswith("calibrate.py")
    if not command:
        return 0.0
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        import os
        age = max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
        return age if age <= STARTUP_MAX_S else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class Budget:
    """Wall time left: the total (counted from the process start), and a stage's slice."""
    total_s: float
    t0: float = field(default_factory=lambda: time.perf_counter() - _process_age_s())
    skipped: list = field(default_factory=list)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t0

    def left_s(self) -> float:
        return max(0.0, self.total_s - RESERVE_S * min(1.0, self.total_s / 40) - self.elapsed_s())

    def stage_deadline(self, share: float) -> float:
        """A clock time: this stage may use ``share`` of the budget, within what is left."""
        return time.perf_counter() + min(share * self.total_s, self.left_s())

    def skip(self, what: str) -> None:
        self.skipped.append(what)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.perf_counter())


def _timeit(fn, sync, min_time_s: float = 0.02, reps: int = 5, max_s: float = 0.25) -> float:
    """Minimum seconds per call over up to ``reps`` samples of at least ``min_time_s`` each;
    the first call is timed too (a call slower than ``min_time_s`` is a sample by itself), and
    no sample starts once ``max_s`` is spent, so a slow kernel is run once or twice only."""
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    start = time.perf_counter()      # max_s counts from here: the first call was predicted
    samples, n = ([first], 1) if first >= min_time_s else ([], 1)
    while not samples:               # grow the inner loop until one sample lasts min_time_s
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        dt = time.perf_counter() - t
        if dt >= min_time_s or n >= 1 << 16 or time.perf_counter() - start > max_s:
            samples.append(dt / n)
            break
        n = 2 * n if dt * 4 < min_time_s else max(n, int(n * min_time_s / max(dt, 1e-9)) + 1)
    while len(samples) < reps and time.perf_counter() - start + samples[-1] * n <= max_s:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        samples.append((time.perf_counter() - t) / n)
    return max(min(samples), TIMER_FLOOR_S)   # noise on a shared machine only ever adds time


def _cpuinfo() -> dict:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    info = {}
    for line in lines:
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags") and key not in info:
            info[key] = val.strip()
    return info


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return _cpuinfo().get("model name") or platform.processor() or "cpu"


def cpu_matrix_features() -> dict:
    """The CPU flags that decide whether bf16/fp16 GEMMs run natively or are emulated."""
    flags = set(_cpuinfo().get("flags", "").split())
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16",
                                    "amx_tile")}


class GemmBench:
    """GEMM timings of one device, and the predicted time of a GEMM not yet run."""

    def __init__(self, device: str, sync):
        import torch

        self.torch, self.device, self.sync = torch, device, sync
        self.tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        self.rows: list[dict] = []

    def warm_up(self, dtypes) -> None:
        """One tiny GEMM per dtype: the first op of a process starts thread pools and
        libraries, which no measurement should pay for."""
        for dt in ("fp32", *dtypes):
            a = self.torch.ones(8, 8, device=self.device).to(self.tdt[dt])
            self.torch.mm(a, a)
        self.sync()

    def predict_s(self, dt: str, m: int, n: int, k: int) -> float | None:
        """Seconds for one call, from the largest measured GEMMs of this dtype at or below this
        size (their lowest rate), slowed by sqrt(size ratio) beyond them: pessimistic where the
        rate falls with size (emulated bf16), so a long GEMM is never started blind."""
        flops = 2.0 * m * n * k
        below = sorted((r for r in self.rows if r["dtype"] == dt and r["flops"] <= flops),
                       key=lambda r: r["flops"])[-3:]
        if not below:
            return None
        ref = below[-1]["flops"]
        rate = min(r["flops"] / r["s"] for r in below)
        return flops / rate * math.sqrt(flops / ref)

    def run(self, dt: str, m: int, n: int, k: int, max_s: float) -> dict:
        torch = self.torch
        a = torch.randn(m, k, device=self.device).to(self.tdt[dt])
        b = torch.randn(k, n, device=self.device).to(self.tdt[dt])
        t = _timeit(lambda: torch.mm(a, b), self.sync, max_s=max_s)
        row = {"dtype": dt, "m": m, "n": n, "k": k, "s": t, "flops": 2.0 * m * n * k}
        self.rows.append(row)
        return row

    def try_run(self, dt: str, shape: tuple, deadline: float, max_s: float = 0.25) -> str | None:
        """Run one shape if its predicted time fits before ``deadline``; else why not."""
        pred = self.predict_s(dt, *shape)
        left = _left(deadline)
        if pred is not None and pred > left:
            return f"predicted {pred:.3g} s > {left:.3g} s left"
        if pred is None and left <= 0:
            return "no time left"
        self.run(dt, *shape, max_s=min(max_s, max(left - (pred or 0.0), 0.0)))
        return None


def probe(bench: GemmBench, dtypes, budget: Budget) -> dict:
    """Each dtype's GEMM rate on small shapes (fp32 always, as the reference), smallest first;
    returns per dtype the largest probed shape and its rate, and each dtype's rate over fp32's."""
    deadline = budget.stage_deadline(SHARES["probe"])
    out = {}
    order = ["fp32"] + [d for d in dtypes if d != "fp32"]
    for i, dt in enumerate(order):
        dt_deadline = time.perf_counter() + _left(deadline) / (len(order) - i)
        # every dtype's smallest shape runs whatever the clock says (a few milliseconds): without
        # one rate of its own nothing later can predict that dtype's cost, and an earlier dtype
        # that overran its share on a loaded machine must not leave the next one unmeasured
        bench.run(dt, *PROBE_SHAPES[0], max_s=0.05)
        for shape in PROBE_SHAPES[1:]:
            why = bench.try_run(dt, shape, dt_deadline, max_s=0.1)
            if why:
                budget.skip(f"probe {dt} {shape[0]}x{shape[1]}x{shape[2]} ({why})")
                break
        mine = [r for r in bench.rows if r["dtype"] == dt]
        if mine:
            r = mine[-1]
            out[dt] = {"m": r["m"], "n": r["n"], "k": r["k"], "flops_per_s": r["flops"] / r["s"]}
    rate = {(r["dtype"], r["m"], r["n"], r["k"]): r["flops"] / r["s"] for r in bench.rows}
    for dt, p in out.items():      # at the largest shape probed in both dtypes
        common = [s for s in PROBE_SHAPES if (dt, *s) in rate and ("fp32", *s) in rate]
        if common:
            p["rate_over_fp32"] = rate[(dt, *common[-1])] / rate[("fp32", *common[-1])]
            p["ratio_shape"] = list(common[-1])
    return out


def gemm_grid(bench: GemmBench, dtypes, budget: Budget) -> None:
    """The shape grid per dtype in ascending size, each dtype an equal share of what is left;
    shapes whose predicted time does not fit are skipped (and counted)."""
    shapes = sorted(((m, n, k) for m in GEMM_M for n in GEMM_NK for k in GEMM_NK),
                    key=lambda s: (s[0] * s[1] * s[2], s))
    for i, dt in enumerate(dtypes):
        deadline = time.perf_counter() + budget.left_s() / (len(dtypes) - i)
        done = {(r["m"], r["n"], r["k"]) for r in bench.rows if r["dtype"] == dt}
        skipped, first_why = 0, None
        for shape in shapes:
            if shape in done:
                continue
            why = bench.try_run(dt, shape, deadline)
            if why:
                skipped += 1
                first_why = first_why or f"{shape[0]}x{shape[1]}x{shape[2]}: {why}"
        if skipped:
            budget.skip(f"{dt} GEMM: {skipped} of {len(shapes)} shapes (first: {first_why})")


def measure_stream(device: str, sync, budget: Budget) -> list[dict]:
    """copy and add from 64 KiB to 256 MiB buffers, smallest first; a size whose predicted
    time (from the last size's bandwidth) does not fit is skipped with all larger ones."""
    import torch

    deadline = budget.stage_deadline(SHARES["stream"])
    rows, sizes = [], [2 ** p for p in range(16, 29, 2)]
    for kind, per in (("copy", 2), ("add", 3)):
        kind_deadline = time.perf_counter() + _left(deadline) / (2 if kind == "copy" else 1)
        for nbytes in sizes:
            last = [r for r in rows if r["kind"] == kind]
            pred = 0.0 if not last else per * nbytes / (last[-1]["bytes"] / last[-1]["s"]) * 4
            if pred * 3 > _left(kind_deadline) or _left(kind_deadline) <= 0:
                budget.skip(f"{kind} stream from {nbytes >> 20} MiB buffers up (budget)")
                break
            x = torch.empty(nbytes // 4, device=device).uniform_()
            y, z = torch.empty_like(x), torch.empty_like(x)
            fn = (lambda: y.copy_(x)) if kind == "copy" else (lambda: torch.add(x, y, out=z))
            t = _timeit(fn, sync, max_s=min(0.25, _left(kind_deadline)))
            rows.append({"kind": kind, "bytes": per * nbytes, "s": t})
            del x, y, z
    return rows


def measure_overhead(device: str, sync, budget: Budget) -> float | None:
    import torch

    deadline = budget.stage_deadline(SHARES["overhead"])
    if _left(deadline) < 0.05:
        budget.skip("op overhead (budget)")
        return None
    x = torch.ones(8, device=device, requires_grad=True)
    y = torch.ones(8, device=device)
    return _timeit(lambda: torch.add(x, y), sync, max_s=min(0.25, _left(deadline)))


def measure_special(device: str, sync, budget: Budget | None = None) -> dict:
    """Elements per second of the element-wise kernels whose cost is not bandwidth: exp
    (softmax, SiLU, tanh), random numbers (dropout's bernoulli_), log-softmax backward, and
    parameters per second of torch's default AdamW for this device (for-loop on CPU, foreach on
    GPUs), fp32, 48 tensors of 1 Mi parameters (768 MiB of parameters, gradients and states:
    beyond the caches, as in a training step). Each kernel is skipped when the stage's time is
    spent (AdamW also when a predicted step would not fit)."""
    import torch

    budget = budget or Budget(60.0)
    deadline = budget.stage_deadline(SHARES["special"])
    n = 1 << 22
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    logits = torch.randn(512, 8192, device=device)
    out = torch.log_softmax(logits, -1)
    grad = torch.randn_like(out)
    kernels = {
        "exp": (n, lambda: torch.exp(x, out=y)),
        "rng": (n, lambda: y.bernoulli_(0.9)),
        "log_softmax_bwd": (logits.numel(), lambda: torch.ops.aten._log_softmax_backward_data(
            grad, out, -1, torch.float32))}
    rates = {}
    for name, (count, fn) in kernels.items():
        if _left(deadline) < 0.05:
            budget.skip(f"special rate {name} (budget)")
            continue
        rates[name] = count / _timeit(fn, sync, max_s=min(0.25, _left(deadline)))
    # one AdamW step reads and writes ~16 bytes per parameter per tensor, 4 tensors
    per_step = 48 * (1 << 20) * 4 * 16 / max(rates.get("exp", 1e9) * 4, 1e9)
    if _left(deadline) < 4 * per_step + 1.0:
        budget.skip(f"special rate adamw_params (predicted {per_step:.2g} s per step; budget)")
        return rates
    params = [torch.nn.Parameter(torch.randn(1 << 20, device=device)) for _ in range(48)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    rates["adamw_params"] = 48 * (1 << 20) / _timeit(
        opt.step, sync, min_time_s=0.2, reps=3, max_s=min(1.0, _left(deadline)))
    return rates


def measure_dispatch(device: str = "cpu", budget: Budget | None = None) -> float | None:
    """Host time per kernel of an eager HF + peft training step: a tiny Llama (so the kernels
    themselves take no time), forward + backward time divided by simcost's kernel count."""
    if budget is not None and min(SHARES["dispatch"] * budget.total_s,
                                  budget.left_s()) < DISPATCH_MIN_S:
        budget.skip(f"dispatch (needs about {DISPATCH_MIN_S:.0f} s; budget)")
        return None
    try:
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
        if budget is not None:
            budget.skip("dispatch (transformers / peft not installed)")
        return None
    from simcost.models.config import spec_from_config
    from simcost.peft.spec import PeftSpec
    from simcost.pipeline import build_graph
    from simcost.validate.exact import harness_peft
    from simcost.validate.torch_steps import time_steps

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 8, "num_attention_heads": 2,
           "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}
    spec = PeftSpec("lora", r=4, alpha=8, targets="all-linear")
    m = time_steps(cfg, harness_peft(cfg, spec), batch=1, seq=8, dtype="fp32", attn="sdpa",
                   warmup=3, repeats=15, device=device)
    _, a = build_graph(spec_from_config(cfg), 1, 8, dtype="fp32", attn="sdpa", peft=spec,
                       device_kind="cpu" if device == "cpu" else "gpu")
    kernels = sum((r.cost.fwd_kernels + r.cost.bwd_kernels) * r.count for r in a.records)
    return (m.forward_s + m.backward_s) / kernels


def measure(device: str = "cpu", dtypes=("fp32", "bf16"), progress=None,
            budget_s: float | None = None, budget: Budget | None = None) -> dict:
    """Run the microbenchmarks within ``budget_s`` seconds; returns raw samples (seconds),
    the probe, what was skipped and each stage's wall time."""
    import torch

    budget = budget or Budget(budget_s or 150.0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tick = progress or (lambda: None)
    bench = GemmBench(device, sync)
    bench.warm_up(dtypes)
    stages = {}

    def stage(name, fn):
        t = time.perf_counter()
        res = fn()
        stages[name] = round(time.perf_counter() - t, 3)
        tick()
        return res

    out = {"budget_s": budget.total_s, "threads": torch.get_num_threads()}
    if device == "cpu":
        out["cpu_features"] = cpu_matrix_features()
        # first, on a clean heap: blocks the other stages free stay in glibc's bins and serve
        # later requests above its mmap threshold, hiding the allocator's policy
        out["host_alloc"] = stage("host_alloc", lambda: host_allocator.measure(budget))
    out["probe"] = stage("probe", lambda: probe(bench, dtypes, budget))
    out["stream"] = stage("stream", lambda: measure_stream(device, sync, budget))
    out["overhead_s"] = stage("overhead", lambda: measure_overhead(device, sync, budget))
    out["special"] = stage("special", lambda: measure_special(device, sync, budget))
    out["dispatch_s"] = stage("dispatch", lambda: measure_dispatch(device, budget))
    stage("gemm", lambda: gemm_grid(bench, dtypes, budget))
    out["gemm"] = [{k: r[k] for k in ("dtype", "m", "n", "k", "s")} for r in bench.rows
                   if r["dtype"] in dtypes]
    out["skipped"] = list(budget.skipped)
    out["stages_s"] = stages
    out["elapsed_s"] = round(budget.elapsed_s(), 3)
    return out


def slow_dtype_notes(probe_res: dict) -> list[str]:
    """'bf16 GEMMs run at 0.004x the fp32 rate': a 16-bit dtype far slower than fp32."""
    return [f"{dt} GEMMs run at {p['rate_over_fp32']:.3g}x the fp32 rate on this device "
            f"(probe {'x'.join(map(str, p['ratio_shape']))}; likely emulated: no native {dt} matrix "
            f"instructions)"
            for dt, p in probe_res.items() if dt != "fp32" and p.get("rate_over_fp32", 1) < 0.5]


def gemm_saturation(m, n, k, half, sharp):
    """Fraction of the large-shape GEMM throughput reached at (m, n, k); computed in log
    space, so no size or parameter overflows it (it is in (0, 1])."""
    z = [a * (math.log(h) - math.log(max(x, 1))) for x, h, a in zip((m, n, k), half, sharp)]
    return float(np.exp(-np.sum(np.logaddexp(0.0, z))))


def _clean_gemm(rows) -> list[dict]:
    """Rows with positive whole sizes and a finite positive time (floored at the timer's
    resolution), known dtypes only."""
    out = []
    for r in rows:
        try:
            m, n, k, s = int(r["m"]), int(r["n"]), int(r["k"]), float(r["s"])
        except (KeyError, TypeError, ValueError, OverflowError):
            continue
        if r.get("dtype") in ESIZE and min(m, n, k) >= 1 and math.isfinite(s) and s >= 0:
            out.append({"dtype": r["dtype"], "m": m, "n": n, "k": k, "s": max(s, TIMER_FLOOR_S)})
    return out


def fit_bandwidth(stream) -> float | None:
    """Median bytes/s of the streams beyond the caches (>= 128 MiB moved), else the best
    measured; None without a usable row."""
    ok = [r for r in stream or [] if isinstance(r.get("s"), (int, float)) and
          math.isfinite(r["s"]) and r["s"] > 0 and math.isfinite(r.get("bytes", math.nan)) and
          r["bytes"] > 0]
    if not ok:
        return None
    big = [r for r in ok if r["bytes"] >= 2 ** 27]
    rates = [r["bytes"] / max(r["s"], TIMER_FLOOR_S) for r in (big or ok)]
    return float(statistics.median(rates) if big else max(rates))


def _log_model(theta, X, log_flops, log_bytes, dt_idx, log_o):
    """log t; theta = log h (3), log a (3), log GEMM operand bandwidth, log P per dtype."""
    log_h, a, log_p = theta[:3], np.exp(theta[3:6]), theta[7:][dt_idx]
    log_sat = -np.logaddexp(0.0, a * (log_h - X)).sum(axis=1)
    log_t = np.maximum(log_flops - log_p - log_sat, log_bytes - theta[6])
    return np.logaddexp(log_o, log_t) if log_o is not None else log_t


def _saturation_fit(g, dtypes, best, bw, o):
    """Bounded least squares on log time; returns (peaks, half, sharp, relative errors)."""
    from scipy.optimize import least_squares

    X = np.log(np.array([[r["m"], r["n"], r["k"]] for r in g], dtype=float))
    log_flops = np.log(2.0 * np.prod(np.exp(X), axis=1))
    log_meas = np.log(np.array([r["s"] for r in g]))
    dt_idx = np.array([dtypes.index(r["dtype"]) for r in g])
    nbytes = [(r["m"] * r["k"] + r["k"] * r["n"] + r["m"] * r["n"]) * ESIZE[r["dtype"]]
              for r in g]
    log_bytes = np.log(np.array(nbytes, dtype=float))
    # GEMM operands mostly come from the caches: their bandwidth is fitted, between the DRAM
    # stream bandwidth (or 1 GB/s unmeasured) and 1000x it
    log_bw = math.log(bw) if bw else math.log(1e9)
    log_o = math.log(o) if o and o > 0 else None
    log_best = np.log([best[d] for d in dtypes])
    lo = np.concatenate([[0.0] * 3, [math.log(0.25)] * 3, [log_bw], log_best])
    hi = np.concatenate([[math.log(1e5)] * 3, [math.log(4.0)] * 3, [log_bw + math.log(1e3)],
                         log_best + math.log(PEAK_MAX_OVER_BEST)])
    x0 = np.concatenate([[math.log(32.0)] * 3, [0.0] * 3, [log_bw + math.log(10.0)],
                         log_best + math.log(1.2)])
    sol = least_squares(lambda th: _log_model(th, X, log_flops, log_bytes, dt_idx, log_o)
                        - log_meas, x0, bounds=(lo, hi), method="trf", loss="soft_l1",
                        f_scale=0.1)
    th = np.clip(sol.x, lo, hi)
    err = np.abs(np.expm1(_log_model(th, X, log_flops, log_bytes, dt_idx, log_o) - log_meas))
    peaks = {d: float(np.exp(th[7 + i])) for i, d in enumerate(dtypes)}
    return peaks, tuple(np.exp(th[:3])), tuple(np.exp(th[3:6])), err


def fit(raw: dict) -> dict:
    """Fit BW and o from the streams, then P per dtype and the saturation from the GEMMs;
    every value finite and positive (or None when nothing measured it), no numpy warning.
    A fit with too few shapes, or a median error above FIT_MAX_MEDIAN_ERROR, falls back to
    P = the best measured rate with no saturation parameters (the measured table then gives the
    shape dependence)."""
    bw = fit_bandwidth(raw.get("stream"))
    o = raw.get("overhead_s")
    o = float(o) if isinstance(o, (int, float)) and math.isfinite(o) and o > 0 else None
    g = _clean_gemm(raw.get("gemm") or [])
    dtypes = sorted({r["dtype"] for r in g})
    best = {d: max(2.0 * r["m"] * r["n"] * r["k"] / r["s"] for r in g if r["dtype"] == d)
            for d in dtypes}
    out = {"matmul_flops_per_s": dict(best), "matmul_half": None, "matmul_sharpness": None,
           "bandwidth_bytes_per_s": bw, "op_overhead_s": o, "dispatch_s": raw.get("dispatch_s"),
           "fit_gemm_median_abs_error": None, "fit_gemm_max_abs_error": None,
           "fit_model": "best-measured", "fit_note": None}
    if not g:
        out["fit_note"] = "no GEMM measured: the base profile's peaks are kept"
        return out
    distinct = min(len({r[a] for r in g}) for a in ("m", "n", "k"))
    if len(g) < 8 or distinct < 2:
        out["fit_note"] = (f"{len(g)} GEMM shapes ({distinct} sizes on the narrowest axis): too "
                           f"few to fit the saturation; peak = best measured rate")
        return out
    with np.errstate(all="ignore"):   # finite-difference probes at the bounds; result checked
        peaks, half, sharp, err = _saturation_fit(g, dtypes, best, bw, o)
    med = float(np.median(err)) if np.all(np.isfinite(err)) else math.inf
    out["fit_gemm_median_abs_error"] = med if math.isfinite(med) else None
    out["fit_gemm_max_abs_error"] = float(np.max(err)) if math.isfinite(med) else None
    if med > FIT_MAX_MEDIAN_ERROR:
        out["fit_note"] = (f"saturation fit median error {100 * med:.0f} % > "
                           f"{100 * FIT_MAX_MEDIAN_ERROR:.0f} %: fell back to peak = best "
                           f"measured rate and the measured table")
        return out
    out.update(matmul_flops_per_s=peaks, matmul_half=half, matmul_sharpness=sharp,
               fit_model="saturation")
    return out


def _fill_grid(rows, fitted, dt) -> tuple[list, int]:
    """The (m, n, k) throughput grid of the measured sizes; a cell not measured (skipped for
    time) from the fitted saturation model when there is one, else from the nearest measured
    shape in log2 size. Returns the grid and the number of filled cells."""
    ms, ns, ks = (sorted({r[a] for r in rows}) for a in ("m", "n", "k"))
    have = {(r["m"], r["n"], r["k"]): 2.0 * r["m"] * r["n"] * r["k"] / r["s"] for r in rows}
    grid, filled = [], 0
    for m in ms:
        grid.append([])
        for n in ns:
            grid[-1].append([])
            for k in ks:
                v = have.get((m, n, k))
                if v is None:
                    filled += 1
                    if fitted.get("matmul_half"):
                        v = fitted["matmul_flops_per_s"][dt] * gemm_saturation(
                            m, n, k, fitted["matmul_half"], fitted["matmul_sharpness"])
                    else:
                        near = min(have, key=lambda s: sum(abs(math.log2(a / b)) for a, b in
                                                           zip(s, (m, n, k))))
                        v = have[near]
                grid[-1][-1].append(float(v))
    return grid, filled


def tables(raw: dict, fitted: dict | None = None) -> tuple[dict, dict | None, int]:
    """The GEMM throughput grid per dtype (a dtype with fewer than 2 sizes on an axis has no
    table), the stream bandwidth per bytes moved (None without streams), and how many grid
    cells were filled rather than measured."""
    fitted = fitted or {}
    g = _clean_gemm(raw.get("gemm") or [])
    gemm, filled = {}, 0
    for dt in sorted({r["dtype"] for r in g}):
        rows = [r for r in g if r["dtype"] == dt]
        ms, ns, ks = (sorted({r[a] for r in rows}) for a in ("m", "n", "k"))
        if min(len(ms), len(ns), len(ks)) < 2:
            continue
        grid, f = _fill_grid(rows, fitted, dt)
        filled += f
        gemm[dt] = {"m": ms, "n": ns, "k": ks, "flops_per_s": grid}
    st = [r for r in raw.get("stream") or [] if r.get("s", 0) > 0]
    if not st:
        return gemm, None, filled
    sizes = sorted({r["bytes"] for r in st})
    bw = [statistics.median(r["bytes"] / r["s"] for r in st if r["bytes"] == b) for b in sizes]
    # copy and add move different totals per buffer: merged by moved bytes
    return gemm, {"bytes": sizes, "bytes_per_s": bw}, filled


def _quantity(src: str):
    def q(v, note=None):
        d = {"value": v, "source": src, "derived": False}
        if note:
            d["note"] = note
        return d
    return q


def _time_model(fitted: dict, raw: dict, q, threads, name) -> dict:
    gemm_table, stream_table, filled = tables(raw, fitted)
    tm = {"matmul_efficiency": q(1.0, "peaks above are already achievable throughput"),
          "bandwidth_efficiency": q(1.0, "bandwidth above is already achieved")}
    if fitted.get("matmul_half"):
        for ax, h, a in zip("mnk", fitted["matmul_half"], fitted["matmul_sharpness"]):
            tm[f"matmul_half_{ax}"] = q(h)
            tm[f"matmul_sharpness_{ax}"] = q(a)
    if fitted.get("dispatch_s"):
        tm["dispatch_s"] = q(fitted["dispatch_s"], "host time per kernel of a tiny eager HF + "
                                                   "peft training step")
    if gemm_table:
        tm["gemm_table"] = gemm_table
    if stream_table:
        tm["stream_table"] = stream_table
    if raw.get("special"):
        tm["special_rates"] = raw["special"]
    tm.update(host_allocator.profile_fields(raw.get("host_alloc"), q))
    tm.update({
        "threads": threads, "device_name": name,
        "fit_gemm_median_abs_error": fitted["fit_gemm_median_abs_error"],
        "calibration": {
            "budget_s": raw.get("budget_s"), "elapsed_s": raw.get("elapsed_s"),
            "stages_s": raw.get("stages_s"), "fit_model": fitted["fit_model"],
            "fit_note": fitted["fit_note"], "probe": raw.get("probe"),
            "slow_dtypes": slow_dtype_notes(raw.get("probe") or {}),
            "cpu_features": raw.get("cpu_features"), "skipped": raw.get("skipped", []),
            "gemm_cells_filled": filled}})
    return tm


def write_profile(base: str, fitted: dict, raw: dict, out: str, device: str, threads: int | None) -> dict:
    """The base profile with measured numbers in place of the datasheet ones, plus the fitted
    time-model parameters; every value cites this calibration. What was not measured (skipped
    for time) keeps the base profile's value."""
    import torch

    prof = json.loads(load_profile(base).model_dump_json())
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = _device_name(device)
    q = _quantity(f"simcost calibrate on {name} ({device}, {threads or 'default'} threads, "
                  f"torch {torch.__version__}, {when})")
    prof["name"] = Path(out).stem
    prof["display_name"] = f"{name} (calibrated)"
    note = ("fitted achievable GEMM throughput at large shapes" if fitted["fit_model"] ==
            "saturation" else "best measured GEMM throughput")
    for dt, v in fitted["matmul_flops_per_s"].items():
        prof["peak_flops_per_s"][dt] = q(v, note)
    if fitted["bandwidth_bytes_per_s"]:
        prof["memory_bandwidth_bytes_per_s"] = q(
            fitted["bandwidth_bytes_per_s"], "median of copy/add moving >= 128 MiB (beyond the "
                                             "caches), else the best measured")
    if fitted["op_overhead_s"]:
        prof["launch_overhead_s"] = q(fitted["op_overhead_s"], "one dispatched op with autograd")
    prof["time_model"] = _time_model(fitted, raw, q, threads, name)
    text = json.dumps(prof, indent=1, allow_nan=False)
    Path(out).write_text(text)
    Path(out).with_suffix(".raw.json").write_text(json.dumps(raw, allow_nan=False))
    return prof


def parse_dtypes(text: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(x.strip() for x in str(text).split(",") if x.strip()))
    bad = [x for x in items if x not in DTYPES]
    if bad or not items:
        raise SimcostError(f"--dtypes takes a comma-separated list of {', '.join(DTYPES)}, "
                           f"got '{text}'")
    return items


def add_arguments(cal) -> None:
    """The calibrate options (for the ``simcost calibrate`` sub-parser)."""
    cal.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                     help="device to measure (default: %(default)s)")
    cal.add_argument("--threads", type=int, default=None, help="torch threads (CPU; default: "
                                                               "torch's)")
    cal.add_argument("--dtypes", default="fp32,bf16",
                     help="comma-separated GEMM dtypes to fit, of fp32, bf16, fp16 "
                          "(default: %(default)s)")
    cal.add_argument("--budget", default=DEFAULT_BUDGET,
                     help="wall-time bound for the whole run, e.g. 90s, 3m (default: "
                          "%(default)s); what does not fit is skipped and listed")
    cal.add_argument("--base", default=None,
                     help="profile to start from (default cpu-generic / h100-sxm)")
    cal.add_argument("--out", required=True, help="path of the profile JSON to write")


def _summary(fitted: dict, raw: dict, out: str, elapsed_s: float) -> list[str]:
    gemm = ", ".join(f"{dt} GEMM {v / 1e9:.1f} GFLOP/s"
                     for dt, v in fitted["matmul_flops_per_s"].items()) or "no GEMM"
    bw = fitted["bandwidth_bytes_per_s"]
    err = fitted["fit_gemm_median_abs_error"]
    lines = [f"wrote {out} in {elapsed_s:.0f} s (budget {raw['budget_s']:.0f} s): {gemm}"
             + (f", bandwidth {bw / 1e9:.1f} GB/s" if bw else "")
             + (f", op overhead {fitted['op_overhead_s'] * 1e6:.1f} us"
                if fitted["op_overhead_s"] else "")
             + (f", dispatch {fitted['dispatch_s'] * 1e6:.1f} us/kernel"
                if fitted.get("dispatch_s") else "")
             + (f", GEMM fit median error {100 * err:.1f} %" if err is not None else "")]
    if host_allocator.summary(raw.get("host_alloc")):
        lines.append(host_allocator.summary(raw.get("host_alloc")))
    if fitted["fit_note"]:
        lines.append(f"fit: {fitted['fit_note']}")
    lines += [f"note: {n}" for n in slow_dtype_notes(raw.get("probe") or {})]
    if raw.get("skipped"):
        lines.append(f"skipped ({len(raw['skipped'])}): " + "; ".join(raw["skipped"]))
    return lines


def run_cli(args) -> int:
    from rich.progress import Progress

    from simcost.request.fields import parse_duration_s
    budget = Budget(parse_duration_s(getattr(args, "budget", None) or DEFAULT_BUDGET,
                                     "--budget"))
    dtypes = parse_dtypes(args.dtypes)
    if args.threads is not None and args.threads < 1:
        raise SimcostError(f"--threads must be >= 1, got {args.threads}")
    try:
        import torch
    except ImportError:
        raise SimcostError("simcost calibrate needs torch: pip install torch==2.13.0") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SimcostError("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = args.base or ("cpu-generic" if args.device == "cpu" else "h100-sxm")
    load_profile(base)   # fail early on a bad base name
    check_output_file(args.out, "--out")   # before minutes of measuring, not after
    with Progress(transient=True) as bar:
        task = bar.add_task(f"calibrating {args.device} ({budget.total_s:.0f} s budget)",
                            total=7)
        raw = measure(args.device, dtypes, progress=lambda: bar.advance(task), budget=budget)
    fitted = fit(raw)
    write_profile(base, fitted, raw, args.out, args.device, args.threads)
    load_profile(args.out)   # the file written is a valid profile
    for line in _summary(fitted, raw, args.out, budget.elapsed_s()):
        print(line)
    return 0


def main(argv=None) -> int:
    """``python -m simcost.hardware.calibrate``: the same as ``simcost calibrate``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="simcost calibrate")
    add_arguments(p)
    try:
        return run_cli(p.parse_args(argv))
    except SimcostError as e:
        print(f"simcost: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
