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

The error of a row is ``predicted / measured - 1``; MAPE is the mean of ``|error|``, per source
and per kind (step time, tokens/s, peak memory, op latency).
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from simcost.errors import SimcostError
from simcost.paths import data_dir
from simcost.peft.spec import PeftSpec

CSV_NAME = "published_measurements_dev.csv"
GIB = 2 ** 30

# ---------------------------------------------------------------------------------------------
# names

MODELS = {
    "qwen-1.8b": "qwen-1.8b", "qwen-7b": "qwen-7b", "qwen-14b": "qwen-14b",
    "qwen-72b": "qwen-72b",
    "llama 3.1 8b": "llama-3.1-8b", "llama 3.1 70b": "llama-3.1-70b",
    "llama 3.1 405b": "llama-3.1-405b", "llama 3.2 3b": "llama-3.2-3b",
    "llama-2-7b": "llama-2-7b", "llama-2-7b-chat-hf": "llama-2-7b",
    "llama-2-7b (one layer)": "llama-2-7b",
    "llama-2-70b": "llama-2-70b", "llama-2-70b-hf": "llama-2-70b", "llama-2-70b-chat": "llama-2-70b",
    "mistral-7b-v0.1": "mistral-7b",
}

# (pattern on the lower-cased hardware string, profile, note). First match wins.
HARDWARE = [
    (r"a100-sxm4-80gb|a100 sxm4 80gb", "a100-80gb-sxm", None),
    (r"^(nvidia )?a100 80gb$", "a100-80gb-sxm",
     "form factor not stated; SXM4 assumed (cloud 80 GB A100 nodes are SXM4)"),
    (r"^a100$|^nvidia a100 sxm$", "a100-80gb-sxm",
     "A100 variant not stated; the 80 GB SXM4 part is assumed (the run peaks above 40 GB)"),
    (r"^nvidia a100 pcie$", "a100-80gb-pcie", None),
    (r"^rtx 4090$", "rtx-4090", None),
    (r"^rtx a6000$", "rtx-a6000", None),
    (r"^h100 80gb$|^h100 sxm 80gb$|^nvidia h100 sxm$", "h100-sxm", None),
    (r"^h200 sxm 141gb$|^nvidia h200 sxm$", "h200", None),
    (r"^b200 180gb$|^nvidia b200 sxm$", "b200", None),
    (r"^amd mi300x$", "mi300x", None),
]

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

# measured rows that set a profile's ``time_model`` (evaluating them would be circular)
PROFILE_INPUTS = {
    "HWEFF-MAMF-002": "a100-80gb-sxm / a100-40gb-sxm time_model.matmul_efficiency",
    "HWEFF-MAMF-004": "a100-80gb-pcie time_model.matmul_efficiency",
    "HWEFF-MAMF-005": "h100-sxm / h200 time_model.matmul_efficiency",
    "HWEFF-MAMF-007": "b200 time_model.matmul_efficiency",
    "HWEFF-MAMF-012": "mi300x time_model.matmul_efficiency",
    "HWEFF-MAMF-009": "gb200 time_model.matmul_efficiency",
    "HWEFF-MAMF-016": "b200 time_model.matmul_efficiency_fp8",
    "HWEFF-MAMF-018": "h200 time_model.matmul_efficiency_fp8",
    "HWEFF-MAMF-019": "gb200 time_model.matmul_efficiency_fp8",
    "HWEFF-MAMF-020": "h100-sxm time_model.matmul_efficiency_fp8",
    "INF-VIDUR-OP-014": "a100-80gb-sxm time_model.bandwidth_efficiency (decode GEMV, weight-bound)",
    "INF-VIDUR-OP-029": "h100-sxm time_model.bandwidth_efficiency (decode GEMV, weight-bound)",
}


class Unsupported(Exception):
    """A row simcost cannot express yet (the message is the one-line reason)."""


def source_of(row_id: str) -> str:
    return row_id.rsplit("-", 1)[0]


# ---------------------------------------------------------------------------------------------
# the mapping of a row


