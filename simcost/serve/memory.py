"""Serving memory: weights, KV cache, adapter weights, and the pool they share.

- Weights: the base model's parameters at the serving dtype (fp16/bf16 2 B, fp8/int8 1 B,
  int4 0.5 B + one fp16 scale per 128-weight group as AWQ/GPTQ store them, nf4 per
  :mod:`simcost.dtypes`), sharded over ``tp`` ranks (Megatron column/row split; norms and
  embeddings: the embedding and head are vocab-parallel, norms replicated).
- KV cache per token: ``2 · L · n_kv · d_h · bytes`` (K and V, every layer, GQA's ``n_kv``
  heads), per rank ``/ tp`` (KV heads are split across ranks; a rank holds at least one).
  Prefix tuning adds ``num_virtual_tokens`` cached tokens per request (peft's
  ``past_key_values``), prompt tuning adds the same number of *input* tokens.
- Adapter bytes: ``L · Σ_targets r · (in + out) · bytes`` (A is ``r × in``, B is ``out × r``).
- Unified paging (S-LoRA, arXiv:2311.03285 §4.1): KV cache and resident adapter weights share
  one pool of pages of ``hidden`` elements; a KV token takes 2 pages per layer, an adapter of
  rank r takes r pages per (layer, A/B matrix of width hidden). In bytes the pool is simply
  shared, so the model keeps a byte budget ``pool_bytes`` that KV reservations and resident
  adapters draw from.
"""
from __future__ import annotations

from dataclasses import dataclass

from simcost.dtypes import BYTES
from simcost.errors import SimcostError
from simcost.models.config import ModelSpec

WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0 + 2 / 4096,
                "int4": 0.5 + 2 / 128, "nf4": BYTES["nf4"]}
KV_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0}

# LoRA target projections -> (in, out) features for a Llama-family block
def target_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    h = spec.hidden
    return {"q_proj": (h, spec.q_dim), "k_proj": (h, spec.kv_dim), "v_proj": (h, spec.kv_dim),
            "o_proj": (spec.q_dim, h), "gate_proj": (h, spec.ffn), "up_proj": (h, spec.ffn),
            "down_proj": (spec.ffn, h)}


def resolve_targets(spec: ModelSpec, targets) -> list[str]:
    shapes = target_shapes(spec)
    if targets is None:
        return ["q_proj", "k_proj", "v_proj", "o_proj"]   # S-LoRA's evaluated adapters
    if isinstance(targets, str):
        targets = ["all-linear"] if targets == "all-linear" else [t for t in targets.split(",") if t]
    if list(targets) == ["all-linear"]:
        return list(shapes)
    bad = [t for t in targets if t not in shapes]
    if bad:
        raise SimcostError(f"unknown LoRA target '{bad[0]}' for serving; valid: {', '.join(shapes)}")
    return list(targets)


def base_params(spec: ModelSpec) -> dict:
    """Parameter counts: per block (linear, norm) and outside the blocks."""
    h = spec.hidden
    attn = h * spec.q_dim + 2 * h * spec.kv_dim + spec.q_dim * h
    if spec.attn_bias:
        attn += spec.q_dim + 2 * spec.kv_dim
    n_exp = max(spec.experts, 1)
    mlp = n_exp * 3 * h * spec.ffn + (h * spec.experts if spec.experts else 0)
    norms = 2 * h
    emb = spec.vocab * h
    head = 0 if spec.tie_embeddings else spec.vocab * h
    return {"block_linear": attn + mlp, "block_norm": norms, "embedding": emb, "head": head,
            "final_norm": h,
            "total": spec.layers * (attn + mlp + norms) + emb + head + h}


