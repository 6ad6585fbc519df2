"""The Python what-if API: the same estimate as ``simcost estimate train``, as typed results.

>>> from simcost import estimate_train
>>> r = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=2048, peft="lora", rank=16)
>>> r.params_trainable
8388608
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from simcost.errors import SimcostError
from simcost.graph.ir import ModelGraph
from simcost.hardware import load_profile
from simcost.models.config import ModelSpec, load_model
from simcost.peft.spec import PeftSpec, from_adapter_config, validate
from simcost import pipeline
from simcost.sim.analysis import Analysis
from simcost.sim.train import check_options, train_numbers


class TrainEstimate(BaseModel):
    """One training-step estimate (SI units: FLOPs, bytes, seconds)."""
    model_config = ConfigDict(arbitrary_types_allowed=True)
    model: str
    hardware: str
    batch: int
    seq: int
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
    tokens_per_s: float
    fits: bool
    parallel: dict | None = None    # multi-device / fp8 estimates: plan, per-device numbers
    checkpointing: str | None = None  # 'full' or 'selective' when activations are recomputed
    cost_usd: dict | None = None    # from the profile's price per device-hour, when it has one
    warnings: list[str] = []        # e.g. a sequence beyond the model's trained positions
    loss_chunks: int | None = None  # chunked cross-entropy (torchtune), when N > 1
    optimizer_in_backward: bool | None = None  # optimizer stepped per parameter in backward

    def model_dump_public(self) -> dict:
        d = self.model_dump()
        if not d.get("warnings"):
            d.pop("warnings", None)
        for k in ("parallel", "checkpointing", "cost_usd", "loss_chunks",
                  "optimizer_in_backward"):
            if d.get(k) is None:
                d.pop(k, None)
        return d

    @property
    def params_trainable(self) -> int:
        return self.params["trainable"]

    @property
    def params_total(self) -> int:
        return self.params["total"]


def resolve_peft(peft: str | PeftSpec | None = None, peft_config: str | None = None,
                 **shorthand: Any) -> PeftSpec:
    if peft_config is not None:
        if peft not in (None, "full") and not isinstance(peft, PeftSpec):
            raise SimcostError("give either --peft or --peft-config, not both")
        return from_adapter_config(peft_config)
    if isinstance(peft, PeftSpec):
        return peft
    kw = {k: v for k, v in shorthand.items() if v is not None}
    if "targets" in kw and isinstance(kw["targets"], str) and kw["targets"] != "all-linear":
        kw["targets"] = tuple(t.strip() for t in kw["targets"].split(",") if t.strip())
    if "rank" in kw:
        kw["r"] = kw.pop("rank")
        kw.setdefault("alpha", 2 * kw["r"])
    spec = PeftSpec(method=peft or "full", **kw)
    validate(spec)
    return spec


def _model(model: str | ModelSpec, max_positions: int | None = None) -> ModelSpec:
    """The model's spec; ``max_positions`` states an extended context (``--max-positions``)."""
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if max_positions:
        import dataclasses
        spec = dataclasses.replace(spec, max_positions=int(max_positions))
    return spec


def _check_seq(spec: ModelSpec, seq, extra: int) -> list[str]:
    """Validate the sequence length; returns warnings for the estimate.

    A model with a learned position table (GPT-2) cannot run beyond it: an error. Rotary
    models (Llama, Mistral, Qwen, ...) compute positions for any length, and transformers runs
    them beyond ``max_position_embeddings`` without complaint (MLPerf's llama2_70b_lora trains
    Llama-2-70B, 4096 trained positions, at 8192): the cost is modelled, with a warning that
    the length is beyond the trained context."""
    if np.min(np.asarray(seq)) < 1:
        raise SimcostError("sequence length must be >= 1")
    s = int(np.max(np.asarray(seq)) + extra)
    if s <= spec.max_positions:
        return []
    if spec.learned_positions:
        raise SimcostError(f"sequence length {s} exceeds {spec.name}'s "
                           f"{spec.max_positions} learned positions")
    return [f"sequence length {s} is beyond {spec.name}'s {spec.max_positions} trained positions "
            f"(RoPE runs it; the cost is modelled, quality is not; --max-positions N states "
            f"an extended context)"]


