"""TorchInductor's pointwise fusion (``pointwise`` rule, simcost.stack.fusions.inductor_pointwise;
cost: simcost.costs.fused.pointwise_fused), used by the ``torchtune-compile`` stack.

Invariants: a chain of N element-wise ops between two GEMMs is one kernel each way reading
its inputs and writing its outputs once; nothing fuses into a GEMM or attention; the compiled
graph never keeps more activations than eager, runs the same matmul FLOPs, and moves no more
element-wise bytes in fewer kernels.
"""
from __future__ import annotations

import pytest

from simcost import estimate_train
from simcost.graph import kinds as K
from simcost.graph.ir import ModelGraph, Op, Param, Segment
from simcost.models.config import load_model
from simcost.peft import PeftSpec
from simcost.pipeline import build_graph
from simcost.sim.analysis import analyse
from simcost.stack import load_stack
from simcost.stack.fusions import FUSIONS
from simcost.stack.fusions.inductor_pointwise import FUSIBLE

T, D = 1024, 256


def _chain(n: int):
    """linear -> n element-wise ops (add, scale, silu, mul, cast ...) -> linear, one block."""
    g = ModelGraph(1, T, "bf16")
    x = g.new_tensor((1, T, D), "bf16")
    h = g.new_tensor((1, T, D), "bf16")
    w1 = Param("l.{i}.a.weight", (D, D), "bf16", trainable=True)
    w2 = Param("l.{i}.b.weight", (D, D), "bf16", trainable=True)
    ops = [Op("a", K.LINEAR, (x,), (h,), (w1,), module="model.layers.{i}.a")]
    kinds = [K.ADD, K.SCALE, K.SILU, K.MUL, K.COPY, K.NEG, K.SIGMOID, K.TANH]
    cur = h
    for i in range(n):
        out = g.new_tensor((1, T, D), "bf16")
        k = kinds[i % len(kinds)]
        ins = (cur, x) if k in (K.ADD, K.MUL) else (cur,)
        ops.append(Op(f"pw{i}", k, ins, (out,), module=f"model.layers.{{i}}.pw{i}"))
        cur = out
    y = g.new_tensor((1, T, D), "bf16")
    ops.append(Op("b", K.LINEAR, (cur,), (y,), (w2,), module="model.layers.{i}.b"))
    g.segments = [Segment("block", ops, 1, 0, x, y)]
    return g


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_a_chain_of_n_pointwise_ops_is_one_kernel(n):
    eager = analyse(_chain(n))
    g = _chain(n)
    assert FUSIONS["pointwise"](g) == 1
    fused = analyse(g)
    pw = [r for r in fused.records if r.op.kind == K.POINTWISE_FUSED]
    assert len(pw) == 1 and len(pw[0].op.attrs["members"]) == n
    c = pw[0].cost
    assert c.fwd_kernels == 1 and c.bwd_kernels == 1
    # reads the GEMM output h and the block input x once, writes its one output once, plus
    # whatever it must save beyond those (nothing: every need is recomputed from h and x)
    tb = T * D * 2
    io = set(pw[0].op.inputs) | set(pw[0].op.outputs)
    extra = sum(g.tensors[s].nbytes for s in c.saved if not isinstance(s, tuple) and s not in io)
    assert c.fwd_bytes == 3 * tb + extra
    e_pw = [r for r in eager.records if r.op.kind not in (K.LINEAR,)]
    assert c.fwd_bytes <= sum(r.cost.fwd_bytes for r in e_pw)
    assert c.bwd_bytes <= sum(r.cost.bwd_bytes for r in e_pw)
    assert fused.activations_bytes <= eager.activations_bytes
    assert [r.op.kind for r in fused.records] == [K.LINEAR, K.POINTWISE_FUSED, K.LINEAR]


def _tt(stack, peft):
    return build_graph(load_model("llama-3.2-1b"), 2, 512, dtype="bf16", attn="flash",
                       peft=peft, device_kind="gpu", stack=load_stack(stack))


