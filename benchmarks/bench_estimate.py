"""Speed of the estimator, and of two peers on the same machine in the same run.

    python benchmarks/bench_estimate.py [--repeat 10] [--json OUT]
        [--peers-path DIR] [--llm-viewer DIR] [--simcost DIR] [--quick]

cold  = the first estimate in a fresh process after ``import simcost.api`` (profile and config
        files parsed, graph built, PEFT applied, analysed, priced), measured in a subprocess
        per repetition. Python's cyclic GC often runs its first full pass over the freshly
        imported modules during that call; ``cold_gc_frozen`` freezes those first, as the CLI does.
warm  = the same estimate again in the same process.
distinct = llama-2-7b LoRA on A100, 200 different (batch, seq, rank) configurations, none
        repeated (rank cycles over 8/16/32/64, batch over 1..25, seq 128..3312), after one
        call per structure (rank, batch == 1 or not) elsewhere: the median wall time of one
        ``estimate_train`` call (request validation to the typed result). ``identical`` = one
        of them repeated.
auto  = ``--parallel auto`` for llama-2-70b LoRA on H100 (8 devices: batch 8, seq 8192;
        16 devices: batch 64, seq 4096; 1024 devices: batch 1024, seq 4096): the plan search,
        warm (the first call of a structure is timed separately as ``_first``).
sweep = llama-2-7b LoRA r16 on A100, 25 batch sizes x 40 sequence lengths through the
        vectorised path (one graph, numpy arrays), and the same 1000 configurations one by one.

Peers (each timed in a subprocess, over the same 200 (batch, seq) pairs, one call per pair):

- llm-analysis 0.2.2 (PyPI): ``LLMAnalysis(...)`` + ``.training()`` of its bundled
  Llama-2-7B on ``a100-sxm-80gb`` (full fine-tuning: it has no PEFT), as
  ``docs/peers.md`` ran it. Install it where the benchmark finds it without touching this
  environment's transformers (its metadata pins transformers < 5)::

      pip install --no-deps --target /tmp/peers llm-analysis==0.2.2 'fire<0.6' termcolor six
      python benchmarks/bench_estimate.py --peers-path /tmp/peers

- LLM-Viewer (hahnyuan/LLM-Viewer, not on PyPI; commit 472f71f as in ``docs/peers.md``):
  ``ModelAnalyzer.analyze(seq, batch)`` (prefill and one decode step: it has no training
  estimate) with this repo's ``models_zoo/llama-2-7b`` config (no hub access) on
  ``nvidia_A100_80G``. Pass a checkout with ``--llm-viewer DIR``; without one its published
  figure from ``docs/peers.md`` is printed, marked as not re-measured.

A peer that is not installed is skipped with a printed note. ``--simcost DIR`` times another
checkout of simcost (a before/after comparison on the same machine).
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

# published per-call figures of the peers (docs/peers.md, section 5: same 2-core VM class)
PUBLISHED_MS = {"llm_analysis": 0.26, "llm_viewer": 0.084}

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

RANKS = (8, 16, 32, 64)


def distinct_configs(n: int = 200) -> list[tuple[int, int, int]]:
    """``n`` different (batch, seq, rank) triples (seq alone never repeats)."""
    return [(1 + i % 25, 128 + 16 * i, RANKS[i % len(RANKS)]) for i in range(n)]


LLM_ANALYSIS = r"""
import json, logging, sys, time
sys.path.insert(0, %r)
from llm_analysis.analysis import LLMAnalysis
from llm_analysis.config import (ParallelismConfig, get_dtype_config_by_name,
                                 get_gpu_config_by_name, get_model_config_by_name)
from llm_analysis.logger import logger
logger.setLevel(logging.ERROR)
m = get_model_config_by_name("NousResearch_Llama-2-7b-hf")
g = get_gpu_config_by_name("a100-sxm-80gb")
d = get_dtype_config_by_name("w16a16e16")
def one(b, s):
    # global_batch_size given: it prices configurations beyond its memory (7B full FT)
    return LLMAnalysis(m, g, d, ParallelismConfig()).training(
        batch_size_per_gpu=b, global_batch_size=b, seq_len=s)
one(3, 100)
out = []
for b, s in %r:
    t = time.perf_counter()
    one(b, s)
    out.append(time.perf_counter() - t)
print(json.dumps(out))
"""

LLM_VIEWER = r"""
import json, os, sys, time, io, contextlib
sys.path.insert(0, %r)
os.chdir(%r)
from model_analyzer import ModelAnalyzer
with contextlib.redirect_stdout(io.StringIO()):
    a = ModelAnalyzer(%r, "nvidia_A100_80G", config_file="configs/Llama.py")
a.analyze(100, 3)
out = []
for b, s in %r:
    t = time.perf_counter()
    a.analyze(s, b)
    out.append(time.perf_counter() - t)