@dataclass
class Mapping:
    """How one row becomes a simcost estimate."""
    model: str
    hardware: str
    batch: int
    seq: int
    peft: PeftSpec
    grad_accum: int = 1
    dtype: str = "bf16"
    mixed_precision: str = "none"
    attn: str = "flash"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    memory_scope: str = "device"     # device: + CUDA context; torch_allocator: tensors only
    max_positions: int | None = None  # override the zoo's position limit (evidence in notes)
    caveats: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    distributed: dict | None = None  # multi-device: estimate_train's plan arguments; batch global
    memory_devices: int = 1          # a memory metric summed over this many devices
    loss_chunks: int = 1             # torchtune CEWithChunkedOutputLoss: N output chunks
    optimizer_in_backward: bool = False  # torchtune optimizer_in_bwd

    def estimate_kwargs(self) -> dict:
        kw = dict(batch=self.batch, seq=self.seq, peft=self.peft, dtype=self.dtype,
                  mixed_precision=self.mixed_precision, attn=self.attn,
                  optimizer=self.optimizer, grad_checkpointing=self.grad_checkpointing)
        if self.distributed:
            kw.update(self.distributed)
        if self.loss_chunks != 1:
            kw["loss_chunks"] = self.loss_chunks
        if self.optimizer_in_backward:
            kw["optimizer_in_backward"] = True
        return kw

    def describe(self) -> dict:
        p = self.peft
        peft = {"method": p.method}
        if p.method in ("lora", "qlora"):
            peft.update(r=p.r, alpha=p.alpha, dropout=p.dropout,
                        targets=p.targets if isinstance(p.targets, str) or p.targets is None
                        else list(p.targets), adapter_dtype=p.adapter_dtype)
        if p.modules_to_save:
            peft["modules_to_save"] = list(p.modules_to_save)
        return {"model": self.model, "hardware": self.hardware, "batch": self.batch,
                "seq": self.seq, "grad_accum": self.grad_accum, "peft": peft,
                "dtype": self.dtype, "mixed_precision": self.mixed_precision, "attn": self.attn,
                "optimizer": self.optimizer, "grad_checkpointing": self.grad_checkpointing,
                "memory_scope": self.memory_scope,
                **({"loss_chunks": self.loss_chunks} if self.loss_chunks != 1 else {}),
                **({"optimizer_in_backward": True} if self.optimizer_in_backward else {}),
                **({"distributed": {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v)
                                    for k, v in self.distributed.items()}}
                   if self.distributed else {})}


@dataclass
class GemmMapping:
    """One measured forward GEMM (m x k) @ (k x n)."""
    hardware: str
    dtype: str
    m: int
    n: int
    k: int
    caveats: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"hardware": self.hardware, "dtype": self.dtype, "m": self.m, "n": self.n,
                "k": self.k}


@dataclass
class Result:
    id: str
    source: str
    metric: str
    status: str                       # evaluated | unsupported
    reason: str = ""
    kind: str = ""                    # step_time | tokens_per_s | memory | op_latency
    measured: float | None = None     # SI: seconds, bytes, tokens/s
    predicted: float | None = None
    unit: str = ""
    caveats: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mapping: dict | None = None

    @property
    def error(self) -> float | None:
        if self.measured is None or self.predicted is None:
            return None
        return self.predicted / self.measured - 1.0


# ---------------------------------------------------------------------------------------------
# reading


def default_csv() -> Path:
    """The repo's copy (validation/published/), or the one a wheel carries (_data/published/)."""
    repo = data_dir("validation") / "published" / CSV_NAME
    return repo if repo.is_file() else data_dir("published") / CSV_NAME


def load_rows(path: str | Path | None = None) -> list[dict]:
    p = Path(path) if path is not None else default_csv()
    if not p.is_file():
        raise SimcostError(f"no published-measurements CSV at '{p}'")
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "id" not in rows[0]:
        raise SimcostError(f"{p} has no 'id' column")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise SimcostError(f"{p} repeats row ids")
    return rows


def _int(text: str) -> int | None:
    m = re.search(r"\d+", text or "")
    return int(m.group()) if m else None


def parse_batch(text: str) -> tuple[int | None, int]:
    """'1 (GA 8)' -> (1, 8); '2' -> (2, 1); '' -> (None, 1)."""
    ga = re.search(r"GA\s*(\d+)", text or "")
    return _int(text), int(ga.group(1)) if ga else 1


def model_name(text: str) -> str | None:
    return MODELS.get((text or "").strip().lower())


def hardware_name(text: str) -> tuple[str | None, str | None]:
    t = (text or "").strip().lower()
    for pat, name, note in HARDWARE:
        if re.search(pat, t):
            return name, note
    return None, None


def parse_lora(text: str) -> dict:
    """'r=64 alpha=16 dropout=0.05 targets c_attn,c_proj,w1,w2' -> r, alpha, dropout, targets."""
    out = {}
    for key, pat in (("r", r"\br\s*=\s*(\d+)"), ("alpha", r"\b(?:alpha|a)\s*=\s*([\d.]+)"),
                     ("dropout", r"dropout\s*=\s*([\d.]+)")):
        m = re.search(pat, text or "")
        if m:
            out[key] = float(m.group(1)) if key != "r" else int(m.group(1))
    m = re.search(r"targets\s+([\w.,]+)", text or "")
    if m:
        out["targets"] = tuple(t for t in m.group(1).split(",") if t)
    return out


def metric_value(row: dict) -> tuple[str, float, str]:
    """(kind, value in SI units, unit note) of the row's metric; Unsupported when the metric
    is not one simcost predicts."""
    metric, raw = row["metric"], row["value"].strip()
    try:
        v = float(raw)
    except ValueError:
        raise Unsupported(f"value '{raw}' is not a number (a range or OOM)") from None
    if metric == "step_time_s":
        return "step_time", v, "s per optimizer step"
    if metric == "iterations_per_s":
        return "step_time", 1.0 / v, "s per step (1 / it/s)"
    if metric == "tokens_per_s":
        return "tokens_per_s", v, "tokens/s"
    if metric in ("peak_mem_GiB_per_gpu", "peak_mem_active_GiB"):
        return "memory", v * GIB, "GiB"
    if metric in ("mem_GB", "peak_gpu_mem_GB", "peak_mem_GB", "peak_mem_GB_per_gpu",
                  "peak_mem_reserved_GB", "mem_GB_total_all_gpus"):
        return "memory", v * GIB, "GB read as GiB"
    if metric == "latency_ms":
        return "op_latency", v * 1e-3, "ms"
    raise Unsupported(f"metric '{metric}' is not a single-device training or op quantity")


