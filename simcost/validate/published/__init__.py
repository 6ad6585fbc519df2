"""``simcost validate published``: simcost against published measurements.

Reads the project's copy of the maintainers' ``published_measurements_dev.csv``
(``validation/published/``), maps every row simcost can express to an :func:`estimate_train`
call (or, for measured GEMM latencies, to the per-op time model), and compares. Every other
row is listed as *unsupported* with a one-line reason; no row is dropped.

What the mapping assumes about each source's framework (the evidence is cited in
``validation/published/README.md``):

- ``FT-QWEN``: Qwen v1 ``finetune.py`` (HF Trainer) from ``finetune_lora_single_gpu.sh``:
  ``--bf16`` with a model whose weights Qwen's remote code casts to bf16, FlashAttention-2,
  ``--gradient_checkpointing``, ``adamw_torch``, every sample padded to ``model_max_length``
  (so the sequence length is exact), micro-batch 1 x gradient accumulation 8. peft of late 2023
  creates the LoRA matrices in the base weight's dtype (bf16; fp32 adapters came with peft
  0.12's ``autocast_adapter_dtype``). "LoRA (emb)" = ``modules_to_save=["wte", "lm_head"]``
  (the base, non-chat model). Q-LoRA loads a GPTQ Int4 checkpoint; full-parameter runs use
  ``finetune_ds.sh`` (DeepSpeed ZeRO-2) - neither is expressible yet.
- ``FT-TORCHTUNE``: torchtune recipes in pure bf16 (parameters, LoRA matrices and AdamW state
  all bf16, no master copy), activation checkpointing per decoder layer, packed sequences
  (exact length; attention modelled as a fused kernel), memory from
  ``torch.cuda.memory_stats`` (GiB, CUDA context excluded).
- ``INF-VIDUR-OP``: one forward GEMM of Llama-2-7B measured by Vidur's profiler
  (fp16, cuBLAS): compared with simcost's per-op time model.
- ``MLPERF``: MLPerf Training llama2_70b_lora step times on the submitter's device count, with
  the NeMo reference implementation's settings and ``--parallel auto``.

The error of a row is ``predicted / measured - 1``; MAPE is the mean of ``|error|``, per source
and per kind (step time, tokens/s, peak memory, op latency).

The package, by concern: :mod:`.rows` reads the CSV and parses its fields; :mod:`.sources`
names the sources and the rules no mapper can get past; :mod:`.mapping` holds the mapping types
and the registry of one mapper per source (:mod:`.qwen`, :mod:`.torchtune`, :mod:`.vidur`,
:mod:`.mlperf`); :mod:`.predict` prices a mapping and compares; :mod:`.report` summarises and
writes; :mod:`.cli` is the command, :mod:`.outdir` where it writes.
"""
from __future__ import annotations

import importlib

# every name other code imports from here -> the submodule defining it. Loaded on first use,
# so that the light submodules (outdir: the CLI's help text) import without the rest.
_EXPORTS = {
    "cli": ("run_cli",),
    "mapping": ("GemmMapping", "Mapping", "register_mapper"),
    "mlperf": ("MLPERF_HARDWARE", "MLPERF_SYSTEM_SETTINGS"),
    "outdir": ("NOT_WRITTEN", "OUT_DIR_HELP", "checkout_reports_dir", "resolve_out_dir"),
    "predict": ("Result", "evaluate", "evaluate_row", "predict", "predict_gemm"),
    "qwen": ("QWEN_DS_ZERO",),
    "report": ("KINDS", "TIME_KINDS", "mape", "print_report", "summarize", "to_json",
               "to_markdown"),
    "rows": ("CSV_NAME", "GIB", "HARDWARE", "MODELS", "REQUIRED_COLUMNS", "Unsupported",
             "default_csv", "hardware_name", "load_rows", "metric_value", "model_name",
             "parse_batch", "parse_lora", "source_of"),
    # MAPPERS from sources: importing it registers every source's mapper
    "sources": ("MAPPERS", "MULTI_DEVICE_SOURCES", "PROFILE_INPUTS", "SOURCES",
                "common_unsupported", "map_row"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
