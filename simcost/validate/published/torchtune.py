"""FT-TORCHTUNE: torchtune recipes in pure bf16 (parameters, LoRA matrices and AdamW state all
bf16, no master copy), activation checkpointing per decoder layer, packed sequences (exact
length; attention modelled as a fused kernel), memory from ``torch.cuda.memory_stats``
(GiB, CUDA context excluded)."""
from __future__ import annotations

import re

from simcost.peft.spec import PeftSpec
from simcost.validate.published.mapping import Mapping, register_mapper, row_hardware, row_model
from simcost.validate.published.rows import (Unsupported, first_int, metric_value, parse_batch,
                                             parse_lora)

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


def _tt_row_flags(row: dict, n: int, notes: list[str]) -> set[str]:
    """The recipe features a row outside the flags table states (its sequence, locator,
    checkpointing and optimizer columns)."""
    loc = row["source_locator"].lower()
    flags = set()
    if re.search(r"(?<!un)packed", row["seq_len"].lower()):
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
    return flags


def _tt_flag_effects(row: dict, flags: set[str], kind: str, notes: list[str],
                     caveats: list[str]) -> None:
    """What each feature does to a memory or a time row: modelled (a note), not modelled but
    small (a caveat) or not modelled (Unsupported)."""
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
        caveats.append("torch.compile: Inductor's pointwise fusion per layer modelled "
                       "(stack torchtune-compile); the compiled loss is priced eager")
        if "chunked_ce" in flags and kind == "memory":
            caveats.append("compiled compute_cross_entropy may save other tensors than eager's "
                           "fp32 log-probabilities per chunk")


def _tt_hardware(row: dict, kind: str, notes: list[str]) -> str:
    if kind == "memory" and re.fullmatch(r"a100 \(80gb assumed\)", row["hardware"].strip().lower()):
        # the README says '8x A100'; a memory row is the torch allocator's count (CUDA
        # context excluded), which does not depend on the A100 variant
        notes.append("'8x A100' (variant not stated): the allocator's bytes do not depend on "
                     "it; the a100-80gb-sxm profile is used")
        return "a100-80gb-sxm"
    return row_hardware(row, notes)


def _tt_lora_targets(row: dict, lo: dict, notes: list[str]) -> tuple[str, ...]:
    """The LoRA target modules the row's peft_config names (torchtune's defaults if none)."""
    cfg = row["peft_config"].lower()
    if "q,k,v,o + mlp" in cfg or "q,k,v,o+mlp" in cfg:
        return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if re.search(r"\bq,k,v\b(?!,)", cfg):
        return ("q_proj", "k_proj", "v_proj")
    if "q_proj,v_proj" in cfg or "q,v" in cfg:
        return ("q_proj", "v_proj")
    if "default" in cfg or "not stated" in cfg or not cfg:
        # llama3_2/3B_lora_single_device: q, v, output_proj + MLP, rank 64, alpha 128
        lo.setdefault("r", 64)
        lo.setdefault("alpha", 128)
        notes.append("LoRA config not stated: torchtune 3B default (q, v, output_proj, "
                     "MLP; r=64, alpha=128) assumed")
        return ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    raise Unsupported(f"LoRA config '{row['peft_config']}' not mapped")


def _tt_peft(row: dict, notes: list[str]) -> PeftSpec:
    method = row["method"].lower()
    if method.startswith("full_ft"):
        return PeftSpec("full")
    if not method.startswith(("lora", "qlora")):
        raise Unsupported(f"method '{row['method']}' not mapped")
    lo = parse_lora(row["peft_config"])
    targets = _tt_lora_targets(row, lo, notes)
    return PeftSpec("qlora" if method.startswith("qlora") else "lora", r=lo.get("r", 8),
                    alpha=lo.get("alpha", 16), dropout=0.0, targets=targets,
                    adapter_dtype="bf16")


def _tt_distributed(n: int, batch: int, ga: int, flags: set[str], notes: list[str]) -> dict:
    """full_finetune_distributed / lora_finetune_distributed: FSDP2 fully_shard per decoder
    layer = ZeRO-3 data parallelism, per-device batch from the row."""
    dist = dict(devices=n, dp=n, zero=3, micro_batch=batch)
    notes.append(f"{n} GPUs: FSDP full sharding (ZeRO-3 plan), dp {n}, micro-batch "
                 f"{batch}, GA {ga}; memory per device")
    if "fsdp_cpu_offload" in flags:
        dist["offload"] = "params"
        notes.append("fsdp_cpu_offload: parameter and gradient shards and the AdamW step "
                     "on the host (plan offload 'params': two unsharded layers and one "
                     "layer's unreduced gradients on the device)")
    return dist


@register_mapper("FT-TORCHTUNE")
def map_torchtune(row: dict) -> Mapping:
    notes: list[str] = []
    caveats: list[str] = []
    kind = metric_value(row)[0]
    n = first_int(row["n_devices"]) or 1
    if "optimization flags" in row["source_locator"].lower():
        flags = _tt_table_flags(row)
    else:
        flags = _tt_row_flags(row, n, notes)
    if "packed" not in flags:
        raise Unsupported("sequence length is data-dependent (unpacked alpaca samples padded "
                          "per batch): not stated")
    _tt_flag_effects(row, flags, kind, notes, caveats)
    hw = _tt_hardware(row, kind, notes)
    batch, ga = parse_batch(row["batch_size"])
    seq = first_int(row["seq_len"])
    spec = _tt_peft(row, notes)
    opt = "adamw8bit" if "adamw8bit" in flags else "adamw"
    notes.append("pure bf16 (parameters, adapters, optimizer state); attention as a fused "
                 "kernel over the packed length (document masking not modelled)")
    dist, gbatch = None, batch or 1
    if n > 1:
        dist = _tt_distributed(n, batch or 1, ga, flags, notes)
        gbatch = n * (batch or 1) * ga
    return Mapping(model=row_model(row), hardware=hw, batch=gbatch, seq=seq, peft=spec,
                   grad_accum=ga, dtype="bf16", attn="flash", optimizer=opt,
                   grad_checkpointing="ac" in flags, memory_scope="torch_allocator",
                   stack="torchtune-compile" if "compile" in flags else "torchtune",
                   caveats=caveats, notes=notes, distributed=dist,
                   loss_chunks=8 if "chunked_ce" in flags else 1,
                   optimizer_in_backward="opt_in_bwd" in flags)