# ---------------------------------------------------------------------------------------------
# rules: what simcost cannot express yet

_SERVING = ("output_tokens_per_s", "throughput_req_s", "avg_first_token_latency_s",
            "avg_latency_s")


# sources whose multi-device runs are mapped onto a simcost plan (MLPerf: NeMo's configs;
# Qwen: finetune_lora_ds.sh / DeepSpeed; torchtune: the lora_finetune_distributed recipe, FSDP)
MULTI_DEVICE_SOURCES = ("MLPERF", "FT-QWEN", "FT-TORCHTUNE")


def _common_unsupported(row: dict) -> None:
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
    n = _int(row["n_devices"]) or 1
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
    _common_unsupported(row)
    src = source_of(row["id"])
    if src == "FT-QWEN":
        return _map_qwen(row)
    if src == "FT-TORCHTUNE":
        return _map_torchtune(row)
    if src == "INF-VIDUR-OP":
        return _map_vidur(row)
    if src == "MLPERF":
        return _map_mlperf(row)
    raise Unsupported(f"source {src}: no mapping")


def _hardware(row: dict, mp_notes: list) -> str:
    hw, note = hardware_name(row["hardware"])
    if hw is None:
        raise Unsupported(f"hardware '{row['hardware']}' is not stated or has no profile")
    if note:
        mp_notes.append(note)
    return hw


def _model(row: dict) -> str:
    m = model_name(row["model"])
    if m is None:
        raise Unsupported(f"model '{row['model']}' is not in simcost's zoo")
    return m


# Qwen v1 finetune.py -------------------------------------------------------------------------

def _map_qwen(row: dict) -> Mapping:
    method = row["method"].lower()
    if "q-lora" in method or "gptq" in row["quantization"].lower():
        raise Unsupported("Q-LoRA on a GPTQ Int4 checkpoint (AutoGPTQ kernels): simcost has "
                          "NF4 (bitsandbytes) only, no GPTQ format")
    if method.startswith("full_ft"):
        raise Unsupported("full-parameter runs use finetune/finetune_ds.sh: DeepSpeed ZeRO-2 "
                          "(ds_config_zero2.json) even on one GPU, whose fp32 partitions and "
                          "buckets are not modelled")
    if not method.startswith("lora"):
        raise Unsupported(f"method '{row['method']}' not mapped")
    notes: list[str] = []
    caveats: list[str] = []
    hw = _hardware(row, notes)
    batch, ga = parse_batch(row["batch_size"])
    seq = _int(row["seq_len"])
    lo = parse_lora(row["peft_config"])
    emb = "(emb)" in method or "embedding+lm_head" in row["peft_config"]
    kind = metric_value(row)[0]
    # HF Trainer --bf16 runs the LoRA branch under autocast (bf16 GEMMs) while peft < 0.7
    # (the README's "PyTorch 2.0" era, Nov 2023) stores the LoRA matrices in fp32: simcost
    # ties adapter storage and compute dtype, so memory rows take fp32 adapters, time rows bf16.
    adapter = None if kind == "memory" else "bf16"
    spec = PeftSpec("lora", r=lo.get("r", 64), alpha=lo.get("alpha", 16),
                    dropout=lo.get("dropout", 0.05),
                    targets=lo.get("targets", ("c_attn", "c_proj", "w1", "w2")),
                    adapter_dtype=adapter,
                    modules_to_save=("wte", "lm_head") if emb else ())
    notes.append("samples padded to model_max_length: exact sequence length")
    notes.append("LoRA matrices: fp32 storage (peft < 0.7), bf16 compute (autocast)")
    if kind == "memory":
        notes.append("memory 'G' read as GiB of device memory (CUDA context included)")
    if kind == "memory" and emb:
        caveats.append("torch 2.0 foreach AdamW keeps two parameter-sized temporaries "
                       "(simcost: one, as torch >= 2.1)")
    model = _model(row)
    from simcost.models.config import load_model
    cfg = load_model(model).config or {}
    max_pos = None
    if cfg.get("use_dynamic_ntk") and seq and seq > (cfg.get("seq_length") or 0):
        # Qwen v1 extends past seq_length with dynamic NTK RoPE + logn attention (the README
        # trains at up to 8192); simcost's zoo caps max_positions at seq_length
        max_pos = int(cfg.get("max_position_embeddings") or seq)
        notes.append(f"dynamic-NTK RoPE: positions up to max_position_embeddings={max_pos}")
    n = _int(row["n_devices"]) or 1
    dist, mem_dev, gbatch = None, 1, batch or 1
    if n > 1:
        if kind != "memory":
            raise Unsupported(f"multi-device speed ({n} GPUs on several servers): the "
                              "inter-server network of these runs is not stated")
        dist, mem_dev, gbatch = _qwen_distributed(row, n, batch or 1, ga, notes)
    return Mapping(model=model, hardware=hw, batch=gbatch, seq=seq,
                   peft=spec, grad_accum=ga, dtype="bf16", attn="flash", optimizer="adamw",
                   grad_checkpointing="on" in row["grad_ckpt"].lower(),
                   memory_scope="device", caveats=caveats, notes=notes, max_positions=max_pos,
                   distributed=dist, memory_devices=mem_dev)


