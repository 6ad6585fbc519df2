"""Whole-job numbers from one step's estimate: steps, job time with its interval, cost, energy.

A job is ``tokens`` (split into sequences of ``seq``) or ``samples``, seen ``epochs`` times,
``batch`` samples per optimizer step (the global batch). Its steps are
``ceil(samples x epochs / batch)``; the last, partial step is priced as a whole one, as a
trainer runs it (padding aside).

Energy: each device draws its TDP while busy and ``IDLE_POWER_FRACTION`` of it while it waits
(on the host, or in a pipeline bubble), so a step's energy is
``devices x TDP x (idle + (1 - idle) x busy_fraction) x step_s``. Counting a busy device at
TDP is an upper bound: under a training load datacenter GPUs draw most, not all, of it.
"""
from __future__ import annotations

import math

from simcost.errors import SimcostError

# Idle draw as a fraction of TDP. derived: not a datasheet figure; idle readings of
# datacenter GPUs in nvidia-smi sit around 10-20 % of their TDP (e.g. ~50-60 W on a 400 W
# A100, ~70-100 W on a 700 W H100); 0.15 is the middle of that range.
IDLE_POWER_FRACTION = 0.15
J_PER_KWH = 3.6e6


def job_samples(*, tokens: int | None, samples: int | None, seq: int | None) -> int | None:
    """The samples of one epoch: given, or ``ceil(tokens / seq)`` sequences; None: no job."""
    if samples is not None:
        return int(samples)
    if tokens is None:
        return None
    if not seq:
        raise SimcostError("--tokens needs --seq (the tokens are split into sequences of "
                           "--seq); a model without a token sequence takes --samples")
    return math.ceil(tokens / seq)


def job_steps(samples: int, epochs: float, batch: int) -> int:
    """Optimizer steps: every epoch's samples, ``batch`` per step, the last step partial."""
    return max(1, math.ceil(samples * epochs / batch))


def busy_fraction(time_s: dict) -> float:
    """The share of a step the device computes or communicates: everything but waiting on the
    host and pipeline bubbles."""
    step = time_s["step"]
    if step <= 0:
        return 0.0
    idle = time_s.get("host_overhead", 0.0) + time_s.get("pipeline_bubble", 0.0)
    return min(1.0, max(0.0, (step - idle) / step))


def step_energy(tdp_w: float | None, devices: int, time_s: dict) -> dict | None:
    """Joules per step (all devices) and the average power per device; None without a TDP."""
    if not tdp_w:
        return None
    u = busy_fraction(time_s)
    power_w = tdp_w * (IDLE_POWER_FRACTION + (1.0 - IDLE_POWER_FRACTION) * u)
    return {"per_step_j": power_w * devices * time_s["step"], "power_w_per_device": power_w,
            "busy_fraction": u, "tdp_w": tdp_w, "idle_fraction_of_tdp": IDLE_POWER_FRACTION}


def mfu(flops: dict, step_s: float, devices: int, peak_flops_per_s: float) -> float | None:
    """Model FLOPs utilisation: the step's forward and backward FLOPs (recomputation and the
    optimizer excluded) over what the devices' dense peak could do in the step."""
    if step_s <= 0 or not peak_flops_per_s:
        return None
    useful = flops.get("forward", 0.0) + flops.get("backward", 0.0)
    return useful / (step_s * devices * peak_flops_per_s)


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def whole_job(*, step_s: float, batch: int, seq: int | None, devices: int, samples: int,
              epochs: float, price_per_device_hour: float | None, energy: dict | None,
              interval: dict | None) -> dict:
    """The job's steps, time (with the step interval scaled), cost and energy."""
    steps = job_steps(samples, epochs, batch)
    job_s = steps * step_s
    out = {"samples": samples, "epochs": epochs, "global_batch": batch, "steps": steps,
           "tokens": _whole(samples * epochs * seq) if seq else None, "job_s": job_s,
           "job_s_interval": ({"p10": steps * interval["p10"], "p90": steps * interval["p90"]}
                              if interval and "p10" in interval else None),
           "job_usd": None, "usd_per_million_tokens": None,
           "energy_j": energy["per_step_j"] * steps if energy else None}
    if price_per_device_hour is not None:
        out["job_usd"] = price_per_device_hour * devices * job_s / 3600.0
        if out["tokens"]:
            out["usd_per_million_tokens"] = out["job_usd"] / out["tokens"] * 1e6
    return out
