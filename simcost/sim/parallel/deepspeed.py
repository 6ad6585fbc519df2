"""DeepSpeed ZeRO's ``zero_optimization`` buffer sizes, read from a ds_config (what it allocates
is priced by :func:`simcost.sim.parallel.memory.deepspeed_memory`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from simcost.errors import SimcostError


@dataclass(frozen=True)
class DeepSpeedZero:
    """The DeepSpeed ``zero_optimization`` buffer sizes (elements) a ZeRO plan runs with.

    Defaults are DeepSpeed's own (deepspeed/runtime/zero/config.py: ``reduce_bucket_size`` and
    ``allgather_bucket_size`` 5e8, ``overlap_comm`` false for ZeRO-1/2 and true for ZeRO-3,
    ``contiguous_gradients`` true, ``stage3_prefetch_bucket_size`` 5e7,
    ``stage3_max_live_parameters`` 1e9, ``stage3_param_persistence_threshold`` 1e5).
    ``allgather_bucket_size`` is recorded but allocates nothing on torch >= 1.13 (the updated
    partitions are all-gathered in place with ``all_gather_into_tensor``); the stage-3 prefetch
    and live-parameter limits bound the gathered weights, which the plan already prices as two
    unsharded layers in flight."""
    reduce_bucket_size: float = 5e8
    allgather_bucket_size: float = 5e8
    overlap_comm: bool | None = None          # None: DeepSpeed's default (True only for ZeRO-3)
    contiguous_gradients: bool = True
    stage3_prefetch_bucket_size: float = 5e7
    stage3_max_live_parameters: float = 1e9
    stage3_param_persistence_threshold: float = 1e5
    source: str = "DeepSpeed defaults"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e15:
                    raise SimcostError(f"ds_config '{f.name}' must be a finite number > 0, "
                                       f"got {v!r}")
            elif f.name in ("overlap_comm", "contiguous_gradients"):
                if not (isinstance(v, bool) or (v is None and f.name == "overlap_comm")):
                    raise SimcostError(f"ds_config '{f.name}' must be true or false, got {v!r}")

    def overlap(self, zero: int) -> bool:
        return (zero == 3) if self.overlap_comm is None else bool(self.overlap_comm)

    def buffer_bytes(self, zero: int, elem: int = 2) -> tuple[float, float]:
        """(bytes live through the backward only, bytes resident) of the gradient buckets."""
        if zero == 3:
            return 0.0, float(self.reduce_bucket_size) * elem
        if not self.contiguous_gradients:
            return 0.0, 0.0
        return (2 if self.overlap(zero) else 1) * float(self.reduce_bucket_size) * elem, 0.0

    @classmethod
    def from_config(cls, zero_cfg: dict, hidden: int | None = None, source: str = "") -> "DeepSpeedZero":
        """From a ds_config ``zero_optimization`` dict; ``"auto"`` filled as HF transformers'
        HfTrainerDeepSpeedConfig does (hidden^2, 0.9 hidden^2, 10 hidden)."""
        auto = {"reduce_bucket_size": (hidden or 0) ** 2,
                "stage3_prefetch_bucket_size": 0.9 * (hidden or 0) ** 2,
                "stage3_param_persistence_threshold": 10 * (hidden or 0)}
        if not isinstance(zero_cfg, dict):
            raise SimcostError("deepspeed must be a DeepSpeedZero or a zero_optimization dict")
        names = {f.name for f in dataclasses.fields(cls)} - {"source"}
        # keys that change nothing simcost prices (the stage is --zero's; offload is --offload)
        inert = {"stage", "offload_optimizer", "offload_param", "round_robin_gradients",
                 "sub_group_size", "stage3_gather_16bit_weights_on_model_save",
                 "stage3_max_reuse_distance", "reduce_scatter", "allgather_partitions",
                 "load_from_fp32_weights", "elastic_checkpoint", "ignore_unused_parameters"}
        unknown = sorted(set(zero_cfg) - names - inert)
        if unknown:
            raise SimcostError(f"ds_config zero_optimization: unknown key '{unknown[0]}'")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in zero_cfg and f.name != "source":
                v = zero_cfg[f.name]
                if v == "auto":
                    if f.name not in auto or not hidden:
                        raise SimcostError(f"ds_config '{f.name}': 'auto' needs the hidden size")
                    v = auto[f.name]
                kw[f.name] = v
        return cls(**kw, source=source or "ds_config")