def _qwen_distributed(row: dict, n: int, batch: int, ga: int, notes: list):
    """Qwen's multi-GPU LoRA runs: finetune/finetune_lora_ds.sh launches HF Trainer under
    torchrun with DeepSpeed; the default config is finetune/ds_config_zero2.json (ZeRO-2:
    optimizer state and gradients sharded, the frozen weights replicated), the 72B rows name
    ZeRO-3 (ds_config_zero3.json: the weights sharded too). Pure data parallelism, per-device
    batch 1; the metric sums device memory over the GPUs."""
    method = row["method"].lower()
    zero = 3 if "zero3" in method else 2
    m = re.search(r"(\d+) servers? x (\d+) gpus?", row["notes"].lower())
    nodes = int(m.group(1)) if m and int(m.group(1)) * int(m.group(2)) == n else None
    notes.append(f"{n} GPUs{f' on {nodes} nodes' if nodes else ''}: DeepSpeed ZeRO-{zero} "
                 f"data parallel (dp {n}, micro-batch {batch}, GA {ga}); memory = per-device "
                 f"peak x {n}")
    from simcost.models.config import load_model
    from simcost.sim.parallel import DeepSpeedZero
    hidden = load_model(_model(row)).hidden
    ds = DeepSpeedZero.from_config(QWEN_DS_ZERO[zero], hidden,
                                   source=f"QwenLM/Qwen finetune/ds_config_zero{zero}.json")
    notes.append(f"DeepSpeed buffers ({ds.source}): reduce_bucket_size {ds.reduce_bucket_size:.3g}"
                 f", overlap_comm {ds.overlap(zero)}, contiguous_gradients "
                 f"{ds.contiguous_gradients}; bf16 module, fp32 master/Adam partitions")
    dist = dict(devices=n, nodes=nodes, dp=n, zero=zero, micro_batch=batch, deepspeed=ds)
    return dist, n, n * batch * ga


# the zero_optimization sections of the ds_configs finetune_lora_ds.sh passes (QwenLM/Qwen
# finetune/ds_config_zero2.json @af22d5e, the script's default; ds_config_zero3.json for the
# "LoRA + DeepSpeed ZeRO3" 72B rows). "auto" is filled by HF transformers from the hidden size.
QWEN_DS_ZERO = {
    2: {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
        "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
        "contiguous_gradients": True},
    3: {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9},
}


# torchtune ---------------------------------------------------------------------------------

# the README 'optimization flags' table (Llama 3.2 3B): each row adds to the previous one,
# LoRA/QLoRA rows sit on packing + compile + chunked CE + AC + activation offloading
_TT_FLAGS = ["packed", "compile", "chunked_ce", "ac", "opt_in_bwd", "act_offload", "adamw8bit"]
_TT_STEPS = {"baseline": 0, "+packed dataset": 1, "+torch.compile": 2,
             "+chunked cross-entropy": 3, "+activation checkpointing": 4,
             "+optimizer step fused into backward": 5, "+activation offloading": 6,
             "+8-bit adamw": 7}


def _tt_table_flags(row: dict) -> set[str]:
    note = row["notes"].lower()
    for key, n in _TT_STEPS.items():
        if note.startswith(key):
            return set(_TT_FLAGS[:n])
    if note.startswith(("lora", "qlora")):
        return {"packed", "compile", "chunked_ce", "ac", "act_offload"}
    raise Unsupported(f"torchtune flags table row '{row['notes']}' not recognised")


