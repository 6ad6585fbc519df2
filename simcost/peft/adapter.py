"""Serial (Houlsby) bottleneck adapters: after the attention output projection and after the
MLP output, h + up(act(down(h))) with a bottleneck of ``adapter_dim``. Not mergeable; sits on
the critical path. (peft has no Houlsby adapter; the cost follows the paper's placement.)"""
from __future__ import annotations

from simcost.graph import kinds as K
from simcost.graph.ir import Op, Param
from simcost.peft.base import register


@register("adapter")
def apply(g, model, spec) -> None:
    m = spec.adapter_dim
    d = model.hidden
    for seg in g.block_segments():
        sites = [op for op in seg.ops if op.kind == K.LINEAR and not op.attrs.get("adapter")
                 and op.module.split(".")[-1] in ("o_proj", "down_proj", "c_proj", "w2")
                 and g.tensors[op.outputs[0]].shape[-1] == d]
        for op in sites:
            y = op.outputs[0]
            yt = g.tensors[y]
            dt = yt.dtype
            name = "attn" if "attn" in op.module else "mlp"
            ops: list[Op] = []

            def emit(kind, nm, inputs, shape, params=(), attrs=None):
                t = g.new_tensor(shape, dt)
                ops.append(Op(f"adapter_{name}.{nm}", kind, tuple(inputs), (t,), tuple(params),
                              dict(attrs or {}, adapter=True), f"adapter_{name}"))
                return t

            lead = yt.shape[:-1]
            pre = op.module.rsplit(".", 1)[0]
            down = emit("linear", "down", [y], lead + (m,), [
                Param(f"{pre}.adapter.down.weight", (m, d), dt, True, "adapter"),
                Param(f"{pre}.adapter.down.bias", (m,), dt, True, "adapter")])
            act = emit("gelu", "act", [down], lead + (m,))
            up = emit("linear", "up", [act], yt.shape, [
                Param(f"{pre}.adapter.up.weight", (d, m), dt, True, "adapter"),
                Param(f"{pre}.adapter.up.bias", (d,), dt, True, "adapter")])
            out = emit("add", "residual", [y, up], yt.shape)
            g.insert_after(seg, op, ops, y, out)
