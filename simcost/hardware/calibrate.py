"""``simcost calibrate``: microbenchmarks on the local device, fitted into a profile.

Measures (with torch, on ``cpu`` or ``cuda``):
- GEMMs over a grid of shapes, skinny ones included (LoRA's rank-r products), per dtype;
- memory-bound element-wise kernels (copy, add) from cache-sized to DRAM-sized buffers;
- the fixed cost of one dispatched op (a tiny add with autograd recording).

and fits the time model's few physical parameters with scipy (least squares on log time):
  GEMM:        t = o + max(2mnk / (P · s(m) s(n) s(k)), bytes / BW),  s(x) = 1 / (1 + (h/x)^a)
  element-wise t = o + bytes / BW
P (achievable matmul FLOP/s per dtype), per dimension a half-saturation size h and a
sharpness a (small or skinny GEMMs run below peak: tile, vector-width and cache effects), BW and o
are written into a profile file that ``--hardware PATH`` accepts.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from simcost.hardware.profile import load_profile

GEMM_M = (16, 128, 512, 2048)
GEMM_NK = (8, 64, 512, 2048)


def _timeit(fn, sync, min_time_s: float = 0.02, reps: int = 5) -> float:
    fn()
    sync()
    n = 1
    while True:                      # grow the inner loop until one sample lasts min_time_s
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        dt = time.perf_counter() - t
        if dt >= min_time_s or n >= 1 << 16:
            break
        if dt * 4 < min_time_s:
            n *= 2
        else:                        # close: jump straight to the needed count
            n = max(n, int(n * min_time_s / max(dt, 1e-9)) + 1)
    samples = [dt / n]
    for _ in range(reps - 1):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        samples.append((time.perf_counter() - t) / n)
    return min(samples)   # noise on a shared machine only ever adds time


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure(device: str = "cpu", dtypes=("fp32", "bf16"), progress=None) -> dict:
    """Run the microbenchmarks; returns raw samples (seconds)."""
    import torch

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {"gemm": [], "stream": [], "overhead_s": None}
    tasks = [("gemm", dt, m, n, k) for dt in dtypes for m in GEMM_M for n in GEMM_NK for k in GEMM_NK]
    sizes = [2 ** p for p in range(16, 29, 2)]          # 64 KiB .. 256 MiB
    tasks += [("stream", kind, s) for kind in ("copy", "add") for s in sizes]
    tasks += [("special",), ("overhead",)]
    for task in tasks:
        if task[0] == "gemm":
            _, dt, m, n, k = task
            a = torch.randn(m, k, device=device).to(tdt[dt])
            b = torch.randn(k, n, device=device).to(tdt[dt])
            t = _timeit(lambda: torch.mm(a, b), sync)
            out["gemm"].append({"dtype": dt, "m": m, "n": n, "k": k, "s": t})
        elif task[0] == "stream":
            _, kind, nbytes = task
            x = torch.empty(nbytes // 4, device=device).uniform_()
            y = torch.empty_like(x)
            z = torch.empty_like(x)
            if kind == "copy":
                t = _timeit(lambda: y.copy_(x), sync)
                moved = 2 * nbytes
            else:
                t = _timeit(lambda: torch.add(x, y, out=z), sync)
                moved = 3 * nbytes
            out["stream"].append({"kind": kind, "bytes": moved, "s": t})
        elif task[0] == "special":
            out["special"] = measure_special(device, sync)
        else:
            x = torch.ones(8, device=device, requires_grad=True)
            y = torch.ones(8, device=device)
            out["overhead_s"] = _timeit(lambda: torch.add(x, y), sync)
        if progress:
            progress()
    out["dispatch_s"] = measure_dispatch(device)
    if progress:
        progress()
    return out


def measure_special(device: str, sync) -> dict:
    """Elements per second of the element-wise kernels whose cost is not bandwidth: exp
    (softmax, SiLU, tanh), random numbers (dropout's bernoulli_), log-softmax backward."""
    import torch

    n = 1 << 22
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    rates = {"exp": n / _timeit(lambda: torch.exp(x, out=y), sync),
             "rng": n / _timeit(lambda: y.bernoulli_(0.9), sync)}
    logits = torch.randn(512, 8192, device=device)
    out = torch.log_softmax(logits, -1)
    grad = torch.randn_like(out)
    rates["log_softmax_bwd"] = logits.numel() / _timeit(
        lambda: torch.ops.aten._log_softmax_backward_data(grad, out, -1, torch.float32), sync)
    # torch's default AdamW for this device (for-loop on CPU, foreach on GPUs), fp32,
    # 48 tensors of 1 Mi parameters (768 MiB of parameters, gradients and states: beyond
    # the caches, as in a training step): parameters updated per second
    params = [torch.nn.Parameter(torch.randn(1 << 20, device=device)) for _ in range(48)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    rates["adamw_params"] = 48 * (1 << 20) / _timeit(opt.step, sync, min_time_s=0.2, reps=3)
    return rates


def measure_dispatch(device: str = "cpu") -> float | None:
    """Host time per kernel of an eager HF + peft training step: a tiny Llama (so the kernels
    themselves take no time), forward + backward time divided by simcost's kernel count."""
    try:
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError:
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


def n_tasks(dtypes) -> int:
    return len(dtypes) * len(GEMM_M) * len(GEMM_NK) ** 2 + 2 * 7 + 3


def gemm_saturation(m, n, k, half, sharp):
    """Fraction of the large-shape GEMM throughput reached at (m, n, k)."""
    s = 1.0
    for x, h, a in zip((m, n, k), half, sharp):
        s = s / (1.0 + (h / x) ** a)
    return s


def fit(raw: dict) -> dict:
    """Fit BW and o from the streams, then P per dtype and h_m, h_n, h_k from the GEMMs."""
    from scipy.optimize import least_squares

    st = raw["stream"]
    big = [r for r in st if r["bytes"] >= 2 ** 27]   # beyond the caches
    bw = statistics.median(r["bytes"] / r["s"] for r in big)
    o = raw["overhead_s"]
    g = raw["gemm"]
    dtypes = sorted({r["dtype"] for r in g})
    esize = {"fp32": 4, "bf16": 2, "fp16": 2}

    def model(theta, rows):
        hm, hn, hk, am, an, ak = np.exp(theta[:6])
        peaks = dict(zip(dtypes, np.exp(theta[6:])))
        res = []
        for r in rows:
            m, n, k = r["m"], r["n"], r["k"]
            sat = gemm_saturation(m, n, k, (hm, hn, hk), (am, an, ak))
            comp = 2 * m * n * k / (peaks[r["dtype"]] * sat)
            mem = (m * k + k * n + m * n) * esize[r["dtype"]] / bw
            res.append(o + max(comp, mem))
        return np.array(res)

    meas = np.array([r["s"] for r in g])
    best = {dt: max(2 * r["m"] * r["n"] * r["k"] / r["s"] for r in g if r["dtype"] == dt) for dt in dtypes}
    theta0 = np.log([32.0, 32.0, 32.0, 1.0, 1.0, 1.0] + [best[dt] for dt in dtypes])
    sol = least_squares(lambda th: np.log(model(th, g)) - np.log(meas), theta0, method="trf",
                        loss="soft_l1", f_scale=0.1)
    pred = model(sol.x, g)
    hm, hn, hk, am, an, ak = np.exp(sol.x[:6])
    peaks = dict(zip(dtypes, np.exp(sol.x[6:])))
    err = np.abs(pred / meas - 1)
    return {"matmul_flops_per_s": {dt: float(peaks[dt]) for dt in dtypes},
            "matmul_half_m": float(hm), "matmul_half_n": float(hn), "matmul_half_k": float(hk),
            "matmul_sharpness_m": float(am), "matmul_sharpness_n": float(an),
            "matmul_sharpness_k": float(ak),
            "bandwidth_bytes_per_s": float(bw), "op_overhead_s": float(o),
            "dispatch_s": raw.get("dispatch_s"),
            "fit_gemm_median_abs_error": float(np.median(err)),
            "fit_gemm_max_abs_error": float(np.max(err))}


def tables(raw: dict) -> tuple[dict, dict]:
    """The measured GEMM throughput grid per dtype and the stream bandwidth per buffer size."""
    gemm = {}
    for dt in sorted({r["dtype"] for r in raw["gemm"]}):
        rows = [r for r in raw["gemm"] if r["dtype"] == dt]
        ms, ns, ks = (sorted({r[a] for r in rows}) for a in ("m", "n", "k"))
        grid = [[[0.0] * len(ks) for _ in ns] for _ in ms]
        for r in rows:
            grid[ms.index(r["m"])][ns.index(r["n"])][ks.index(r["k"])] = \
                2 * r["m"] * r["n"] * r["k"] / r["s"]
        gemm[dt] = {"m": ms, "n": ns, "k": ks, "flops_per_s": grid}
    sizes = sorted({r["bytes"] for r in raw["stream"]})
    bw = [statistics.median(r["bytes"] / r["s"] for r in raw["stream"] if r["bytes"] == b) for b in sizes]
    # copy and add move different totals per buffer: merge by moved bytes, keep it monotone in x
    return gemm, {"bytes": sizes, "bytes_per_s": bw}


def write_profile(base: str, fitted: dict, raw: dict, out: str, device: str, threads: int | None) -> dict:
    """The base profile with measured numbers in place of the datasheet ones, plus the fitted
    time-model parameters; every value cites this calibration."""
    import torch

    prof = json.loads(load_profile(base).model_dump_json())
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    name = _device_name(device)
    src = (f"simcost calibrate on {name} ({device}, {threads or 'default'} threads, "
           f"torch {torch.__version__}, {when})")

    def q(v, note=None):
        d = {"value": v, "source": src, "derived": False}
        if note:
            d["note"] = note
        return d

    prof["name"] = Path(out).stem
    prof["display_name"] = f"{name} (calibrated)"
    for dt, v in fitted["matmul_flops_per_s"].items():
        prof["peak_flops_per_s"][dt] = q(v, "fitted achievable GEMM throughput at large shapes")
    prof["memory_bandwidth_bytes_per_s"] = q(fitted["bandwidth_bytes_per_s"],
                                              "median of copy/add moving >= 128 MiB (beyond the caches)")
    prof["launch_overhead_s"] = q(fitted["op_overhead_s"], "one dispatched op with autograd")
    gemm_table, stream_table = tables(raw)
    prof["time_model"] = {
        "matmul_efficiency": q(1.0, "peaks above are already achievable throughput"),
        "matmul_half_m": q(fitted["matmul_half_m"]), "matmul_half_n": q(fitted["matmul_half_n"]),
        "matmul_half_k": q(fitted["matmul_half_k"]),
        "matmul_sharpness_m": q(fitted["matmul_sharpness_m"]),
        "matmul_sharpness_n": q(fitted["matmul_sharpness_n"]),
        "matmul_sharpness_k": q(fitted["matmul_sharpness_k"]),
        "bandwidth_efficiency": q(1.0, "bandwidth above is already achieved"),
        **({"dispatch_s": q(fitted["dispatch_s"], "host time per kernel of a tiny eager HF + peft "
                                                  "training step")} if fitted.get("dispatch_s") else {}),
        "threads": threads, "device_name": name,
        "gemm_table": gemm_table, "stream_table": stream_table,
        "special_rates": raw.get("special"),
        "fit_gemm_median_abs_error": fitted["fit_gemm_median_abs_error"],
    }
    Path(out).write_text(json.dumps(prof, indent=1))
    Path(out).with_suffix(".raw.json").write_text(json.dumps(raw))
    return prof


def run_cli(args) -> int:
    from rich.progress import Progress

    from simcost.errors import SimcostError
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
    dtypes = tuple(args.dtypes.split(","))
    t0 = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task(f"calibrating {args.device}", total=n_tasks(dtypes))
        raw = measure(args.device, dtypes, progress=lambda: bar.advance(task))
    fitted = fit(raw)
    write_profile(base, fitted, raw, args.out, args.device, args.threads)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{dt} GEMM {v / 1e9:.0f} GFLOP/s" for dt, v in fitted["matmul_flops_per_s"].items())
          + f", bandwidth {fitted['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, op overhead "
          f"{fitted['op_overhead_s'] * 1e6:.1f} us, dispatch "
          f"{(fitted.get('dispatch_s') or 0) * 1e6:.1f} us/kernel, GEMM fit median error "
          f"{100 * fitted['fit_gemm_median_abs_error']:.1f} %")
    return 0