def _map_torchtune(row: dict) -> Mapping:
    notes: list[str] = []
    caveats: list[str] = []
    seq_text = row["seq_len"].lower()
    loc = row["source_locator"].lower()
    kind = metric_value(row)[0]
    n = _int(row["n_devices"]) or 1
    if "optimization flags" in loc:
        flags = _tt_table_flags(row)
    else:
        flags = set()
        if re.search(r"(?<!un)packed", seq_text):
            flags.add("packed")
        if "torch.compile on" in loc or "compile=true" in row["notes"].lower():
            flags.add("compile")
        if "on" in row["grad_ckpt"].lower():
            flags.add("ac")
        opt = row["optimizer"].lower()
        if "optimizer_in_bwd" in opt or "fused into backward" in opt:
            flags.add("opt_in_bwd")
        if "paged" in opt or "8bit" in opt:
            flags.add("adamw8bit")
        if "fsdp cpu offload" in opt:
            flags.add("fsdp_cpu_offload")
        if "memory and training speed" in loc:
            # the README's Llama 3.1 table (2024-09-24) ran the configs of torchtune >= 0.3,
            # whose llama3_1 recipes use CEWithChunkedOutputLoss
            # (recipes/configs/llama3_1/8B_qlora_single_device.yaml, 70B_lora.yaml,
            # 70B_full.yaml, 405B_qlora.yaml); the row does not say it
            flags.add("chunked_ce")
            if n > 1 and "opt_in_bwd" in flags:
                # the README footnote is '**= Uses CPU offload with fused optimizer': the
                # 70B_full config's torch.optim.AdamW(fused=True) with fsdp_cpu_offload: True.
                # full_finetune_distributed gained optimizer_in_bwd only with torchtune PR
                # #1833 (merged 2024-10-14), after this table's commit (2024-09-24)
                flags.discard("opt_in_bwd")
                notes.append("optimizer NOT fused into backward (the row's reading of the "
                             "footnote 'CPU offload with fused optimizer'): "
                             "full_finetune_distributed had no optimizer_in_bwd before "
                             "torchtune PR #1833 (2024-10-14); the 70B_full config's "
                             "AdamW(fused=True) steps the CPU-offloaded shards after backward")
    if "packed" not in flags:
        raise Unsupported("sequence length is data-dependent (unpacked alpaca samples padded "
                          "per batch): not stated")
    if kind == "memory":
        missing = []
        if "act_offload" in flags:
            missing.append("activation offloading to host memory")
        if "paged" in row["optimizer"].lower():
            missing.append("paged 8-bit AdamW (state paged to host under pressure)")
        if missing:
            raise Unsupported("not modelled: " + "; ".join(missing))
        if "chunked_ce" in flags:
            notes.append("chunked cross-entropy: CEWithChunkedOutputLoss, num_output_chunks=8 "
                         "(its default), the recipe's `del logits` before backward")
        if "opt_in_bwd" in flags:
            notes.append("optimizer_in_bwd: one AdamW per parameter stepped from its "
                         "post-accumulate-grad hook, gradient then set to None")
    else:
        if "paged" in row["optimizer"].lower():
            caveats.append("paged optimizer: host paging under memory pressure not modelled")
        if "chunked_ce" in flags:
            caveats.append("chunked cross-entropy priced for memory only (its small time "
                           "effect, N smaller loss kernels, not modelled)")
        if "opt_in_bwd" in flags:
            caveats.append("optimizer step fused into backward: same optimizer work, priced "
                           "after the backward (no overlap modelled)")
        if "act_offload" in flags:
            caveats.append("activation offloading not modelled (copies overlap compute)")
    if "compile" in flags:
        caveats.append("torch.compile not modelled: eager kernels and eager saved tensors")
        if "chunked_ce" in flags and kind == "memory":
            caveats.append("compiled compute_cross_entropy may save other tensors than eager's "
                           "fp32 log-probabilities per chunk")
    if kind == "memory" and re.fullmatch(r"a100 \(80gb assumed\)", row["hardware"].strip().lower()):
        # the README says '8x A100'; a memory row is the torch allocator's count (CUDA
        # context excluded), which does not depend on the A100 variant
        hw = "a100-80gb-sxm"
        notes.append("'8x A100' (variant not stated): the allocator's bytes do not depend on "
                     "it; the a100-80gb-sxm profile is used")
    else:
        hw = _hardware(row, notes)
    batch, ga = parse_batch(row["batch_size"])
    seq = _int(row["seq_len"])
    method = row["method"].lower()
    cfg = row["peft_config"].lower()
    if method.startswith("full_ft"):
        spec = PeftSpec("full")
    elif method.startswith(("lora", "qlora")):
        lo = parse_lora(row["peft_config"])
        if "q,k,v,o + mlp" in cfg or "q,k,v,o+mlp" in cfg:
            targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj")
        elif re.search(r"\bq,k,v\b(?!,)", cfg):
            targets = ("q_proj", "k_proj", "v_proj")
        elif "q_proj,v_proj" in cfg or "q,v" in cfg:
            targets = ("q_proj", "v_proj")
        elif "default" in cfg or "not stated" in cfg or not cfg:
            # llama3_2/3B_lora_single_device: q, v, output_proj + MLP, rank 64, alpha 128
            targets = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            lo.setdefault("r", 64)
            lo.setdefault("alpha", 128)
            notes.append("LoRA config not stated: torchtune 3B default (q, v, output_proj, "
                         "MLP; r=64, alpha=128) assumed")
        else:
            raise Unsupported(f"LoRA config '{row['peft_config']}' not mapped")
        spec = PeftSpec("qlora" if method.startswith("qlora") else "lora", r=lo.get("r", 8),
                        alpha=lo.get("alpha", 16), dropout=0.0, targets=targets,
                        adapter_dtype="bf16")
    else:
        raise Unsupported(f"method '{row['method']}' not mapped")
    opt = "adamw8bit" if "adamw8bit" in flags else "adamw"
    notes.append("pure bf16 (parameters, adapters, optimizer state); attention as a fused "
                 "kernel over the packed length (document masking not modelled)")
    dist, gbatch = None, batch or 1
    if n > 1:
        # full_finetune_distributed / lora_finetune_distributed: FSDP2 fully_shard per
        # decoder layer = ZeRO-3 data parallelism, per-device batch from the row
        dist = dict(devices=n, dp=n, zero=3, micro_batch=batch or 1)
        gbatch = n * (batch or 1) * ga
        notes.append(f"{n} GPUs: FSDP full sharding (ZeRO-3 plan), dp {n}, micro-batch "
                     f"{batch or 1}, GA {ga}; memory per device")
        if "fsdp_cpu_offload" in flags:
            dist["offload"] = "params"
            notes.append("fsdp_cpu_offload: parameter and gradient shards and the AdamW step "
                         "on the host (plan offload 'params': two unsharded layers and one "
                         "layer's unreduced gradients on the device)")
    return Mapping(model=_model(row), hardware=hw, batch=gbatch, seq=seq, peft=spec,
                   grad_accum=ga, dtype="bf16", attn="flash", optimizer=opt,
                   grad_checkpointing="ac" in flags, memory_scope="torch_allocator",
                   caveats=caveats, notes=notes, distributed=dist,
                   loss_chunks=8 if "chunked_ce" in flags else 1,
                   optimizer_in_backward="opt_in_bwd" in flags)


