"""Error bars: p10-p90 intervals from the out-of-fit residuals of the stack's validation rows.

A stack profile stores, per hardware class and metric, the 10th and 90th percentiles of the
errors ``e = predicted / measured - 1`` over the dev rows left out of its fits
(``validation/fit/fit_stacks.py`` writes them). If the errors of new rows follow the same
distribution, the measured value lies in ``[pred / (1 + e90), pred / (1 + e10)]`` for about
80 % of them. Where a stack has no such rows, the interval is absent and the estimate says
why. On a profile whose efficiencies are stand-ins (its vendor's median, no measurement of its
own) the step-time interval is widened by the spread (p10-p90) of the measured values the
stand-in replaces (``stand_in_factors``).
"""
from __future__ import annotations

METRICS = {"step_s": "step_time", "peak_bytes": "memory"}


def hardware_class(device) -> str:
    """The class residuals are pooled over: the device kind (gpu, tpu, edge, cpu), with
    ``-calibrated`` for a profile whose GEMM throughput ``simcost calibrate`` measured (its
    errors are another population than a datasheet profile's)."""
    return device.kind + ("-calibrated" if device.params.gemm_table else "")


def interval(pred: float, q) -> tuple[float, float]:
    """The measured value's p10-p90 range for a prediction, from error quantiles ``q``."""
    return pred / (1.0 + q.p90), pred / (1.0 + q.p10)


def estimate_intervals(stack, device, step_s: float, peak_bytes: float) -> dict:
    """``{"step_s": {...}, "peak_bytes": {...}}``: each ``{"p10", "p90", "rows"}`` or
    ``{"note": why there is none}``."""
    hw = hardware_class(device)
    out = {}
    for key, value in (("step_s", step_s), ("peak_bytes", peak_bytes)):
        q = stack.interval(hw, METRICS[key]) if stack is not None else None
        if q is None or q.n == 0:
            why = stack.interval_note if stack is not None and stack.interval_note else (
                f"no out-of-fit validation rows for stack '{stack.name if stack else 'none'}' "
                f"on {hw} devices")
            out[key] = {"note": why}
            continue
        lo, hi = interval(value, q)
        out[key] = {"p10": lo, "p90": hi, "rows": q.n}
        factors = device.stand_in_time_factors
        if key == "step_s" and factors:
            # a stand-in efficiency (no measurement of this device) may be anywhere in the
            # p10-p90 of the measured devices it stands in for; time scales as 1 / efficiency
            out[key].update(p10=lo * factors[0], p90=hi * factors[1],
                            stand_in_factors=list(factors))
    return out
