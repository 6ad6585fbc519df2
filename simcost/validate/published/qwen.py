"""FT-QWEN: Qwen v1 ``finetune.py`` (HF Trainer), single-GPU LoRA and the multi-GPU
DeepSpeed LoRA runs' memory."""
from __future__ import annotations

import re

from simcost.peft.spec import PeftSpec
from simcost.validate.published.mapping import Mapping, register_mapper, row_hardware, row_model
from simcost.validate.published.rows import (Unsupported, first_int, metric_value, parse_batch,
                                             parse_lora)

@register_mapper("FT-QWEN")
def map_qwen(row: dict) -> Mapping:
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
    hw = row_hardware(row, notes)
    batch, ga = parse_batch(row["batch_size"])
    seq = first_int(row["seq_len"])
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
    model = row_model(row)
    from simcost.models.config import load_model
    cfg = load_model(model).config or {}
    max_pos = None
    if cfg.get("use_dynamic_ntk") and seq and seq > (cfg.get("seq_length") or 0):
        # Qwen v1 extends past seq_length with dynamic NTK RoPE + logn attention (the README
        # trains at up to 8192); simcost's zoo caps max_positions at seq_length
        max_pos = int(cfg.get("max_position_embeddings") or seq)
        notes.append(f"dynamic-NTK RoPE: positions up to max_position_embeddings={max_pos}")
    n = first_int(row["n_devices"]) or 1
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
    hidden = load_model(row_model(row)).hidden
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

