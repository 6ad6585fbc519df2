"""The profile schema (pydantic, used at the file edge only) and loading by name or path.

The simulator reads a plain :class:`Device` (SI floats) built from the validated file, so the
hot path never touches pydantic. Every number is checked on load: peaks, bandwidths, memory and
latencies finite and in range, efficiencies in (0, 1], counts whole and >= 1, measured tables
well-formed. A violation is one line naming the field path and the value.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from functools import cached_property, lru_cache
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      ValidationInfo, model_validator)

from simcost.jsonio import describe_error, load_validated, profile_file, read_json  # noqa: F401
from simcost.paths import data_dir

PROFILE_DIR = data_dir("hardware_profiles")
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


def _number(v: Any) -> Any:
    """A JSON number (not a bool, not a string)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number, got {v!r}")
    return v


def _whole(v: float) -> float:
    if v != int(v):
        raise ValueError(f"must be a whole number, got {v}")
    return v


Num = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
PosNum = Annotated[Num, Field(gt=0)]
NonNegNum = Annotated[Num, Field(ge=0)]
EffNum = Annotated[Num, Field(gt=0, le=1)]
CountNum = Annotated[Num, Field(ge=1), AfterValidator(_whole)]


class Quantity(BaseModel):
    """A number with its source. The plain class checks finiteness only; the subclasses below
    state each field's range."""
    model_config = ConfigDict(extra="forbid")
    value: Num
    source: str
    derived: bool = False
    note: str | None = None


class PosQuantity(Quantity):
    value: PosNum


class NonNegQuantity(Quantity):
    value: NonNegNum


class EffQuantity(Quantity):
    value: EffNum
    # True: no measurement of this device, a stand-in (the median of its vendor's measured
    # devices); estimates say so in a warning. population_p10 / _p90: the spread of the
    # measured values it stands in for, which widens the estimates' step-time interval
    stand_in: bool = False
    population_p10: EffNum | None = None
    population_p90: EffNum | None = None


class CountQuantity(Quantity):
    value: CountNum


PriceBasis = Literal["rental", "owned", "none"]
PRICE_GIVEN = "given in the profile"     # the source a plain-number price is recorded with
_DATE = re.compile(r"(\d{4})-(\d{2})(?:-(\d{2}))?")


def _price_date(v: str) -> str:
    """``YYYY-MM-DD`` or ``YYYY-MM``: the date of the price snapshot."""
    import datetime
    m = _DATE.fullmatch(v)
    try:
        if m is None:
            raise ValueError
        datetime.date(int(m[1]), int(m[2]), int(m[3] or 1))
    except ValueError:
        raise ValueError(f"must be a date YYYY-MM-DD or YYYY-MM, got {v!r}") from None
    return v