print(json.dumps(out))
"""


def cold(root: Path, repeat: int, frozen: bool) -> list[float]:
    out = []
    for _ in range(repeat):
        r = subprocess.run([sys.executable, "-c", COLD % (str(root), frozen)],
                           capture_output=True, text=True, check=True)
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


def _ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def _timed(f, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


def peer(script: str, what: str) -> list[float] | None:
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"note: {what} not measured ({last})")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def peers(res: dict, args, pairs: list[tuple[int, int]]) -> None:
    if args.peers_path or _importable("llm_analysis"):
        la = peer(LLM_ANALYSIS % (args.peers_path or "", pairs), "llm-analysis")
    else:
        la = None
        print("note: llm-analysis not installed (see this file's docstring); skipped")
    if la:
        res["peer_llm_analysis_ms_median"] = _ms(la)
    res["peer_llm_analysis_published_ms"] = PUBLISHED_MS["llm_analysis"]
    lv = None
    if args.llm_viewer:
        d = str(Path(args.llm_viewer).resolve())
        lv = peer(LLM_VIEWER % (d, d, str(ROOT / "models_zoo" / "llama-2-7b"), pairs),
                  "LLM-Viewer")
    else:
        print("note: LLM-Viewer not measured (no --llm-viewer checkout); its published "
              f"{PUBLISHED_MS['llm_viewer']} ms per call (docs/peers.md) is shown, not "
              "re-measured")
    if lv:
        res["peer_llm_viewer_ms_median"] = _ms(lv)
    res["peer_llm_viewer_published_ms"] = PUBLISHED_MS["llm_viewer"]


def _importable(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=None)
    ap.add_argument("--peers-path", default=None,
                    help="a folder holding llm_analysis (pip install --target)")
    ap.add_argument("--llm-viewer", default=None, help="a checkout of hahnyuan/LLM-Viewer")
    ap.add_argument("--simcost", default=None, help="time this checkout of simcost instead")
    ap.add_argument("--quick", action="store_true",
                    help="skip the cold starts and the 1000-call scalar sweep")
    a = ap.parse_args()
    root = Path(a.simcost).resolve() if a.simcost else ROOT
    sys.path.insert(0, str(root))
    import numpy as np

    import simcost.api as api

    res: dict = {"simcost": str(root)}
    if not a.quick:
        res["cold_70b_ms_median"] = _ms(cold(root, a.repeat, False))
        res["cold_70b_gc_frozen_ms_median"] = _ms(cold(root, a.repeat, True))
    kw70 = dict(batch=1, seq=4096, peft="lora", rank=16)
    api.estimate_train("llama-2-70b", "a100-80gb-sxm", **kw70)
    res["warm_70b_ms_median"] = _ms(_timed(
        lambda: api.estimate_train("llama-2-70b", "a100-80gb-sxm", **kw70), a.repeat * 5))

    # one warm call over distinct configurations (the figure), and repeated
    configs = distinct_configs()
    for r in RANKS:                       # one call per structure, at points not measured
        for b in (1, 2):
            api.estimate_train("llama-2-7b", "a100-80gb-sxm", batch=b, seq=100, peft="lora",
                               rank=r)
    per = []
    for b, s, r in configs:
        t = time.perf_counter()
        api.estimate_train("llama-2-7b", "a100-80gb-sxm", batch=b, seq=s, peft="lora", rank=r)
        per.append(time.perf_counter() - t)
    res["warm_distinct_ms_median"] = _ms(per)
    res["warm_distinct_ms_mean"] = 1e3 * statistics.fmean(per)
    b, s, r = configs[57]
    res["warm_identical_ms_median"] = _ms(_timed(lambda: api.estimate_train(
        "llama-2-7b", "a100-80gb-sxm", batch=b, seq=s, peft="lora", rank=r), 200))

    for devices, batch, seq in ((8, 8, 8192), (16, 64, 4096), (1024, 1024, 4096)):
        auto = dict(batch=batch, seq=seq, peft="lora", devices=devices, parallel="auto")
        t = time.perf_counter()
        api.estimate_train("llama-2-70b", "h100-sxm", **auto)
        res[f"auto_70b_{devices}dev_first_ms"] = 1e3 * (time.perf_counter() - t)
        res[f"auto_70b_{devices}dev_ms_median"] = _ms(_timed(
            lambda: api.estimate_train("llama-2-70b", "h100-sxm", **auto),
            max(3, a.repeat // (4 if devices > 100 else 1))))

    batches = np.arange(1, 26)
    seqs = np.linspace(128, 4096, 40).astype(int)
    sw = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        out = api.sweep_train("llama-2-7b", "a100-80gb-sxm", batches=batches, seqs=seqs,
                              peft="lora", rank=16)
        sw.append(time.perf_counter() - t)
    assert out["step_s"].shape == (25, 40)
    res["sweep_1000_vectorised_s_median"] = statistics.median(sw)
    res["per_config_vectorised_ms"] = 1e3 * res["sweep_1000_vectorised_s_median"] / 1000
    if not a.quick:
        t = time.perf_counter()
        for b in batches:
            for q in seqs:
                api.estimate_train("llama-2-7b", "a100-80gb-sxm", batch=int(b), seq=int(q),
                                   peft="lora", rank=16)
        res["sweep_1000_scalar_s"] = time.perf_counter() - t

    peers(res, a, [(b, s) for b, s, _ in configs])
    res["machine"] = machine()
    table(res)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


def table(res: dict) -> None:
    rows = [("simcost warm, distinct configs (median)", "warm_distinct_ms_median"),
            ("simcost warm, identical call (median)", "warm_identical_ms_median"),
            ("simcost vectorised sweep, per point", "per_config_vectorised_ms"),
            ("llm-analysis 0.2.2 training(), measured now", "peer_llm_analysis_ms_median"),
            ("llm-analysis, published (docs/peers.md)", "peer_llm_analysis_published_ms"),
            ("LLM-Viewer analyze(), measured now", "peer_llm_viewer_ms_median"),
            ("LLM-Viewer, published (docs/peers.md, not re-measured)",
             "peer_llm_viewer_published_ms")]
    print(f"{'per call':56s} {'ms':>9s}")
    for label, k in rows:
        if k in res:
            print(f"{label:56s} {res[k]:9.4f}")
    print()
    for k, v in res.items():
        print(f"{k:34s} {v:.4f}" if isinstance(v, float) else f"{k:34s} {v}")


if __name__ == "__main__":
    main()
