"""MLPERF: MLPerf Training llama2_70b_lora step times, on the submitter's device count with
the NeMo reference implementation's settings."""
from __future__ import annotations

import re

from simcost.peft.spec import PeftSpec
from simcost.validate.published.mapping import Mapping, register_mapper
from simcost.validate.published.rows import Unsupported, first_int, parse_batch

MLPERF_HARDWARE = [(r"h100", "h100-sxm"), (r"h200", "h200"), (r"gb300|b300", None),
                   (r"gb200", "gb200"), (r"b200|blackwell", "b200"), (r"l40s", "l40s"),
                   (r"mi300x", "mi300x")]


# (TP communication overlap, fp8 fused attention) where a system's NeMo config overrides
# config_common.sh (TP_COMM_OVERLAP=True, FP8_DPA=1): the L40S configs turn both off
# (training_results_v4.0 NVIDIA/benchmarks/llama2_70b_lora/implementations/nemo/
# config_L40S_16x4x2xtp4pp1cp2.sh and config_L40S_96x4x1xtp4pp1cp2.sh: TP_COMM_OVERLAP=False,
# FP8_DPA=False, NVTE_FP8_DPA_BWD=False)
MLPERF_SYSTEM_SETTINGS = {"l40s": (False, False)}


@register_mapper("MLPERF")
def map_mlperf(row: dict) -> Mapping:
    """The benchmark's reference settings (seq 8192, LoRA r=16 alpha 32 dropout 0.1 on the
    fused qkv and o projections = HF q/k/v/o_proj, global batch from the row, AdamW) on the
    submitter's device count, with the NeMo implementation every listed GPU submission derives
    from (training_results_v4.0 NVIDIA/benchmarks/llama2_70b_lora/implementations/nemo:
    config_common.sh FP8_DPA=1, TP_COMM_OVERLAP=True, MBS=1; config_DGXH100_*.sh FP8=True,
    SP=1): fp8 linears and fp8 fused attention, bf16 weights and LoRA adapters, sequence
    parallelism with TP overlap, micro-batch 1, no activation checkpointing. dp follows from
    the logged gradient accumulation (global = dp x 1 x GA); tp, pp and cp come from
    ``--parallel auto``."""
    if row["metric"] != "step_time_s":
        raise Unsupported("MLPerf: only per-step time rows are expressible")
    hw_text = row["hardware"].lower()
    hw = next((name for pat, name in MLPERF_HARDWARE if re.search(pat, hw_text)), None)
    if hw is None:      # no pattern, or a device without a profile (Blackwell Ultra)
        raise Unsupported(f"hardware '{row['hardware']}' has no profile")
    n = first_int(row["n_devices"]) or 1
    gb, ga = parse_batch(row["batch_size"])
    if not gb or gb % ga:
        raise Unsupported(f"batch '{row['batch_size']}' not parsable")
    dp = gb // ga
    if n % dp:
        raise Unsupported(f"{n} devices not divisible by dp = {dp}")
    m = re.search(r"_n(\d+)\)?", row["hardware"])
    nodes = int(m.group(1)) if m and n % int(m.group(1)) == 0 else None
    notes = [f"global batch {gb} = dp {dp} x micro-batch 1 x GA {ga}"]
    if nodes:
        notes.append(f"{nodes} nodes (from the system name)")
    peft = PeftSpec("lora", r=16, alpha=32, dropout=0.1,
                    targets=("q_proj", "k_proj", "v_proj", "o_proj"), adapter_dtype="bf16")
    overlap, fp8_dpa = MLPERF_SYSTEM_SETTINGS.get(hw, (True, True))
    dist = dict(devices=n, nodes=nodes, dp=dp, micro_batch=1, parallel="auto",
                tp_overlap=overlap, fp8_attention=fp8_dpa)
    if (overlap, fp8_dpa) != (True, True):
        notes.append(f"submitter config for {hw}: TP_COMM_OVERLAP={overlap}, FP8_DPA={fp8_dpa}")
    caveats = ["fused qkv_proj (NeMo) modelled as separate q/k/v LoRA (same rank-16 work split "
               "three ways)"]
    if "nvidia" not in hw_text:
        caveats.append("non-NVIDIA submission: its implementation's settings are not in the "
                       "dev data; NeMo's (fp8 linears and attention, TP overlap) are assumed")
    return Mapping(model="llama-2-70b", hardware=hw, batch=gb, seq=8192, peft=peft,
                   grad_accum=ga, dtype="fp8", attn="flash", optimizer="adamw",
                   max_positions=8192, caveats=caveats, notes=notes, distributed=dist)

