"""The result layer: what the training entrances return, and the version of its JSON form.

``SCHEMA_VERSION`` is written as ``schema_version`` into every ``--json`` object; it changes
when a key is renamed or removed or its meaning changes (adding keys does not change it).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from simcost.models.config import ModelSpec
from simcost.peft.spec import PeftSpec
from simcost.stack.intervals import estimate_intervals

SCHEMA_VERSION = 2


class TrainEstimate(BaseModel):
    """One training-step estimate (SI units: FLOPs, bytes, seconds)."""
    model_config = ConfigDict(arbitrary_types_allowed=True)
    model: str
    hardware: str
    batch: int
    seq: int | None                 # None: a model without a token sequence (vision)
    dtype: str
    mixed_precision: str
    attn: str
    optimizer: str
    grad_checkpointing: bool
    peft: dict
    params: dict
    flops: dict
    memory_bytes: dict
    time_s: dict
    tokens_per_s: float | None      # None: images or samples, not tokens (samples_per_s)
    samples_per_s: float | None = None
    fits: bool
    parallel: dict | None = None    # multi-device / fp8 estimates: plan, per-device numbers
    checkpointing: str | None = None  # 'full' or 'selective' when activations are recomputed
    cost_usd: dict | None = None    # from the profile's price per device-hour, when it has one
    warnings: list[str] = []        # e.g. a sequence beyond the model's trained positions
    loss_chunks: int | None = None  # chunked cross-entropy (torchtune), when N > 1
    optimizer_in_backward: bool | None = None  # optimizer stepped per parameter in backward
    stack: dict | None = None       # the software stack priced: name, versions, alias
    intervals: dict | None = None   # p10-p90 of step_s and peak_bytes, or why there are none
    frontend: str | None = None     # 'analytic' (hand-built graph) or 'traced' (torch recorded)
    sizes: dict | None = None       # a traced model's sizes (batch, seq, target_seq, image)
    unpriced_ops: dict | None = None  # aten ops priced by their bytes alone: calls per step
    mfu: float | None = None        # model FLOPs utilisation of the step (simcost.sim.job.mfu)
    energy: dict | None = None      # joules per step from the profile's TDP (None: no TDP)
    job: dict | None = None         # the whole job (--tokens / --samples, --epochs)
    find: dict | None = None        # --find max-batch | max-seq: what was searched and found
    advice: list | None = None      # when it does not fit: the memory savers that would help

    def model_dump_public(self) -> dict:
        """The ``--json`` object: ``schema_version`` first, empty optional keys left out."""
        d = {"schema_version": SCHEMA_VERSION, **self.model_dump()}
        if not d.get("warnings"):
            d.pop("warnings", None)
        for k in ("parallel", "checkpointing", "cost_usd", "loss_chunks",
                  "optimizer_in_backward", "stack", "intervals", "sizes", "unpriced_ops",
                  "tokens_per_s", "mfu", "energy", "job", "find", "advice"):
            if d.get(k) is None:
                d.pop(k, None)
        return d

    @property
    def params_trainable(self) -> int:
        return self.params["trainable"]

    @property
    def params_total(self) -> int:
        return self.params["total"]


class MultiTrainEstimate(BaseModel):
    """N PEFT jobs sharing one frozen base (mLoRA/ASPEN BatchLoRA) against N separate runs."""
    jobs: int
    shared: TrainEstimate           # all N jobs in one process; batch = per-job batch
    separate: TrainEstimate         # one job alone (each of N separate runs)
    phases_s: dict                  # the shared step: base vs adapter ops, optimizer
    comparison: dict                # speed-up and memory against N separate runs

    def model_dump_public(self) -> dict:
        d = {"schema_version": SCHEMA_VERSION, **self.model_dump()}
        d["shared"] = self.shared.model_dump_public()
        d["separate"] = self.separate.model_dump_public()
        return d


def make_estimate(spec: ModelSpec | str, device, pspec: PeftSpec | dict, n, *, batch, seq,
                  dtype: str, mixed_precision: str, attn: str, optimizer: str, checkpointing,
                  flops: dict | None = None, memory_bytes: dict | None = None,
                  time_s: dict | None = None, tokens_per_s=None, fits=None,
                  parallel: dict | None = None, warnings: list[str] = (),
                  loss_chunks: int = 1, optimizer_in_backward: bool = False,
                  stack=None, counts_tokens: bool = True) -> TrainEstimate:
    """The one place a :class:`TrainEstimate` is assembled: parameter counts from ``n`` (a
    :class:`~simcost.sim.train.TrainNumbers`), every other number from ``n`` unless given
    (the multi-device path passes its per-device memory, time and whole-job FLOPs).
    ``spec`` is the model (or its name), ``pspec`` the method (or its result entry, for a
    traced adapter config); ``counts_tokens`` False: a model without tokens (``n``'s
    ``tokens_per_s`` then counts samples, and ``tokens_per_s`` is None)."""
    from simcost.sim.memory import ckpt_mode
    mode = ckpt_mode(checkpointing)
    f = float
    step_s = f((n.time_s if time_s is None else time_s)["step"])
    tok_s = f(n.tokens_per_s if tokens_per_s is None else tokens_per_s) if counts_tokens \
        else None
    name = spec if isinstance(spec, str) else spec.name
    peft_entry = pspec if isinstance(pspec, dict) else peft_dict(pspec)
    peft_warns = [] if isinstance(pspec, dict) else list(pspec.warnings)
    mem = {k: f(v) for k, v in (n.memory_bytes if memory_bytes is None else memory_bytes).items()}
    return TrainEstimate(
        model=name, hardware=device.name, batch=batch, seq=seq, dtype=dtype,
        mixed_precision=mixed_precision, attn=attn, optimizer=optimizer,
        grad_checkpointing=mode != "none", peft=peft_entry,
        params={"total": n.params_total, "trainable": n.params_trainable,
                "added": n.params_added, "with_adapters": n.params_total + n.params_added},
        flops={k: f(v) for k, v in (n.flops if flops is None else flops).items()},
        memory_bytes=mem,
        time_s={k: f(v) for k, v in (n.time_s if time_s is None else time_s).items()},
        tokens_per_s=tok_s, samples_per_s=batch / step_s if step_s else None,
        fits=bool(n.fits if fits is None else fits), parallel=parallel,
        checkpointing=None if mode == "none" else mode,
        cost_usd=run_cost(device.price_usd_per_hour, (parallel or {}).get("devices", 1), step_s,
                          tok_s),
        warnings=[*warnings, *peft_warns, *device_warnings(device)],
        loss_chunks=int(loss_chunks) if loss_chunks != 1 else None,
        optimizer_in_backward=True if optimizer_in_backward else None,
        stack=stack.label() if stack is not None else None,
        intervals=estimate_intervals(stack, device, step_s, mem["peak"])
        if stack is not None else None)


def device_warnings(device) -> list[str]:
    """What an estimate on ``device`` should say about its profile's time model."""
    if device.params.gemm_table:
        return []
    if device.params.matmul_efficiency is None:
        return [f"hardware profile '{device.name}' has no measured matmul efficiency "
                f"(time_model.matmul_efficiency): GEMMs are priced at the datasheet peak, an "
                f"optimistic bound ('simcost calibrate' on the device measures it)"]
    if device.stand_ins:
        return [f"hardware profile '{device.name}' has no measurement of its own for "
                f"{', '.join(device.stand_ins)}: the median of its vendor's measured devices "
                f"stands in ('simcost calibrate' on the device measures them)"]
    return []


