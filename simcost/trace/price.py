"""Price a recorded step (:class:`~simcost.trace.record.Trace`) at concrete sizes.

Every size expression of the recording is compiled once into one numpy function of the named
dimensions, so pricing at a new batch x sequence (or a whole numpy grid of them) evaluates
expressions and per-aten formulas (:mod:`simcost.trace.aten_costs`) only, with no re-trace.

A backward call is *weight-gradient* work when its outputs are all free of the symbolic sizes
while some input carries them (a reduction over tokens into a parameter-shaped gradient:
``dW = dYᵀ·X``, an embedding's dense gradient); the rest is activation-gradient work.
Calls without a formula are priced memory-bound by their bytes and listed in ``unpriced``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from simcost.trace.aten_costs import TMeta, aten_cost
from simcost.trace.record import SymMeta, Trace


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
    bwd_bytes: object = 0
    bwd_kernels: int = 0
    saved_bytes: object = 0
    unpriced: Counter = field(default_factory=Counter)

    @property
    def bwd_matmul_flops(self):
        return self.bwd_act_matmul_flops + self.bwd_weight_matmul_flops


def _exprs(x, out: dict) -> None:
    if isinstance(x, SymMeta):
        for s in x.shape:
            if not isinstance(s, int):
                out.setdefault(s, len(out))
    elif isinstance(x, (list, tuple)):
        for v in x:
            _exprs(v, out)
    elif isinstance(x, dict):
        for v in x.values():
            _exprs(v, out)
    elif hasattr(x, "free_symbols"):
        out.setdefault(x, len(out))


class Pricer:
    """The compiled size expressions of one trace; call :meth:`price` per set of sizes."""

    def __init__(self, trace: Trace):
        import sympy
        self.trace = trace
        index: dict = {}
        for c in trace.calls:
            if not c.is_view:
                _exprs((c.args, c.kwargs, c.outs), index)
        saved = trace.saved_expr()
        _exprs(saved, index)
        self.index = index
        self.names = sorted(trace.symbols)
        syms = [trace.symbols[n] for n in self.names]
        self._fn = sympy.lambdify(syms, list(index), "numpy") if index else None
        self._saved = saved

    def values(self, dims: dict) -> list:
        return self._fn(*(self.trace.size(n, dims) for n in self.names)) if self._fn else []

    def price(self, **dims) -> StepPrice:
        self.trace.check(**dims)
        vals = self.values(dims)
        index = self.index

        def ev(x):
            if isinstance(x, SymMeta):
                return TMeta(tuple(s if isinstance(s, int) else vals[index[s]] for s in x.shape),
                             x.dtype)
            if isinstance(x, list):
                return [ev(v) for v in x]
            if isinstance(x, tuple):
                return tuple(ev(v) for v in x)
            if hasattr(x, "free_symbols"):
                return vals[index[x]]
            return x

        p = StepPrice()
        for c in self.trace.calls:
            if c.is_view:
                continue
            cost, covered = aten_cost(c.name, ev(c.args), {k: ev(v) for k, v in c.kwargs.items()},
                                      ev(c.outs), c.tags)
            if not covered:
                p.unpriced[c.name] += 1
            w = self.trace.weight(c.layer)
            if w != 1:
                cost = _scaled(cost, w)
            if c.phase == "fwd":
                p.fwd_flops = p.fwd_flops + cost.flops
                p.fwd_matmul_flops = p.fwd_matmul_flops + cost.matmul_flops
                p.fwd_bytes = p.fwd_bytes + cost.bytes
                p.fwd_kernels += cost.kernels
                continue
            p.bwd_bytes = p.bwd_bytes + cost.bytes
            p.bwd_kernels += cost.kernels
            if _is_weight_grad(c):
                p.bwd_weight_flops = p.bwd_weight_flops + cost.flops
                p.bwd_weight_matmul_flops = p.bwd_weight_matmul_flops + cost.matmul_flops
            else:
                p.bwd_act_flops = p.bwd_act_flops + cost.flops
                p.bwd_act_matmul_flops = p.bwd_act_matmul_flops + cost.matmul_flops
        saved = self._saved
        p.saved_bytes = saved if isinstance(saved, int) else vals[index[saved]]
        return p


def _scaled(cost, w: int):
    cost.flops = cost.flops * w
    cost.matmul_flops = cost.matmul_flops * w
    cost.bytes = cost.bytes * w
    cost.kernels = cost.kernels * w
    return cost


def _symbolic(meta: SymMeta) -> bool:
    return any(not isinstance(s, int) for s in meta.shape)


def _is_weight_grad(call) -> bool:
    ins = [a for a in _flat(call.args) if isinstance(a, SymMeta)]
    return bool(call.outs) and not any(_symbolic(o) for o in call.outs) \
        and any(_symbolic(a) for a in ins)


def _flat(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)
    else:
        yield x
