"""A recorded step compiled for pricing: no sympy, no torch, picklable (the trace cache stores it).

Every size expression of a :class:`~simcost.trace.record.Trace` (tensor shapes, saved and
allocated bytes, guards) is printed once as numpy source: one function of the named sizes
returns all of them, so pricing a step at new sizes, or a whole sweep of them as numpy arrays,
evaluates that function and the per-aten formulas (:mod:`simcost.trace.aten_costs`) only.
In the compiled calls an expression is a :class:`Ref` to its place in that function's result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simcost.errors import SimcostError


@dataclass(frozen=True, slots=True)
class Ref:
    """A size expression: the ``i``-th value of :meth:`CompiledTrace.values`."""
    i: int


@dataclass(frozen=True, slots=True)
class Meta:
    """A tensor argument: sizes as ints or :class:`Ref`."""
    shape: tuple
    dtype: str


@dataclass(frozen=True, slots=True)
class CCall:
    name: str
    phase: str               # 'fwd', 'bwd', or 'rec' (a checkpointed forward recomputed in backward)
    args: tuple
    kwargs: dict
    outs: tuple
    tags: frozenset
    layer: object            # the kept layer (an int) or None
    weight_grad: bool = False  # backward work making a parameter-shaped gradient
    static: bool = False       # no size expression in it: its cost is the same at any sizes
    params: tuple = ()         # names of the parameters among its arguments


@dataclass
class CompiledTrace:
    names: tuple             # the named sizes, in the order the value function takes them
    source: str              # numpy source of ``_values(*names) -> list``
    guards: list             # (text, index of a boolean value)
    specialized: dict        # size name -> the value the recording holds for
    calls: list              # CCall, views left out
    saved: list              # (nbytes: int | Ref, layers it stands for)
    storage_bytes: list      # storage id -> int | Ref
    events: list             # (+1 | -1, storage id, call index into ``calls``)
    births: dict             # storage id -> call index into ``calls``
    counts: dict             # kept layer -> layers it stands for
    params: list             # simcost.trace.record.ParamInfo per parameter
    params_total: int
    params_trainable: int
    fwd_calls: int           # calls[0:fwd_calls] are the forward
    layer_outputs: frozenset = frozenset()   # hidden states a kept layer returned
    layer_inputs: dict = field(default_factory=dict)  # hidden state -> kept layers it entered
    _fn: object = None

    def __getstate__(self):
        """What is pickled: the recording, not what is derived from it in a process (the
        compiled value function, the IR structure, the timeline)."""
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_fn", "_ir", "_timeline", "_param_counts", "_static")}

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._fn = None

    def fn(self):
        if self._fn is None:
            ns: dict = {"numpy": np}
            exec(self.source, ns)        # noqa: S102 -- our own printed expressions
            self._fn = ns["_values"]
        return self._fn

    def size(self, name: str, dims: dict):
        if name in self.specialized:
            return self.specialized[name]
        if name not in dims:
            raise SimcostError(f"the traced step needs the size {name}")
        return dims[name]

    def check(self, dims: dict) -> None:
        """Refuse sizes this recording does not describe (a specialisation or a guard)."""
        for name, v in self.specialized.items():
            if name in dims and np.any(np.asarray(dims[name]) != v):
                raise SimcostError(f"the traced step fixed {name} to {v} (the model needs a "
                                   f"concrete size there); trace again at {name}={_show(dims[name])}")
        if self.guards:
            vals = self.values(dims)
            for text, i in self.guards:
                if not np.all(vals[i]):
                    raise SimcostError(f"the traced step holds only where {text}; trace again "
                                       f"at these sizes")

    def values(self, dims: dict) -> list:
        return self.fn()(*(self.size(n, dims) for n in self.names))


def _show(v):
    a = np.asarray(v)
    return int(a) if a.ndim == 0 else f"{int(a.min())}..{int(a.max())}"


def compile_trace(trace) -> CompiledTrace:
    """The :class:`CompiledTrace` of a :class:`~simcost.trace.record.Trace`."""
    index: dict = {}
    names = tuple(sorted(trace.symbols))
    import sympy
    subs = {trace.symbols[n]: sympy.Symbol(n) for n in names}

    def ref(x):
        if isinstance(x, int):
            return x
        if getattr(x, "is_number", False):
            return int(x)
        if x not in index:
            index[x] = len(index)
        return Ref(index[x])

    def conv(x):
        from simcost.trace.record import SymMeta
        if isinstance(x, SymMeta):
            return Meta(tuple(ref(s) for s in x.shape), x.dtype)
        if isinstance(x, list):
            return [conv(v) for v in x]
        if isinstance(x, tuple):
            return tuple(conv(v) for v in x)
        if hasattr(x, "free_symbols"):
            return ref(x)
        return x

    calls, remap = [], {}
    for i, c in enumerate(trace.calls):
        if c.is_view:
            continue
        remap[i] = len(calls)
        args, outs = conv(c.args), conv(c.outs)
        kwargs = {k: conv(v) for k, v in c.kwargs.items()}
        calls.append(CCall(c.name, c.phase, args, kwargs, outs, c.tags, c.layer,
                           c.phase == "bwd" and _is_weight_grad(args, outs),
                           not _has_ref((args, kwargs, outs)), c.params))
    saved = [(ref(nb), trace.weight(trace.saved_layer.get(sid))) for sid, nb in trace.saved.items()]
    storage = [ref(b) for b in trace.storage_bytes]
    guards = [(str(g.xreplace(subs)), ref(g).i) for g in trace.guards]
    return CompiledTrace(names, _source(index, [trace.symbols[n] for n in names]), guards,
                         dict(trace.specialized), calls, saved, storage,
                         [(s, sid, _after(remap, i)) for s, sid, i in trace.events],
                         {sid: _after(remap, i) for sid, i in trace.births.items()},
                         dict(trace.counts), list(trace.params), trace.params_total,
                         trace.params_trainable, sum(1 for i in remap if i < trace.fwd_calls),
                         frozenset(trace.layer_outputs), dict(trace.layer_inputs))


def _is_weight_grad(args, outs) -> bool:
    """Its outputs are all free of the symbolic sizes while an input carries them: a
    reduction over the tokens into a parameter-shaped gradient (``dW = dYᵀ·X``, an
    embedding's dense gradient)."""
    def symbolic(m):
        return any(isinstance(s, Ref) for s in m.shape)

    ins = [a for a in _flat(args) if isinstance(a, Meta)]
    return bool(outs) and not any(symbolic(o) for o in outs) and any(symbolic(a) for a in ins)


def _has_ref(x) -> bool:
    if isinstance(x, Ref):
        return True
    if isinstance(x, Meta):
        return any(isinstance(s, Ref) for s in x.shape)
    if isinstance(x, (list, tuple)):
        return any(_has_ref(v) for v in x)
    if isinstance(x, dict):
        return any(_has_ref(v) for v in x.values())
    return False


def _flat(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)
    else:
        yield x


def _after(remap: dict, i: int) -> int:
    """The compiled index of recorded call ``i`` (a view: the next kept call's)."""
    while i not in remap and i >= 0:
        i -= 1
    return remap.get(i, 0)


def _source(index: dict, symbols: list) -> str:
    """``_values(*symbols)``: every indexed expression, in index order, as numpy source."""
    p = _printer()
    args = ", ".join(p.doprint(s) for s in symbols)
    body = ", ".join(p.doprint(e) for e in index)
    return f"def _values({args}):\n    return [{body}]\n"


def _printer():
    from sympy.printing.numpy import NumPyPrinter

    class Printer(NumPyPrinter):
        """numpy source of torch's symbolic-shape expressions (torch.utils._sympy.functions)."""

        def _bin(self, e, op):
            return f"(({self._print(e.args[0])}) {op} ({self._print(e.args[1])}))"

        def _print_FloorDiv(self, e):
            return self._bin(e, "//")

        _print_CleanDiv = _print_FloorDiv

        def _print_CeilDiv(self, e):
            return f"(-((-({self._print(e.args[0])})) // ({self._print(e.args[1])})))"

        def _print_PythonMod(self, e):
            return self._bin(e, "%")

        _print_Mod = _print_PythonMod

        def _print_IntTrueDiv(self, e):
            return self._bin(e, "/")

        def _print_Max(self, e):
            out = self._print(e.args[0])
            for a in e.args[1:]:
                out = f"numpy.maximum({out}, {self._print(a)})"
            return out

        def _print_Min(self, e):
            out = self._print(e.args[0])
            for a in e.args[1:]:
                out = f"numpy.minimum({out}, {self._print(a)})"
            return out

        def _print_ToFloat(self, e):
            return f"(1.0 * ({self._print(e.args[0])}))"

        def _print_TruncToInt(self, e):
            return f"numpy.trunc({self._print(e.args[0])})"

    return Printer({"fully_qualified_modules": True, "allow_unknown_functions": False})
