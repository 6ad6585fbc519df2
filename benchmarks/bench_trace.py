"""Speed of the traced front end through the API, on this machine (torch, transformers and peft
imported before timing, as issue 9 states):

- cold: ``estimate_train(..., frontend="traced")`` with an empty trace cache (build on the meta
  device, peft, record one step with symbolic batch x sequence, compile, price);
- cached (memory): the same estimate again at new sizes in the same process;
- cached (disk): the in-memory cache cleared, the recording read from the disk cache;
- sweep: ``sweep_train`` over 40 x 25 = 1000 batch x sequence points from the cached recording
  (batch 1 included: torch specialises it, so it has a recording of its own, traced first).

    python benchmarks/bench_trace.py [--model llama-2-7b] [--peft-type LOHA] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--peft-type", default="LOHA")
    ap.add_argument("--hardware", default="a100-80gb-sxm")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    os.environ["SIMCOST_CACHE_DIR"] = tempfile.mkdtemp(prefix="simcost-bench-")
    import numpy as np
    import peft  # noqa: F401  -- imported before timing, as the issue states
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from simcost.api import estimate_train, sweep_train
    from simcost.trace import cache
    cfg = os.path.join(os.environ["SIMCOST_CACHE_DIR"], "adapter_config.json")
    with open(cfg, "w") as f:
        json.dump({"peft_type": a.peft_type, "r": 8, "target_modules": ["q_proj", "v_proj"],
                   "task_type": "CAUSAL_LM"}, f)
    kw = dict(peft_config=cfg, frontend="traced")
    t0 = time.perf_counter()
    estimate_train(a.model, a.hardware, batch=2, seq=512, **kw)
    cold = time.perf_counter() - t0
    warm, disk = [], []
    for i in range(a.repeat):
        t0 = time.perf_counter()
        estimate_train(a.model, a.hardware, batch=3 + i, seq=1024 + 64 * i, **kw)
        warm.append(time.perf_counter() - t0)
        cache._MEMORY.clear()
        t0 = time.perf_counter()
        estimate_train(a.model, a.hardware, batch=3 + i, seq=2048 + 64 * i, **kw)
        disk.append(time.perf_counter() - t0)
    batches, seqs = np.arange(1, 41), np.arange(1, 26) * 128
    sweep_train(a.model, a.hardware, batches=batches, seqs=seqs, **kw)     # records batch 1
    sweeps = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        sweep_train(a.model, a.hardware, batches=batches, seqs=seqs, **kw)
        sweeps.append(time.perf_counter() - t0)
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"Python {platform.python_version()}",
        "model": a.model, "peft_type": a.peft_type,
        "cold_traced_estimate_s": round(cold, 3),
        "cached_estimate_memory_s": round(statistics.median(warm), 4),
        "cached_estimate_disk_s": round(statistics.median(disk), 4),
        "sweep_1000_points_s": round(statistics.median(sweeps), 4)}))


if __name__ == "__main__":
    main()
