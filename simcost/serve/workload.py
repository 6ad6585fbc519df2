"""The requests a serving simulation replays: synthetic draws or a validated trace.

``round(rate · duration)`` requests with gamma inter-arrival times with shape ``1/cv²`` and
mean ``1/rate`` (cv = 1: Poisson); prompt and output lengths uniform integers in ``[lo, hi]``;
the adapter of a request is ``floor(N · X)`` with ``X ~ Power(alpha)`` (pdf
``alpha·x^(alpha−1)``; alpha = 1 is uniform, smaller alpha concentrates on low ids).
``generator='slora'`` draws them exactly as S-LoRA's benchmark does (``benchmarks/trace.py`` of
S-LoRA/S-LoRA: legacy ``np.random`` seeded once, ``int(rate · duration)`` requests, upper
bounds exclusive). A trace (``time,adapter,prompt_len,output_len``) is read and checked row
by row by :func:`simcost.request.serve.read_trace`; the workload receives its arrays.

The work is O(requests): nothing is allocated per adapter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simcost.errors import SimcostError
from simcost.request.fields import MAX_REQUESTS

GENERATORS = ("default", "slora")   # how synthetic requests are drawn (Workload.generator)


def request_count(rate: float, duration: float, generator: str = "default") -> int:
    """How many requests ``rate`` x ``duration`` draws (the generator's own rounding)."""
    x = rate * duration
    return max(1, int(x) if generator == "slora" else int(round(x)))


def check_request_count(n: int | float, what: str = "--rate x --duration") -> None:
    if not np.isfinite(n) or n > MAX_REQUESTS:
        raise SimcostError(f"{what} asks for {n:.3g} requests; at most {MAX_REQUESTS:.0e} "
                           "are simulated")


@dataclass
class Workload:
    rate: float = 10.0
    duration: float = 60.0
    cv: float = 1.0
    input_len: tuple = (8, 512)
    output_len: tuple = (8, 512)
    adapters: int = 1
    ranks: tuple = (8,)
    popularity_alpha: float = 1.0
    # (time, adapter, prompt_len, output_len) arrays of a validated trace (read_trace)
    requests: tuple | None = None
    n_requests: int | None = None     # all arriving at t = 0 when rate is inf (offline)
    seed: int = 0
    # "default": numpy Generator(seed), lengths uniform on [lo, hi]; "slora": the draws of
    # S-LoRA's benchmark generator (S-LoRA/S-LoRA benchmarks/trace.py generate_requests, run
    # by benchmarks/run_exp.py with seed 42): legacy np.random seeded once, then
    # power(alpha, n) for the adapter, randint(lo, hi, n) for prompt and output lengths
    # (upper bound exclusive), gamma(1/cv², cv²/rate, n) gaps, n = int(rate · duration), so
    # the simulated requests are the benchmark's own
    generator: str = "default"

    def generate(self):
        """(arrival_s, adapter, prompt_len, output_len), sorted by arrival."""
        if self.requests is not None:
            return self.requests
        self._check()
        out = _slora_generate(self) if self.generator == "slora" else _default_generate(self)
        if not np.all(np.isfinite(out[0])):
            raise SimcostError(f"--rate {self.rate:g} with --cv {self.cv:g} gives arrival "
                               "times beyond floating point")
        return out

    def _check(self):
        if self.generator not in GENERATORS:
            raise SimcostError(f"unknown generator '{self.generator}'; valid: "
                               f"{', '.join(GENERATORS)}")
        if not self.rate > 0:
            raise SimcostError(f"--rate must be > 0, got {self.rate}")
        for name, v in (("--cv", self.cv), ("--popularity-alpha", self.popularity_alpha),
                        ("--duration", self.duration)):
            if not (np.isfinite(v) and v > 0):
                raise SimcostError(f"{name} must be finite and > 0, got {v}")
        (lo_i, hi_i), (lo_o, hi_o) = self.input_len, self.output_len
        if lo_i < 1 or hi_i < lo_i or lo_o < 1 or hi_o < lo_o:
            raise SimcostError("lengths must be MIN:MAX with 1 <= MIN <= MAX")
        if self.adapters < 1:
            raise SimcostError("a workload draws from at least one adapter (or the base model)")
        if np.isinf(self.rate):
            if self.generator == "slora":
                raise SimcostError("the S-LoRA generator needs a finite --rate")
            check_request_count(int(self.n_requests or 1000), "--n-requests")
        else:
            check_request_count(self.rate * self.duration)


def _adapter_draw(draw: np.ndarray, adapters: int) -> np.ndarray:
    return np.minimum((draw * adapters).astype(np.int64), adapters - 1)


def _default_generate(wl: Workload):
    rng = np.random.default_rng(wl.seed)
    (lo_i, hi_i), (lo_o, hi_o) = wl.input_len, wl.output_len
    if np.isinf(wl.rate):
        n = int(wl.n_requests or 1000)
        t = np.zeros(n)
    else:
        shape = 1.0 / wl.cv ** 2
        # round(rate x duration) requests, gamma gaps (mean 1/rate)
        n = request_count(wl.rate, wl.duration)
        t = np.cumsum(rng.gamma(shape, 1.0 / (shape * wl.rate), n))
    prompt = rng.integers(lo_i, hi_i + 1, n)
    out = rng.integers(lo_o, hi_o + 1, n)
    ad = _adapter_draw(rng.power(wl.popularity_alpha, n), wl.adapters)
    return t, ad, prompt.astype(np.int64), out.astype(np.int64)


def _slora_generate(wl: Workload):
    (lo_i, hi_i), (lo_o, hi_o) = wl.input_len, wl.output_len
    rs = np.random.RandomState(wl.seed)
    n = request_count(wl.rate, wl.duration, "slora")
    ad = _adapter_draw(rs.power(wl.popularity_alpha, n), wl.adapters)
    prompt = rs.randint(lo_i, max(hi_i, lo_i + 1), n).astype(np.int64)
    out = rs.randint(lo_o, max(hi_o, lo_o + 1), n).astype(np.int64)
    shape = 1.0 / wl.cv ** 2
    t = np.cumsum(rs.gamma(shape, wl.cv ** 2 / wl.rate, n))
    return t, ad, prompt, out
