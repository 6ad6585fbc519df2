"""Chrome / Perfetto traces of a training step or a serving simulation (``--trace-out FILE``).

The file is the Trace Event Format's JSON object form: ``{"traceEvents": [...],
"displayTimeUnit": "ms", "otherData": {...}}`` (simcost's version and the estimate's key
numbers in ``otherData``), with complete events (``"ph": "X"``: ``ts`` and ``dur`` in
microseconds, ``pid``, ``tid``, ``name``, ``cat``, ``args``) and metadata events (``"ph":
"M"``: ``process_name``, ``thread_name``, ``process_sort_index``, ``thread_sort_index``).
ui.perfetto.dev (Open trace file) and chrome://tracing open it. :data:`TRACE_SCHEMA` is the
JSON Schema of what is written. Pure Python and json; the spans come from
:mod:`simcost.sim.breakdown` (the estimates' own numbers, recorded as they are computed).

**Training, one device** (process "device 0"): one span per op per layer instance and phase
(a segment standing for N layers appears N times: llama-2-70b with LoRA at batch 1 x 2048,
4,654 events, 0.72 MB; 1.07 MB with full checkpointing). Tracks: ``compute`` (ops: cat
``forward``, ``recompute``, ``backward``), ``optimizer`` (the optimizer step), ``host`` (the
step's host overhead, page faults), and ``layers`` (one span per layer instance and phase
enclosing its ops: an overview, cat ``layer``). The spans
of the critical categories :data:`CRITICAL_CATS` lie end to end from 0: their durations add up
to ``time_s['step']``, and the last ends there. Each op's duration is its share of its
segment's phase time (host and device overlap inside a segment, so an op is credited in
proportion to the side that sets the pace: :func:`simcost.sim.timing.phase_times`).

**Training, several devices** (``--devices N``): every device of one pipeline stage does the
same work in simcost's plan model (the slowest stage's), so one process per pipeline stage
stands for its tp x cp x dp devices. Its ``compute`` track holds each micro-batch's forward
and backward compute (cat ``forward`` / ``backward``; one span per micro-batch, not per op),
the slowdown that hidden communication causes (cat ``overlap_slowdown``) and the pipeline
bubble (cat ``bubble``: the gaps of the 1F1B schedule, laid out by dependencies; for the
interleaved schedule the bubble is split between fill and drain, aggregated); the
``pipeline`` track one span per micro-step slot (an overview, cat ``micro_step``); one
``communication: AXIS`` track per axis with traffic, each exposed transfer (cat
``communication.exposed``, on the critical path) and each hidden one (cat
``communication.hidden``, overlapping the compute that hides it, starting with it);
``optimizer`` and ``host`` as above. Again the :data:`CRITICAL_CATS` spans of each process
add up to ``time_s['step']`` and tile [0, step]. Not drawn: pipeline point-to-point traffic
hidden behind the steady state (only its exposed fill and drain are, after the pipeline, as
the plan model adds them), and the data-parallel gradient all-reduce is drawn hidden behind
the last micro-batch's backward (its exposed rest after the pipeline).

**Serving** (``simulate serve``): one process per replica; its ``iterations`` track holds one
span per engine iteration (name ``prefill``, ``decode`` or ``mixed``; args: sequences, tokens)
and lies where the simulator ran it (the replica's busy time is their sum; the last ends at the
replica's last finish); ``slot k`` tracks hold the requests, each on the lowest slot free at
its arrival: ``queue+prefill`` from arrival to the first token (its TTFT), ``decode`` from the
first token to the finish (latency = the two).
"""
from __future__ import annotations

import heapq
import json
import math
from pathlib import Path

from simcost.errors import SimcostError

CRITICAL_CATS = ("forward", "recompute", "backward", "page_faults", "optimizer", "host",
                 "communication.exposed", "overlap_slowdown", "bubble")
US = 1e6    # microseconds per second

