"""The profile schema (pydantic, used at the file edge only) and loading by name or path.

The simulator reads a plain :class:`Device` (SI floats) built from the validated file, so the
hot path never touches pydantic.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from simcost.errors import SimcostError, unknown
from simcost.paths import data_dir

PROFILE_DIR = data_dir("hardware_profiles")


class Quantity(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float
    source: str
    derived: bool = False
    note: str | None = None


class Peaks(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fp32: Quantity
    tf32: Quantity | None = None
    bf16: Quantity | None = None
    fp16: Quantity | None = None
    fp8: Quantity | None = None
    int8: Quantity | None = None


class Link(BaseModel):
    """A device's link. ``bandwidth_bytes_per_s``: one direction, all of the device's links
    together. ``torus_dims`` (TPU ICI): the devices form a wrap-around torus of that many
    dimensions, every device with 2 links per axis; a collective over a group gets the
    bandwidth of the axes the group spans (see :mod:`simcost.sim.collectives`).
    ``domain_devices``: how many devices share this link (an NVLink domain: 8 in an HGX
    server, 72 in a GB200 NVL72 rack); absent: 8."""
    model_config = ConfigDict(extra="forbid")
    kind: str
    bandwidth_bytes_per_s: Quantity | None = None
    latency_s: Quantity | None = None
    torus_dims: Quantity | None = None
    domain_devices: Quantity | None = None


class TimeModelSpec(BaseModel):
    """Parameters of the per-op time model (all optional; see simcost.sim.timing)."""
    model_config = ConfigDict(extra="allow")
    matmul_efficiency: Quantity | None = None      # achievable / dense peak at large shapes
    matmul_efficiency_fp8: Quantity | None = None  # the same for fp8 (lower than 16-bit)
    bandwidth_efficiency: Quantity | None = None   # achievable / datasheet bandwidth
    compute_units: Quantity | None = None          # SMs / CUs / cores: wave quantisation
    tile_m: Quantity | None = None
    tile_n: Quantity | None = None
    matmul_half_m: Quantity | None = None          # fitted saturation (calibrated profiles)
    matmul_half_n: Quantity | None = None
    matmul_half_k: Quantity | None = None
    matmul_sharpness_m: Quantity | None = None
    matmul_sharpness_n: Quantity | None = None
    matmul_sharpness_k: Quantity | None = None
    step_overhead_s: Quantity | None = None        # per-step host work (framework, Python)
    dispatch_s: Quantity | None = None             # host time per eager-framework kernel
    # fused (flash) attention: achieved / dense peak, causal FLOPs counted as half
    attention_efficiency_fwd: Quantity | None = None
    attention_efficiency_bwd: Quantity | None = None
    attention_efficiency_fp8_fwd: Quantity | None = None
    attention_efficiency_fp8_bwd: Quantity | None = None
    comm_overlap_sms: Quantity | None = None       # SMs a concurrent collective occupies


class HardwareProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    display_name: str
    kind: Literal["gpu", "tpu", "edge", "cpu"]
    vendor: str
    peak_flops_per_s: Peaks
    memory_bytes: Quantity
    memory_bandwidth_bytes_per_s: Quantity
    runtime_overhead_bytes: Quantity
    launch_overhead_s: Quantity
    interconnect: Link | None = None
    host_link: Link | None = None
    tdp_w: Quantity | None = None
    price_usd_per_hour: Quantity | None = None
    time_model: TimeModelSpec | None = None

    def device(self) -> "Device":
        pk = self.peak_flops_per_s
        peaks = {k: getattr(pk, k).value for k in ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")
                 if getattr(pk, k) is not None}
        tm = {}
        if self.time_model is not None:
            for k in TimeModelSpec.model_fields:
                q = getattr(self.time_model, k)
                if q is not None:
                    tm[k] = q.value
            tm.update(self.time_model.model_extra or {})   # measured tables, metadata
        return Device(self.name, self.kind, peaks, self.memory_bytes.value,
                      self.memory_bandwidth_bytes_per_s.value, self.runtime_overhead_bytes.value,
                      self.launch_overhead_s.value,
                      self.price_usd_per_hour.value if self.price_usd_per_hour else None, tm)


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    peak_flops_per_s: dict
    memory_bytes: float
    memory_bandwidth_bytes_per_s: float
    runtime_overhead_bytes: float
    launch_overhead_s: float
    price_usd_per_hour: float | None
    time_model: dict | None = None

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


@lru_cache(maxsize=64)
def _load_file(path: str) -> HardwareProfile:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise SimcostError(f"malformed JSON in {path}: {e.msg} at line {e.lineno}") from None
    except OSError as e:
        raise SimcostError(f"cannot read hardware profile {path}: {e.strerror}") from None
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise SimcostError(f"invalid hardware profile {path}: {loc}: {err['msg']}") from None


def load_profile(name_or_path: str) -> HardwareProfile:
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise SimcostError(f"no hardware profile file at '{name_or_path}'")
        return _load_file(str(p.resolve()))
    file = PROFILE_DIR / f"{name_or_path}.json"
    if not file.is_file():
        raise unknown("hardware", name_or_path, list_profiles())
    return _load_file(str(file))