def weight_bytes(spec: ModelSpec, wdtype: str, tp: int = 1, act_dtype: str = "fp16") -> float:
    """Per-rank bytes of the base weights. Embedding and norms stay at the activation dtype
    (quantisers leave them unquantised); the head too, except for fp8 checkpoints."""
    if wdtype not in WEIGHT_BYTES:
        raise SimcostError(f"unknown weight dtype '{wdtype}'; valid: {', '.join(WEIGHT_BYTES)}")
    p = base_params(spec)
    wb = WEIGHT_BYTES[wdtype]
    ab = WEIGHT_BYTES[act_dtype]
    lin = spec.layers * p["block_linear"] * wb / tp
    other = (p["embedding"] + p["head"]) * ab / tp + (spec.layers * p["block_norm"] + p["final_norm"]) * ab
    return lin + other


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str = "fp16", tp: int = 1) -> float:
    """K and V of one token in every layer: ``2·L·n_kv·d_h·bytes`` per rank."""
    if kv_dtype not in KV_BYTES:
        raise SimcostError(f"unknown KV-cache dtype '{kv_dtype}'; valid: {', '.join(KV_BYTES)}")
    kv_heads = max(1, -(-spec.kv_heads // tp))
    return 2.0 * spec.layers * kv_heads * spec.head_dim * KV_BYTES[kv_dtype]


def adapter_bytes(spec: ModelSpec, rank: int, targets: list[str], dtype: str = "fp16",
                  tp: int = 1) -> float:
    shapes = target_shapes(spec)
    return spec.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets) \
        * WEIGHT_BYTES[dtype] / tp


def workspace_bytes(spec: ModelSpec, max_tokens: int, max_seqs: int, tp: int = 1,
                    act_bytes: float = 2.0) -> float:
    """Peak transient activations of one forward over ``max_tokens`` tokens (no autograd: one
    layer's intermediates live at a time): the fused gate/up output (2·ffn), its activation
    (ffn), qkv and the residual stream; plus fp32 logits for the last token of each sequence."""
    per_tok = (3 * spec.ffn / tp + (spec.q_dim + 2 * spec.kv_dim) / tp + 3 * spec.hidden) * act_bytes
    return max_tokens * per_tok + max_seqs * spec.vocab / tp * 4.0


@dataclass(frozen=True)
class ServeMemory:
    capacity: float            # device bytes
    usable: float              # capacity x gpu_memory_utilization
    weights: float
    runtime_overhead: float
    workspace: float
    pool: float                # what is left for KV cache and resident adapters
    kv_per_token: float
    adapter_bytes: dict        # rank -> bytes of one adapter

    @property
    def kv_tokens(self) -> int:
        return int(max(self.pool, 0) // self.kv_per_token)

    def as_dict(self) -> dict:
        return {"capacity": self.capacity, "usable": self.usable, "weights": self.weights,
                "runtime_overhead": self.runtime_overhead, "workspace": self.workspace,
                # what is left for KV and adapters, and by how much the rest overflows usable
                # memory when nothing is left (then nothing fits)
                "pool": max(self.pool, 0.0), "pool_shortfall": max(-self.pool, 0.0),
                "kv_per_token": self.kv_per_token,
                "kv_tokens_capacity": self.kv_tokens,
                "adapter_bytes": {str(k): v for k, v in self.adapter_bytes.items()}}


def serve_memory(spec: ModelSpec, device, *, wdtype: str, act_dtype: str, kv_dtype: str, tp: int,
                 ranks, targets, max_tokens: int, max_seqs: int,
                 gpu_memory_utilization: float = 0.9) -> ServeMemory:
    cap = device.memory_bytes
    usable = cap * gpu_memory_utilization
    w = weight_bytes(spec, wdtype, tp, act_dtype)
    ws = workspace_bytes(spec, max_tokens, max_seqs, tp, WEIGHT_BYTES[act_dtype])
    pool = usable - w - device.runtime_overhead_bytes - ws
    ab = {int(r): adapter_bytes(spec, int(r), targets, act_dtype, tp) for r in set(ranks)}
    return ServeMemory(cap, usable, w, device.runtime_overhead_bytes, ws, pool,
                       kv_bytes_per_token(spec, kv_dtype, tp), ab)


def adapters_that_fit(pool_bytes: float, kv_reserve_bytes: float, adapter_bytes_by_rank: dict,
                      ranks, limit: int | None = None) -> int:
    """How many adapters (ranks cycled as the adapter ids cycle them) stay resident in the
    per-device pool beside ``kv_reserve_bytes`` of KV cache: the pool less that reserve over
    the mean adapter's bytes, at most ``limit`` (the adapters there are)."""
    by_rank = {int(k): float(v) for k, v in adapter_bytes_by_rank.items()}
    sizes = [by_rank[int(r)] for r in ranks]
    mean = sum(sizes) / len(sizes)
    free = max(pool_bytes - kv_reserve_bytes, 0.0)
    n = int(free // mean) if mean > 0 else (limit or 0)
    return n if limit is None else min(n, limit)
