"""One structure's training-step numbers as a compiled function of ``(batch, seq)``.

For a fixed model, method, precision, device and stack, the hand-built pipeline does the same
Python work at every ``batch`` x ``seq``; :class:`CompiledNumbers` traces it once
(:mod:`simcost.sim.symbolic`) and afterwards evaluates only the arithmetic on ``batch`` and
``seq`` that the pipeline would do, giving bit-identical :class:`TrainNumbers`.

- The first call runs the plain pipeline (a one-off estimate pays for no trace); the next
  call at a point no program covers traces there and checks the trace against a plain run (type
  and value of every number); a structure whose code the trace cannot follow (or that fails
  the check) is priced by the plain pipeline from then on.
- A program whose guarded branch goes the other way at a new point (a kernel choice, a
  ``max``) returns ``None``: the point is traced again and the program kept beside the
  first, up to :data:`MAX_PROGRAMS`; beyond that the plain pipeline prices it.
- A replay that raises an arithmetic error (Python's, where numpy would warn) hands the
  point to the plain pipeline, which behaves as it always did.
- ``batch == 1`` is its own structure (a different tensor layout,
  :data:`simcost.models.attention.UNIT_BATCH_LAYOUT`): the caller keys it separately; here a
  unit batch is passed to the pipeline as the plain integer 1, as the plain path does.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from simcost.sim.symbolic import Untraceable, trace
from simcost.sim.train import TrainNumbers

MAX_PROGRAMS = 8


def _leaves(n: TrainNumbers) -> list:
    return [n.params_total, n.params_added, n.params_trainable, *n.flops.values(),
            *n.memory_bytes.values(), *n.time_s.values(), n.tokens_per_s, n.fits]


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if a == b:
        return True
    try:
        return math.isnan(a) and math.isnan(b)
    except TypeError:
        return False


class CompiledNumbers:
    """``numbers(batch, seq)`` by the compiled trace of ``compute(batch, seq)`` (the plain
    pipeline, returning :class:`TrainNumbers`); ``unit_batch``: ``batch`` is always 1."""

    def __init__(self, compute: Callable[[object, object], TrainNumbers], unit_batch: bool):
        self.compute = compute
        self.unit_batch = unit_batch
        self.programs: list = []
        self.template: TrainNumbers | None = None
        self.traceable = True
        self.why: str | None = None    # why not, when not
        self.seen = False              # a plain call made: the next uncovered call traces

    def __call__(self, batch: int, seq: int) -> TrainNumbers:
        for prog in self.programs:
            try:
                vals = prog(batch, seq)
            except ArithmeticError:    # (Python's, where numpy warns): as the plain run does
                return self.compute(batch, seq)
            if vals is not None:
                return self._numbers(vals)
        if not self.traceable or len(self.programs) >= MAX_PROGRAMS:
            return self.compute(batch, seq)
        if not self.seen:
            # the first call of a structure runs the plain pipeline: a one-off estimate (the
            # CLI's) does not pay for a trace it would never replay
            self.seen = True
            return self.compute(batch, seq)
        return self._trace(batch, seq)

    def _trace(self, batch: int, seq: int) -> TrainNumbers:
        plain = self.compute(batch, seq)
        unit = self.unit_batch

        def run(b, s):
            return self.compute(1 if unit else b, s)
        try:
            traced, values, prog = trace(run, (batch, seq), _leaves)
        except Untraceable as e:
            self.traceable, self.why = False, str(e)
            return plain
        want = _leaves(plain)
        replay = prog(batch, seq)
        if (traced.warnings != plain.warnings or list(traced.flops) != list(plain.flops)
                or list(traced.memory_bytes) != list(plain.memory_bytes)
                or list(traced.time_s) != list(plain.time_s) or replay is None
                or not all(map(_same, want, values)) or not all(map(_same, want, replay))):
            self.traceable, self.why = False, "the trace does not reproduce the plain run"
            return plain
        if self.template is None:
            self.template = plain
        elif (list(self.template.flops), list(self.template.memory_bytes),
              list(self.template.time_s), self.template.warnings) != (
                list(plain.flops), list(plain.memory_bytes), list(plain.time_s),
                plain.warnings):
            self.traceable, self.why = False, "another branch names other numbers"
            return plain
        self.programs.append(prog)
        return plain

    def _numbers(self, v) -> TrainNumbers:
        t = self.template
        nf, nm = len(t.flops), len(t.memory_bytes)
        nt = len(t.time_s)
        i = 3
        flops = dict(zip(t.flops, v[i:i + nf]))
        i += nf
        mem = dict(zip(t.memory_bytes, v[i:i + nm]))
        i += nm
        times = dict(zip(t.time_s, v[i:i + nt]))
        i += nt
        return TrainNumbers(v[0], v[1], v[2], flops, mem, times, v[i], v[i + 1],
                            list(t.warnings))
