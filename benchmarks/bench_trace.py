"""Speed of the traced front end on this machine (torch, transformers and peft already imported).

- cold: build a zoo model on the meta device, apply an adapter config with peft, record one
  training step with symbolic batch x sequence (no cache);
- price: one pricing of the recording at a new size, and a 1000-point batch x sequence sweep
  priced at once (numpy arrays).

    python benchmarks/bench_trace.py [--model llama-2-7b] [--peft-type LOHA]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--peft-type", default="LOHA")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    import peft  # noqa: F401  -- imported before timing, as the issue states
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from simcost.models.config import load_config_dict
    from simcost.trace.build import trace_config
    from simcost.trace.price import Pricer
    _, cfg = load_config_dict(a.model)
    pc = {"peft_type": a.peft_type, "r": 8, "target_modules": ["q_proj", "v_proj"]}
    t0 = time.perf_counter()
    tr = trace_config(cfg, pc, dtype="bf16", hints={"batch": 2, "seq": 512})
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    pr = Pricer(tr)
    compile_s = time.perf_counter() - t0
    one = []
    for i in range(a.repeat):
        t0 = time.perf_counter()
        pr.price(batch=4 + i, seq=1024)
        one.append(time.perf_counter() - t0)
    b, s = np.meshgrid(np.arange(1, 41), np.arange(1, 26) * 128)
    t0 = time.perf_counter()
    pr.price(batch=b.ravel(), seq=s.ravel())
    sweep = time.perf_counter() - t0
    print(json.dumps({"model": a.model, "peft_type": a.peft_type, "calls": len(tr.calls),
                      "cold_trace_s": round(cold, 3), "compile_s": round(compile_s, 3),
                      "price_one_s": round(min(one), 4), "sweep_1000_s": round(sweep, 4)}))


if __name__ == "__main__":
    main()