def graph(model: str | ModelSpec, *, batch, seq, dtype: str = "bf16", attn: str = "sdpa",
          peft: PeftSpec | None = None, device_kind: str = "gpu") -> tuple[ModelGraph, Analysis]:
    """The analysed operator graph, for inspecting per-op costs
    (``graph.to_networkx()`` gives one node per op with its ``OpCost``)."""
    spec = _model(model)
    return pipeline.build_graph(spec, batch, seq, dtype=dtype, attn=attn, peft=peft,
                                device_kind=device_kind)


def estimate_train(model: str | ModelSpec, hardware: str, *, batch: int, seq: int,
                   peft: str | PeftSpec | None = None, peft_config: str | None = None,
                   dtype: str = "bf16", mixed_precision: str = "none", attn: str = "sdpa",
                   optimizer: str = "adamw", grad_checkpointing: bool = False,
                   devices: int = 1, nodes: int | None = None, tp: int | None = None,
                   pp: int | None = None, dp: int | None = None, cp: int | None = None,
                   zero: int = 0, parallel: str | None = None, micro_batch: int | None = None,
                   sequence_parallel: bool | None = None, tp_overlap: bool = False,
                   pp_schedule: str = "1f1b", virtual_stages: int = 1, offload: str = "none",
                   fp8_attention: bool = False, max_positions: int | None = None,
                   ep: int | None = None, loss_chunks: int = 1,
                   optimizer_in_backward: bool = False, **peft_options: Any) -> TrainEstimate:
    """Estimate one training step (forward with loss, backward, optimizer step).

    ``loss_chunks`` = N > 1 prices torchtune's chunked cross-entropy (logits as N sequence
    chunks, upcast and cross-entropy'd one at a time); ``optimizer_in_backward`` the optimizer
    stepped per parameter from its gradient hook (gradients freed as they are applied). Both
    change memory only (:mod:`simcost.sim.memory`).

    With ``devices > 1``, an explicit plan (``tp``, ``pp``, ``dp``, ``cp``, ``zero``, ...),
    ``parallel='auto'``, ``offload`` or ``dtype='fp8'``, ``batch`` is the global batch per
    optimizer step and the estimate is per device (see :mod:`simcost.sim.parallel`). ``ep``
    shards a mixture-of-experts model's experts over that many data-parallel ranks."""
    if batch < 1:
        raise SimcostError(f"batch must be >= 1, got {batch}")
    _check_memory_modes(loss_chunks, optimizer_in_backward, optimizer)
    spec = _model(model, max_positions)
    distributed = (devices != 1 or parallel is not None or dtype == "fp8" or offload != "none"
                   or any(x not in (None, 1) for x in (tp, pp, dp, cp)) or zero
                   or micro_batch is not None or fp8_attention or ep not in (None, 1))
    if distributed:
        from simcost.sim.parallel_api import estimate_parallel
        return estimate_parallel(
            spec, hardware, batch=batch, seq=seq, peft=peft, peft_config=peft_config,
            dtype=dtype, mixed_precision=mixed_precision, attn=attn, optimizer=optimizer,
            grad_checkpointing=grad_checkpointing, devices=devices, nodes=nodes, tp=tp, pp=pp,
            dp=dp, cp=cp, zero=zero, parallel=parallel, micro_batch=micro_batch,
            sequence_parallel=sequence_parallel, tp_overlap=tp_overlap, pp_schedule=pp_schedule,
            virtual_stages=virtual_stages, offload=offload, fp8_attention=fp8_attention,
            peft_options=peft_options, ep=ep, loss_chunks=loss_chunks,
            optimizer_in_backward=optimizer_in_backward)
    check_options(dtype, mixed_precision)
    pspec = resolve_peft(peft, peft_config, **peft_options)
    from simcost.peft import tokens_added
    warns = _check_seq(spec, seq, tokens_added(pspec))
    device = load_profile(hardware).device()
    compute = mixed_precision if mixed_precision != "none" else dtype
    g, a = pipeline.build_graph(spec, batch, seq, dtype=compute, attn=attn, peft=pspec,
                                device_kind=_kernel_kind(device))
    if dtype != compute:   # AMP: parameters stored in ``dtype``, compute in the 16-bit type
        for p, _ in g.params():
            if p.dtype == compute and p.role != "adapter":
                p.dtype = dtype
    n = train_numbers(g, a, device, batch=batch, seq=seq, optimizer=optimizer,
                      mixed=mixed_precision, checkpointing=grad_checkpointing,
                      loss_chunks=loss_chunks, optimizer_in_backward=optimizer_in_backward)
    return make_estimate(spec, device, pspec, n, batch=batch, seq=seq, dtype=dtype,
                         mixed_precision=mixed_precision, attn=attn, optimizer=optimizer,
                         checkpointing=grad_checkpointing, warnings=warns,
                         loss_chunks=loss_chunks, optimizer_in_backward=optimizer_in_backward)


