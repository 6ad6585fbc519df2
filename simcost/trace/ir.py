"""A priced traced step as simcost's IR: a :class:`~simcost.graph.ir.ModelGraph` whose ops are
the recorded aten calls and an :class:`~simcost.sim.analysis.Analysis` of their costs, so the
time model (:func:`simcost.sim.timing.phase_times`), the optimizer and parameter memory, the
stacks' host and allocator terms and the reports work on it unchanged (no torch here).

- Segments: one per kept layer (``count`` = the layers it stands for; its forward, backward
  and recomputed calls together, as a decoder block is one segment of the hand-built graph),
  one per run of calls outside the layers (embedding, head, the loss's backward), and one
  holder segment per distinct layer count carrying the parameters (``held_params``), so
  ``g.params()`` yields each parameter with the number of layers it stands for.
- Ops: kind ``aten`` with the call's cost; an SDPA call is kind ``sdpa`` (``causal`` from its
  ``is_causal``), which is what a GPU profile prices at its fused-attention efficiency
  (FlashAttention runs there where the CPU trace ran torch's flash kernel for the CPU).
- A call after which the host reads a value the device made (``.item()``, linalg's error
  check) is marked ``sync``: the time model does not overlap host and device across it.
- A call's forward work goes into the op's forward fields; backward and recomputed forward
  work into its backward fields (weight-gradient work where :mod:`simcost.trace.price` says
  so), since both run in the backward phase.
"""
from __future__ import annotations

from simcost.costs.registry import OpCost
from simcost.graph import kinds as K
from simcost.graph.ir import ModelGraph, Op, Param, Segment
from simcost.sim.analysis import Analysis, OpRecord
from simcost.sim.train import param_counts
from simcost.trace.aten_costs import SYNCS

_SDPA = frozenset(f"aten._scaled_dot_product_{k}{b}.default"
                  for k in ("flash_attention", "flash_attention_for_cpu", "efficient_attention",
                            "cudnn_attention") for b in ("", "_backward"))


def _is_sdpa(name: str) -> bool:
    return name in _SDPA


def _causal(call) -> bool:
    """``is_causal`` of an SDPA call (forward: 5th argument; backward: 8th)."""
    if "is_causal" in call.kwargs:
        return bool(call.kwargs["is_causal"])
    i = 7 if call.name.endswith("backward.default") else 4
    return bool(call.args[i]) if len(call.args) > i else False


def op_cost(pc) -> OpCost:
    """The :class:`OpCost` of one priced call (forward fields, or backward ones)."""
    c = pc.cost
    if pc.call.phase == "fwd":
        return OpCost(fwd_flops=c.flops, fwd_matmul_flops=c.matmul_flops, fwd_bytes=c.bytes,
                      fwd_kernels=c.kernels, gemms_fwd=list(c.gemms), special_fwd=dict(c.special))
    cost = OpCost(fwd_kernels=0, bwd_bytes=c.bytes, bwd_kernels=c.kernels,
                  gemms_bwd=list(c.gemms), special_bwd=dict(c.special))
    if pc.weight_grad:
        cost.bwd_weight_flops, cost.bwd_weight_matmul_flops = c.flops, c.matmul_flops
    else:
        cost.bwd_act_flops, cost.bwd_act_matmul_flops = c.flops, c.matmul_flops
    return cost


def build_ir(ct, priced: list, *, batch, seq, dtype: str, saved=0,
             quantize: str = "none") -> tuple[ModelGraph, Analysis]:
    """``priced``: :func:`simcost.trace.price.evaluate`'s calls of ``ct`` (a CompiledTrace);
    ``saved``: the bytes autograd keeps for backward (the analysis's activations);
    ``quantize``: the frozen base stored as :mod:`simcost.trace.quantize` says. The segments
    and ops depend on the recording only, so they are made once per recording."""
    segments, placed = _structure(ct, quantize, dtype)
    g = ModelGraph(batch, seq, dtype)
    g.segments = segments
    g.meta["traced"] = True
    if getattr(ct, "_param_counts", None) is None:    # the model's, whatever its storage
        plain = ModelGraph(batch, seq, dtype)
        plain.segments = _structure(ct)[0]
        ct._param_counts = param_counts(plain)
    g.meta["param_counts"] = ct._param_counts
    records = [OpRecord(si, op, pc.count, (), True, op_cost(pc))
               for (si, op), pc in zip(placed, priced)]
    return g, Analysis(records, [0] * len(segments), 0, saved, 0)


def _structure(ct, quantize: str = "none", compute: str = "bf16") -> tuple[list, list]:
    """(segments, (segment index, op) per compiled call), cached on the recording per
    quantisation."""
    cache = ct.__dict__.setdefault("_ir", {})
    key = (quantize, compute if quantize != "none" else None)
    if key in cache:
        return cache[key]
    seg_of: dict = {}
    segments: list[Segment] = []
    placed = []
    run = 0
    prev = None
    for i, c in enumerate(ct.calls):
        if c.layer is None and (prev is None or prev[1] is not None or prev[0] != c.phase):
            run += 1
        prev = (c.phase, c.layer)
        key = ("layer", c.layer) if c.layer is not None else ("run", run)
        si = seg_of.get(key)
        if si is None:
            si = seg_of[key] = len(segments)
            count = ct.counts.get(c.layer, 1) if c.layer is not None else 1
            segments.append(Segment(f"layer{len(seg_of)}" if c.layer is not None else
                                    f"outside{run}", [], count,
                                    first_layer=len(seg_of) if c.layer is not None else None))
        sdpa = _is_sdpa(c.name)
        attrs = {"causal": _causal(c)} if sdpa else {}
        if c.name in SYNCS:
            attrs["sync"] = True
        op = Op(f"{c.name}#{i}", K.SDPA if sdpa else K.ATEN, (), (), attrs=attrs)
        segments[si].ops.append(op)
        placed.append((si, op))
    for count, params in _params_by_count(ct.params, quantize, compute).items():
        holder = Op(f"params[x{count}]", K.ATEN, (), (), attrs={"held_params": tuple(params)})
        segments.append(Segment(f"params_x{count}", [holder], count))
    cache[key] = (segments, placed)
    return cache[key]


def _params_by_count(table, quantize: str = "none", compute: str = "bf16") -> dict:
    from simcost.trace.quantize import quantized
    q = quantized(table, quantize)
    out: dict[int, list] = {}
    for p in table:
        role = "adapter" if p.added else "weight"
        if p.name in q:
            dt = "nf4" if quantize == "nf4" else "int8"
            out.setdefault(p.count, []).append(
                Param(p.name, tuple(p.shape), dt, False, role, compute_dtype=compute))
            if quantize == "int8":          # LLM.int8: one fp32 scale per output row
                out[p.count].append(Param(p.name + ".SCB", (p.shape[0],), "fp32", False,
                                          "quant_state"))
            continue
        out.setdefault(p.count, []).append(
            Param(p.name, tuple(p.shape), p.dtype, p.trainable, role))
    return out
