"""MLPerf Training llama2_70b_lora step times vs simcost's distributed estimate (--parallel auto).

Writes validation/reports/mlperf_llama2_70b_lora.{md,json}; also times the issue's
`--parallel auto` command (llama-2-70b, 8 x H100, batch 8, seq 8192).

    python benchmarks/mlperf_llama2_70b_lora.py
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from simcost.validate.published import evaluate, load_rows, mape

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def memory_rows(rows: list[dict]) -> list[dict]:
    """Per row, memory per device (GiB) as mapped today (the submitted NeMo plan where NVIDIA
    published it, stack nemo, fp8_params) and as the previous mapping priced it (stack hf,
    bf16-stored weights, --parallel auto), both with today's memory model; and the submitted
    plan with bf16 weights (the issue's '250 GiB')."""
    from simcost.api import estimate_train
    from simcost.validate.published.sources import map_row
    out = []
    for row in rows:
        if row["metric"] != "step_time_s":
            continue
        mp = map_row(row)
        kw = mp.estimate_kwargs()
        now = estimate_train(mp.model, mp.hardware, max_positions=mp.max_positions, **kw)
        old_kw = {k: v for k, v in kw.items() if k not in ("tp", "pp", "cp", "zero", "stack")}
        old_kw.update(parallel="auto", fp8_params=False)
        old = estimate_train(mp.model, mp.hardware, max_positions=mp.max_positions, **old_kw)
        bf16 = estimate_train(mp.model, mp.hardware, max_positions=mp.max_positions,
                              **dict(kw, fp8_params=False))
        m, o = now.memory_bytes, old.memory_bytes
        out.append({"id": row["id"], "system": f"{mp.hardware} x{kw['devices']}",
                    "plan": now.parallel["plan_label"], "weights_gib": m["weights"] / GIB,
                    "activations_gib": m["activations"] / GIB, "peak_gib": m["peak"] / GIB,
                    "capacity_gib": m["capacity"] / GIB, "fits": now.fits,
                    "previous_plan": old.parallel["plan_label"],
                    "previous_peak_gib": o["peak"] / GIB, "previous_fits": old.fits,
                    "plan_bf16_weights_peak_gib": bf16.memory_bytes["peak"] / GIB})
    return out


def memory_lines(mem: list[dict]) -> list[str]:
    lines = ["## Memory per device (GiB)", "",
             "Today's mapping: the submitted plan where NVIDIA's NeMo config of the round, "
             "hardware and model-parallel size names it (else `--parallel auto`), stack `nemo`, "
             "frozen linear weights stored fp8 (`fp8_params`, the configs' "
             "`fp8_params: ${FP8}`), fp8 attention's saved q/k/v/out in fp8. Previous: stack "
             "`hf`, bf16-stored weights, `--parallel auto`. *bf16 w.*: today's plan with "
             "bf16-stored weights (the issue's 250 GiB is the B200 row). Both priced by "
             "today's memory model.", "",
             "| id | system | plan | weights | activations | peak | capacity | fits | "
             "previous plan | previous peak | bf16 w. |", "|" + "---|" * 11]
    for r in mem:
        lines.append(f"| {r['id']} | {r['system']} | {r['plan']} | {r['weights_gib']:.1f} | "
                     f"{r['activations_gib']:.1f} | {r['peak_gib']:.1f} | "
                     f"{r['capacity_gib']:.1f} | {'yes' if r['fits'] else '**no**'} | "
                     f"{r['previous_plan']} | {r['previous_peak_gib']:.1f}"
                     f"{'' if r['previous_fits'] else ' (no)'} | "
                     f"{r['plan_bf16_weights_peak_gib']:.1f} |")
    return lines


def main(out_dir: str = "validation/reports") -> int:
    rows = [r for r in load_rows() if r["id"].startswith("MLPERF")]
    t0 = time.perf_counter()
    res = evaluate(rows)
    t_eval = time.perf_counter() - t0
    ev = [r for r in res if r.status == "evaluated"]
    by_hw: dict[str, list] = {}
    for r in ev:
        d = r.mapping["distributed"]
        key = f"{r.mapping['hardware']} x{d['devices']}"
        by_hw.setdefault(key, []).append(r)
    cmd = [sys.executable, "-m", "simcost.cli", "estimate", "train", "--model", "llama-2-70b",
           "--peft", "lora", "--hardware", "h100-sxm", "--devices", "8", "--parallel", "auto",
           "--batch", "8", "--seq", "8192", "--dtype", "bf16", "--json"]
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        walls.append(time.perf_counter() - t)
    auto = json.loads(out.stdout)
    from simcost.api import estimate_train
    t = time.perf_counter()
    estimate_train("llama-2-70b", "h100-sxm", batch=8, seq=8192, devices=8, parallel="auto",
                   max_positions=8192, peft="lora")
    t_api = time.perf_counter() - t
    summary = {
        "rows_evaluated": len(ev),
        "rows_unsupported": len(res) - len(ev),
        "step_time_mape": mape(ev),
        "mean_signed_error": statistics.mean(r.error for r in ev),
        "by_system": {k: {"n": len(v), "mape": mape(v),
                          "mean_signed_error": statistics.mean(r.error for r in v),
                          "plan": v[0].notes[-1]} for k, v in sorted(by_hw.items())},
        "evaluation_wall_s": t_eval,
        "auto_command_wall_s": {"cli_subprocess_median": statistics.median(walls),
                                "api_call": t_api, "plan": auto["parallel"]["plan_label"],
                                "plans_searched": auto["parallel"]["plans_searched"]},
    }
    rows_out = [{"id": r.id, "hardware": r.mapping["hardware"],
                 "devices": r.mapping["distributed"]["devices"],
                 "global_batch": r.mapping["batch"], "grad_accum": r.mapping["grad_accum"],
                 "measured_s": r.measured, "predicted_s": r.predicted, "error": r.error,
                 "plan": r.notes[-1]} for r in ev]
    unsup = [{"id": r.id, "metric": r.metric, "reason": r.reason}
             for r in res if r.status != "evaluated"]
    mem = memory_rows(rows)
    summary["rows_not_fitting"] = [r["id"] for r in mem if not r["fits"]]
    out = Path(ROOT / out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlperf_llama2_70b_lora.json").write_text(json.dumps(
        {"summary": summary, "rows": rows_out, "memory": mem, "unsupported": unsup}, indent=1))
    lines = ["# MLPerf Training llama2_70b_lora: step time, simcost vs submissions", "",
             "Generated by `python benchmarks/mlperf_llama2_70b_lora.py`. Settings per row: "
             "llama-2-70b, seq 8192, LoRA r=16 alpha 32 dropout 0.1 on q/k/v/o (bf16 adapters), "
             "global batch and gradient accumulation from the row (micro-batch 1, so "
             "dp = global / GA), fp8 linears + fp8 attention (NeMo FP8=True, FP8_DPA=1), "
             "TP communication overlap (both off on L40S, and fp8 attention off on v4.1 H200, as "
             "their configs set), AdamW, stack `nemo`, frozen linear weights stored fp8 "
             "(`fp8_params`); tp / pp / cp the submitted plan where NVIDIA's config of the "
             "round, hardware and model-parallel size names it, else `--parallel auto`. "
             "No per-row tuning: the inputs are the device profiles (datasheet peaks, "
             "measured bf16/fp8 max-achievable-matmul efficiency), the default 400 Gb/s "
             "NDR per GPU between nodes, and the nemo stack's two fitted constants (sustained "
             "GEMM fraction, host seconds per optimizer step), fitted by "
             "`validation/fit/fit_stacks.py` on the H100 systems of up to 64 GPUs only: the "
             "larger H100 systems, H200, B200 and L40S are out of that fit.", "",
             f"**Step-time MAPE: {summary['step_time_mape']:.1%}** over "
             f"{len(ev)} rows (mean signed error {summary['mean_signed_error']:+.1%}; "
             f"dev target <= 8 %: {'met' if summary['step_time_mape'] <= 0.08 else 'not met'}). "
             "First cut (perfect overlap, attention at the dense fp8 GEMM efficiency): "
             "19.4 %.", "",
             "| system | rows | MAPE | signed | plan chosen |", "|---|---|---|---|---|"]
    for k, v in summary["by_system"].items():
        lines.append(f"| {k} | {v['n']} | {v['mape']:.1%} | {v['mean_signed_error']:+.1%} | "
                     f"{v['plan'].split(': ', 1)[1].split(';')[0]} |")
    lines += ["", "## Rows", "", "| id | system | measured s | predicted s | error |",
              "|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['id']} | {r['hardware']} x{r['devices']} | {r['measured_s']:.3f} | "
                     f"{r['predicted_s']:.3f} | {r['error']:+.1%} |")
    lines += ["", *memory_lines(mem), "", "## Diagnosis", "",
              DIAGNOSIS, "",
              "## The auto command", "",
              f"`simcost estimate train --model llama-2-70b --peft lora --hardware h100-sxm "
              f"--devices 8 --parallel auto --batch 8 --seq 8192 --dtype bf16` (verbatim from "
              f"the issue): {summary['auto_command_wall_s']['cli_subprocess_median']:.2f} s wall "
              f"(whole process, median of 3), {t_api * 1e3:.0f} ms in the API; "
              f"{auto['parallel']['plans_searched']} plans searched, chosen "
              f"`{auto['parallel']['plan_label']}`.", "",
              f"## Unsupported MLPERF rows ({len(unsup)})", "",
              "All are `time_to_train_min` (steps to converge x step time + evaluation and "
              "start-up): not a per-step metric."]
    (out / "mlperf_llama2_70b_lora.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


DIAGNOSIS = """\
- Second cut (this report) prices two physical effects the first cut left out, from
  published sources, with no per-row input:
  1. **Overlap is not free.** A collective running concurrently with compute occupies SMs:
     TransformerEngine's userbuffers default to num_sm = 16 per overlap
     (transformer_engine/pytorch/module/base.py, initialize_ub), 16 / 132 of an H100; the
     hidden communication time x that fraction is added to the compute
     (`time_s.overlap_compute_slowdown`). TE pipelines the forward reduce-scatter in 4 chunks,
     so the last chunk's share stays exposed. In the backward, TE hides the reduce-scatter of a
     column-parallel linear's input gradient behind its *weight-gradient* GEMM ("bulk"
     overlap); LoRA's frozen base has no weight gradient, so that traffic hides only behind the
     adapters' small wgrad GEMMs: a PEFT-specific exposure.
  2. **Fused attention at measured FlashAttention-3 rates** (arXiv 2407.08608, H100 SXM5,
     head dim 128, 8k): forward causal 602 TFLOPS bf16 / 815 fp8, backward 559 (no fp8
     backward is published: fp8 backward is taken at the bf16 rate). Causal FLOPs count half
     the dense ones, as in the paper. Set for h100-sxm and h200 (same GH100 compute); B200 and
     L40S have no published FA3 measurement and keep the dense-GEMM pricing.
- Third cut: each row follows its submitter's published system config where it departs
  from NeMo's config_common.sh. The L40S configs (config_L40S_16x4x2xtp4pp1cp2.sh,
  config_L40S_96x4x1xtp4pp1cp2.sh) turn TP overlap and fp8 attention off: L40S -28 % / -34 %
  -> -14 % / -19 %. The B200 profile now has its 148 SMs (wave quantisation): -27 % -> -23 %.
- What is left (all rows still under-predict): FP8 bookkeeping (amax reductions, scaling,
  cast-transposes for the backward GEMMs) is one quantisation pass; B200 has no attention
  measurement and ran a 2024 preview software stack; the v4.0 rows at 64/1024 x H100
  (0.64 / 0.68 s) are an older NeMo than the v4.1 rows at the same plan (0.55 s), which
  simcost matches within ~2-14 %. The MAMF matmul efficiency is a best-shape figure; on
  real shapes cuBLAS runs a few percent lower (Vidur's H100 GEMMs: 5-9 %), which is about
  the 8 x H100 bias (-7 %).
- Memory (issue 10, "250 GiB per device"). The 250 GiB is the v4.1 DGX B200 row on its
  submitted plan tp1 pp1 cp2 (config_DGXB200_1x8x2xtp1pp1cp2.sh): 128.6 GiB of bf16 weights +
  114.3 GiB of activations + reserve. Root cause, in the stack and the mapping, not in a plan
  formula: (1) NeMo's configs store the frozen TE linear weights as fp8 (`fp8_params:
  ${FP8}`, FP8=True), simcost stored them bf16: 128.6 -> 64.9 GiB there; (2) fp8 fused
  attention (FP8_DPA=1, NVTE_FP8_DPA_BWD=1) saves fp8 q/k/v/out (TE FusedAttnFunc), simcost
  saved bf16: -2.25 sbh a layer; (3) NeMo's LoRA on the fused linear_qkv is one adapter (one
  dropout mask, one dropped input, one A), peft on HF's q/k/v three: -6 sbh a layer (the nemo
  stack's `qkv_lora` rule); (4) `--parallel auto` searched instead of using the submitted plan,
  which the configs' names give (tp4 cp1 on 8 x H100 came out 96.5 GiB, so the search fell
  back to ZeRO-3; the v4.1 H200 config runs tp1 cp2 with FP8_DPA=0, the search chose tp2 with
  fp8 attention). Still over: the v4.1 H200 rows (tp1 cp2, 176 GiB of 140): their saved norms
  and SwiGLU are HF eager's; with fused RMSNorm and SwiGLU (the nemo profile's rms_norm and
  swiglu rules) they come to 145.8 GiB, and with the config's FP8_ACTIVATION=True (the fused
  SwiGLU keeps its input in fp8, megatron/core/fusions/fused_bias_swiglu.py) to 126.5 GiB.
- The issue's literal command (`--seq 8192` on the zoo's llama-2-70b, 4096 trained
  positions) runs: rotary models are estimated beyond their trained context, as transformers
  runs them, with a warning (a learned position table, GPT-2's, is still refused)."""


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
