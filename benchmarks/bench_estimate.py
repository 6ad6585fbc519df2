"""Speed of the estimator: one cold 70B estimate, and a 1000-configuration sweep.

    python benchmarks/bench_estimate.py [--repeat 20] [--json OUT]

cold  = the first estimate in a fresh process after ``import simcost.api`` (profile and config
        files parsed, graph built, PEFT applied, analysed, priced), measured in a subprocess
        per repetition. Python's cyclic GC often runs its first full pass over the freshly
        imported modules during that call; ``cold_gc_frozen`` freezes those first, as the CLI does.
warm  = the same estimate again in the same process.
auto  = ``--devices 8 --parallel auto`` for llama-2-70b LoRA on H100 (batch 8, seq 8192): the
        plan search, warm, in the same process.
sweep = llama-2-7b LoRA r16 on A100, 25 batch sizes x 40 sequence lengths through the
        vectorised path (one graph, numpy arrays), and the same 1000 configurations one by one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COLD = r"""
import gc, time, sys
sys.path.insert(0, %r)
import simcost.api as api
if %r:
    gc.collect(); gc.freeze()
t = time.perf_counter()
api.estimate_train("llama-2-70b", "a100-80gb-sxm", batch=1, seq=4096, peft="lora", rank=16)
print(time.perf_counter() - t)
"""


def cold(repeat: int, frozen: bool) -> list[float]:
    out = []
    for _ in range(repeat):
        r = subprocess.run([sys.executable, "-c", COLD % (str(ROOT), frozen)], capture_output=True,
                           text=True, check=True)
        out.append(float(r.stdout.strip()))
    return out


def machine() -> str:
    """The CPU the figures were measured on (they scale with it)."""
    import os
    import platform
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import numpy as np

    import simcost.api as api

    res = {}
    c = cold(a.repeat, False)
    cf = cold(a.repeat, True)
    res["cold_70b_ms_median"] = 1e3 * statistics.median(c)
    res["cold_70b_gc_frozen_ms_median"] = 1e3 * statistics.median(cf)
    api.estimate_train("llama-2-70b", "a100-80gb-sxm", batch=1, seq=4096, peft="lora", rank=16)
    w = []
    for _ in range(a.repeat * 5):
        t = time.perf_counter()
        api.estimate_train("llama-2-70b", "a100-80gb-sxm", batch=1, seq=4096, peft="lora", rank=16)
        w.append(time.perf_counter() - t)
    res["warm_70b_ms_median"] = 1e3 * statistics.median(w)

    auto = dict(batch=8, seq=8192, peft="lora", devices=8, parallel="auto")
    api.estimate_train("llama-2-70b", "h100-sxm", **auto)
    w = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        api.estimate_train("llama-2-70b", "h100-sxm", **auto)
        w.append(time.perf_counter() - t)
    res["auto_70b_8dev_ms_median"] = 1e3 * statistics.median(w)

    batches = np.arange(1, 26)
    seqs = np.linspace(128, 4096, 40).astype(int)
    s = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        out = api.sweep_train("llama-2-7b", "a100-80gb-sxm", batches=batches, seqs=seqs,
                              peft="lora", rank=16)
        s.append(time.perf_counter() - t)
    assert out["step_s"].shape == (25, 40)
    res["sweep_1000_vectorised_s_median"] = statistics.median(s)
    t = time.perf_counter()
    for b in batches:
        for q in seqs:
            api.estimate_train("llama-2-7b", "a100-80gb-sxm", batch=int(b), seq=int(q),
                               peft="lora", rank=16)
    res["sweep_1000_scalar_s"] = time.perf_counter() - t
    res["per_config_vectorised_ms"] = 1e3 * res["sweep_1000_vectorised_s_median"] / 1000
    res["machine"] = machine()
    for k, v in res.items():
        print(f"{k:34s} {v:.4f}" if isinstance(v, float) else f"{k:34s} {v}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
