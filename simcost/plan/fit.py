"""Does it fit, and what would make it fit: ``--find max-batch|max-seq`` and the memory savers.

Both ask the one ``fits`` of the estimate (reserved memory plus the runtime's context against
the device's capacity, :mod:`simcost.sim.memory`), so what they report is what
``simcost estimate train`` says at that size or with that change.
"""
from __future__ import annotations

from dataclasses import dataclass

from simcost.errors import SimcostError
from simcost.request.fields import MAX_BATCH, MAX_SEQ
from simcost.request.train import TrainRequest
from simcost.result import TrainEstimate

FIND = {"max-batch": "batch", "max-seq": "seq"}


@dataclass
class Probe:
    value: int
    estimate: TrainEstimate | None    # None: the request is invalid at this size
    why: str | None = None            # why it is invalid

    @property
    def fits(self) -> bool:
        return self.estimate is not None and self.estimate.fits


def _probe(req: TrainRequest, field: str, value: int) -> Probe:
    from simcost.api import run_train
    try:
        r = TrainRequest.build(**{**_fields(req), field: value})
        return Probe(value, run_train(r))
    except SimcostError as e:
        return Probe(value, None, str(e))


def _fields(req: TrainRequest) -> dict:
    return {k: getattr(req, k) for k in TrainRequest.model_fields if k != "notes"}


def _granularity(req: TrainRequest, field: str) -> int:
    """Sizes are searched in multiples of this: a global batch splits evenly over an explicit
    plan's data-parallel replicas; a context-parallel sequence over 2 x cp chunks."""
    if field == "batch":
        if req.parallel == "auto" or req.devices == 1:
            return 1
        model_par = (req.tp or 1) * (req.pp or 1) * (req.cp or 1)
        return req.dp or max(1, req.devices // model_par)
    return 2 * req.cp if req.cp and req.cp > 1 else 1


def find_max(req: TrainRequest, what: str) -> tuple[TrainEstimate | None, dict]:
    """The largest size that fits (``what``: max-batch or max-seq), by doubling then bisection
    over multiples of the plan's granularity. Returns (the estimate at that size or None when
    even the smallest does not fit, the ``find`` entry: what, value, the first size that does
    not fit and its peak, probes run). A size the request refuses (beyond a learned position
    table, not divisible by the plan) ends the search like one that does not fit, and the
    entry says why."""
    if what not in FIND:
        raise SimcostError(f"unknown --find '{what}'; valid: {', '.join(FIND)}")
    field = FIND[what]
    if field == "seq" and req.seq is None:
        raise SimcostError("--find max-seq needs a model with a token sequence (give --seq's "
                           "model a text input); vision models have none")
    g = _granularity(req, field)
    upper = (MAX_BATCH if field == "batch" else MAX_SEQ) // g
    probes: dict[int, Probe] = {}

    def at(k: int) -> Probe:
        if k not in probes:
            probes[k] = _probe(req, field, k * g)
        return probes[k]

    if not at(1).fits:
        return None, _entry(what, None, at(1), len(probes))
    lo, hi = 1, None
    while hi is None:                       # doubling: the first multiple that does not fit
        k = min(2 * lo, upper)
        if k == lo:
            return at(lo).estimate, _entry(what, at(lo), None, len(probes),
                                           limit=f"the largest {field} simcost prices")
        if at(k).fits:
            lo = k
        else:
            hi = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid).fits:
            lo = mid
        else:
            hi = mid
    return at(lo).estimate, _entry(what, at(lo), at(hi), len(probes))


def _entry(what: str, found: Probe | None, over: Probe | None, probes: int,
           limit: str | None = None) -> dict:
    d = {"what": what, "value": found.value if found else None, "probes": probes}
    if over is not None:
        d["first_not_fitting"] = {
            "value": over.value,
            "peak_bytes": over.estimate.memory_bytes["peak"] if over.estimate else None,
            "why": over.why or "does not fit"}
    if limit:
        d["limit"] = limit
    return d


# the memory savers tried on a request that does not fit: (label, request changes, applies?)
def _savers(req: TrainRequest) -> list[tuple[str, dict]]:
    out = []
    if req.checkpointing == "none" and req.optimizer != "mezo":
        out.append(("--checkpointing full", {"grad_checkpointing": "full"}))
    if req.loss_chunks == 1 and req.seq and req.seq >= 8 and req.optimizer != "mezo":
        out.append(("--loss-chunks 8", {"loss_chunks": 8}))
    if req.method == "lora" and not req.shorthand.dora and req.quantize == "none" \
            and req.peft_config is None:
        out.append(("--peft qlora", {"peft": "qlora"}))
    plan_given = req.parallel is not None or any(
        x not in (None, 1) for x in (req.tp, req.pp, req.dp, req.cp)) or req.zero
    if req.devices > 1 and not plan_given:
        out.append(("--parallel auto", {"parallel": "auto"}))
    for more in (2, 4, 8):
        n = req.devices * more
        out.append((f"--devices {n} --parallel auto",
                    {"devices": n, "parallel": "auto", "tp": None, "pp": None, "dp": None,
                     "cp": None, "micro_batch": None, "nodes": None}))
    both = {}
    for _, ch in out[:3]:
        if "devices" not in ch and "parallel" not in ch:
            both.update(ch)
    if len(both) > 1:
        label = " ".join(lab for lab, ch in out[:3] if set(ch) <= set(both))
        out.append((label, both))
    return out


def savers(req: TrainRequest, est: TrainEstimate) -> list[dict]:
    """For a request that does not fit: each memory saver (checkpointing, chunked loss, QLoRA,
    a searched plan, more devices, the first three together) with the peak and step time it
    gives, fitting ones first. Savers the request refuses are left out."""
    from simcost.api import run_train
    if est.fits:
        return []
    out = []
    for label, change in _savers(req):
        try:
            r = run_train(TrainRequest.build(**{**_fields(req), **change}))
        except SimcostError:
            continue
        out.append({"change": label, "peak_bytes": r.memory_bytes["peak"],
                    "capacity_bytes": r.memory_bytes["capacity"], "fits": r.fits,
                    "step_s": r.time_s["step"]})
    out.sort(key=lambda d: (not d["fits"], d["step_s"] if d["fits"] else d["peak_bytes"]))
    return out
