"""What an estimate sums away, kept on request: the per-op spans of a training step, the parts of
a parallel plan's micro-steps, and the iterations and requests of a serving simulation.
:mod:`simcost.perfetto` lays them out as a trace (``--trace-out``).

Nothing is kept unless a :func:`recording` block is active (the estimates look the recorder up
once, a ``ContextVar``), so estimates and simulations outside one cost nothing extra.

- :func:`step_spans`: one device's training step as :class:`StepSpan` records in execution
  order (forward ops, forward page faults, backward ops with any recomputation, backward page
  faults, the optimizer step, its page faults, the step's host overhead). Each op's seconds
  are its share of its segment's phase time (:func:`simcost.sim.timing.phase_times`, the
  same model, not a second one), and the records' seconds add up to ``time_s['step']``.
  A segment standing for N layers gives N repetitions of its ops.
- :class:`PlanDetail`: one parallel plan's micro-step (compute, exposed communication per
  axis, the slowdown from hidden communication), pipeline, data-parallel, optimizer and
  offload times, as :func:`simcost.sim.parallel.evaluate_plan` adds them up.
- :class:`ReplicaLog`: one serving replica's iterations (start, seconds, batch) and its
  requests (arrival, first token, finish).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

PHASES = ("forward", "backward", "recompute", "page_faults", "optimizer", "host")


@dataclass(frozen=True, slots=True)
class StepSpan:
    name: str                    # op name ('attn.q_proj'), or the phase's own name
    phase: str                   # one of PHASES
    seconds: float
    segment: str = ""            # the graph segment ('layers', 'embed', ...) or ''
    repeat: int | None = None    # which of the segment's instances (0 .. count - 1)
    layer: int | None = None     # the model layer, where the segment is a run of layers
    kind: str = ""               # op kind (simcost.graph.kinds)
    forward_pass: int = 0        # MeZO runs two forward passes


@dataclass
class PlanDetail:
    """The terms :func:`simcost.sim.parallel.evaluate_plan` adds into one plan's step."""
    plan: object                 # simcost.sim.parallel.Plan
    compute_fwd_s: float         # one micro-batch's compute on the slowest stage
    compute_bwd_s: float
    slot_fwd_s: float            # the micro-step: compute + exposed comm + slowdown
    slot_bwd_s: float
    slowdown_fwd_s: float
    slowdown_bwd_s: float
    comm: dict                   # axis -> simcost.sim.parallel.AxisComm
    pipe_s: float
    bubble_s: float
    optimizer_s: float
    host_overhead_s: float
    step_s: float


@dataclass
class ReplicaLog:
    """One serving replica: its iterations as (start s, seconds, decode sequences, prefill
    sequences, tokens) and, at the end, its requests (global index, arrival, first token,
    finish, prompt and output tokens)."""
    index: int
    devices: int
    iterations: list = field(default_factory=list)
    requests: dict = field(default_factory=dict)


@dataclass
class Recorder:
    step: list | None = None                       # StepSpan records of the last step priced
    plans: dict = field(default_factory=dict)      # plan label -> PlanDetail
    replicas: list = field(default_factory=list)   # ReplicaLog per replica simulated


_ACTIVE: ContextVar[Recorder | None] = ContextVar("simcost_recorder", default=None)


@contextmanager
def recording() -> Iterator[Recorder]:
    """``with recording() as rec: ...``: the estimates run inside keep their breakdowns in
    ``rec``."""
    rec = Recorder()
    token = _ACTIVE.set(rec)
    try:
        yield rec
    finally:
        _ACTIVE.reset(token)


def recorder() -> Recorder | None:
    """The active recorder, None outside a :func:`recording` block."""
    return _ACTIVE.get()


def step_spans(g, analysis, per_op: list, *, t_opt, step_overhead_s, faults=None,
               forward_passes: int = 1, optimizer_name: str = "optimizer step") -> list:
    """The step's :class:`StepSpan` records in execution order from ``per_op``
    (:func:`simcost.sim.timing.phase_times`' per-op shares of ``analysis``). Backward runs
    the segments in reverse and, within one, the ops in reverse (a traced graph's records
    are already in the recorded order, backward calls included); under checkpointing each
    instance recomputes its forward first. ``faults``: page-fault seconds per phase (or
    None)."""
    pos = {id(r): i for i, r in enumerate(analysis.records)}
    traced = bool(g.meta.get("traced"))
    entries = sorted(((float(f), float(b), float(rc), r) for r, f, b, rc in per_op),
                     key=lambda e: pos[id(e[3])])
    fwd = [e for e in entries if e[0] > 0]
    bwd = [e for e in entries if e[1] > 0 or e[2] > 0]
    if not traced:
        bwd.reverse()
    faults = faults or {}
    out: list = []
    for p in range(forward_passes):
        for seg, run in _runs(g, fwd):
            for k in range(seg.count):
                out.extend(_span(g, seg, k, e[3], "forward", e[0], p) for e in run)
        _fault(out, faults, "forward")
    for seg, run in _runs(g, bwd):
        recs = sorted((e for e in run if e[2] > 0), key=lambda e: pos[id(e[3])])
        for k in reversed(range(seg.count)):        # the last layer's backward first
            out.extend(_span(g, seg, k, e[3], "recompute", e[2]) for e in recs)
            out.extend(_span(g, seg, k, e[3], "backward", e[1]) for e in run if e[1] > 0)
    _fault(out, faults, "backward")
    if t_opt > 0:
        out.append(StepSpan(optimizer_name, "optimizer", float(t_opt)))
    _fault(out, faults, "optimizer")
    if step_overhead_s > 0:
        out.append(StepSpan("step overhead", "host", float(step_overhead_s)))
    return out


def _runs(g, entries: list) -> list:
    """Consecutive entries of one segment: (segment, entries)."""
    runs: list = []
    for e in entries:
        seg = g.segments[e[3].segment]
        if runs and runs[-1][0] is seg:
            runs[-1][1].append(e)
        else:
            runs.append((seg, [e]))
    return runs


def _span(g, seg, k: int, rec, phase: str, seconds: float, forward_pass: int = 0) -> StepSpan:
    layer = None
    if seg.first_layer is not None and not g.meta.get("traced"):
        layer = seg.first_layer + k
    return StepSpan(rec.op.name, phase, seconds, seg.name, k if seg.count > 1 else None, layer,
                    rec.op.kind, forward_pass)


def _fault(out: list, faults: dict, phase: str) -> None:
    s = float(faults.get(phase, 0.0))
    if s > 0:
        out.append(StepSpan(f"page faults ({phase})", "page_faults", s))
