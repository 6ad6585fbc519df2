"""``lora_qkv`` / ``lora_o`` / ``lora_mlp``: Unsloth's fused LoRA autograd functions.

``FastLlamaModel.patch_peft_model`` (unsloth/models/llama.py) swaps a block's attention and
MLP forwards for ``apply_lora_qkv``, ``apply_lora_o`` and ``apply_lora_mlp_swiglu``
(unsloth/kernels/fast_lora.py) when the projections carry LoRA adapters without dropout:
q, k and v all adapted for ``LoRA_QKV``, o for ``LoRA_W``, gate, up and down for
``LoRA_MLP``, the base linears without bias; otherwise that part keeps peft's eager path. Each projection then computes
``matmul_lora``: the base GEMM plus ``(x·Aᵀ)·Bᵀ`` added in place in x's dtype, with no fp32
copy of x, no separate scale, add or cast kernels; backward is hand-written and keeps only
x (once for q, k and v) and, in ``LoRA_MLP``, the gate and up outputs (the down projection's
input is recomputed; the fused SwiGLU keeps those, :mod:`~simcost.stack.fusions.swiglu`).

The rule replaces peft's branch of each such projection (``cast_input``, ``lora_A``,
``lora_B``, ``lora_scale``, ``lora_add``, ``cast_result``) by one ``lora_fused`` op
(:func:`simcost.costs.fused.lora_fused`) that writes the branch's old result tensor, so
everything downstream is unchanged. The base linears stay as they are (their GEMMs, a QLoRA
dequantisation). List it after ``swiglu_unsloth`` (which tests for the LoRA branches).
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.graph.ir import Op
from simcost.stack.fusions import register
from simcost.stack.fusions.swiglu import _lora_mlp

GROUPS = {"lora_qkv": ("q_proj", "k_proj", "v_proj"), "lora_o": ("o_proj",),
          "lora_mlp": ("gate_proj", "up_proj", "down_proj")}
BRANCH = ("cast_input", "lora_A", "lora_B", "lora_scale", "lora_add", "cast_result")


def _branch(seg, base: Op) -> list[Op] | None:
    """peft's plain LoRA branch of ``base`` (no dropout, no DoRA), in order, or None."""
    ops = [op for op in seg.ops if op.attrs.get("adapter")
           and op.name.startswith(base.name + ".")]
    names = {op.name[len(base.name) + 1:] for op in ops}
    if not {"lora_A", "lora_B", "lora_scale", "lora_add"} <= names or names - set(BRANCH):
        return None
    return ops


def _fuse(seg, base: Op, ops: list[Op], recomputed_input: bool) -> None:
    by = {op.name[len(base.name) + 1:]: op for op in ops}
    final = (by.get("cast_result") or by["lora_add"]).outputs[0]
    params = (by["lora_A"].params[0], by["lora_B"].params[0])
    fused = Op(f"{base.name}.lora_fused", K.LORA_FUSED, (base.inputs[0], base.outputs[0]),
               (final,), params, {"adapter": True, "recomputed_input": recomputed_input},
               base.module)
    at = seg.ops.index(ops[0])
    for op in ops:
        seg.ops.remove(op)
    seg.ops.insert(at, fused)


def _apply(g, group: str) -> int:
    n = 0
    for seg in g.segments:
        # bias-free projections only (patch_peft_model checks ``base_layer.bias is None``)
        bases = {op.name: op for op in seg.ops if op.kind == K.LINEAR
                 and not op.attrs.get("adapter") and len(op.params) == 1}
        names = GROUPS[group]
        if not all(p in bases for p in names):
            continue
        if group == "lora_mlp" and not _lora_mlp(seg):
            continue
        branches = [_branch(seg, bases[p]) for p in names]
        if any(b is None for b in branches):
            continue          # Unsloth keeps peft's path unless every projection qualifies
        for p, ops in zip(names, branches):
            _fuse(seg, bases[p], ops, recomputed_input=group == "lora_mlp" and p == "down_proj")
            n += 1
    return n


@register("lora_qkv")
def lora_qkv(g) -> int:
    return _apply(g, "lora_qkv")


@register("lora_o")
def lora_o(g) -> int:
    return _apply(g, "lora_o")


@register("lora_mlp")
def lora_mlp(g) -> int:
    return _apply(g, "lora_mlp")
