"""simcost's step time and memory for every experiment of peft's MetaMathQA method comparison,
beside peft's published measurements (``results.csv``). A report, never a fit: no constant is
fitted on these rows.

Each experiment runs through the traced front end with its own ``adapter_config.json`` (full
fine-tuning: every parameter trainable), as peft's benchmark runs it (``default_training_params
.json``): Llama-3.2-3B, bf16 weights, fp32 adapters (``autocast_adapter_dtype``), no AMP, no
checkpointing, batch 4, AdamW, one NVIDIA L40S (``l40s`` profile), the ``hf`` stack. peft pads
each batch to its longest sample within length-sorted groups of 80 samples; 4,198,051 tokens
over 20,000 samples make 210 tokens per sample, the sequence simcost prices. Measured:
``step_time_s`` (the summed per-step durations / 5,000 steps) and the 99th percentile of
``memory_reserved`` after each optimizer step (the caching allocator keeps the step's peak
reserved, so this is the high end of the steps' ``max_memory_reserved``), against simcost's
``peak_reserved``.

    python validation/metamathqa/run_simcost.py [--all] [--out-dir validation/metamathqa]
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEQ = 210            # 4,198,051 tokens / 20,000 samples
BATCH = 4


def experiments(all_: bool) -> list[dict]:
    with open(HERE / "experiments.csv") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if all_ or r["is_default"] == "True"]


def measured() -> dict:
    with open(HERE / "results.csv") as f:
        return {r["experiment"]: r for r in csv.DictReader(f)}


def estimate(exp: str) -> dict:
    from simcost.api import estimate_train
    from simcost.errors import SimcostError
    cfg = HERE / "experiments" / exp / "adapter_config.json"
    kw = dict(batch=BATCH, seq=SEQ, dtype="bf16", frontend="traced", stack="hf")
    if cfg.is_file():
        kw["peft_config"] = str(cfg)
    try:
        r = estimate_train("llama-3.2-3b", "l40s", **kw)
    except SimcostError as e:
        return {"error": str(e)}
    m = r.memory_bytes
    return {"step_s": r.time_s["step"], "tokens_per_s": r.tokens_per_s,
            "peak_reserved_bytes": m["peak_reserved"], "peak_bytes": m["peak"],
            "trainable": r.params["trainable"], "unpriced": json.dumps(r.unpriced_ops or {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--all", action="store_true", help="every experiment, not one per method")
    ap.add_argument("--out-dir", default=str(HERE))
    a = ap.parse_args()
    meas = measured()
    rows = []
    for e in experiments(a.all):
        exp = e["experiment"]
        r = {"experiment": exp, "method": e["method"], "peft_type": e["peft_type"], **estimate(exp)}
        m = meas.get(exp)
        if m:
            r["measured_step_s"] = float(m["step_time_s"])
            r["measured_reserved_99th_bytes"] = float(m["accelerator_memory_reserved_99th_bytes"])
            r["measured_trainable"] = int(m["num_trainable_params"])
        rows.append(r)
        print(exp, {k: v for k, v in r.items() if k not in ("experiment", "unpriced")}, flush=True)
    out = Path(a.out_dir)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "experiment", k))
    with open(out / "simcost.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "simcost.md").write_text(report(rows))


def _errors(rows, pred: str, meas: str):
    ok = [r for r in rows if pred in r and meas in r]
    e = np.array([(r[pred] - r[meas]) / r[meas] for r in ok])
    return ok, e


def report(rows) -> str:
    from scipy.stats import spearmanr
    lines = ["# simcost on peft's MetaMathQA method comparison (report only, nothing fitted)", "",
             "`python validation/metamathqa/run_simcost.py` writes this file and `simcost.csv`.",
             f"Llama-3.2-3B, batch {BATCH} x {SEQ} tokens, bf16, AdamW, one L40S, stack `hf`, "
             "traced front end.", "",
             "The memory column is not a like-for-like check: peft samples `memory_reserved` "
             "after each optimizer step of a run that also generates answers at batch 50 every "
             "250 steps, and the caching allocator keeps what generation reserved; its 99th "
             "percentile is the generation's footprint wherever that exceeds the training step "
             "(every method but full fine-tuning). The step time is the measured training step "
             "alone.", ""]
    for what, pred, meas in (("step time", "step_s", "measured_step_s"),
                             ("peak reserved vs reserved p99", "peak_reserved_bytes",
                              "measured_reserved_99th_bytes")):
        ok, e = _errors(rows, pred, meas)
        if len(ok) > 1:
            rho = spearmanr([r[pred] for r in ok], [r[meas] for r in ok]).statistic
            lines.append(f"- {what}: MAPE {100 * np.mean(np.abs(e)):.1f} % over {len(ok)} "
                         f"experiments, mean signed {100 * np.mean(e):+.1f} %, Spearman {rho:.2f}")
    lines += ["", "| experiment | peft_type | trainable (simcost / peft) | step s (simcost / "
              "measured) | GiB reserved (simcost / measured p99) | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        gib = 2 ** 30
        if "error" in r:
            lines.append(f"| {r['experiment']} | {r['peft_type']} | | | | {r['error']} |")
            continue
        ms = r.get("measured_step_s")
        mm = r.get("measured_reserved_99th_bytes")
        lines.append(
            f"| {r['experiment']} | {r['peft_type']} | {r['trainable']:,} / "
            f"{r.get('measured_trainable', 0):,} | {r['step_s']:.3f} / "
            f"{'' if ms is None else f'{ms:.3f}'} | {r['peak_reserved_bytes'] / gib:.2f} / "
            f"{'' if mm is None else f'{mm / gib:.2f}'} | "
            f"{'' if r['unpriced'] == '{}' else 'unpriced: ' + r['unpriced']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
