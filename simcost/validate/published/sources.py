"""The CSV's sources, the rows that set profile inputs, the rules every row passes before its
source's mapper (what simcost cannot express yet, whatever the source), and :func:`map_row`,
which hands a row to its source's registered mapper."""
from __future__ import annotations

from simcost.validate.published.mapping import MAPPERS, GemmMapping, Mapping
# each mapper module registers its source's mapper on import
from simcost.validate.published.mlperf import map_mlperf  # noqa: F401
from simcost.validate.published.qwen import map_qwen  # noqa: F401
from simcost.validate.published.torchtune import map_torchtune  # noqa: F401
from simcost.validate.published.vidur import map_vidur  # noqa: F401
from simcost.validate.published.rows import Unsupported, first_int, source_of

SOURCES = {
    "FT-QWEN": "QwenLM/Qwen README 'Profiling of Memory and Speed' (finetune.py, HF Trainer)",
    "FT-TORCHTUNE": "pytorch/torchtune README and tutorials",
    "FT-PEFTREADME": "huggingface/peft README (2023-03)",
    "FT-PEFTDOCS": "huggingface/peft docs (DeepSpeed / FSDP)",
    "FT-BLOG": "huggingface/blog ram-efficient-pytorch-fsdp",
    "FT-EDGE": "ml-explore/mlx-examples LoRA README",
    "MLPERF": "MLPerf Training llama2_70b_lora v4.0/v4.1",
    "SERVE-SLORA": "S-LoRA raw results",
    "INF-TRTLLM": "TensorRT-LLM perf overview",
    "INF-QWEN": "QwenLM/Qwen README inference table",
    "INF-VIDUR-OP": "microsoft/vidur operator profiles",
    "HWEFF-MAMF": "stas00/ml-engineering maximum achievable matmul FLOPS",
}

# measured rows that set a profile's ``time_model`` (evaluating them would be circular). The
# NVIDIA rows also set, by their median, the derived efficiencies of the NVIDIA profiles with no
# measurement of their own (BF16: 002-007, 009; FP8: 014, 016-020); the AMD ones (010-012), the
# MI250X's.
PROFILE_INPUTS = {
    "HWEFF-MAMF-002": "a100-80gb-sxm / a100-40gb-sxm time_model.matmul_efficiency",
    "HWEFF-MAMF-004": "a100-80gb-pcie time_model.matmul_efficiency",
    "HWEFF-MAMF-005": "h100-sxm / h200 time_model.matmul_efficiency",
    "HWEFF-MAMF-007": "b200 time_model.matmul_efficiency",
    "HWEFF-MAMF-003": "by the median of the NVIDIA rows, the unmeasured NVIDIA profiles' "
                      "time_model.matmul_efficiency (GH200 has no profile)",
    "HWEFF-MAMF-006": "by the median of the NVIDIA rows, the unmeasured NVIDIA profiles' "
                      "time_model.matmul_efficiency (B300 has no profile)",
    "HWEFF-MAMF-010": "by the median of the AMD rows, mi250x time_model.matmul_efficiency",
    "HWEFF-MAMF-011": "by the median of the AMD rows, mi250x time_model.matmul_efficiency",
    "HWEFF-MAMF-012": "mi300x time_model.matmul_efficiency",
    "HWEFF-MAMF-014": "by the median of the NVIDIA rows, the unmeasured NVIDIA profiles' "
                      "time_model.matmul_efficiency_fp8 (GH200 has no profile)",
    "HWEFF-MAMF-017": "by the median of the NVIDIA rows, the unmeasured NVIDIA profiles' "
                      "time_model.matmul_efficiency_fp8 (B300 has no profile)",
    "HWEFF-MAMF-009": "gb200 time_model.matmul_efficiency",
    "HWEFF-MAMF-016": "b200 time_model.matmul_efficiency_fp8",
    "HWEFF-MAMF-018": "h200 time_model.matmul_efficiency_fp8",
    "HWEFF-MAMF-019": "gb200 time_model.matmul_efficiency_fp8",
    "HWEFF-MAMF-020": "h100-sxm time_model.matmul_efficiency_fp8",
    "INF-VIDUR-OP-014": "a100-80gb-sxm time_model.bandwidth_efficiency (decode GEMV, weight-bound)",
    "INF-VIDUR-OP-029": "h100-sxm time_model.bandwidth_efficiency (decode GEMV, weight-bound)",
}

# ---------------------------------------------------------------------------------------------
# rules: what simcost cannot express yet, for any source

_SERVING = ("output_tokens_per_s", "throughput_req_s", "avg_first_token_latency_s",
            "avg_latency_s")


# sources whose multi-device runs are mapped onto a simcost plan (MLPerf: NeMo's configs;
# Qwen: finetune_lora_ds.sh / DeepSpeed; torchtune: the lora_finetune_distributed recipe, FSDP)
MULTI_DEVICE_SOURCES = ("MLPERF", "FT-QWEN", "FT-TORCHTUNE")


def common_unsupported(row: dict) -> None:
    """Unsupported with the reason when no mapper could express ``row``."""
    rid, method = row["id"], row["method"].lower()
    src = source_of(rid)
    if src == "HWEFF-MAMF":
        if rid in PROFILE_INPUTS:
            raise Unsupported(f"hardware-efficiency input: sets {PROFILE_INPUTS[rid]}")
        raise Unsupported("hardware-efficiency reference (GEMM microbenchmark): no simcost "
                          "profile for this device/dtype uses it")
    if rid in PROFILE_INPUTS:
        raise Unsupported(f"hardware-efficiency input: sets {PROFILE_INPUTS[rid]}")
    if row["metric"] in _SERVING or src in ("SERVE-SLORA", "INF-TRTLLM", "INF-QWEN"):
        raise Unsupported("serving / generation measurement: simcost estimates training steps "
                          "only (serving is checked by python -m simcost.validate.serving)")
    n = first_int(row["n_devices"]) or 1
    if n > 1 and src not in MULTI_DEVICE_SOURCES:
        raise Unsupported(f"multi-device run ({n} devices): no mapping of this source's "
                          "parallel setup (framework, sharding, launcher) yet")
    if row["metric"] == "time_to_train_min":
        raise Unsupported("time to train (steps to converge x step time): not a per-step metric")
    if "cpu" in row["metric"]:
        raise Unsupported("host (CPU) memory metric: simcost models device memory")
    if row["metric"] == "activation_mem_GB":
        raise Unsupported("activation-only memory from prose, for LoRA-FA (not a simcost "
                          "method)")
    m = row["model"]
    if "T0" in m or "mt0" in m:
        raise Unsupported("T5-family encoder-decoder (T0/mT0): no simcost builder")
    if "bloom" in m.lower():
        raise Unsupported("BLOOM (ALiBi): no simcost builder")
    if "stable-diffusion" in m:
        raise Unsupported("Stable Diffusion UNet: not a language model")
    if "mlx" in method or "apple" in row["hardware"].lower():
        raise Unsupported("Apple MLX framework: simcost models CUDA PyTorch training")
    if "offload" in method or (("deepspeed" in method or "fsdp" in method)
                               and src not in MULTI_DEVICE_SOURCES):
        raise Unsupported("DeepSpeed/FSDP/offload run: sharding and CPU offload not modelled")


def map_row(row: dict) -> Mapping | GemmMapping:
    """The simcost estimate for ``row``, or Unsupported with the reason."""
    common_unsupported(row)
    src = source_of(row["id"])
    mapper = MAPPERS.get(src)
    if mapper is None:
        raise Unsupported(f"source {src}: no mapping")
    return mapper(row)