def _plain_price(v: Any) -> Any:
    """A plain non-negative number (a user's own figure) becomes a quantity sourced
    ``PRICE_GIVEN``, with no date."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"value": v, "source": PRICE_GIVEN,
                "note": "a plain number in the profile: the user's own figure, unsourced"}
    return v


class PriceQuantity(NonNegQuantity):
    """USD per device-hour with its source and ``date`` (``YYYY-MM-DD`` or ``YYYY-MM``) of the
    price snapshot; a plain number in the profile is read as one sourced ``PRICE_GIVEN``."""
    date: Annotated[str, AfterValidator(_price_date)] | None = None

    @property
    def given(self) -> bool:
        return self.source == PRICE_GIVEN

    @model_validator(mode="after")
    def _dated(self):
        if self.date is None and not self.given:
            raise ValueError("needs the date of its price snapshot (\"date\": \"YYYY-MM-DD\" or "
                             "\"YYYY-MM\"), or give the price as a plain number")
        return self


class AllocatorQuantity(Quantity):
    """The host allocator a calibration ran under (see simcost.hardware.host_allocator)."""
    value: Literal["glibc", "tcmalloc", "jemalloc", "mimalloc", "unknown"]


class Peaks(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fp32: PosQuantity
    tf32: PosQuantity | None = None
    bf16: PosQuantity | None = None
    fp16: PosQuantity | None = None
    fp8: PosQuantity | None = None
    int8: PosQuantity | None = None


class Link(BaseModel):
    """A device's link. ``bandwidth_bytes_per_s``: one direction, all of the device's links
    together (> 0: a device without a device-to-device link has no ``interconnect``).
    ``torus_dims`` (TPU ICI): the devices form a wrap-around torus of that many
    dimensions, every device with 2 links per axis; a collective over a group gets the
    bandwidth of the axes the group spans (see :mod:`simcost.sim.collectives`).
    ``domain_devices``: how many devices share this link (an NVLink domain: 8 in an HGX
    server, 72 in a GB200 NVL72 rack); absent: 8."""
    model_config = ConfigDict(extra="forbid")
    kind: str
    bandwidth_bytes_per_s: PosQuantity | None = None
    latency_s: NonNegQuantity | None = None
    torus_dims: CountQuantity | None = None
    domain_devices: CountQuantity | None = None


def _ascending(xs: list[float], what: str) -> None:
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"{what} must be strictly ascending, got {xs}")


class GemmTable(BaseModel):
    """Measured GEMM throughput on a grid of shapes (calibrated profiles): FLOP/s at
    (m[i], n[j], k[l]); at least 2 sizes per axis (the time model interpolates in log2 size)."""
    model_config = ConfigDict(extra="forbid")
    m: list[PosNum] = Field(min_length=2)
    n: list[PosNum] = Field(min_length=2)
    k: list[PosNum] = Field(min_length=2)
    flops_per_s: list[list[list[PosNum]]]

    @model_validator(mode="after")
    def _shape(self):
        for a in ("m", "n", "k"):
            _ascending(getattr(self, a), a)
        g = self.flops_per_s
        if len(g) != len(self.m) or any(len(r) != len(self.n) for r in g) or \
                any(len(c) != len(self.k) for r in g for c in r):
            raise ValueError(f"flops_per_s must be a {len(self.m)} x {len(self.n)} x "
                             f"{len(self.k)} grid (m x n x k)")
        return self


class StreamTable(BaseModel):
    """Measured bandwidth of element-wise kernels by bytes moved (calibrated profiles)."""
    model_config = ConfigDict(extra="forbid")
    bytes: list[PosNum] = Field(min_length=1)
    bytes_per_s: list[PosNum] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self):
        _ascending(self.bytes, "bytes")
        if len(self.bytes) != len(self.bytes_per_s):
            raise ValueError(f"bytes and bytes_per_s must have the same length, got "
                             f"{len(self.bytes)} and {len(self.bytes_per_s)}")
        return self


def _finite_everywhere(x: Any, path: str) -> None:
    """Any number in free-form metadata is finite (a NaN anywhere is refused)."""
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"{path} must be finite, got {x}")
    if isinstance(x, dict):
        for k, v in x.items():
            _finite_everywhere(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _finite_everywhere(v, f"{path}[{i}]")


class TimeModelSpec(BaseModel):
    """Parameters of the per-op time model (all optional; see simcost.sim.timing). Other keys
    (calibration metadata) are kept as they are, provided every number in them is finite."""
    model_config = ConfigDict(extra="allow")
    matmul_efficiency: EffQuantity | None = None      # achievable / dense peak at large shapes
    matmul_efficiency_fp8: EffQuantity | None = None  # the same for fp8 (lower than 16-bit)
    bandwidth_efficiency: EffQuantity | None = None   # achievable / datasheet bandwidth
    compute_units: CountQuantity | None = None        # SMs / CUs / cores: wave quantisation
    tile_m: CountQuantity | None = None
    tile_n: CountQuantity | None = None
    matmul_half_m: PosQuantity | None = None          # fitted saturation (calibrated profiles)
    matmul_half_n: PosQuantity | None = None
    matmul_half_k: PosQuantity | None = None
    matmul_sharpness_m: PosQuantity | None = None
    matmul_sharpness_n: PosQuantity | None = None
    matmul_sharpness_k: PosQuantity | None = None
    step_overhead_s: NonNegQuantity | None = None     # per-step host work (framework, Python)
    dispatch_s: NonNegQuantity | None = None          # host time per eager-framework kernel
    # fused (flash) attention: achieved / dense peak, causal FLOPs counted as half
    attention_efficiency_fwd: EffQuantity | None = None
    attention_efficiency_bwd: EffQuantity | None = None
    attention_efficiency_fp8_fwd: EffQuantity | None = None
    attention_efficiency_fp8_bwd: EffQuantity | None = None
    comm_overlap_sms: NonNegQuantity | None = None    # SMs a concurrent collective occupies
    # CPU host allocator (simcost calibrate; see simcost.hardware.host_allocator): its name,
    # the page-fault cost of a fresh block and the block size it returns to the OS from
    host_allocator: AllocatorQuantity | None = None
    fresh_alloc_bytes_per_s: PosQuantity | None = None
    host_alloc_return_threshold_bytes: PosQuantity | None = None
    # measured tables (calibrated profiles)
    gemm_table: dict[Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8"], GemmTable] | None = None
    stream_table: StreamTable | None = None
    special_rates: dict[str, PosNum] | None = None    # elements (or parameters) per second

    @model_validator(mode="after")
    def _extras_finite(self):
        for k, v in (self.model_extra or {}).items():
            _finite_everywhere(v, k)
        return self


TABLE_FIELDS = ("gemm_table", "stream_table", "special_rates")
SCALAR_FIELDS = tuple(k for k in TimeModelSpec.model_fields if k not in TABLE_FIELDS)


class HardwareProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    display_name: str
    kind: Literal["gpu", "tpu", "edge", "cpu"]
    vendor: str
    peak_flops_per_s: Peaks
    memory_bytes: PosQuantity
    memory_bandwidth_bytes_per_s: PosQuantity
    runtime_overhead_bytes: NonNegQuantity
    launch_overhead_s: NonNegQuantity
    interconnect: Link | None = None     # None: no device-to-device link (one device only)
    host_link: Link | None = None
    tdp_w: PosQuantity | None = None
    price_usd_per_hour: Annotated[PriceQuantity | None, BeforeValidator(_plain_price)] = None
    # rental: a price per device-hour; owned: an amortised purchase price (derived); none: no
    # price. Required in bundled profiles; a user profile defaults to rental with a price, else none
    price_basis: PriceBasis | None = None
    time_model: TimeModelSpec | None = None
    notes: dict[str, str] | None = None  # field name -> remark (e.g. why there is no interconnect)

    @model_validator(mode="after")
    def _price(self, info: ValidationInfo):
        bundled = bool(info.context and info.context.get("bundled"))
        q, basis = self.price_usd_per_hour, self.price_basis
        if basis is None:
            if bundled:
                raise ValueError("price_basis is missing: a bundled profile states rental, owned "
                                 "or none")
            self.price_basis = basis = "rental" if q is not None else "none"
        if basis == "none" and q is not None:
            raise ValueError(f"price_basis none takes no price_usd_per_hour (got {q.value} USD/h):"
                             f" drop the price or state price_basis rental or owned")
        if basis != "none" and q is None:
            raise ValueError(f"price_basis {basis} needs price_usd_per_hour (USD per device-hour)")
        if basis == "owned" and q is not None and not q.given and not q.derived:
            raise ValueError("an owned price is an amortised purchase price: mark "
                             "price_usd_per_hour derived: true and state the lifetime in its note")
        if bundled and q is not None and q.given:
            raise ValueError("a bundled profile's price_usd_per_hour is a quantity with value, "
                             "source and date, not a plain number")
        if bundled and basis == "none" and not (self.notes or {}).get("price_usd_per_hour"):
            raise ValueError("price_basis none in a bundled profile needs the reason in "
                             "notes.price_usd_per_hour")
        return self

    def device(self) -> "Device":
        pk = self.peak_flops_per_s
        peaks = {k: getattr(pk, k).value for k in DTYPES if getattr(pk, k) is not None}
        tm = {}
        if self.time_model is not None:
            for k in SCALAR_FIELDS:
                q = getattr(self.time_model, k)
                if q is not None:
                    tm[k] = q.value
            for k in TABLE_FIELDS:
                t = getattr(self.time_model, k)
                if t is not None:
                    tm[k] = ({dt: v.model_dump() for dt, v in t.items()} if k == "gemm_table"
                             else t.model_dump() if isinstance(t, BaseModel) else dict(t))
            tm.update(self.time_model.model_extra or {})   # calibration metadata
        given = {k: getattr(self.time_model, k) for k in SCALAR_FIELDS} \
            if self.time_model is not None else {}
        stand_ins = tuple(k for k, q in given.items() if getattr(q, "stand_in", False))
        spread = [(given[k].value / given[k].population_p90,
                   given[k].value / given[k].population_p10) for k in stand_ins
                  if given[k].population_p10 is not None and given[k].population_p90 is not None]
        q = self.price_usd_per_hour
        return Device(self.name, self.kind, peaks, self.memory_bytes.value,
                      self.memory_bandwidth_bytes_per_s.value, self.runtime_overhead_bytes.value,
                      self.launch_overhead_s.value, q.value if q is not None else None, tm,
                      price_basis=self.price_basis,
                      price_source=q.source if q is not None else None,
                      price_date=q.date if q is not None else None, stand_ins=stand_ins,
                      stand_in_time_factors=(min(lo for lo, _ in spread),
                                             max(hi for _, hi in spread)) if spread else None)


@dataclass(frozen=True)
class TimeModelParams:
    """The time-model values of a profile as typed attributes (None: the profile does not give
    it; the time model then uses its default). One field per scalar of :class:`TimeModelSpec`,
    the measured tables as plain dicts, and ``extras`` for calibration metadata."""
    matmul_efficiency: float | None = None
    matmul_efficiency_fp8: float | None = None
    bandwidth_efficiency: float | None = None
    compute_units: float | None = None
    tile_m: float | None = None
    tile_n: float | None = None
    matmul_half_m: float | None = None
    matmul_half_n: float | None = None
    matmul_half_k: float | None = None
    matmul_sharpness_m: float | None = None
    matmul_sharpness_n: float | None = None
    matmul_sharpness_k: float | None = None
    step_overhead_s: float | None = None
    dispatch_s: float | None = None
    attention_efficiency_fwd: float | None = None
    attention_efficiency_bwd: float | None = None
    attention_efficiency_fp8_fwd: float | None = None
    attention_efficiency_fp8_bwd: float | None = None
    comm_overlap_sms: float | None = None
    host_allocator: str | None = None
    fresh_alloc_bytes_per_s: float | None = None
    host_alloc_return_threshold_bytes: float | None = None
    gemm_table: dict | None = None       # dtype -> {"m", "n", "k", "flops_per_s"}
    stream_table: dict | None = None     # {"bytes", "bytes_per_s"}
    special_rates: dict | None = None    # kind -> per second
    extras: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, tm: dict | None) -> "TimeModelParams":
        tm = dict(tm or {})
        known = {f.name for f in fields(cls)} - {"extras"}
        return cls(**{k: tm[k] for k in known if k in tm},
                   extras={k: v for k, v in tm.items() if k not in known})


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    peak_flops_per_s: dict
    memory_bytes: float
    memory_bandwidth_bytes_per_s: float
    runtime_overhead_bytes: float
    launch_overhead_s: float
    price_usd_per_hour: float | None    # USD per device-hour; None: no price (basis none)
    time_model: dict | None = None      # the same values as a dict (readers migrate to .params)
    # "rental" (a price per device-hour), "owned" (an amortised purchase price) or "none";
    # absent: rental with a price, none without. The source and date of the price (a plain
    # number in a user profile: source PRICE_GIVEN, no date)
    price_basis: str | None = None
    price_source: str | None = None
    price_date: str | None = None
    stand_ins: tuple = ()               # time-model values that are stand-ins, not measurements
    # (low, high) factors on a step time from the spread of the measured values the stand-ins
    # replace: time scales as 1 / efficiency (None: no stand-in with a known spread)
    stand_in_time_factors: tuple | None = None

    def __post_init__(self):
        if self.price_basis is None:
            object.__setattr__(self, "price_basis",
                               "none" if self.price_usd_per_hour is None else "rental")
        if self.price_basis not in ("rental", "owned", "none"):
            raise ValueError(f"price_basis must be rental, owned or none, got {self.price_basis!r}")
        if (self.price_basis == "none") != (self.price_usd_per_hour is None):
            raise ValueError(f"price_basis {self.price_basis} with price_usd_per_hour "
                             f"{self.price_usd_per_hour}: basis none means no price")

    @cached_property
    def params(self) -> TimeModelParams:
        """The time-model values as typed fields (derived from ``time_model``, so a
        ``dataclasses.replace(dev, time_model=...)`` stays consistent)."""
        return TimeModelParams.from_dict(self.time_model)

    def matmul_peak(self, dtype: str) -> float:
        """Dense matrix peak for ``dtype``; fp32 GEMMs use TF32 tensor cores only if asked."""
        p = self.peak_flops_per_s
        if dtype in p:
            return p[dtype]
        if dtype == "bf16" and "fp16" in p:      # V100: no bf16 path, emulated at fp32 rate
            return p["fp32"]
        return p["fp32"]

    def vector_peak(self) -> float:
        return self.peak_flops_per_s["fp32"]


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def _read_json(path: str, shown: str) -> Any:
    """The profile file's JSON value (one line for an unreadable file: see simcost.jsonio)."""
    return read_json(path, "hardware profile")


@lru_cache(maxsize=64)
def _load_file(path: str, shown: str, bundled: bool = False) -> HardwareProfile:
    """A bundled profile is held to more (``price_basis`` stated, a price sourced and dated)."""
    return load_validated(HardwareProfile, _read_json(path, shown), "hardware profile", shown,
                          context={"bundled": bundled})


def load_profile(name_or_path: str) -> HardwareProfile:
    file, shown, bundled = profile_file(name_or_path, PROFILE_DIR, "hardware", list_profiles)
    return _load_file(file, shown, bundled)