_NUM = {"type": "number", "minimum": 0}
_INT = {"type": "integer", "minimum": 0}
TRACE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Trace Event Format (JSON object form), the events simcost writes",
    "type": "object",
    "required": ["traceEvents", "displayTimeUnit", "otherData"],
    "properties": {
        "traceEvents": {"type": "array", "items": {"$ref": "#/$defs/event"}},
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
    },
    "$defs": {
        "event": {
            "type": "object",
            "required": ["ph"],
            "properties": {"ph": {"enum": ["X", "M"]}},
            "allOf": [
                {"if": {"properties": {"ph": {"const": "X"}}},
                 "then": {"$ref": "#/$defs/complete"}},
                {"if": {"properties": {"ph": {"const": "M"}}},
                 "then": {"$ref": "#/$defs/metadata"}},
            ],
        },
        "complete": {
            "type": "object",
            "required": ["name", "cat", "ph", "ts", "dur", "pid", "tid", "args"],
            "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1},
                           "cat": {"type": "string", "minLength": 1},
                           "ph": {"const": "X"}, "ts": _NUM, "dur": _NUM, "pid": _INT,
                           "tid": _INT, "args": {"type": "object"}},
        },
        "metadata": {
            "type": "object",
            "required": ["name", "ph", "pid", "args"],
            "additionalProperties": False,
            "properties": {
                "name": {"enum": ["process_name", "thread_name", "process_sort_index",
                                  "thread_sort_index"]},
                "ph": {"const": "M"}, "pid": _INT, "tid": _INT,
                "args": {"type": "object", "minProperties": 1, "maxProperties": 1,
                         "properties": {"name": {"type": "string"},
                                        "sort_index": {"type": "integer"}}},
            },
            "allOf": [{"if": {"properties": {"name": {"enum": ["thread_name",
                                                              "thread_sort_index"]}}},
                       "then": {"required": ["tid"]}}],
        },
    },
}

# track ids within a process (their sort order too)
LAYERS, PIPELINE, COMPUTE, OPTIMIZER, HOST, COMM = 1, 2, 3, 4, 5, 10
ITERATIONS, SLOT = 1, 100


# ---- the file ------------------------------------------------------------------------------
def check_trace_out(path) -> Path:
    """The trace file's path, refused in one line unless it can be written (checked before
    anything runs)."""
    from simcost.paths import check_output_file
    return check_output_file(path, "--trace-out")


def write_trace(path, trace: dict) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(trace, f, separators=(",", ":"))
    except OSError as e:
        raise SimcostError(f"--trace-out {path}: {e.strerror or e}") from None


# ---- events --------------------------------------------------------------------------------
def complete(name: str, cat: str, start_s: float, dur_s: float, pid: int, tid: int,
             args: dict | None = None) -> dict:
    """A complete event; ``ts`` and ``dur`` on a picosecond grid (:func:`_grid_ps`), so that
    a span ending where the next begins ends there in a viewer too."""
    a, b = _grid_ps(start_s), _grid_ps(start_s + dur_s)
    return {"name": name, "cat": cat, "ph": "X", "ts": a / 1e6, "dur": (b - a) / 1e6,
            "pid": pid, "tid": tid, "args": args or {}}


def _grid_ps(t_s: float) -> int:
    """``t_s`` in whole picoseconds, never a whole nanosecond: Perfetto truncates ``ts *
    1000`` and ``dur * 1000`` to integer nanoseconds, and a whole nanosecond written in
    microseconds can come out one below, making back-to-back spans overlap by 1 ns (then
    misnested on their track). Off whole nanoseconds truncation only ever leaves a gap."""
    p = round(t_s * 1e12)
    return p + 1 if p and p % 1000 == 0 else p


def process(pid: int, name: str, sort_index: int | None = None) -> list:
    out = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]
    out.append({"name": "process_sort_index", "ph": "M", "pid": pid,
                "args": {"sort_index": pid if sort_index is None else sort_index}})
    return out


def thread(pid: int, tid: int, name: str) -> list:
    return [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}},
            {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
             "args": {"sort_index": tid}}]


def _trace(events: list, other: dict) -> dict:
    from simcost import __version__
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"generator": "simcost", "simcost_version": __version__, **other}}


def critical_seconds(trace: dict, pid: int) -> float:
    """Seconds of one process's critical-path spans (:data:`CRITICAL_CATS`)."""
    return sum(e["dur"] for e in trace["traceEvents"]
               if e["ph"] == "X" and e["pid"] == pid and e["cat"] in CRITICAL_CATS) / US


