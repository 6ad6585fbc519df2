"""``qkv_lora``: one LoRA adapter on the fused query-key-value projection, as NeMo builds it.

Megatron-Core computes q, k and v with one ``linear_qkv`` (TELayerNormColumnParallelLinear,
output q_dim + 2 kv_dim), and NeMo's LoRA on it is a single adapter: one dropout of the
layer input, one ``linear_in`` (A: hidden -> r) and one ``linear_out`` (B: r -> q_dim +
2 kv_dim) (NeMo nemo/collections/llm/peft/lora.py, ``LoRA(target_modules=["linear_qkv",
"linear_proj"])``; the MLPerf llama2_70b_lora configs' ``target_modules: ['attention']`` /
train.py ``target_modules=["linear_proj", "linear_qkv"]``, ``dropout_position="pre"``). peft on
the HF graph has three adapters on q_proj, k_proj and v_proj, each with its own dropout mask,
dropped copy of the input and A.

The rule rewrites the HF-shaped graph to NeMo's adapter: k's and v's B read q's A output
(B split by output columns is the fused B exactly), their dropouts and A's are removed. The
parameters become NeMo's (one A of hidden x r, B of r x (q_dim + 2 kv_dim)); the saved
tensors one mask and one dropped input instead of three; the A GEMM runs once.

Pattern: in one segment, the ``q_proj``, ``k_proj`` and ``v_proj`` LoRA adapters (peft ops
``<proj>.lora_dropout`` -> ``<proj>.lora_A`` -> ``<proj>.lora_B``) read the same input with
the same rank and dropout; adapters without dropout (an A straight on the input) fuse too.
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.stack.fusions import register

PROJS = ("q_proj", "k_proj", "v_proj")


def _adapter(seg, proj: str):
    """(dropout op or None, A op, B op) of ``proj``'s LoRA adapter in ``seg``, or None."""
    by_name = {op.name: op for op in seg.ops}
    a, b = by_name.get(f"{proj}.lora_A"), by_name.get(f"{proj}.lora_B")
    if a is None or b is None or a.kind != K.LINEAR or b.inputs != a.outputs:
        return None
    drop = by_name.get(f"{proj}.lora_dropout")
    if drop is not None and (drop.kind != K.DROPOUT or a.inputs != drop.outputs):
        return None
    return drop, a, b


def _source(ad) -> tuple:
    """What the adapter reads and how: (input tensor, dropout p, rank)."""
    drop, a, _ = ad
    x = drop.inputs[0] if drop is not None else a.inputs[0]
    p = drop.attrs.get("p") if drop is not None else None
    return x, p, a.params[0].shape


def _readers(seg, tid) -> list:
    return [op for op in seg.ops if tid in op.inputs]


@register("qkv_lora")
def qkv_lora(g) -> int:
    """Fuse each segment's q/k/v LoRA adapters into one; returns the segments fused."""
    n = 0
    for seg in g.segments:
        ads = [_adapter(seg, p) for p in PROJS]
        if any(ad is None for ad in ads) or len({_source(ad) for ad in ads}) != 1:
            continue
        # the removed dropouts' and A's outputs must feed nothing but their own adapter
        if any(len(_readers(seg, t)) != 1 for drop, a, _ in ads[1:]
               for t in ((drop.outputs[0],) if drop is not None else ()) + (a.outputs[0],)):
            continue
        shared = ads[0][1].outputs[0]
        for drop, a, b in ads[1:]:
            b.inputs = (shared,)
            seg.ops.remove(a)
            if drop is not None:
                seg.ops.remove(drop)
        n += 1
    return n
