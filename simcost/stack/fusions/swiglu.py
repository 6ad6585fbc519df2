"""``swiglu`` / ``swiglu_unsloth``: ``silu(gate) * up`` as one kernel each way.

Eager (transformers ``LlamaMLP``: ``act_fn(gate_proj(x)) * up_proj(x)``) runs two kernels
forward and keeps gate (silu's input), silu(gate) and up (the product's factors). Fused
(:func:`simcost.costs.fused.swiglu_fused`) keeps gate and up only and recomputes silu in
backward:
- ``swiglu``: Liger ``src/liger_kernel/ops/swiglu.py`` ``LigerSiLUMulFunction``
  (``save_for_backward(a, b)``, backward one kernel writing da, db over a, b), which
  ``LigerSwiGLUMLP`` runs in every MLP; Megatron ``megatron/core/fusions/fused_bias_swiglu.py``
  (saves the fc1 output, gate and up, only).
- ``swiglu_unsloth``: Unsloth ``unsloth/kernels/swiglu.py`` (``swiglu_fg_kernel``,
  ``swiglu_DWf_DW_dfg_kernel``) runs inside ``LoRA_MLP`` (kernels/fast_lora.py), which
  ``FastLlamaModel.patch_peft_model`` installs only on MLPs whose gate, up and down
  projections all carry LoRA adapters without dropout; any other MLP runs HF's eager code, so
  the rule fuses those MLPs only. (LoRA_MLP's own handling of the LoRA products, which keeps
  X, e, g and no fp32 casts, is not modelled here.)

Pattern: a ``silu`` op whose output only feeds a ``mul`` (either operand); GPT-2's GELU and
the MoE experts' internal SwiGLU (one ``moe_experts`` op) do not match.
"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.stack.fusions import register
from simcost.stack.fusions._match import consumers, from_model, only_feeds


def _sites(g, seg) -> list:
    out = []
    for op in seg.ops:
        if op.kind != K.SILU or not from_model(op):
            continue
        users = consumers(seg, op.outputs[0])
        if len(users) == 1 and users[0].kind == K.MUL and from_model(users[0]) \
                and only_feeds(g, seg, op.outputs[0], users[0]):
            out.append((op, users[0]))
    return out


def _fuse(g, seg, silu, mul) -> None:
    a = silu.outputs[0]
    up = mul.inputs[1] if mul.inputs[0] == a else mul.inputs[0]
    mul.kind = K.SWIGLU_FUSED
    mul.inputs = (silu.inputs[0], up)
    seg.ops.remove(silu)


@register("swiglu")
def swiglu(g) -> int:
    n = 0
    for seg in g.segments:
        for silu, mul in _sites(g, seg):
            _fuse(g, seg, silu, mul)
            n += 1
    return n


def _lora_mlp(seg) -> bool:
    """Unsloth's fast LoRA MLP applies: gate, up and down projections of this block all have
    LoRA adapters (``<proj>.lora_A`` ops) and none has a dropout op."""
    names = {op.name for op in seg.ops}
    projs = [n.split(".")[0] for n in names if n.endswith(".lora_A")]
    mlp = [p for p in ("gate_proj", "up_proj", "down_proj") if p in projs]
    dropped = any(op.kind == K.DROPOUT and op.name.split(".")[0] in mlp for op in seg.ops)
    # patch_peft_model also needs the base linears without bias (``base_layer.bias is None``)
    biased = any(op.kind == K.LINEAR and op.name in mlp and len(op.params) > 1
                 for op in seg.ops)
    return len(mlp) == 3 and not dropped and not biased


@register("swiglu_unsloth")
def swiglu_unsloth(g) -> int:
    n = 0
    for seg in g.segments:
        for silu, mul in _sites(g, seg):
            if _lora_mlp(seg):
                _fuse(g, seg, silu, mul)
                n += 1
    return n
