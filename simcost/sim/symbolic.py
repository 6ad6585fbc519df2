"""Trace a numeric computation of ``(batch, seq)`` once, replay it for new values.

The hand-built pipeline (graph → PEFT → analysis → time and memory) is the same Python code
for every ``batch`` x ``seq``: only the arithmetic on those two numbers changes. Running it
once with :class:`Sym` values in their place records that arithmetic (every operator and
numpy ufunc applied to a value that depends on them) as a straight-line program, which
:func:`trace` compiles to a Python function. Calling it with new values performs the very
same operations, in the same order, on the same types as the original code would, so its
results are bit-for-bit the original's.

Branches are guarded: where the traced code asked ``bool()`` of a traced value (``if``,
``max()``, a comparison), the program re-evaluates that condition and returns ``None`` when
it comes out differently (the caller then traces again at the new point). Anything the
program cannot replay faithfully (``float()``, ``int()``, hashing, formatting a traced value,
``np.asarray`` of one, a numpy function that is not a ufunc) raises :class:`Untraceable`
during the trace: the caller then prices that structure without a compiled form.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np


class Untraceable(TypeError):
    """The traced code did something with a traced value that a replay cannot repeat.

    A ``TypeError``, as ``int()`` of a numpy vector raises: code that probes whether a size is
    a plain integer (``simcost.models.attention._is_one``) treats a traced size as a vector."""


_BINARY = {
    "add": ("+", operator.add), "sub": ("-", operator.sub), "mul": ("*", operator.mul),
    "truediv": ("/", operator.truediv), "floordiv": ("//", operator.floordiv),
    "mod": ("%", operator.mod), "pow": ("**", operator.pow),
    "lt": ("<", operator.lt), "le": ("<=", operator.le), "gt": (">", operator.gt),
    "ge": (">=", operator.ge), "eq": ("==", operator.eq), "ne": ("!=", operator.ne),
}


class _Tape:
    """The program being recorded: one line per traced operation (shared sub-expressions
    recorded once), each with the names it reads, and the guards."""

    def __init__(self):
        self.lines: list[tuple[str | None, str, tuple]] = []   # (name or None: guard, code, reads)
        self.consts: list[Any] = []
        self.memo: dict[tuple, Sym] = {}
        self.n = 0

    def const(self, c) -> str:
        if type(c) is int or type(c) is bool:
            return repr(c)
        if type(c) is float and np.isfinite(c):
            return repr(c)           # repr round-trips a finite float exactly
        self.consts.append(c)
        return f"_c[{len(self.consts) - 1}]"

    def ref(self, x) -> str:
        return x.name if isinstance(x, Sym) else self.const(x)

    def key(self, x):
        if isinstance(x, Sym):
            return ("s", x.name)
        if isinstance(x, float):      # 0.0 and -0.0 are equal, and hash alike
            return ("c", type(x), repr(x))
        return ("c", type(x), x)

    def emit(self, expr_key: tuple, expr: str, value, reads: tuple) -> "Sym":
        try:
            hit = self.memo.get(expr_key)
        except TypeError:            # an unhashable constant: no sharing
            hit, expr_key = None, None
        if hit is not None:
            return hit
        name = f"v{self.n}"
        self.n += 1
        self.lines.append((name, f"{name} = {expr}", reads))
        s = Sym(value, name, self)
        if expr_key is not None:
            self.memo[expr_key] = s
        return s

    def guard(self, x: "Sym", outcome: bool) -> None:
        self.lines.append((None, f"if {'not ' if outcome else ''}{x.name}: return None",
                           (x.name,)))

    def body(self, outputs: list[str]) -> list[str]:
        """The lines the outputs and the guards need, in recorded order (the rest is work
        whose result the traced code dropped)."""
        live = set(outputs)
        keep = []
        for name, code, reads in reversed(self.lines):
            if name is None or name in live:
                keep.append(code)
                live.update(reads)
        keep.reverse()
        return keep


def _reads(*xs) -> tuple:
    return tuple(x.name for x in xs if isinstance(x, Sym))


# x op c == x exactly, for a constant c of exactly this type, where x has one of these types
_IDENTITY = {("mul", 1): (int, float, np.float64, np.int64), ("truediv", 1): (float, np.float64),
             ("add", 0): (int,), ("sub", 0): (int,)}


def _value(x):
    return x.v if isinstance(x, Sym) else x


def _binary(name: str, reflected: bool = False):
    sym, fn = _BINARY[name]

    def op(self, other):
        if isinstance(other, np.ndarray):
            raise Untraceable(f"a traced value {sym} a numpy array")
        a, b = (other, self) if reflected else (self, other)
        t = self.tape
        v = fn(_value(a), _value(b))
        if type(other) is int and (name, other) in _IDENTITY and (
                not reflected or name in ("mul", "add")) and type(self.v) in _IDENTITY[
                (name, other)] and type(v) is type(self.v):
            return self
        return t.emit((name, t.key(a), t.key(b)), f"{t.ref(a)} {sym} {t.ref(b)}", v,
                      _reads(a, b))
    return op


def _unary(fn: Callable, fmt: str):
    def op(self):
        t = self.tape
        return t.emit((fmt, t.key(self)), fmt.format(self.name), fn(self.v), (self.name,))
    return op


def _refuse(what: str):
    def op(self, *a, **k):
        raise Untraceable(f"{what} of a traced value")
    return op


class Sym:
    """A traced number: its value at the traced point and its name in the program."""
    __slots__ = ("v", "name", "tape")

    def __init__(self, v, name: str, tape: _Tape):
        self.v = v
        self.name = name
        self.tape = tape

    for _n in _BINARY:
        locals()[f"__{_n}__"] = _binary(_n)
    for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow"):
        locals()[f"__r{_n}__"] = _binary(_n, reflected=True)
    del _n
    __neg__ = _unary(operator.neg, "-{}")
    __pos__ = _unary(operator.pos, "+{}")
    __abs__ = _unary(abs, "abs({})")

    def __bool__(self) -> bool:
        out = bool(self.v)
        self.tape.guard(self, out)
        return out

    __int__ = __index__ = _refuse("int()")
    __float__ = _refuse("float()")
    __complex__ = _refuse("complex()")
    __hash__ = _refuse("hashing")        # type: ignore[assignment]
    __str__ = __repr__ = __format__ = _refuse("formatting")
    __array__ = _refuse("np.asarray()")
    __len__ = __iter__ = _refuse("iterating")
    __round__ = __trunc__ = __floor__ = __ceil__ = _refuse("rounding")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or kwargs or ufunc.nout != 1:
            raise Untraceable(f"np.{ufunc.__name__}.{method} of a traced value")
        if any(isinstance(x, np.ndarray) for x in inputs):
            raise Untraceable(f"np.{ufunc.__name__} of a traced value and a numpy array")
        t = self.tape
        v = ufunc(*(_value(x) for x in inputs))
        fn = _FAST_UFUNCS.get(ufunc) if type(v) is np.float64 and all(
            map(_plain_float, inputs)) else None
        args = ", ".join(t.ref(x) for x in inputs)
        return t.emit(("ufunc", ufunc.__name__, *(t.key(x) for x in inputs)),
                      f"{t.const(fn or ufunc)}({args})", v, _reads(*inputs))

    def __array_function__(self, func, types, args, kwargs):
        raise Untraceable(f"np.{getattr(func, '__name__', func)} of a traced value")


def _plain_float(x) -> bool:
    """A float64 scalar, or an integer constant float64 holds exactly: Python compares it
    with a float64 as numpy does."""
    if isinstance(x, Sym):
        return type(x.v) in (float, np.float64)
    if type(x) is int:
        return abs(x) < 2 ** 53
    return type(x) in (float, np.float64)


_F64 = np.float64


def _maximum(a, b):
    """``np.maximum`` of two float64 scalars (see :func:`_plain_float`), 15x faster: where
    they differ and neither is NaN the larger one, as a float64; otherwise numpy decides
    (NaN, and which zero of two signed zeros)."""
    if a > b:
        return a if type(a) is _F64 else _F64(a)
    if b > a:
        return b if type(b) is _F64 else _F64(b)
    return np.maximum(a, b)


def _minimum(a, b):
    """``np.minimum`` as :func:`_maximum`."""
    if a < b:
        return a if type(a) is _F64 else _F64(a)
    if b < a:
        return b if type(b) is _F64 else _F64(b)
    return np.minimum(a, b)


_FAST_UFUNCS = {np.maximum: _maximum, np.minimum: _minimum}


class Program:
    """The compiled trace: ``program(*args)`` gives the outputs' values, or ``None`` where a
    traced branch goes the other way for these arguments."""

    def __init__(self, fn: Callable, source: str, n_lines: int):
        self.fn = fn
        self.source = source
        self.n_lines = n_lines

    def __call__(self, *args):
        return self.fn(*args)


def trace(compute: Callable[..., Any], args: tuple, leaves: Callable[[Any], list]
          ) -> tuple[Any, list, Program]:
    """Run ``compute(*syms)`` with a :class:`Sym` for each of ``args`` (numbers), and compile
    what it did. ``leaves(result)`` lists the result's numbers in a fixed order; returns
    (result, their values at ``args``, the program giving them for other arguments).
    Raises :class:`Untraceable` (or whatever ``compute`` raises)."""
    tape = _Tape()
    names = [f"a{i}" for i in range(len(args))]
    syms = [Sym(a, n, tape) for a, n in zip(args, names)]
    result = compute(*syms)
    outs = leaves(result)
    values, refs = [], []
    for x in outs:
        if isinstance(x, np.ndarray):
            raise Untraceable("a numpy array among the results")
        values.append(_value(x))
        refs.append(tape.ref(x))
    lines = tape.body(refs)
    body = "\n    ".join(lines) or "pass"
    source = (f"def _program({', '.join(names)}):\n    {body}\n"
              f"    return ({', '.join(refs)}{',' if len(refs) == 1 else ''})\n")
    scope: dict[str, Any] = {"_c": tape.consts}
    exec(compile(source, "<simcost.sim.symbolic>", "exec"), scope)
    return result, values, Program(scope["_program"], source, len(lines))