# ---- training ------------------------------------------------------------------------------
def train_trace(est, rec) -> dict:
    """The trace of a :class:`~simcost.result.TrainEstimate` from the
    :class:`~simcost.sim.breakdown.Recorder` that was active while it was computed."""
    t = est.time_s
    other = {"kind": "training step", "model": est.model, "hardware": est.hardware,
             "frontend": est.frontend, "batch": est.batch, "seq": est.seq,
             "time_s": {k: float(v) for k, v in t.items()},
             "tokens_per_s": _num(est.tokens_per_s),
             "peak_bytes": float(est.memory_bytes["peak"]), "fits": bool(est.fits),
             "critical_cats": list(CRITICAL_CATS)}
    if est.parallel is not None:
        label = est.parallel["plan_label"]
        detail = rec.plans.get(label)
        if detail is None or abs(detail.step_s - t["step"]) > 1e-12 * max(t["step"], 1.0):
            raise SimcostError(f"--trace-out: no recorded timeline for plan {label}")
        other["plan"] = label
        return _trace(_plan_events(detail), other)
    if rec.step is None:
        raise SimcostError("--trace-out: the estimate recorded no step timeline")
    return _trace(_step_events(rec.step, 0, f"device 0 ({est.hardware})"), other)


def check_frontend(req) -> None:
    """Refuse, before anything runs, what has no step timeline: the traced front end's
    multi-device plans (:mod:`simcost.trace.parallel` prices them without per-device
    parts)."""
    from simcost.request.frontend import resolve_frontend
    if req.distributed and resolve_frontend(req)[0] == "traced":
        raise SimcostError("--trace-out: the traced front end's multi-device plans keep no "
                           "per-device timeline; trace one device, or a model the analytic "
                           "front end covers")


def _num(x):
    return None if x is None else float(x)


def _step_events(spans: list, pid: int, name: str) -> list:
    ev = [*process(pid, name), *thread(pid, LAYERS, "layers"),
          *thread(pid, COMPUTE, "compute"), *thread(pid, OPTIMIZER, "optimizer"),
          *thread(pid, HOST, "host")]
    tid = {"forward": COMPUTE, "recompute": COMPUTE, "backward": COMPUTE,
           "optimizer": OPTIMIZER, "host": HOST, "page_faults": HOST}
    t = 0.0
    group, g_start = None, 0.0
    for s in spans:
        key = (s.segment, s.repeat, s.phase == "forward", s.forward_pass) if s.segment else None
        if key != group:
            if group is not None:
                ev.append(_layer_span(group, g_start, t, pid))
            group, g_start = key, t
        args = {}
        if s.segment:
            args = {"segment": s.segment, "kind": s.kind}
            if s.layer is not None:
                args["layer"] = s.layer
            elif s.repeat is not None:
                args["repeat"] = s.repeat
        ev.append(complete(s.name, s.phase, t, s.seconds, pid, tid[s.phase], args))
        t += s.seconds
    if group is not None:
        ev.append(_layer_span(group, g_start, t, pid))
    return ev


def _layer_span(key, start: float, end: float, pid: int) -> dict:
    segment, repeat, forward, fpass = key
    phase = "forward" if forward else "backward"
    where = segment if repeat is None else f"{segment}[{repeat}]"
    args = {"segment": segment, "phase": phase}
    if fpass:
        args["forward_pass"] = fpass
    return complete(f"{where} {phase}", "layer", start, end - start, pid, LAYERS, args)