# Vidur operator profiles ------------------------------------------------------------------------

def _map_vidur(row: dict) -> GemmMapping:
    m = re.search(r"\[T x (\d+)\] x \[(\d+) x (\d+)\]", row["notes"])
    t = _int(row["batch_size"])
    if not m or t is None:
        raise Unsupported("GEMM shape not stated")
    notes: list[str] = []
    hw = _hardware(row, notes)
    k, _, n = (int(x) for x in m.groups())
    return GemmMapping(hardware=hw, dtype=row["precision"].lower() or "fp16", m=t, n=n, k=k,
                       notes=notes)


# MLPerf Training llama2_70b_lora -------------------------------------------------------------

MLPERF_HARDWARE = [(r"h100", "h100-sxm"), (r"h200", "h200"), (r"gb300|b300", None),
                   (r"gb200", "gb200"), (r"b200|blackwell", "b200"), (r"l40s", "l40s"),
                   (r"mi300x", "mi300x")]


# (TP communication overlap, fp8 fused attention) where a system's NeMo config overrides
# config_common.sh (TP_COMM_OVERLAP=True, FP8_DPA=1): the L40S configs turn both off
# (training_results_v4.0 NVIDIA/benchmarks/llama2_70b_lora/implementations/nemo/
# config_L40S_16x4x2xtp4pp1cp2.sh and config_L40S_96x4x1xtp4pp1cp2.sh: TP_COMM_OVERLAP=False,
# FP8_DPA=False, NVTE_FP8_DPA_BWD=False)
MLPERF_SYSTEM_SETTINGS = {"l40s": (False, False)}


def _map_mlperf(row: dict) -> Mapping:
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
    n = _int(row["n_devices"]) or 1
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


# ---------------------------------------------------------------------------------------------
# prediction


def predict(mp: Mapping, kind: str) -> tuple[float, dict]:
    """The predicted value of ``kind`` for mapping ``mp`` and the estimate's breakdown."""
    from simcost.api import estimate_train

    if not mp.seq:
        raise Unsupported("sequence length not stated")

    r = estimate_train(mp.model, mp.hardware, max_positions=mp.max_positions,
                       **mp.estimate_kwargs())
    t = r.time_s
    micro = t["forward"] + t["backward"]
    step = mp.grad_accum * micro + t["optimizer"] + t.get("host_overhead", 0.0)
    if mp.distributed:          # the plan's step already holds accumulation and communication
        step = t["step"]
        micro = t["micro_step_forward"] + t["micro_step_backward"]
        how = "chosen by --parallel auto" if mp.distributed.get("parallel") == "auto" else "stated"
        mp.notes.append(f"plan {how}: {r.parallel['plan_label']}; "
                        f"exposed communication {t['communication_exposed']:.3f} s, "
                        f"bubble {t['pipeline_bubble']:.3f} s")
    mem = r.memory_bytes
    peak = mem["peak"]
    if mp.memory_scope == "torch_allocator":
        peak -= mem["runtime_overhead"]
    detail = {"step_s": step, "micro_step_s": micro, "forward_s": t["forward"],
              "backward_s": t["backward"], "optimizer_s": t["optimizer"],
              "peak_bytes": peak, "fits": r.fits,
              **{f"mem_{k}": v for k, v in mem.items()}}
    if kind == "step_time":
        return step, detail
    if kind == "tokens_per_s":
        return mp.batch * mp.seq * mp.grad_accum / step, detail
    if kind == "memory":
        return peak * mp.memory_devices, detail
    raise Unsupported(f"metric kind '{kind}' does not apply to a training estimate")


