"""LST, ladder side-tuning (Sung et al. 2022, arXiv 2206.06522).

A small *side network* of width ``d / reduction`` (default 8) runs beside the frozen backbone.
Every backbone layer's output is down-projected by a trainable *ladder* linear and mixed into the
side state with a learned gate (μ·ladder(hᵢ) + (1-μ)·sᵢ₋₁); a side block (RMSNorm, up linear,
SiLU, down linear, residual) then updates the side state. The embedding output seeds the side
state, and the final side state is up-projected to ``d`` and added to the backbone's last hidden
state ahead of the frozen final norm and LM head.

Nothing of the backbone trains and nothing upstream of a ladder needs a gradient, so the
gradient-flow analysis finds no backward through the backbone and no backbone tensor saved
except the layer outputs the ladders read (their weight gradient needs them). The side block
is MLP-only (the paper's side transformer also has a narrow attention; it is not modelled).
"""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.graph.ir import Op, Param
from simcost.peft.base import blocks, register


def _lin(g, ops, name, module, x, d_in, d_out, dtype, pname):
    t = g.new_tensor(g.tensors[x].shape[:-1] + (d_out,), dtype)
    ops.append(Op(name, "linear", (x,), (t,),
                  (Param(f"{pname}.weight", (d_out, d_in), dtype, True, "adapter"),),
                  {"adapter": True}, module))
    return t


def _like(g, ops, kind, name, module, inputs, params=()):
    src = g.tensors[inputs[0]]
    t = g.new_tensor(src.shape, src.dtype)
    ops.append(Op(name, kind, tuple(inputs), (t,), tuple(params), {"adapter": True}, module))
    return t


@register("lst")
def apply(g, model, spec) -> None:
    r = spec.side_reduction
    if r < 1 or model.hidden % r:
        raise SimcostError(f"LST reduction must divide the hidden size {model.hidden}, got {r}")
    ds = model.hidden // r
    dff = max(1, model.ffn // r)
    dt = spec.adapter_dtype or g.dtype
    # the prologue: s0 = down(embedding output)
    pro = g.segments[0]
    h0 = pro.output_tid
    ops: list[Op] = []
    x = h0
    if g.tensors[h0].dtype != dt:
        x = _like(g, ops, "copy", "lst.cast_embed", "side", [h0])
        g.tensors[x].dtype = dt
    s0 = _lin(g, ops, "lst.embed_down", "side.embed_down", x, model.hidden, ds, dt,
              "side.embed_down")
    pro.ops.extend(ops)
    pro.aux_out = s0
    for seg in blocks(g):
        h = seg.output_tid
        shape = g.tensors[h].shape[:-1] + (ds,)
        s_prev = g.new_tensor(shape, dt)
        seg.aux_in = s_prev
        pre = "side.layers.{i}"
        ops = []
        x = h
        if g.tensors[h].dtype != dt:
            x = _like(g, ops, "copy", "lst.cast_ladder", pre, [h])
            g.tensors[x].dtype = dt
        lad = _lin(g, ops, "lst.ladder", f"{pre}.ladder", x, model.hidden, ds, dt, f"{pre}.ladder")
        gate = Param(f"{pre}.gate", (1,), dt, True, "adapter")
        a = _like(g, ops, "mul_param", "lst.gate_ladder", f"{pre}.gate", [lad], [gate])
        b = _like(g, ops, "mul_param", "lst.gate_side", f"{pre}.gate", [s_prev], [gate])
        mixed = _like(g, ops, "add", "lst.gate_add", f"{pre}.gate", [a, b])
        normed = _like(g, ops, "rms_norm", "lst.norm", f"{pre}.norm", [mixed],
                       [Param(f"{pre}.norm.weight", (ds,), dt, True, "adapter")])
        up = _lin(g, ops, "lst.up", f"{pre}.up", normed, ds, dff, dt, f"{pre}.up")
        act = _like(g, ops, "silu", "lst.act", f"{pre}.act", [up])
        down = _lin(g, ops, "lst.down", f"{pre}.down", act, dff, ds, dt, f"{pre}.down")
        seg.aux_out = _like(g, ops, "add", "lst.residual", pre, [mixed, down])
        seg.ops.extend(ops)
    # the head: h_L + up(s_L) feeds the frozen final norm and LM head
    head = g.segments[-1]
    x = head.input_tid
    s_last = g.new_tensor(g.tensors[x].shape[:-1] + (ds,), dt)
    head.aux_in = s_last
    ops = []
    up = _lin(g, ops, "lst.side_up", "side.up", s_last, ds, model.hidden, dt, "side.up")
    if dt != g.tensors[x].dtype:
        c = _like(g, ops, "copy", "lst.cast_up", "side.up", [up])
        g.tensors[c].dtype = g.tensors[x].dtype
        up = c
    out = _like(g, ops, "add", "lst.merge", "side", [x, up])
    g.insert_before(head, head.ops[0], ops, x, out)