def _check_memory_modes(loss_chunks, optimizer_in_backward, optimizer: str) -> None:
    try:
        ok = not isinstance(loss_chunks, bool) and int(loss_chunks) == loss_chunks >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SimcostError(f"--loss-chunks must be an integer >= 1, got {loss_chunks!r}")
    if optimizer == "mezo" and (optimizer_in_backward or loss_chunks != 1):
        raise SimcostError("--optimizer-in-backward and --loss-chunks shape the backward "
                           "pass; --optimizer mezo has none")


def make_estimate(spec: ModelSpec, device, pspec: PeftSpec, n, *, batch, seq, dtype: str,
                  mixed_precision: str, attn: str, optimizer: str, checkpointing,
                  flops: dict | None = None, memory_bytes: dict | None = None,
                  time_s: dict | None = None, tokens_per_s=None, fits=None,
                  parallel: dict | None = None, warnings: list[str] = (),
                  loss_chunks: int = 1, optimizer_in_backward: bool = False) -> TrainEstimate:
    """The one place a :class:`TrainEstimate` is assembled: parameter counts from ``n`` (a
    :class:`~simcost.sim.train.TrainNumbers`), every other number from ``n`` unless given
    (the multi-device path passes its per-device memory, time and whole-job FLOPs)."""
    from simcost.sim.memory import ckpt_mode
    mode = ckpt_mode(checkpointing)
    f = float
    step_s = f((n.time_s if time_s is None else time_s)["step"])
    tok_s = f(n.tokens_per_s if tokens_per_s is None else tokens_per_s)
    return TrainEstimate(
        model=spec.name, hardware=device.name, batch=batch, seq=seq, dtype=dtype,
        mixed_precision=mixed_precision, attn=attn, optimizer=optimizer,
        grad_checkpointing=mode != "none", peft=_peft_dict(pspec),
        params={"total": n.params_total, "trainable": n.params_trainable,
                "added": n.params_added, "with_adapters": n.params_total + n.params_added},
        flops={k: f(v) for k, v in (n.flops if flops is None else flops).items()},
        memory_bytes={k: f(v) for k, v in (n.memory_bytes if memory_bytes is None
                                           else memory_bytes).items()},
        time_s={k: f(v) for k, v in (n.time_s if time_s is None else time_s).items()},
        tokens_per_s=f(n.tokens_per_s if tokens_per_s is None else tokens_per_s),
        fits=bool(n.fits if fits is None else fits), parallel=parallel,
        checkpointing=None if mode == "none" else mode,
        cost_usd=run_cost(device, (parallel or {}).get("devices", 1), step_s, tok_s),
        warnings=[*warnings, *device_warnings(device)],
        loss_chunks=int(loss_chunks) if loss_chunks != 1 else None,
        optimizer_in_backward=True if optimizer_in_backward else None)