def _plan_events(d) -> list:
    """One process per pipeline stage (see the module docstring)."""
    plan = d.plan
    pp = plan.pp
    axes = [k for k, c in d.comm.items() if c.total_s > 0]
    comm_tid = {k: COMM + i for i, k in enumerate(d.comm)}
    slot = {"F": d.slot_fwd_s, "B": d.slot_bwd_s}
    ev: list = []
    per_stage = plan.tp * plan.cp * plan.dp
    for s in range(pp):
        ev += process(s, f"stage {s} ({per_stage} device{'s' if per_stage > 1 else ''}: "
                         f"tp {plan.tp} x cp {plan.cp} x dp {plan.dp})")
        ev += [*thread(s, PIPELINE, "pipeline"), *thread(s, COMPUTE, "compute"),
               *thread(s, OPTIMIZER, "optimizer"), *thread(s, HOST, "host")]
        for k in axes:
            ev += thread(s, comm_tid[k], f"communication: {k}")
    for s, ops in enumerate(_schedule(plan, d.slot_fwd_s, d.slot_bwd_s, d.pipe_s)):
        cursor = 0.0
        for kind, mb, start in ops:
            if start > cursor:
                ev.append(complete("pipeline bubble", "bubble", cursor, start - cursor, s,
                                   COMPUTE))
            ev += _micro_step(d, kind, mb, start, s, comm_tid)
            cursor = start + slot[kind]
        if d.pipe_s > cursor:
            ev.append(complete("pipeline bubble", "bubble", cursor, d.pipe_s - cursor, s,
                               COMPUTE))
        t = d.pipe_s
        dp = d.comm["data_parallel"]
        last_b = max(start for kind, _, start in ops if kind == "B")
        if dp.total_s > dp.exposed_s:
            ev.append(complete("data_parallel (hidden)", "communication.hidden", last_b,
                               dp.total_s - dp.exposed_s, s, comm_tid["data_parallel"]))
        for k in ("pipeline_p2p", "data_parallel"):
            t = _exposed(ev, d.comm[k], k, t, s, comm_tid[k])
        if d.optimizer_s > 0:
            ev.append(complete("optimizer step", "optimizer", t, d.optimizer_s, s, OPTIMIZER))
            t += d.optimizer_s
        t = _exposed(ev, d.comm["offload"], "offload", t, s, comm_tid["offload"])
        if d.host_overhead_s > 0:
            ev.append(complete("step overhead", "host", t, d.host_overhead_s, s, HOST))
    return ev


def _exposed(ev: list, c, axis: str, t: float, pid: int, tid: int) -> float:
    if c.exposed_s > 0:
        ev.append(complete(f"{axis} (exposed)", "communication.exposed", t, c.exposed_s, pid,
                           tid))
    return t + c.exposed_s


# axes whose per-micro-step traffic sits inside the forward / backward slots
_SLOT_AXES = ("tensor_parallel", "context_parallel", "zero3_gather", "expert_parallel")


def _micro_step(d, kind: str, mb: int, start: float, pid: int, comm_tid: dict) -> list:
    """One forward (F) or backward (B) slot: compute, then the slowdown, then each axis's
    exposed part; each axis's hidden part overlaps the compute from its start."""
    fwd = kind == "F"
    phase = "forward" if fwd else "backward"
    compute = d.compute_fwd_s if fwd else d.compute_bwd_s
    slow = d.slowdown_fwd_s if fwd else d.slowdown_bwd_s
    ev = [complete(f"{kind}{mb}", "micro_step", start, d.slot_fwd_s if fwd else d.slot_bwd_s,
                   pid, PIPELINE, {"micro_batch": mb, "phase": phase}),
          complete(f"{phase} mb {mb}", phase, start, compute, pid, COMPUTE, {"micro_batch": mb})]
    t = start + compute
    if slow > 0:
        ev.append(complete("overlap slowdown", "overlap_slowdown", t, slow, pid, COMPUTE,
                           {"micro_batch": mb}))
        t += slow
    for k in _SLOT_AXES:
        c = d.comm[k]
        exposed = c.fwd_exposed_s if fwd else c.bwd_exposed_s
        hidden = c.fwd_hidden_s if fwd else c.bwd_hidden_s
        if hidden > 0:
            ev.append(complete(f"{k} (hidden)", "communication.hidden", start, hidden, pid,
                               comm_tid[k], {"micro_batch": mb, "phase": phase}))
        if exposed > 0:
            ev.append(complete(f"{k} (exposed)", "communication.exposed", t, exposed, pid,
                               comm_tid[k], {"micro_batch": mb, "phase": phase}))
            t += exposed
    return ev


