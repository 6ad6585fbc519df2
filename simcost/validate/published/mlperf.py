"""MLPERF: MLPerf Training llama2_70b_lora step times, on the submitter's device count with
the NeMo reference implementation's settings."""
from __future__ import annotations

import re
from dataclasses import dataclass

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

V40 = "training_results_v4.0 NVIDIA/benchmarks/llama2_70b_lora/implementations/nemo/"
V41 = "training_results_v4.1 NVIDIA/benchmarks/llama2_70b_lora/implementations/"


@dataclass(frozen=True)
class NemoPlan:
    """The tp / pp / cp of an NVIDIA NeMo reference config (its file name says them: the
    ``1x8x4xtp4pp1cp1`` of config_DGXH100_1x8x4xtp4pp1cp1.sh is nodes x GPUs x MINIBS, tp,
    pp, cp) and what the config sets beyond config_common.sh."""
    tp: int
    pp: int
    cp: int
    config: str
    fp8_attention: bool | None = None   # FP8_DPA where the config sets it (None: common's)
    distributed_optimizer: bool = False  # optim mcore_distributed_optim (ZeRO-1)
    fp8_activation: bool = False        # FP8_ACTIVATION: SwiGLU input stored fp8


# The submitted plan by (round, hardware profile, model-parallel size tp*pp*cp = devices / dp):
# NVIDIA's own configs, which the other NeMo-based submissions of the round start from. dp is
# fixed by the row (global batch / GA at MBS=1), so the model-parallel size is too; a shape no
# NVIDIA config covers (H200 at 8, v5.x) is searched with --parallel auto instead.
NEMO_PLANS = {
    ("v4.0", "h100-sxm", 4): NemoPlan(4, 1, 1, V40 + "config_DGXH100_1x8x4xtp4pp1cp1.sh"),
    ("v4.0", "h100-sxm", 8): NemoPlan(4, 1, 2, V40 + "config_DGXH100_128x8x1xtp4pp1cp2.sh "
                                      "(eos_n8: config_DGXH100_8x8x1xtp4pp1cp2.sh)"),
    ("v4.0", "h200", 2): NemoPlan(2, 1, 1, V40 + "config_DGXH200_1x8x2xtp2pp1cp1.sh",
                                  fp8_activation=True),
    ("v4.0", "l40s", 8): NemoPlan(4, 1, 2, V40 + "config_L40S_16x4x2xtp4pp1cp2.sh, "
                                  "config_L40S_96x4x1xtp4pp1cp2.sh", fp8_attention=False),
    ("v4.1", "h100-sxm", 4): NemoPlan(4, 1, 1, V41 + "eos_ngc24.09_nemo/"
                                      "config_DGXH100_1x8x4xtp4pp1cp1.sh"),
    ("v4.1", "h100-sxm", 8): NemoPlan(4, 1, 2, V41 + "eos_n8_ngc24.09_nemo/"
                                      "config_DGXH100_8x8x1xtp4pp1cp2.sh, eos_n128_ngc24.09_"
                                      "nemo/config_DGXH100_128x8x1xtp4pp1cp2.sh"),
    ("v4.1", "h200", 2): NemoPlan(1, 1, 2, V41 + "h200_ngc24.09_nemo/config_DGXH200_1x8x2x"
                                  "tp1pp1cp2.sh", fp8_attention=False, fp8_activation=True),
    ("v4.1", "b200", 2): NemoPlan(1, 1, 2, V41 + "b200_preview_nemo/config_DGXB200_1x8x2x"
                                  "tp1pp1cp2.sh (its yaml: optim mcore_distributed_optim)",
                                  distributed_optimizer=True),
}


TEXT_PLAN = re.compile(r"(?:config_\w*?)?tp(\d+)pp(\d+)cp(\d+)(?:\.sh)?")


