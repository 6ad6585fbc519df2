"""The request of ``simcost plan serve`` (:class:`ServePlanRequest`): a workload, a serving SLO
and the space of fleets to search. The CLI (:mod:`simcost.plan.serve`) and the Python API
(:func:`simcost.plan.serve_search.plan_serve`) both build it; the search reads only this.

A field left ``None`` was not given: the search space's default applies (every bundled GPU
profile with a price, the tensor-parallel degrees the model's heads allow up to 8, the
engine's own LoRA kernel). At least one SLO (``slo_ttft`` or ``slo_tpot``) is required: with
neither, "meets the SLO" would mean only "keeps up", and the cheapest fleet that merely keeps
up queues requests for as long as the run lasts.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictInt, field_validator, model_validator

from simcost.request.fields import MAX_REQUESTS, Devices, FinitePos, Rank
from simcost.request.serve import (MAX_ADAPTERS, MAX_SEED, SIM_DEFAULTS, Routing, Traffic, _ranks,
                                   _Serve)

MAX_TP = 8                 # tensor parallelism stays inside one 8-GPU node
DEFAULT_REQUESTS = 1000
DEFAULT_TOP = 3


def _names(v):
    """'a,b' or a list -> a tuple of stripped names (None stays None)."""
    if v is None:
        return None
    items = v.split(",") if isinstance(v, str) else list(v)
    return tuple(str(x).strip() for x in items if str(x).strip()) or None


class ServePlanRequest(Traffic):
    """What to plan: the model and its adapters, the traffic, the SLO, the fleets to search."""
    model: str
    adapters: Annotated[StrictInt, Field(ge=0, le=MAX_ADAPTERS)] = 0
    ranks: tuple[Rank, ...] | None = None
    rate: FinitePos
    slo_ttft: FinitePos | None = None
    slo_tpot: FinitePos | None = None
    hardware: tuple[str, ...] | None = None      # None: every bundled GPU with a price; ('all',)
    tp: tuple[Annotated[StrictInt, Field(ge=1, le=MAX_TP)], ...] | None = None
    lora_kernels: tuple[str, ...] | None = None  # None: the engine's own
    engine: str | None = None
    routing: Routing | None = None
    popularity_alpha: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None
    requests: Annotated[StrictInt, Field(ge=1, le=MAX_REQUESTS)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    max_devices: Devices = 16
    top: Annotated[StrictInt, Field(ge=1, le=100)] = DEFAULT_TOP   # fleets the table shows

    # the serving requests' constructor: a cross-field check's own sentence is the one line
    build = classmethod(_Serve.build.__func__)

    @field_validator("ranks", mode="before")
    @classmethod
    def _parse_ranks(cls, v):
        return _ranks(v)

    @field_validator("tp", mode="before")
    @classmethod
    def _parse_tp(cls, v):
        return _ranks(v, "--tp")         # a comma-separated integer list, like --ranks

    @field_validator("hardware", "lora_kernels", mode="before")
    @classmethod
    def _lists(cls, v):
        return _names(v)

    @model_validator(mode="after")
    def _consistent(self):
        if self.slo_ttft is None and self.slo_tpot is None:
            raise ValueError("give an SLO: --slo-ttft SECONDS and/or --slo-tpot SECONDS (p99)")
        if self.requests is not None and self.duration is not None:
            raise ValueError("give --requests or --duration, not both")
        n = self.n_requests
        if n > MAX_REQUESTS:
            raise ValueError(f"--rate x --duration asks for {n:.4g} requests; at most "
                             f"{MAX_REQUESTS:.0e} are simulated")
        if self.ranks is not None and self.adapters == 0:
            raise ValueError("--ranks needs --adapters N (N >= 1); --adapters 0 serves the "
                             "base model")
        if self.lora_kernels is not None and self.adapters == 0:
            raise ValueError("--lora-kernels needs --adapters N (N >= 1)")
        return self

    @property
    def n_requests(self) -> int:
        """Requests each simulation of the full fleet draws (``round(rate x duration)``)."""
        if self.duration is not None:
            return max(1, round(self.rate * self.duration))
        return self.requests or DEFAULT_REQUESTS

    def duration_at(self, rate: float) -> float:
        """Traffic seconds that draw ``n_requests`` requests at ``rate`` (or the given
        ``--duration`` at the planned rate)."""
        if self.duration is not None and rate == self.rate:
            return float(self.duration)
        return self.n_requests / rate

    def eff(self, name: str):
        v = getattr(self, name)
        return SIM_DEFAULTS[name] if v is None else v
