"""Prediction: a row's mapping priced by simcost (:func:`estimate_train`, or the per-op time
model for a GEMM), compared with its measured value."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from simcost.errors import SimcostError
from simcost.validate.published.mapping import GemmMapping, Mapping
from simcost.validate.published.rows import GIB, Unsupported, metric_value, source_of
from simcost.validate.published.sources import map_row


@dataclass
class Result:
    id: str
    source: str
    metric: str
    status: str                       # evaluated | unsupported
    reason: str = ""
    kind: str = ""                    # step_time | tokens_per_s | memory | op_latency
    stack: str = ""                   # the software stack the row is priced with
    measured: float | None = None     # SI: seconds, bytes, tokens/s
    predicted: float | None = None
    unit: str = ""
    caveats: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mapping: dict | None = None

    @property
    def error(self) -> float | None:
        if self.measured is None or self.predicted is None:
            return None
        return self.predicted / self.measured - 1.0


def predict(mp: Mapping, kind: str) -> tuple[float, dict]:
    """The predicted value of ``kind`` for mapping ``mp`` and the estimate's breakdown."""
    from simcost.api import estimate_train

    if not mp.seq:
        raise Unsupported("sequence length not stated")

    r = estimate_train(mp.model, mp.hardware, max_positions=mp.max_positions,
                       **mp.estimate_kwargs())
    t = r.time_s
    micro = t["forward"] + t["backward"]
    step = mp.grad_accum * micro + t["optimizer"] + t.get("host_overhead", 0.0)
    if mp.distributed:          # the plan's step already holds accumulation and communication
        step = t["step"]
        micro = t["micro_step_forward"] + t["micro_step_backward"]
        how = "chosen by --parallel auto" if mp.distributed.get("parallel") == "auto" else "stated"
        mp.notes.append(f"plan {how}: {r.parallel['plan_label']}; "
                        f"exposed communication {t['communication_exposed']:.3f} s, "
                        f"bubble {t['pipeline_bubble']:.3f} s")
    # the FLOPs the devices execute per optimizer step as the row states its run (recomputation
    # included), and what all its devices could do at their dense peak
    per_step = r.flops["forward"] + r.flops["backward"]
    devices = 1
    if mp.distributed:
        devices = int(mp.distributed.get("devices", 1))
    else:
        per_step *= mp.grad_accum
    compute = mp.mixed_precision if mp.mixed_precision != "none" else mp.dtype
    from simcost.hardware import load_profile
    peaks = load_profile(mp.hardware).device().peak_flops_per_s
    dense = peaks.get(compute, peaks["fp32"]) * devices
    mem = r.memory_bytes
    peak = {"device": mem["peak"], "reserved": mem["peak_reserved"],
            "torch_allocator": mem["peak_allocated"]}[mp.memory_scope]
    detail = {"step_s": step, "micro_step_s": micro, "forward_s": t["forward"],
              "backward_s": t["backward"], "optimizer_s": t["optimizer"],
              "peak_bytes": peak, "fits": r.fits, "executed_flops_per_step": per_step,
              "dense_peak_flops_per_s": dense,
              **{f"mem_{k}": v for k, v in mem.items()}}
    if kind == "step_time":
        return step, detail
    if kind == "tokens_per_s":
        return mp.batch * mp.seq * mp.grad_accum / step, detail
    if kind == "memory":
        return peak * mp.memory_devices, detail
    raise Unsupported(f"metric kind '{kind}' does not apply to a training estimate")


def predict_gemm(mp: GemmMapping, gemm=None) -> float:
    """The GEMM's seconds on its device alone; ``gemm``: the tile model's constants
    (:class:`simcost.sim.timing.GemmTileParams`) instead of the committed ones (the fit)."""
    import dataclasses

    from simcost.hardware import load_profile
    from simcost.sim.timing import TimeModel

    tm = TimeModel.from_device(load_profile(mp.hardware).device())
    if gemm is not None:
        tm = dataclasses.replace(tm, gemm=gemm)
    flops = 2.0 * mp.m * mp.n * mp.k
    nbytes = 2.0 * (mp.m * mp.k + mp.k * mp.n + mp.m * mp.n)
    return float(tm.phase_time(mp.dtype, [(1, mp.m, mp.n, mp.k)], flops, 0.0, nbytes, 1))


def evaluate_row(row: dict, stack: str | None = None) -> Result:
    """``stack``: price the row with this stack (a name or profile path) instead of its
    source's (the fit scripts' candidates)."""
    rid = row["id"]
    res = Result(id=rid, source=source_of(rid), metric=row["metric"], status="unsupported")
    try:
        mp = map_row(row)
        if stack is not None and hasattr(mp, "stack"):
            mp.stack = stack
        kind, measured, unit = metric_value(row)
        if isinstance(mp, GemmMapping):
            if kind != "op_latency":
                raise Unsupported(f"metric '{row['metric']}' on a GEMM row")
            pred = predict_gemm(mp)
        else:
            pred, detail = predict(mp, kind)
            _check_plausible(kind, measured, pred, detail)
            if not detail["fits"]:
                mp.caveats.append(f"simcost predicts it does not fit "
                                  f"({detail['mem_peak'] / GIB:.1f} GiB > "
                                  f"{detail['mem_capacity'] / GIB:.0f} GiB)")
    except Unsupported as e:
        res.reason = str(e)
        return res
    except SimcostError as e:
        res.reason = f"simcost rejected the mapping: {e}"
        return res
    if not (math.isfinite(pred) and pred > 0):
        res.reason = f"simcost predicted {pred} for this mapping (not a positive finite value)"
        return res
    res.status = "evaluated"
    res.kind, res.measured, res.predicted, res.unit = kind, measured, float(pred), unit
    res.caveats, res.notes, res.mapping = list(mp.caveats), list(mp.notes), mp.describe()
    res.stack = getattr(mp, "stack", "") or ""
    return res


def _check_plausible(kind: str, measured: float, predicted: float, detail: dict) -> None:
    """A measured speed that needs more than the devices' dense peak to execute the FLOPs of
    the run its row states (recomputation included) contradicts that statement: no kernel
    exceeds the peak. Such a row is set apart with the figure, never scored."""
    if kind not in ("step_time", "tokens_per_s") or not detail.get("dense_peak_flops_per_s"):
        return
    step_s = measured if kind == "step_time" else detail["step_s"] * predicted / measured
    implied = detail["executed_flops_per_step"] / step_s / detail["dense_peak_flops_per_s"]
    if implied > 1.0:
        raise Unsupported(
            f"implausible as stated: executing its {detail['executed_flops_per_step'] / 1e12:.0f} "
            f"TFLOP per step in the measured {step_s:.3f} s needs {implied:.0%} of the devices' "
            f"dense peak (a different configuration, or a total over more devices?)")


def evaluate(rows: list[dict], source: str | None = None) -> list[Result]:
    out = []
    for row in rows:
        if source and not (source_of(row["id"]) == source or row["id"].startswith(source)):
            continue
        out.append(evaluate_row(row))
    return out