def predict_gemm(mp: GemmMapping) -> float:
    from simcost.hardware import load_profile
    from simcost.sim.timing import TimeModel

    tm = TimeModel.from_device(load_profile(mp.hardware).device())
    flops = 2.0 * mp.m * mp.n * mp.k
    nbytes = 2.0 * (mp.m * mp.k + mp.k * mp.n + mp.m * mp.n)
    return float(tm.phase_time(mp.dtype, [(1, mp.m, mp.n, mp.k)], flops, 0.0, nbytes, 1))


def evaluate_row(row: dict) -> Result:
    rid = row["id"]
    res = Result(id=rid, source=source_of(rid), metric=row["metric"], status="unsupported")
    try:
        mp = map_row(row)
        kind, measured, unit = metric_value(row)
        if isinstance(mp, GemmMapping):
            if kind != "op_latency":
                raise Unsupported(f"metric '{row['metric']}' on a GEMM row")
            pred = predict_gemm(mp)
        else:
            pred, detail = predict(mp, kind)
            if not detail["fits"]:
                mp.caveats.append(f"simcost predicts it does not fit "
                                  f"({detail['mem_peak'] / GIB:.1f} GiB > "
                                  f"{detail['mem_capacity'] / GIB:.0f} GiB)")
    except Unsupported as e:
        res.reason = str(e)
        return res
    except SimcostError as e:
        res.reason = f"simcost rejected the mapping: {e}"
        return res
    res.status = "evaluated"
    res.kind, res.measured, res.predicted, res.unit = kind, measured, float(pred), unit
    res.caveats, res.notes, res.mapping = list(mp.caveats), list(mp.notes), mp.describe()
    return res


def evaluate(rows: list[dict], source: str | None = None) -> list[Result]:
    out = []
    for row in rows:
        if source and not (source_of(row["id"]) == source or row["id"].startswith(source)):
            continue
        out.append(evaluate_row(row))
    return out


# ---------------------------------------------------------------------------------------------
# summary and report

KINDS = ("step_time", "tokens_per_s", "memory", "op_latency")
TIME_KINDS = ("step_time", "tokens_per_s")


def mape(results: list[Result]) -> float | None:
    errs = [abs(r.error) for r in results if r.error is not None]
    return sum(errs) / len(errs) if errs else None


def summarize(results: list[Result]) -> dict:
    """Per source: counts, MAPE of time (step time and tokens/s), memory and op latency,
    over all evaluated rows and over rows without caveats."""
    out = {}
    for src in sorted({r.source for r in results}):
        rs = [r for r in results if r.source == src]
        ev = [r for r in rs if r.status == "evaluated"]
        entry = {"rows": len(rs), "evaluated": len(ev), "unsupported": len(rs) - len(ev),
                 "with_caveats": sum(1 for r in ev if r.caveats)}
        for name, kinds in (("time", TIME_KINDS), ("memory", ("memory",)),
                            ("op_latency", ("op_latency",))):
            sel = [r for r in ev if r.kind in kinds]
            if sel:
                clean = [r for r in sel if not r.caveats]
                entry[name] = {"n": len(sel), "mape": mape(sel),
                               "n_exact": len(clean), "mape_exact": mape(clean),
                               "bias": sum(r.error for r in sel) / len(sel)}
        out[src] = entry
    return out


def _fmt(kind: str, v: float | None) -> str:
    if v is None:
        return "-"
    if kind == "memory":
        return f"{v / GIB:.2f} GiB"
    if kind == "op_latency":
        return f"{v * 1e3:.3f} ms"
    if kind == "tokens_per_s":
        return f"{v:.0f} tok/s"
    return f"{v:.3f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _ape(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def to_json(results: list[Result]) -> dict:
    rows = []
    for r in results:
        d = asdict(r)
        d["error"] = r.error
        rows.append(d)
    return {"summary": summarize(results), "rows": rows}


