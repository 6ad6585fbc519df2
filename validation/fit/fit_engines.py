"""Fit S-LoRA's unpublished per-iteration host cost on named dev rows; write it, with its rows,
held-out rows and residuals, into ``stack_profiles/serving/slora.json``.

    python validation/fit/fit_engines.py            # fit, write the profile, print the report
    python validation/fit/fit_engines.py --check    # fit and compare with the committed values

What is fitted (bounded, one physical meaning each, never one per row):

- ``slora.host.step_overhead_s``: host seconds per iteration the GPU waits for, whatever the
  batch (LightLLM's router loop between two forwards: the RPC to the model process, the
  next-token ``.cpu()`` sync, the detokenizer and HTTP messages, ``InferBatch`` filter/merge);
  bounds 0-100 ms.

A second constant, host seconds per running request per iteration (``host.seq_overhead_s``,
bounds 0-1 ms), was fitted jointly with it first: Nelder-Mead drove it to its lower bound 0
(step_overhead_s 20.4 ms, the same residuals), so the rows do not support it and it is not
fitted; the profile leaves it out.

It is fitted on the S-LoRA rows of setting S1 (Llama-7B, ranks {8}, 5-2000
adapters, A100-80GB: throughput, first-token and average latency): ``FIT_ROWS``. Every other
S-LoRA row (setting S2, Llama-7B with ranks {64,32,16,8}; setting S4, Llama-13B) is held out:
``held_out``. The objective is the mean absolute relative error over the fit rows; the
optimiser is bounded Brent (``minimize_scalar``, fixed tolerance), so the fit is deterministic
and ``--check`` reproduces the committed values.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from simcost.serve.engines import ENGINE_DIR, EngineSpec, load_engine  # noqa: E402
from simcost.validate.published import default_csv, load_rows  # noqa: E402
from simcost.validate.serving import eval_slora  # noqa: E402

SCRIPT = "validation/fit/fit_engines.py"
ENGINE = "slora"
# setting S1: Llama-7B, ranks {8}, 5 / 100 / 1000 / 2000 adapters (the three metrics)
FIT_ROWS = ("SERVE-SLORA-001", "SERVE-SLORA-003", "SERVE-SLORA-005", "SERVE-SLORA-007",
            "SERVE-SLORA-009", "SERVE-SLORA-011")
PARAMS = ("step_overhead_s",)
BOUNDS = {"step_overhead_s": (0.0, 0.1)}
XATOL_S = 1e-5                                   # optimiser tolerance: 10 us


def slora_rows(csv=None) -> list[dict]:
    """The S-LoRA system's rows of the dev data (the baselines' rows are not S-LoRA's)."""
    return [r for r in load_rows(csv or default_csv())
            if r["id"].startswith("SERVE-SLORA") and "S-LoRA" in r["method"]]


def held_out(rows) -> list[str]:
    return [r["id"] for r in rows if r["id"] not in FIT_ROWS]


def engine_with(values: dict) -> EngineSpec:
    return dataclasses.replace(load_engine(ENGINE), **values)


def evaluate(rows, values: dict) -> list[dict]:
    """The serving report's S-LoRA evaluation of ``rows`` with the engine's constants set."""
    return eval_slora(rows, {}, engine=engine_with(values))


def mape(results) -> float:
    return float(np.mean([abs(r["error"]) for r in results if r["status"] == "ok"]))


def fit(rows) -> dict:
    """Fit PARAMS on the FIT_ROWS of ``rows``; the fitted values and the residuals."""
    in_fit = [r for r in rows if r["id"] in FIT_ROWS]
    missing = set(FIT_ROWS) - {r["id"] for r in in_fit}
    if missing:
        raise SystemExit(f"fit rows missing from the dev data: {sorted(missing)}")
    (p,) = PARAMS
    res = minimize_scalar(lambda x: mape(evaluate(in_fit, {p: float(x)})), bounds=BOUNDS[p],
                          method="bounded", options={"xatol": XATOL_S})
    values = {p: float(res.x)}
    out = [r for r in rows if r["id"] not in FIT_ROWS]
    return {"values": values, "in_sample": evaluate(in_fit, values),
            "held_out": evaluate(out, values), "held_out_ids": [r["id"] for r in out]}


def residuals(result: dict) -> dict:
    """MAPEs per metric, in sample and held out (fractions)."""
    out = {"in_sample_mape": mape(result["in_sample"]), "held_out_mape": mape(result["held_out"])}
    for part in ("in_sample", "held_out"):
        for metric in sorted({r["metric"] for r in result[part]}):
            out[f"{part}_mape_{metric}"] = mape([r for r in result[part] if r["metric"] == metric])
    return {k: round(v, 6) for k, v in out.items()}


def write(result: dict, path: Path = ENGINE_DIR / f"{ENGINE}.json") -> None:
    prof = json.loads(path.read_text())
    fit_rec = {"script": SCRIPT, "rows": list(FIT_ROWS), "held_out": result["held_out_ids"],
               "residual": residuals(result)}
    notes = {"step_overhead_s": "host seconds per iteration serial with the forward (LightLLM "
                                "router loop between forwards); bounds 0-0.1 s"}
    for p in PARAMS:
        prof.setdefault("host", {})[p] = {"value": result["values"][p], "fitted": fit_rec,
                                          "note": notes[p]}
    path.write_text(json.dumps(prof, indent=1) + "\n")


def committed(path: Path = ENGINE_DIR / f"{ENGINE}.json") -> dict:
    host = json.loads(path.read_text()).get("host", {})
    return {p: host[p]["value"] for p in PARAMS if p in host}


def report(result: dict) -> str:
    lines = [f"{p} = {v:.6g}" for p, v in result["values"].items()]
    res = residuals(result)
    lines += [f"{k:<44} {100 * v:6.1f} %" for k, v in res.items()]
    lines.append("rows: " + ", ".join(f"{r['id']} {100 * r['error']:+.1f} %"
                                      for r in result["in_sample"] + result["held_out"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed values")
    a = ap.parse_args(argv)
    result = fit(slora_rows())
    print(report(result))
    if a.check:
        got, want = result["values"], committed()
        bad = [p for p in PARAMS if p not in want or not np.isclose(got[p], want[p], rtol=1e-6,
                                                                     atol=0)]
        if bad:
            print(f"committed values differ: {bad}")
            return 1
        return 0
    write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
