"""LoRA (and rsLoRA): y = W·x + s·B·A·dropout(x) on the target linears, as peft computes it.

peft casts the adapter to fp32 on a 16-bit base (``autocast_adapter_dtype``), so the branch
then runs on an fp32 copy of x and the sum is cast back to the base dtype.
"""
from __future__ import annotations

from simcost.graph.ir import Op, Param
from simcost.errors import SimcostError
from simcost.peft.base import LORA_DEFAULTS, linear_sites, model_type, register, rule_of, select
from simcost.peft.lora_params import apply_param_targets, split_targets
from simcost.peft.spec import validate
from simcost.peft.targeting import pattern_value


def adapter_dtype(spec, base_dtype: str) -> str:
    return spec.adapter_dtype or "fp32"


def lora_branch(g, seg, op, spec, *, prefix: str = "lora") -> tuple[list[Op], int, int]:
    """Ops computing s·B(A(dropout(cast(x)))) for linear ``op``: (ops, branch_out, cast_x)."""
    x = op.inputs[0]
    xt = g.tensors[x]
    w = op.params[0]
    d_out, d_in = w.shape
    ad = adapter_dtype(spec, xt.dtype)
    mod = op.module
    ops: list[Op] = []

    def emit(kind, name, inputs, shape, dtype, params=(), attrs=None):
        t = g.new_tensor(shape, dtype)
        ops.append(Op(f"{op.name}.{name}", kind, tuple(inputs), (t,), tuple(params),
                      dict(attrs or {}, adapter=True), f"{mod}.{name}"))
        return t

    lead = xt.shape[:-1]
    xin = x
    if ad != xt.dtype:
        xin = emit("copy", "cast_input", [x], xt.shape, ad)
    cast_x = xin
    if spec.dropout > 0:
        xin = emit("dropout", "lora_dropout", [xin], xt.shape, ad, attrs={"p": spec.dropout})
    a = emit("linear", "lora_A", [xin], lead + (spec.r,), ad,
             [Param(f"{mod}.lora_A.default.weight", (spec.r, d_in), ad, True, "adapter")])
    b = emit("linear", "lora_B", [a], lead + (d_out,), ad,
             [Param(f"{mod}.lora_B.default.weight", (d_out, spec.r), ad, True, "adapter")])
    return ops, b, cast_x


def add_back(g, op, ops, y: int, branch: int, name: str = "lora_add") -> int:
    """result = (result + branch).to(result dtype)."""
    yt, bt = g.tensors[y], g.tensors[branch]
    out_dtype = "fp32" if "fp32" in (yt.dtype, bt.dtype) else yt.dtype
    s = g.new_tensor(yt.shape, out_dtype)
    ops.append(Op(f"{op.name}.{name}", "add", (y, branch), (s,), (), {"adapter": True}, op.module))
    if out_dtype != yt.dtype:
        c = g.new_tensor(yt.shape, yt.dtype)
        ops.append(Op(f"{op.name}.cast_result", "copy", (s,), (c,), (), {"adapter": True}, op.module))
        s = c
    return s


def lora_targets(g, model, spec, targets=None):
    """(seg, op, site spec) for every linear LoRA adapts; the site spec carries that module's
    r and alpha (``rank_pattern`` / ``alpha_pattern``, peft's first matching key)."""
    if targets is None:
        targets = spec.targets if spec.targets is not None else LORA_DEFAULTS[model_type(model)]
        targets, _ = split_targets(model, targets)
    rp, ap = tuple(spec.rank_pattern), tuple(spec.alpha_pattern)

    def value(name):
        r, a = pattern_value(rp, name, spec.r), pattern_value(ap, name, spec.alpha)
        return spec if (r, a) == (spec.r, spec.alpha) else spec.with_(r=r, alpha=a)

    return select(g, rule_of(spec, targets), list(linear_sites(g)), "LoRA", value)


def apply_bias_option(g, spec, sites) -> None:
    if spec.bias == "all":
        for _, op in g.iter_ops():
            for p in op.params:
                if p.name.endswith(".bias"):
                    p.trainable = True
    elif spec.bias == "lora_only":
        for _, op, _ in sites:
            for p in op.params[1:]:
                p.trainable = True


@register("lora")
def apply(g, model, spec) -> None:
    validate(spec)
    targets = spec.targets if spec.targets is not None else LORA_DEFAULTS[model_type(model)]
    mods, params = split_targets(model, targets)
    if params and (spec.rank_pattern or spec.exclude):
        raise SimcostError("rank_pattern and exclude_modules are not modelled for LoRA on "
                           "Mixtral's router and expert parameters")
    sites = lora_targets(g, model, spec, mods) if (mods or not params) else []
    for seg, op, site in sites:
        y = op.outputs[0]
        ops, branch, _ = lora_branch(g, seg, op, site)
        scaled = g.new_tensor(g.tensors[branch].shape, g.tensors[branch].dtype)
        ops.append(Op(f"{op.name}.lora_scale", "scale", (branch,), (scaled,), (), {"adapter": True},
                      op.module))
        out = add_back(g, op, ops, y, scaled)
        g.insert_after(seg, op, ops, y, out)
    apply_param_targets(g, model, spec, params)
    apply_bias_option(g, spec, sites)
