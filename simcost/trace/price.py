"""Price a recorded step at concrete sizes (a :class:`~simcost.trace.compiled.CompiledTrace`).

Pricing at a new batch x sequence (or a whole numpy grid of them) evaluates the compiled size
expressions and the per-aten formulas (:mod:`simcost.trace.aten_costs`) only, with no
re-trace.

A backward call is *weight-gradient* work when its outputs are all free of the symbolic sizes
while some input carries them (:func:`simcost.trace.compiled._is_weight_grad`); the rest is
activation-gradient work. A
forward re-run in backward (``rec``: a checkpointed layer) is *recompute* work. Calls
without a formula are priced memory-bound by their bytes and listed in ``unpriced``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from simcost.trace.aten_costs import TMeta, aten_cost
from simcost.trace.compiled import CompiledTrace, Meta, Ref, compile_trace


@dataclass
class StepPrice:
    fwd_flops: object = 0
    fwd_matmul_flops: object = 0
    fwd_bytes: object = 0
    fwd_kernels: int = 0
    bwd_act_flops: object = 0
    bwd_act_matmul_flops: object = 0
    bwd_weight_flops: object = 0
    bwd_weight_matmul_flops: object = 0
    rec_flops: object = 0
    rec_matmul_flops: object = 0
    bwd_bytes: object = 0
    bwd_kernels: int = 0
    saved_bytes: object = 0
    unpriced: Counter = field(default_factory=Counter)

    @property
    def bwd_matmul_flops(self):
        return self.bwd_act_matmul_flops + self.bwd_weight_matmul_flops + self.rec_matmul_flops


@dataclass(slots=True)
class PricedCall:
    call: object             # the CCall
    cost: object             # its AtenCost for one instance
    count: int               # instances per step (its layer's count)
    weight_grad: bool        # backward work producing a parameter-shaped gradient
    covered: bool            # priced by a formula (else memory-bound by its bytes)


def evaluate(ct: CompiledTrace, dims: dict):
    """(per-call prices, the size values) at ``dims`` (numbers or numpy arrays)."""
    ct.check(dims)
    vals = ct.values(dims)

    def ev(x):
        t = type(x)
        if t is Meta:
            return TMeta(tuple(vals[s.i] if type(s) is Ref else s for s in x.shape), x.dtype)
        if t is Ref:
            return vals[x.i]
        if t is list:
            return [ev(v) for v in x]
        if t is tuple:
            return tuple(ev(v) for v in x)
        return x

    out = []
    counts = ct.counts
    static = ct.__dict__.setdefault("_static", {})   # costs that hold at any sizes
    for i, c in enumerate(ct.calls):
        hit = static.get(i) if c.static else None
        if hit is None:
            kw = {k: ev(v) for k, v in c.kwargs.items()} if c.kwargs else {}
            hit = aten_cost(c.name, ev(c.args), kw, ev(c.outs), c.tags)
            if c.static:
                static[i] = hit
        cost, covered = hit
        out.append(PricedCall(c, cost, counts.get(c.layer, 1) if c.layer is not None else 1,
                              c.weight_grad, covered))
    return out, vals


def byte_values(ct: CompiledTrace, vals: list, items) -> list:
    return [vals[b.i] if isinstance(b, Ref) else b for b in items]


def saved_bytes(ct: CompiledTrace, vals: list):
    total = 0
    for nb, w in ct.saved:
        total = total + (vals[nb.i] if isinstance(nb, Ref) else nb) * w
    return total


def price(ct: CompiledTrace, **dims) -> StepPrice:
    calls, vals = evaluate(ct, dims)
    p = totals(calls)
    p.saved_bytes = saved_bytes(ct, vals)
    return p


def totals(calls: list) -> StepPrice:
    """The step's work per phase from its priced calls (each as often as its layer runs);
    ``unpriced``: the calls per step priced by their bytes alone, per aten op."""
    p = StepPrice()
    for pc in calls:
        c, w, ph = pc.cost, pc.count, pc.call.phase
        if not pc.covered:
            p.unpriced[pc.call.name] += w
        if ph == "fwd":
            p.fwd_flops = p.fwd_flops + c.flops * w
            p.fwd_matmul_flops = p.fwd_matmul_flops + c.matmul_flops * w
            p.fwd_bytes = p.fwd_bytes + c.bytes * w
            p.fwd_kernels += c.kernels * w
            continue
        p.bwd_bytes = p.bwd_bytes + c.bytes * w
        p.bwd_kernels += c.kernels * w
        if ph == "rec":
            p.rec_flops = p.rec_flops + c.flops * w
            p.rec_matmul_flops = p.rec_matmul_flops + c.matmul_flops * w
        elif pc.weight_grad:
            p.bwd_weight_flops = p.bwd_weight_flops + c.flops * w
            p.bwd_weight_matmul_flops = p.bwd_weight_matmul_flops + c.matmul_flops * w
        else:
            p.bwd_act_flops = p.bwd_act_flops + c.flops * w
            p.bwd_act_matmul_flops = p.bwd_act_matmul_flops + c.matmul_flops * w
    return p


class Pricer:
    """``Pricer(trace).price(batch=..., seq=...)``: a recording compiled once, priced per size."""

    def __init__(self, trace):
        self.trace = trace
        self.compiled = compile_trace(trace)

    def price(self, **dims) -> StepPrice:
        return price(self.compiled, **dims)
