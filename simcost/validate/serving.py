"""Serving validation against the dev data: S-LoRA (throughput, first-token and average latency
vs the number of adapters), TensorRT-LLM (offline max-throughput output tokens/s) and Vidur
(measured operator latencies, through the serving step's GEMM path).

Writes ``validation/reports/serving.{md,json}``. No per-row tuning: each row is mapped to a
simulation with the workload its source states, and the hardware profile's physical numbers.

Run: ``python -m simcost.validate.serving``.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from simcost.validate.published import default_csv, load_rows

REPORT_DIR = Path(__file__).resolve().parents[2] / "validation" / "reports"

SLORA_MODEL = {"Llama-7B": "llama-2-7b", "Llama-13B": "llama-2-13b"}
# the KV/adapter pool the S-LoRA server was started with for these rows (--max_total_token_num):
# S-LoRA/S-LoRA benchmarks/paper/synthetic/slora/exp_cmds_a100-80_S1.sh (S1, S2: 125000) and
# exp_cmds_a100-80_S4.sh (S4, Llama-13B: 65000) -- a stated run configuration, not a fit
SLORA_POOL_TOKENS = {"llama-2-7b": 125000, "llama-2-13b": 65000}
TRT_MODEL = {"Llama 3.1 8B": "llama-3.1-8b", "Llama 3.3 70B": "llama-3.1-70b"}
HW = {"A100 80GB": "a100-80gb-sxm", "H100 SXM 80GB": "h100-sxm", "H200 SXM 141GB": "h200",
      "H100 80GB": "h100-sxm"}


# S-LoRA/S-LoRA benchmarks/run_exp.py: run_exp(..., seed=42) -> trace.generate_requests(seed=42)
SLORA_BENCH_SEED = 42


def _slora_rows(rows):
    return [r for r in rows if r["id"].startswith("SERVE-SLORA")]


def simulate_slora_benchmark(model: str, n_adapters: int, ranks, *, rate=10.0, cv=1.0, alpha=1.0,
                             duration=120.0, input_range=(8, 512), output_range=(8, 512),
                             max_total_tokens=None, hardware="a100-80gb-sxm",
                             engine="slora") -> dict:
    """One S-LoRA benchmark run as ``benchmarks/run_exp.py`` does it (S-LoRA/S-LoRA): the
    requests of ``benchmarks/trace.py generate_requests`` (seed 42, randint upper bounds
    exclusive: ``Workload(generator="slora")``) against the ``slora`` engine; throughput =
    requests / time until the last one finishes (``get_res_stats``: ``len(per_req_latency) /
    benchmark_time``, the benchmark clock starting before the first arrival), latencies
    averaged over all requests (none aborted: ``num_abort`` 0 in the result files)."""
    from simcost.serve.api import simulate_serve
    s = simulate_serve(model, hardware, dtype="fp16", adapters=n_adapters, ranks=list(ranks),
                       rate=rate, cv=cv, popularity_alpha=alpha, duration=duration,
                       input_len="%d:%d" % tuple(input_range),
                       output_len="%d:%d" % tuple(output_range), engine=engine,
                       max_total_tokens=max_total_tokens, seed=SLORA_BENCH_SEED,
                       generator="slora")
    return {"throughput_req_s": s.throughput_req_s, "avg_first_token_latency_s": s.ttft_s["mean"],
            "avg_latency_s": s.latency_s["mean"], "max_batch": s.max_batch,
            "makespan_s": s.makespan_s, "swaps": s.swaps}


def eval_slora(rows, cache, engine="slora"):
    """The S-LoRA rows against ``engine`` (a name or an EngineSpec: the fit sets its host
    constants)."""
    out = []
    for r in _slora_rows(rows):
        res = {"id": r["id"], "source": "S-LoRA", "metric": r["metric"], "measured": float(r["value"])}
        if "S-LoRA" not in r["method"]:
            res.update(status="unsupported", reason=f"system '{r['method']}' is not modelled "
                       "(HF PEFT's server runs one adapter per batch with Python generate(); "
                       "vLLM-packed runs one process per adapter under MPS)")
            out.append(res)
            continue
        m = re.search(r"ranks \{([\d,]+)\}; (\d+) adapters", r["peft_config"])
        ranks = [int(x) for x in m.group(1).split(",")]
        n = int(m.group(2))
        model = SLORA_MODEL[r["model"]]
        key = (model, tuple(ranks), n)
        if key not in cache:
            # the "a100-80-table" suite of S-LoRA/S-LoRA benchmarks/exp_suite.py: req_rate 10,
            # cv 1, alpha 1, duration 120 s, input and output ranges [8, 512]
            cache[key] = simulate_slora_benchmark(model, n, ranks, rate=10, cv=1, alpha=1,
                                                  duration=120, input_range=(8, 512),
                                                  output_range=(8, 512),
                                                  max_total_tokens=SLORA_POOL_TOKENS[model],
                                                  engine=engine)
        pred = cache[key][r["metric"]]
        res.update(status="ok", predicted=pred, model=model, ranks=ranks, adapters=n,
                   error=(pred - res["measured"]) / res["measured"])
        out.append(res)
    return out


def eval_trt(rows, n_requests=None):
    from simcost.serve.api import simulate_serve
    out = []
    for r in rows:
        if not r["id"].startswith("INF-TRTLLM"):
            continue
        res = {"id": r["id"], "source": "TensorRT-LLM", "metric": r["metric"], "measured": float(r["value"])}
        hw = HW.get(r["hardware"])
        if r["precision"] != "FP8" or hw is None:
            res.update(status="unsupported",
                       reason=f"{r['precision']} on {r['hardware']}: no FP4 peak in the profile schema")
            out.append(res)
            continue
        isl, osl = (int(x) for x in re.search(r"(\d+)/(\d+)", r["seq_len"]).groups())
        tp = int(r["n_devices"] or 1)
        n = n_requests or max(64, min(3000, int(3e6 // (isl + osl))))
        s = simulate_serve(TRT_MODEL[r["model"]], hw, dtype="bf16", weight_dtype="fp8", kv_dtype="fp8",
                           tp=tp, devices=tp, adapters=0, rate=float("inf"), n_requests=n,
                           input_len=f"{isl}:{isl}", output_len=f"{osl}:{osl}", engine="trtllm",
                           gpu_memory_utilization=0.9)
        pred = s.throughput_tok_s * 1.0
        res.update(status="ok", predicted=pred, tp=tp, n_requests=n, max_batch=s.max_batch,
                   error=(pred - res["measured"]) / res["measured"])
        out.append(res)
    return out


def eval_vidur(rows):
    from simcost.hardware import load_profile
    from simcost.models.config import load_model
    from simcost.serve.step import StepModel
    from simcost.sim.timing import TimeModel
    out = []
    steps = {}
    for r in rows:
        if not r["id"].startswith("INF-VIDUR-OP"):
            continue
        res = {"id": r["id"], "source": "Vidur", "metric": r["metric"], "measured": float(r["value"])}
        m = re.search(r"\[T x (\d+)\] x \[(\d+) x (\d+)\]", r["notes"])
        T = int(r["batch_size"].split()[0])
        k, _, n = (int(x) for x in m.groups())
        hw = HW[r["hardware"]]
        if hw not in steps:
            steps[hw] = StepModel(load_model("llama-2-7b"), TimeModel.from_device(load_profile(hw).device()),
                                  act_dtype="fp16", wdtype="fp16")
        pred = float(steps[hw]._gemm(T, n, k)) * 1e3
        res.update(status="ok", predicted=pred, error=(pred - res["measured"]) / res["measured"])
        out.append(res)
    return out


def summarize(results):
    by = {}
    for r in results:
        key = (r["source"], r["metric"])
        by.setdefault(key, []).append(r)
    summ = []
    for (src, metric), rs in sorted(by.items()):
        ok = [x for x in rs if x["status"] == "ok"]
        summ.append({"source": src, "metric": metric, "n": len(ok), "unsupported": len(rs) - len(ok),
                     "mape": float(np.mean([abs(x["error"]) for x in ok])) if ok else None})
    return summ


def to_markdown(results, summ) -> str:
    lines = ["# Serving validation (dev data)", "",
             "Generated by `python -m simcost.validate.serving`. Uncalibrated datasheet profiles; "
             "no per-row tuning.", "", "| source | metric | rows | MAPE |", "|---|---|---:|---:|"]
    for s in summ:
        mp = "-" if s["mape"] is None else f"{100 * s['mape']:.1f} %"
        lines.append(f"| {s['source']} | {s['metric']} | {s['n']} (+{s['unsupported']} unsupported) | {mp} |")
    lines += ["", "| id | metric | measured | predicted | error |", "|---|---|---:|---:|---:|"]
    for r in results:
        if r["status"] == "ok":
            lines.append(f"| {r['id']} | {r['metric']} | {r['measured']:.4g} | {r['predicted']:.4g} | "
                         f"{100 * r['error']:+.1f} % |")
    lines += ["", "Unsupported rows:", ""]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"- {r['id']}: {r['reason']}")
    lines += ["", "## Engines", "",
              "Each row runs the engine its source used (`simcost/serve/engines.py`, facts cited "
              "there): S-LoRA rows replay S-LoRA's own benchmark (`benchmarks/run_exp.py` + "
              "`trace.py`, seed 42: the same 1200 requests) against the `slora` engine (LightLLM "
              "router: admission every 10 decode steps by LightLLM's peak-usage test, prefill "
              "batches of 1/6 of the pool, eager kernels, per-token BGMV LoRA gathers on the CUDA "
              "cores, one eager op per request per step before the forward, full-vocabulary "
              "sort in the sampler, adapters freed when no running request uses them and copied "
              "over PCIe twice per load, the pool of 125000 / 65000 token slots the runs were "
              "launched with); TensorRT-LLM rows the `trtllm` engine (in-flight batching, chunked "
              "prefill, CUDA graphs, fp8 GEMMs at the profile's measured fp8 matmul fraction).", ""]
    from simcost.serve.engines import ENGINES
    for e in ENGINES.values():
        if e.unpublished:
            lines.append(f"- `{e.name}`, not published, so left out: {e.unpublished}")
    lines += ["", "## Remaining gap (S-LoRA)", "",
              "The Llama-7B runs are not queue-bound (measured first-token latency 0.6-2.7 s at "
              "5-100 adapters): every request is admitted within a few steps and the measured "
              "throughput is 1200 requests over 120 s of arrivals plus the drain of the last "
              "ones, so it follows the per-request latency. That latency is 21-38 s for outputs "
              "of 260 tokens on average, about 80-180 ms per output token with about 170-250 "
              "requests running (Little's law on the measured numbers). The simulation prices a "
              "decode step physically (weights and every cached token's K and V streamed at the "
              "profile's bandwidth, S-LoRA's per-token BGMV adapter reads, the sampler's sort, one "
              "eager op per request) and runs about 3x faster per token, so fewer requests run at "
              "once and latency is under-predicted by 70-75 %; the rank trend (S2 slower than S1 "
              "through the per-token BGMV reads) and the adapter-count trend are reproduced in "
              "sign. The missing time is the engine's, not the device's: LightLLM's "
              "token-granular Triton decode attention (one program per request and head, K/V "
              "gathered one 256-byte row per token through b_loc, num_stages=1), the BGMV "
              "kernels' latency-bound thread blocks (8 KB per block) and the per-request Python "
              "of every step serial with the GPU (model_rpc.py forward loop, "
              "infer_batch.py get_post_sample_tensors over every generated token id, the "
              "router's _add_token_id_to_req / mark_finished_req / detokenization messages, "
              "InferBatch.filter/merge with .item() syncs). None has a published measurement, "
              "so none is modelled; an nsys profile of one S-LoRA decode step at batch 64-256 "
              "on an A100-80GB (kernel times of token_att_fwd / token_softmax_fwd / "
              "token_att_fwd2 and bgmv, and the host gap between steps) would ground them. The "
              "Llama-13B S4 runs are queue-bound (first-token latency 50-72 s) and their "
              "throughput error (+21-25 %) is the same per-step shortfall."]
    return "\n".join(lines) + "\n"


def run(out_dir: Path = REPORT_DIR, csv=None) -> dict:
    rows = load_rows(csv or default_csv())
    results = eval_slora(rows, {}) + eval_trt(rows) + eval_vidur(rows)
    summ = summarize(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving.json").write_text(json.dumps({"summary": summ, "rows": results}, indent=1))
    (out_dir / "serving.md").write_text(to_markdown(results, summ))
    return {"summary": summ, "rows": results}


if __name__ == "__main__":
    rep = run()
    for s in rep["summary"]:
        mp = "-" if s["mape"] is None else f"{100 * s['mape']:.1f} %"
        print(f"{s['source']:<14} {s['metric']:<28} n={s['n']:<3} MAPE {mp}")
    sys.exit(0)