def _schedule(plan, f: float, b: float, pipe_s: float) -> list:
    """Per stage, its slots as (kind 'F'|'B', micro-batch, start s). 1F1B: each stage runs
    min(p - s - 1, m) warm-up forwards, then alternates one forward and one backward, then
    drains its backwards; a forward waits for the previous stage's, a backward for the next
    stage's (list scheduling, every stage with the slowest stage's slot times). Interleaved:
    the plan model's bubble split between fill (s / (p-1) of it) and drain."""
    p, m = plan.pp, plan.micro_batches
    if p > 1 and plan.schedule == "interleaved":
        bubble = pipe_s - m * (f + b)
        out = []
        for s in range(p):
            t = bubble * s / (p - 1)
            ops = []
            for i in range(m):
                ops += [("F", i, t), ("B", i, t + f)]
                t += f + b
            out.append(ops)
        return out
    orders = []
    for s in range(p):
        warm = min(p - s - 1, m)
        o = [("F", i) for i in range(warm)]
        for i in range(m - warm):
            o += [("F", warm + i), ("B", i)]
        o += [("B", i) for i in range(m - warm, m)]
        orders.append(o)
    end: dict = {}
    starts = [[] for _ in range(p)]
    free = [0.0] * p
    nxt = [0] * p
    left = 2 * m * p
    while left:
        progressed = False
        for s in range(p):
            while nxt[s] < len(orders[s]):
                kind, i = orders[s][nxt[s]]
                dep = (("F", s - 1, i) if s > 0 else None) if kind == "F" else \
                    (("B", s + 1, i) if s < p - 1 else ("F", s, i))
                if dep is not None and dep not in end:
                    break
                start = max(free[s], end[dep] if dep is not None else 0.0)
                end[(kind, s, i)] = free[s] = start + (f if kind == "F" else b)
                starts[s].append((kind, i, start))
                nxt[s] += 1
                left -= 1
                progressed = True
        if not progressed:          # cannot happen for 1F1B orders; guards the loop
            raise SimcostError("--trace-out: the pipeline schedule deadlocked")
    return starts


# ---- serving -------------------------------------------------------------------------------
def serve_trace(sim, rec) -> dict:
    """The trace of a :class:`~simcost.serve.api.ServeSimulation` from the recorder that was
    active while it ran."""
    ev: list = []
    for log in rec.replicas:
        pid = log.index
        ev += process(pid, f"replica {log.index} (tp {log.devices})")
        ev += thread(pid, ITERATIONS, "iterations")
        for start, dt, n_dec, n_pre, tokens in log.iterations:
            name = "mixed" if n_dec and n_pre else ("prefill" if n_pre else "decode")
            ev.append(complete(name, "iteration", start, dt, pid, ITERATIONS,
                               {"decode_seqs": n_dec, "prefill_seqs": n_pre,
                                "batch": n_dec + n_pre, "tokens": tokens}))
        ev += _request_events(log, pid)
    other = {"kind": "serving simulation", "model": sim.model, "hardware": sim.hardware,
             "engine": sim.engine, "scheduler": sim.scheduler, "replicas": sim.replicas,
             "n_requests": sim.n_requests, "makespan_s": sim.makespan_s,
             "iterations": sim.iterations, "ttft_s": sim.ttft_s, "latency_s": sim.latency_s,
             "tpot_s": sim.tpot_s}
    return _trace(ev, other)


def _request_events(log, pid: int) -> list:
    r = log.requests
    ev: list = []
    free: list = []          # heap of (finish s, slot)
    idle: list = []          # heap of free slot numbers
    slots = 0
    order = sorted(range(len(r["arrival"])), key=lambda j: float(r["arrival"][j]))
    for j in order:
        arr, first, fin = (float(r[k][j]) for k in ("arrival", "first_token", "finish"))
        if not (math.isfinite(first) and math.isfinite(fin)):      # never served
            continue
        while free and free[0][0] <= arr:
            heapq.heappush(idle, heapq.heappop(free)[1])
        if idle:
            k = heapq.heappop(idle)
        else:
            k = slots
            slots += 1
            ev += thread(pid, SLOT + k, f"slot {k}")
        heapq.heappush(free, (fin, k))
        args = {"request": int(r["index"][j]), "adapter": int(r["adapter"][j]),
                "prompt_tokens": int(r["prompt"][j]), "output_tokens": int(r["output"][j])}
        ev.append(complete("queue+prefill", "request.ttft", arr, first - arr, pid, SLOT + k,
                           args))
        if fin > first:
            ev.append(complete("decode", "request.decode", first, fin - first, pid, SLOT + k,
                               args))
    return ev