PEFTS = [PeftSpec("full"),
         PeftSpec("lora", r=16, alpha=32, dropout=0.0,
                  targets=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
         PeftSpec("lora", r=8, alpha=16, dropout=0.1, targets=("q_proj", "v_proj"))]


@pytest.mark.parametrize("peft", PEFTS, ids=["full", "lora-mlp", "lora-dropout"])
def test_compiled_layer_against_eager_torchtune(peft):
    g0, a0 = _tt("torchtune", peft)
    g1, a1 = _tt("torchtune-compile", peft)
    assert a1.activations_bytes <= a0.activations_bytes
    mm = ("fwd_matmul_flops", "bwd_act_matmul_flops", "bwd_weight_matmul_flops")
    for f in mm:
        assert a1.total(f) == pytest.approx(a0.total(f), rel=1e-12)

    def pointwise(a, field):
        return sum(getattr(r.cost, field) * r.count for r in a.records
                   if r.op.kind in FUSIBLE)
    for f in ("fwd_bytes", "bwd_bytes"):
        assert pointwise(a1, f) <= pointwise(a0, f)
    assert a1.total("fwd_kernels") < a0.total("fwd_kernels")
    assert a1.total("bwd_kernels") < a0.total("bwd_kernels")
    for r in a1.records:
        if r.op.kind == K.POINTWISE_FUSED:
            members = r.op.attrs["members"]
            assert all(m.kind in FUSIBLE for m in members)
            # per-layer compile: a group never leaves its decoder layer
            assert len({m.module.split(".{i}")[0] for m in members}) == 1


def test_residual_add_and_norm_save_the_stream_and_rstd_only():
    g, a = _tt("torchtune-compile", PEFTS[0])
    seg = g.segments.index(g.block_segments()[-1])
    r = next(r for r in a.records if r.segment == seg and r.op.kind == K.POINTWISE_FUSED
             and any(m.kind == K.RMS_NORM for m in r.op.attrs["members"])
             and any(m.kind == K.ADD for m in r.op.attrs["members"]))
    tokens, d = 2 * 512, 2048
    tids = [s for s in r.cost.saved if not isinstance(s, tuple)]
    new = [s[1] for s in r.cost.saved if isinstance(s, tuple)]
    assert len(tids) == 1 and g.tensors[tids[0]].nbytes == tokens * d * 2   # h, bf16
    assert tids[0] in r.op.outputs                                           # materialised
    assert new == [tokens * 4]                                               # fp32 rstd
    assert r.cost.fwd_kernels == 1


def test_split_segments_keep_their_own_members():
    """A LoRA model's first block sees a frozen input and is split off the rest; each copy's
    fused ops refer to that copy's tensors."""
    g, a = _tt("torchtune-compile", PEFTS[1])
    blocks = g.block_segments()
    assert len(blocks) >= 2
    per_seg = []
    for seg in blocks:
        others = {t for o in seg.ops if o.kind != K.POINTWISE_FUSED for t in o.outputs}
        made = set()
        for op in seg.ops:
            if op.kind == K.POINTWISE_FUSED:
                m_out = {t for m in op.attrs["members"] for t in m.outputs}
                assert set(op.outputs) <= m_out and m_out.isdisjoint(others)
                made |= m_out
        per_seg.append(made)
    assert per_seg[0] and per_seg[0].isdisjoint(per_seg[1])


def test_compile_is_faster_and_lighter_than_eager_on_a_torchtune_row():
    kw = dict(batch=2, seq=4096, peft="full", attn="flash", dtype="bf16",
              mixed_precision="none")
    e = estimate_train("llama-3.2-3b", "a100-80gb-sxm", stack="torchtune", **kw)
    c = estimate_train("llama-3.2-3b", "a100-80gb-sxm", stack="torchtune-compile", **kw)
    assert c.time_s["step"] < e.time_s["step"]
    assert c.memory_bytes["activations"] < e.memory_bytes["activations"]