def device_warnings(device) -> list[str]:
    """What an estimate on ``device`` should say about its profile's time model."""
    tm = device.time_model or {}
    if "matmul_efficiency" in tm or "gemm_table" in tm:
        return []
    return [f"hardware profile '{device.name}' has no measured matmul efficiency "
            f"(time_model.matmul_efficiency): GEMMs are priced at the datasheet peak, an "
            f"optimistic bound ('simcost calibrate' on the device measures it)"]


def run_cost(device, devices: int, step_s: float, tokens_per_s: float) -> dict | None:
    """Rental cost from the profile's price per device-hour (None when the profile has none)."""
    if not device.price_usd_per_hour:
        return None
    per_hour = device.price_usd_per_hour * devices
    return {"per_hour": per_hour, "per_step": per_hour * step_s / 3600,
            "per_million_tokens": per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s else None,
            "devices": devices, "price_per_device_hour": device.price_usd_per_hour}


class MultiTrainEstimate(BaseModel):
    """N PEFT jobs sharing one frozen base (mLoRA/ASPEN BatchLoRA) against N separate runs."""
    jobs: int
    shared: TrainEstimate           # all N jobs in one process; batch = per-job batch
    separate: TrainEstimate         # one job alone (each of N separate runs)
    phases_s: dict                  # the shared step: base vs adapter ops, optimizer
    comparison: dict                # speed-up and memory against N separate runs


def estimate_multi_train(model: str | ModelSpec, hardware: str, *, jobs: int, batch: int,
                         seq: int, peft: str | PeftSpec | None = "lora",
                         peft_config: str | None = None, dtype: str = "bf16",
                         mixed_precision: str = "none", attn: str = "sdpa",
                         optimizer: str = "adamw", grad_checkpointing=False,
                         max_positions: int | None = None, loss_chunks: int = 1,
                         optimizer_in_backward: bool = False,
                         **peft_options: Any) -> MultiTrainEstimate:
    """``jobs`` PEFT jobs (same model and adapter config, ``batch`` sequences each) trained in
    one process on one device, base GEMMs batched across jobs (see :mod:`simcost.sim.multi`).

    ``comparison`` holds ``speedup`` (N sequential separate steps / one shared step),
    ``throughput_ratio`` (the same, as tokens/s), and the peak memory of the shared run vs N
    separate runs held at once (``memory_saved_bytes`` = (N-1) base copies, minus nothing)."""
    from simcost.sim.multi import multi_numbers
    if batch < 1:
        raise SimcostError(f"batch must be >= 1, got {batch}")
    if jobs < 1:
        raise SimcostError(f"--jobs must be >= 1, got {jobs}")
    if loss_chunks != 1 or optimizer_in_backward:
        raise SimcostError("--jobs is priced with one loss and one optimizer step per job "
                           "(no --loss-chunks or --optimizer-in-backward)")
    spec = _model(model, max_positions)
    check_options(dtype, mixed_precision)
    pspec = resolve_peft(peft, peft_config, **peft_options)
    from simcost.peft import tokens_added
    warns = _check_seq(spec, seq, tokens_added(pspec))
    device = load_profile(hardware).device()
    compute = mixed_precision if mixed_precision != "none" else dtype

    def build(b):
        g, a = pipeline.build_graph(spec, b, seq, dtype=compute, attn=attn, peft=pspec,
                                    device_kind=_kernel_kind(device))
        if dtype != compute:
            for p, _ in g.params():
                if p.dtype == compute and p.role != "adapter":
                    p.dtype = dtype
        return g, a

    m = multi_numbers(build, device, jobs=jobs, batch=batch, seq=seq, optimizer=optimizer,
                      mixed=mixed_precision, checkpointing=grad_checkpointing)
    kw = dict(seq=seq, dtype=dtype, mixed_precision=mixed_precision, attn=attn,
              optimizer=optimizer, checkpointing=grad_checkpointing, warnings=warns)
    shared = make_estimate(spec, device, pspec, m.shared, batch=batch, **kw)
    single = make_estimate(spec, device, pspec, m.single, batch=batch, **kw)
    sep_step = jobs * single.time_s["step"]
    sep_peak = jobs * (single.memory_bytes["peak"] - single.memory_bytes["runtime_overhead"]) \
        + single.memory_bytes["runtime_overhead"]
    comparison = {
        "separate_sequential_step_s": sep_step,
        "speedup": sep_step / shared.time_s["step"],
        "throughput_ratio": shared.tokens_per_s / single.tokens_per_s,
        "shared_peak_bytes": shared.memory_bytes["peak"],
        "separate_peak_bytes_each": single.memory_bytes["peak"],
        "separate_concurrent_peak_bytes": sep_peak,
        "memory_saved_bytes": sep_peak - shared.memory_bytes["peak"],
        "base_weight_bytes_shared": single.memory_bytes["weights"]
        - float(sum(p.nbytes * c for p, c in build(1)[0].params() if p.role == "adapter")),
    }
    return MultiTrainEstimate(jobs=jobs, shared=shared, separate=single,
                              phases_s={k: float(v) for k, v in m.phases.items()},
                              comparison=comparison)