def to_markdown(results: list[Result], worst: int = 15) -> str:
    summ = summarize(results)
    ev = [r for r in results if r.status == "evaluated"]
    lines = ["# simcost vs published measurements", "",
             f"Rows: {len(results)}; evaluated: {len(ev)}; unsupported: "
             f"{len(results) - len(ev)}. Error = predicted / measured - 1. MAPE over evaluated "
             "rows; 'exact' = rows whose framework features simcost models in full "
             "(no caveats).", "",
             "| source | rows | evaluated | time n | time MAPE | time MAPE exact (n) | "
             "memory n | memory MAPE | memory MAPE exact (n) | op n | op MAPE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for src, e in summ.items():
        t, m, o = e.get("time"), e.get("memory"), e.get("op_latency")
        lines.append(
            f"| {src} | {e['rows']} | {e['evaluated']} | {t['n'] if t else 0} | "
            f"{_ape(t['mape']) if t else '-'} | "
            f"{(_ape(t['mape_exact']) + ' (' + str(t['n_exact']) + ')') if t else '-'} | "
            f"{m['n'] if m else 0} | {_ape(m['mape']) if m else '-'} | "
            f"{(_ape(m['mape_exact']) + ' (' + str(m['n_exact']) + ')') if m else '-'} | "
            f"{o['n'] if o else 0} | {_ape(o['mape']) if o else '-'} |")
    lines += ["", f"## Worst {worst} rows", "",
              "| id | metric | measured | predicted | error | caveats |", "|---|---|---:|---:|---:|---|"]
    for r in sorted(ev, key=lambda r: -abs(r.error))[:worst]:
        lines.append(f"| {r.id} | {r.metric} | {_fmt(r.kind, r.measured)} | "
                     f"{_fmt(r.kind, r.predicted)} | {_pct(r.error)} | {'; '.join(r.caveats)} |")
    for src in summ:
        rs = [r for r in ev if r.source == src]
        if not rs:
            continue
        lines += ["", f"## {src}: {SOURCES.get(src, '')}", "",
                  "| id | metric | measured | predicted | error | mapping |",
                  "|---|---|---:|---:|---:|---|"]
        for r in rs:
            mp = r.mapping or {}
            desc = ", ".join(f"{k}={v}" for k, v in mp.items() if k in
                             ("model", "hardware", "batch", "seq", "grad_accum", "optimizer",
                              "grad_checkpointing", "m", "n", "k"))
            lines.append(f"| {r.id} | {r.metric} | {_fmt(r.kind, r.measured)} | "
                         f"{_fmt(r.kind, r.predicted)} | {_pct(r.error)} | {desc} |")
    lines += ["", "## Unsupported rows", "", "| id | metric | reason |", "|---|---|---|"]
    for r in results:
        if r.status != "evaluated":
            lines.append(f"| {r.id} | {r.metric} | {r.reason} |")
    return "\n".join(lines) + "\n"


def print_report(results: list[Result], worst: int = 15, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    con = console or Console(width=None if sys.stdout.isatty() else 200)
    summ = summarize(results)
    ev = [r for r in results if r.status == "evaluated"]
    for src in summ:
        rs = [r for r in ev if r.source == src]
        if not rs:
            continue
        t = Table(title=f"{src}: {SOURCES.get(src, '')}", title_justify="left")
        for c in ("row", "metric", "measured", "predicted", "error", "caveats"):
            t.add_column(c, justify="right" if c in ("measured", "predicted", "error") else "left")
        for r in rs:
            t.add_row(r.id, r.metric, _fmt(r.kind, r.measured), _fmt(r.kind, r.predicted),
                      _pct(r.error), "; ".join(r.caveats))
        con.print(t)
    t = Table(title="MAPE per source (time = step time and tokens/s)", title_justify="left")
    for c in ("source", "rows", "evaluated", "unsupported", "time MAPE (n)", "exact (n)",
              "memory MAPE (n)", "exact (n)", "op MAPE (n)"):
        t.add_column(c, justify="left" if c == "source" else "right")

    def cell(e, key, exact=False):
        x = e.get(key)
        if not x:
            return "-"
        return (f"{_ape(x['mape_exact'])} ({x['n_exact']})" if exact
                else f"{_ape(x['mape'])} ({x['n']})")
    for src, e in summ.items():
        t.add_row(src, str(e["rows"]), str(e["evaluated"]), str(e["unsupported"]),
                  cell(e, "time"), cell(e, "time", True), cell(e, "memory"),
                  cell(e, "memory", True), cell(e, "op_latency"))
    con.print(t)
    t = Table(title=f"Worst {worst} rows", title_justify="left")
    for c in ("row", "metric", "measured", "predicted", "error", "caveats"):
        t.add_column(c)
    for r in sorted(ev, key=lambda r: -abs(r.error))[:worst]:
        t.add_row(r.id, r.metric, _fmt(r.kind, r.measured), _fmt(r.kind, r.predicted),
                  _pct(r.error), "; ".join(r.caveats))
    con.print(t)
    t = Table(title="Unsupported rows", title_justify="left")
    t.add_column("row")
    t.add_column("metric")
    t.add_column("reason")
    for r in results:
        if r.status != "evaluated":
            t.add_row(r.id, r.metric, r.reason)
    con.print(t)


def run_cli(args) -> int:
    """Entry point for ``simcost validate published`` (args: out_dir, source, optional csv)."""
    rows = load_rows(getattr(args, "csv", None))
    source = getattr(args, "source", None)
    results = evaluate(rows, source)
    if source and not results:
        raise SimcostError(f"no rows from source '{source}'; sources: "
                           f"{', '.join(sorted({source_of(r['id']) for r in rows}))}")
    print_report(results)
    out = Path(getattr(args, "out_dir", None) or "validation/reports")
    out.mkdir(parents=True, exist_ok=True)
    (out / "published.json").write_text(json.dumps(to_json(results), indent=1,
                                                   default=_json_default))
    (out / "published.md").write_text(to_markdown(results))
    return 0


def _json_default(o):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, tuple):
        return list(o)
    return str(o)
