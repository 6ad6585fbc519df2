"""Is a simulated server overloaded: does its queue grow without bound?

A server keeps up when its queueing delay is stationary; when the offered load exceeds what it
can serve, the backlog grows linearly with time and so does the delay of each new request:
a request arriving at ``t`` waits about ``(lambda/mu - 1) t`` (``lambda`` the arrival rate,
``mu`` the service rate). The criterion reads that trend off the simulated requests, with no
reference to the run's length or the requests' sizes:

- split the arrival window ``[first arrival, last arrival]`` into thirds and take the median
  time to first token (queueing delay plus prefill) of the requests arriving in the first and
  in the last third;
- **overloaded** when the median grew by more than ``GROWTH_PER_S`` seconds per second of
  traffic between the two thirds' mid-points (delay growing at 5 % of elapsed time, i.e. an
  arrival rate above ~1.05x the service rate) **and** the last third's median is more than
  ``GROWTH_RATIO`` times the first's (so noise on sub-second delays of a short run cannot
  trigger it).

Medians, not means, so a few long prompts do not decide it. A stable server's medians differ
by noise; an overloaded one's grow ~5x between the thirds (delay rises linearly from zero).
Runs with fewer than ``MIN_REQUESTS`` requests, or every request at one instant (the offline
mode: a batch job, not a queue under an arrival rate), are not judged (``False``, no reason).
"""
from __future__ import annotations

import numpy as np

GROWTH_PER_S = 0.05     # seconds of extra delay per second of traffic (derived: lambda > 1.05 mu)
GROWTH_RATIO = 2.0      # last third's median TTFT over the first third's
MIN_REQUESTS = 30       # at least 10 requests per third


def detect_overload(arrival_s: np.ndarray, ttft_s: np.ndarray, *, completed_per_s: float,
                    offered_per_s: float | None = None) -> tuple[bool, str | None]:
    """(overloaded, one-line reason) of one run from each request's arrival and TTFT (s)."""
    arrival_s = np.asarray(arrival_s, dtype=float)
    ttft_s = np.asarray(ttft_s, dtype=float)
    ok = np.isfinite(arrival_s) & np.isfinite(ttft_s)
    a, d = arrival_s[ok], ttft_s[ok]
    if a.size < MIN_REQUESTS:
        return False, None
    t0, t1 = float(a.min()), float(a.max())
    span = t1 - t0
    if not span > 0:
        return False, None
    first = a <= t0 + span / 3
    last = a >= t1 - span / 3
    if first.sum() < MIN_REQUESTS // 3 or last.sum() < MIN_REQUESTS // 3:
        return False, None
    m_first, m_last = float(np.median(d[first])), float(np.median(d[last]))
    growth = (m_last - m_first) / (2 * span / 3)
    if not (growth > GROWTH_PER_S and m_last > GROWTH_RATIO * m_first):
        return False, None
    offered = offered_per_s if offered_per_s is not None else (a.size - 1) / span
    return True, (f"the queue grows without bound: median TTFT {_g(m_first)} s for the first "
                  f"third of arrivals, {_g(m_last)} s for the last (+{growth:.2f} s per s of "
                  f"traffic); {_g(offered)} req/s offered, {_g(completed_per_s)} req/s served")


def _g(x: float) -> str:
    """3 significant digits without an exponent up to 10^6."""
    return f"{x:,.0f}" if 1e3 <= abs(x) < 1e6 else f"{x:.3g}"