def sweep_train(model: str | ModelSpec, hardware: str, *, batches, seqs, **kw) -> dict:
    """Vectorised estimate over every (batch, seq) pair: one graph, numpy arrays throughout.

    Returns arrays shaped (len(batches), len(seqs)) for step time, tokens/s, peak memory, fits.
    """
    dtype = kw.pop("dtype", "bf16")
    mixed = kw.pop("mixed_precision", "none")
    attn = kw.pop("attn", "sdpa")
    optimizer = kw.pop("optimizer", "adamw")
    ckpt = kw.pop("grad_checkpointing", False)
    chunks = kw.pop("loss_chunks", 1)
    in_bwd = kw.pop("optimizer_in_backward", False)
    spec = _model(model, kw.pop("max_positions", None))
    _check_memory_modes(chunks, in_bwd, optimizer)
    check_options(dtype, mixed)
    pspec = resolve_peft(kw.pop("peft", None), kw.pop("peft_config", None), **kw)
    bb, ss = np.meshgrid(np.asarray(batches, dtype=np.float64), np.asarray(seqs, dtype=np.float64),
                         indexing="ij")
    from simcost.peft import tokens_added
    warns = _check_seq(spec, ss, tokens_added(pspec))
    device = load_profile(hardware).device()
    compute = mixed if mixed != "none" else dtype
    g, a = pipeline.build_graph(spec, bb.ravel(), ss.ravel(), dtype=compute, attn=attn, peft=pspec,
                                device_kind=_kernel_kind(device))
    n = train_numbers(g, a, device, batch=bb.ravel(), seq=ss.ravel(), optimizer=optimizer,
                      mixed=mixed, checkpointing=ckpt, loss_chunks=int(chunks),
                      optimizer_in_backward=bool(in_bwd))
    warns = [*warns, *device_warnings(device)]
    shape = bb.shape
    return {"batch": bb, "seq": ss, "warnings": warns,
            "step_s": np.broadcast_to(n.time_s["step"], bb.size).reshape(shape),
            "tokens_per_s": np.broadcast_to(n.tokens_per_s, bb.size).reshape(shape),
            "peak_bytes": np.broadcast_to(n.memory_bytes["peak"], bb.size).reshape(shape),
            "fits": np.broadcast_to(n.fits, bb.size).reshape(shape)}


def _kernel_kind(device) -> str:
    """Which kernel set runs: torch's CPU kernels, or the accelerator ones."""
    return "cpu" if device.kind == "cpu" else "gpu"


def _peft_dict(spec: PeftSpec) -> dict:
    d = {"method": "dora" if spec.dora else spec.method}
    if spec.method in ("lora", "dora", "qlora"):
        d.update(r=spec.r, alpha=spec.alpha, targets=spec.targets, rslora=spec.rslora,
                 dropout=spec.dropout)
    if spec.method in ("prefix", "prompt"):
        d["num_virtual_tokens"] = spec.num_virtual_tokens
    if spec.method == "lst":
        d["reduction"] = spec.side_reduction
    return d


build_graph = graph