def submitted_plan(row: dict, hw: str, model_parallel: int) -> NemoPlan | None:
    """The submitted plan: the one the row's text names (a NeMo config file name such as
    config_DGXB200_1x8x1xtp1pp1cp1.sh, in its locator or notes) where its tp*pp*cp is the
    row's model-parallel size, else NVIDIA's config of the row's round, hardware and
    model-parallel size, else None."""
    for col in ("source_locator", "notes", "hardware"):
        for m in TEXT_PLAN.finditer(row.get(col) or ""):
            tp, pp, cp = (int(x) for x in m.groups())
            if tp * pp * cp == model_parallel:
                return NemoPlan(tp, pp, cp, f"the row's {col}: {m.group(0)}")
    m = re.search(r"training_results_(v\d+\.\d+)", row.get("source", ""))
    return NEMO_PLANS.get((m.group(1), hw, model_parallel)) if m else None


@register_mapper("MLPERF")
def map_mlperf(row: dict) -> Mapping:
    """The benchmark's reference settings (seq 8192, LoRA r=16 alpha 32 dropout 0.1 on the
    fused qkv and o projections = HF q/k/v/o_proj, global batch from the row, AdamW) on the
    submitter's device count, with the NeMo implementation every listed GPU submission derives
    from (training_results_v4.0 NVIDIA/benchmarks/llama2_70b_lora/implementations/nemo:
    config_common.sh FP8_DPA=1, TP_COMM_OVERLAP=True, MBS=1; config_DGXH100_*.sh FP8=True,
    SP=1): fp8 linears and fp8 fused attention, frozen linear weights stored fp8 (the yaml's
    ``fp8_params: ${FP8}``), bf16 LoRA adapters, sequence parallelism with TP overlap,
    micro-batch 1, no activation checkpointing, on the ``nemo`` stack. dp follows from the
    logged gradient accumulation (global = dp x 1 x GA); tp, pp and cp are the submitted plan
    where NVIDIA's config of the row's round, hardware and model-parallel size names it
    (:data:`NEMO_PLANS`), else ``--parallel auto``."""
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
    # fp8_params: the yaml's ``fp8_params: ${FP8}`` with FP8=True in every NVIDIA config
    # (megatron_gpt_peft_tuning_config.yaml, v4.0 and v4.1): the frozen TE linear weights are
    # fp8 Float8Tensors, one byte each
    dist = dict(devices=n, nodes=nodes, dp=dp, micro_batch=1, tp_overlap=overlap,
                fp8_params=True)
    plan = submitted_plan(row, hw, n // dp)
    if plan is not None:
        fp8_dpa = fp8_dpa if plan.fp8_attention is None else plan.fp8_attention
        dist.update(tp=plan.tp, pp=plan.pp, cp=plan.cp, zero=1 if plan.distributed_optimizer
                    else 0)
        notes.append(f"submitted plan tp{plan.tp} pp{plan.pp} cp{plan.cp} from {plan.config}")
        if plan.fp8_activation:
            dist["fp8_activation"] = True
            notes.append("its config sets FP8_ACTIVATION=True: the fused SwiGLU keeps its "
                         "input in fp8 (Megatron activation_func_fp8_input_store)")
    else:
        dist["parallel"] = "auto"
    dist["fp8_attention"] = fp8_dpa
    if (overlap, fp8_dpa) != (True, True):
        notes.append(f"submitter config for {hw}: TP_COMM_OVERLAP={overlap}, FP8_DPA={fp8_dpa}")
    # NeMo's one LoRA adapter on the fused linear_qkv: the nemo stack's qkv_lora rule
    caveats = []
    submitter = row.get("source_locator", "").split("/", 1)[0]
    if plan is not None and submitter != "NVIDIA" and not plan.config.startswith("the row's"):
        caveats.append(f"{submitter}'s config is not in the dev data: NVIDIA's plan for the same "
                       f"round, hardware and model-parallel size is assumed")
    if "nvidia" not in hw_text:
        caveats.append("non-NVIDIA submission: its implementation's settings are not in the "
                       "dev data; NeMo's (fp8 linears and attention, TP overlap) are assumed")
    return Mapping(model="llama-2-70b", hardware=hw, batch=gb, seq=8192, peft=peft,
                   grad_accum=ga, dtype="fp8", attn="flash", optimizer="adamw",
                   max_positions=8192, caveats=caveats, notes=notes, distributed=dist,
                   stack="nemo")

