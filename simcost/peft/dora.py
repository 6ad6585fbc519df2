"""DoRA (peft ``use_dora``): W' = m ⊙ (W + s·BA) / ‖W + s·BA‖ per output row.

Per step peft materialises BA by pushing an identity through A and B (i×i×r + i×r×o FLOPs),
takes the row norms of W + s·BA (detached, so nothing of it is saved), and per token computes
``(m/‖·‖ - 1)·(W·x) + (m/‖·‖)·s·B(A(x))``, which keeps the base output and the LoRA output.
With ``lora_dropout > 0`` both terms use the dropped input, so W·dropout(x) is computed a
second time (no bias) instead of reusing the layer's output.
"""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.graph.ir import Op, Param
from simcost.peft.base import LORA_DEFAULTS, model_type, register
from simcost.peft.lora import add_back, apply_bias_option, lora_branch, lora_targets
from simcost.peft.lora_params import split_targets
from simcost.peft.spec import validate


@register("dora")
def apply(g, model, spec) -> None:
    validate(spec)
    targets = spec.targets if spec.targets is not None else LORA_DEFAULTS[model_type(model)]
    if split_targets(model, targets)[1]:
        raise SimcostError("DoRA cannot adapt Mixtral's router or expert parameters (peft's "
                           "ParamWrapper has no DoRA); target the attention projections instead")
    sites = lora_targets(g, model, spec)
    for seg, op, site in sites:
        y = op.outputs[0]
        d_out, d_in = op.params[0].shape
        ops, branch, cast_x = lora_branch(g, seg, op, site)
        ad = g.tensors[branch].dtype
        # per-step weight norm (detached): its inputs are the layer's weights, not activations
        norm = g.new_tensor((d_out,), ad)
        lora_params = tuple(p for o in ops for p in o.params)
        ops.insert(0, Op(f"{op.name}.dora_weight_norm", "dora_weight_norm", (), (norm,),
                         (op.params[0],) + lora_params,
                         {"adapter": True, "detached": True, "r": site.r}, op.module))
        mag = Param(f"{op.module}.lora_magnitude_vector.default.weight", (d_out,), ad, True, "adapter")
        base = y
        if spec.dropout > 0:
            # peft's DoRA variant: with dropout it passes base_result=None, so the layer
            # recomputes F.linear(dropout(x), W) (no bias) on the dropped input
            xd = next(o for o in ops if o.name == f"{op.name}.lora_A").inputs[0]
            base = g.new_tensor(g.tensors[branch].shape, ad)
            # GPT-2's Conv1D (fan_in_fan_out) in the adapter dtype: peft's transpose() makes
            # W.T a fresh nn.Parameter that requires grad (see the dora_base_linear formula)
            leaf = model.family == "gpt2" and op.params[0].dtype == ad
            ops.append(Op(f"{op.name}.dora_base_linear", "dora_base_linear",
                          (xd, branch) if leaf else (xd,), (base,), (op.params[0],),
                          {"adapter": True, "param_leaf": leaf}, op.module))
        combo = g.new_tensor(g.tensors[branch].shape, ad)
        ops.append(Op(f"{op.name}.dora_combine", "dora_combine", (base, branch, norm), (combo,),
                      (mag,), {"adapter": True}, op.module))
        out = add_back(g, op, ops, y, combo)
        g.insert_after(seg, op, ops, y, out)
    apply_bias_option(g, spec, sites)
