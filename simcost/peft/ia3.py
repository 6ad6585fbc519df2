"""(IA)³: learned vectors scale the output of the attention targets and the input of the
feed-forward targets (peft ``IA3Layer``); on a 16-bit base the vectors are fp32 and the scaled
tensor is cast back."""
from __future__ import annotations

import re

from simcost.graph.ir import Op, Param
from simcost.peft.base import IA3_DEFAULTS, linear_sites, model_type, register, rule_of, select


def is_feedforward(name: str, ff) -> bool:
    """peft's IA3 rule: a str is a full regex match, a list a plain suffix test."""
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(k) for k in ff)


@register("ia3")
def apply(g, model, spec) -> None:
    default_t, default_ff = IA3_DEFAULTS[model_type(model)]
    targets = spec.targets if spec.targets is not None else default_t
    # peft fills feedforward_modules from its table whenever the config leaves it unset
    ff = spec.feedforward_modules if spec.feedforward_modules is not None else default_ff
    for seg, op, is_ff in select(g, rule_of(spec, targets), list(linear_sites(g)), "(IA)3",
                                 lambda name: is_feedforward(name, ff)):
        d_out, d_in = op.params[0].shape
        vdt = spec.adapter_dtype or "fp32"
        x, y = op.inputs[0], op.outputs[0]
        xt = g.tensors[x]
        ops: list[Op] = []

        def emit(kind, nm, inputs, shape, dtype, params=(), attrs=None):
            t = g.new_tensor(shape, dtype)
            ops.append(Op(f"{op.name}.{nm}", kind, tuple(inputs), (t,), tuple(params),
                          dict(attrs or {}, adapter=True), op.module))
            return t

        if is_ff:
            vec = Param(f"{op.module}.ia3_l.default", (1, d_in), vdt, True, "adapter")
            xin = emit("copy", "ia3_cast", [x], xt.shape, vdt) if vdt != xt.dtype else x
            scaled = emit("mul_param", "ia3_scale", [xin], xt.shape, vdt, [vec], {"vector_copy": True})
            if vdt != xt.dtype:
                scaled = emit("copy", "ia3_cast_back", [scaled], xt.shape, xt.dtype)
            g.insert_before(seg, op, ops, x, scaled)
        else:
            vec = Param(f"{op.module}.ia3_l.default", (d_out, 1), vdt, True, "adapter")
            yt = g.tensors[y]
            out_dt = "fp32" if "fp32" in (vdt, yt.dtype) else yt.dtype
            scaled = emit("mul_param", "ia3_scale", [y], yt.shape, out_dt, [vec], {"vector_copy": True})
            if out_dt != yt.dtype:
                scaled = emit("copy", "ia3_cast_back", [scaled], yt.shape, yt.dtype)
            g.insert_after(seg, op, ops, y, scaled)