def run_cost(price_per_device_hour: float | None, devices: int, step_s: float,
             tokens_per_s: float | None, source: str = "profile") -> dict | None:
    """The run's cost from a price per device-hour (None when there is none); ``source`` says
    where the price came from (the profile, or --price)."""
    if price_per_device_hour is None:
        return None
    per_hour = price_per_device_hour * devices
    return {"per_hour": per_hour, "per_step": per_hour * step_s / 3600,
            "per_million_tokens": per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s else None,
            "devices": devices, "price_per_device_hour": price_per_device_hour,
            "price_source": source}


def peft_dict(spec: PeftSpec) -> dict:
    d = {"method": "dora" if spec.dora else spec.method}
    if spec.method in ("lora", "dora", "qlora"):
        d.update(r=spec.r, alpha=spec.alpha, targets=spec.targets, rslora=spec.rslora,
                 dropout=spec.dropout)
        # what an adapter_config.json narrowed or varied (absent when it did not)
        for k in ("layers", "layers_pattern", "exclude", "modules_to_save", "bias"):
            v = getattr(spec, k)
            if v not in (None, (), "none"):
                d[k] = v
        if spec.rank_pattern:
            d["rank_pattern"] = dict(spec.rank_pattern)
        if spec.alpha_pattern:
            d["alpha_pattern"] = dict(spec.alpha_pattern)
    if spec.method in ("prefix", "prompt"):
        d["num_virtual_tokens"] = spec.num_virtual_tokens
    if spec.method == "lst":
        d["reduction"] = spec.side_reduction
    return d
