"""The Python what-if API: the same estimate as ``simcost estimate train``, as typed results.

Every entrance builds its validated request (:mod:`simcost.request.train`) first, then runs
the pipeline on it; results come from :mod:`simcost.result`.

>>> from simcost import estimate_train
>>> r = estimate_train("llama-2-7b", "a100-80gb-sxm", batch=1, seq=2048, peft="lora", rank=16)
>>> r.params_trainable
8388608
"""
from __future__ import annotations

from collections import OrderedDict
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from simcost import pipeline
from simcost.errors import SimcostError
from simcost.graph.ir import ModelGraph
from simcost.hardware import load_profile
from simcost.models.attention import UNIT_BATCH_LAYOUT
from simcost.models.config import ModelSpec, load_model
from simcost.peft.spec import PeftSpec
from simcost.request.fields import MAX_BATCH, MAX_SEQ
from simcost.request.frontend import analytic_request, resolve_frontend
from simcost.request.train import (MultiTrainRequest, SweepRequest, TrainRequest, check_seq,
                                   request_peft, resolve_peft, sweep_points)
from simcost.result import MultiTrainEstimate, TrainEstimate, device_warnings, make_estimate
from simcost.sim.analysis import Analysis
from simcost.sim.train import train_numbers
from simcost.stack import load_stack
from simcost.stack.intervals import estimate_intervals

__all__ = ["estimate_train", "estimate_multi_train", "sweep_train", "graph", "build_graph",
           "TrainEstimate", "MultiTrainEstimate", "resolve_peft"]


def _model(model: str | ModelSpec, max_positions: int | None = None) -> ModelSpec:
    """The model's spec; ``max_positions`` states an extended context (``--max-positions``)."""
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if max_positions:
        import dataclasses
        spec = dataclasses.replace(spec, max_positions=int(max_positions))
    return spec


def graph(model: str | ModelSpec, *, batch, seq, dtype: str = "bf16", attn: str = "sdpa",
          peft: PeftSpec | None = None, device_kind: str = "gpu") -> tuple[ModelGraph, Analysis]:
    """The analysed operator graph, for inspecting per-op costs
    (``graph.to_networkx()`` gives one node per op with its ``OpCost``)."""
    spec = _model(model)
    return pipeline.build_graph(spec, batch, seq, dtype=dtype, attn=attn, peft=peft,
                                device_kind=device_kind)


def estimate_train(model: str | ModelSpec, hardware: str, *, batch: int, seq: int | None = None,
                   **options: Any) -> TrainEstimate:
    """Estimate one training step (forward with loss, backward, optimizer step). ``seq``:
    tokens per sequence, required by text models (a vision model takes ``image_size``; an
    encoder-decoder ``target_seq`` too).

    ``options`` are the fields of :class:`~simcost.request.train.TrainRequest` (``peft``,
    ``peft_config``, ``dtype``, ``mixed_precision``, ``attn``, ``optimizer``,
    ``grad_checkpointing``, the plan: ``devices``, ``tp``, ``pp``, ``dp``, ``cp``, ``ep``,
    ``zero``, ``parallel``, ``micro_batch``, ...) and the PEFT shorthand (``rank``, ``alpha``,
    ``targets``, ...), checked before anything runs: a bad value raises
    :class:`~simcost.errors.SimcostError` naming it.

    ``loss_chunks`` = N > 1 prices torchtune's chunked cross-entropy (logits as N sequence
    chunks, upcast and cross-entropy'd one at a time); ``optimizer_in_backward`` the optimizer
    stepped per parameter from its gradient hook (gradients freed as they are applied). Both
    change memory only (:mod:`simcost.sim.memory`).

    With ``devices > 1``, an explicit plan, ``parallel='auto'``, ``offload`` or
    ``dtype='fp8'``, ``batch`` is the global batch per optimizer step and the estimate is per
    device (see :mod:`simcost.sim.parallel`). ``ep`` shards a mixture-of-experts model's
    experts over that many data-parallel ranks."""
    return run_train(TrainRequest.from_call(model, hardware, batch=batch, seq=seq, **options))


def run_train(req: TrainRequest) -> TrainEstimate:
    """The estimate of a validated request, by the front end that covers it
    (:mod:`simcost.request.frontend`)."""
    st = _structure(req)
    if st.frontend == "traced":
        from simcost.trace.estimate import estimate_traced
        return with_job(estimate_traced(req, st.why), req)
    return with_job(_run_analytic(analytic_request(req), st), req, frontend="analytic")


@lru_cache(maxsize=256)
def _power(hardware: str) -> tuple:
    """(TDP in W or None, the device) of a profile name or path, read once."""
    profile = load_profile(hardware)
    return (profile.tdp_w.value if profile.tdp_w else None), profile.device()


def with_job(est: TrainEstimate, req: TrainRequest, **update) -> TrainEstimate:
    """The step's estimate with what follows from it: its MFU and energy, the price of
    ``--price`` instead of the profile's, and the whole job of ``--tokens``/``--samples``
    (``update``: other fields to set in the same copy)."""
    from simcost.result import run_cost
    from simcost.sim import job as J
    tdp_w, device = _power(req.hardware)
    devices = est.parallel["devices"] if est.parallel else 1
    step_s = est.time_s["step"]
    compute = est.mixed_precision if est.mixed_precision != "none" else est.dtype
    upd = {**update, "mfu": J.mfu(est.flops, step_s, devices, device.matmul_peak(compute)),
           "energy": J.step_energy(tdp_w, devices, est.time_s)}
    price = est.cost_usd["price_per_device_hour"] if est.cost_usd else None
    if req.price is not None:
        price = req.price
        upd["cost_usd"] = run_cost(price, devices, step_s, est.tokens_per_s, source="--price")
    samples = J.job_samples(tokens=req.tokens, samples=req.samples, seq=req.seq)
    if samples is not None:
        if samples * req.epochs < req.batch:
            upd["warnings"] = [*est.warnings, (
                f"the job ({samples * req.epochs:g} samples) is smaller than one step of "
                f"--batch {req.batch}: priced as one full step")]
        upd["job"] = J.whole_job(step_s=step_s, batch=req.batch, seq=req.seq, devices=devices,
                                 samples=samples, epochs=req.epochs,
                                 price_per_device_hour=price, energy=upd["energy"],
                                 interval=(est.intervals or {}).get("step_s"))
    return est.model_copy(update=upd)


# -- what a request prices, apart from its batch and sequence length -----------------------
#
# A warm estimate_train call re-uses everything that does not depend on (batch, seq): the
# front end's choice, the model spec, the PEFT spec, the device, the stack and the compiled
# step numbers (simcost.sim.compiled). They are kept per *structure*: every request field but
# batch and seq, plus whether batch == 1 (a different tensor layout) and whether seq is given.
# Files (model configs, hardware and stack profiles, adapter configs) are read once per
# structure, as load_profile already reads a profile once per process: clear_caches() after
# editing one in a running process. Least recently used structures beyond
# STRUCTURE_CACHE_SIZE are dropped; CACHE_STRUCTURES = False prices every call from scratch.

CACHE_STRUCTURES = True
STRUCTURE_CACHE_SIZE = 128
_STRUCTURES: OrderedDict = OrderedDict()
_KEY_FIELDS = tuple(f for f in TrainRequest.model_fields if f not in ("batch", "seq"))


class _Structure:
    """One structure's shared pieces (see above); ``numbers(batch, seq)`` prices a step."""

    def __init__(self, req: TrainRequest, compiled: bool = True):
        self.frontend, self.why = resolve_frontend(req)
        if self.frontend == "traced":
            return
        areq = analytic_request(req)
        self.req = areq
        self.spec = _model(areq.model, areq.max_positions)
        if areq.distributed:
            return
        self.pspec = request_peft(areq)
        compute = self._compute
        if CACHE_STRUCTURES and compiled:
            from simcost.sim.compiled import CompiledNumbers
            compute = CompiledNumbers(compute, unit_batch=req.batch == 1)
        self.numbers = compute

    @cached_property
    def device(self):
        return load_profile(self.req.hardware).device()

    @cached_property
    def stack(self):
        return load_stack(self.req.stack)

    def _compute(self, batch, seq):
        req = self.req
        g, a = _build(self.spec, req, self.pspec, self.device, batch, seq)
        return train_numbers(g, a, self.device, batch=batch, seq=seq, optimizer=req.optimizer,
                             mixed=req.mixed_precision, checkpointing=req.grad_checkpointing,
                             loss_chunks=req.loss_chunks,
                             optimizer_in_backward=req.optimizer_in_backward, stack=self.stack,
                             host_allocator=req.host_allocator)


def _structure(req: TrainRequest) -> _Structure:
    from simcost.sim.breakdown import recorder
    if not CACHE_STRUCTURES or recorder() is not None:
        # a step recorded op by op (--trace-out) runs the pipeline itself, not a replay
        return _Structure(req, compiled=False)
    key = (req.batch == 1, req.seq is None, *(getattr(req, f) for f in _KEY_FIELDS))
    try:
        st = _STRUCTURES.get(key)
    except TypeError:          # an unhashable field (a deepspeed dict): no sharing
        return _Structure(req)
    if st is None:
        st = _STRUCTURES[key] = _Structure(req)
        if len(_STRUCTURES) > STRUCTURE_CACHE_SIZE:
            _STRUCTURES.popitem(last=False)
    else:
        _STRUCTURES.move_to_end(key)
    return st


def clear_caches() -> None:
    """Forget every structure (after editing a model config or profile file in-process)."""
    _STRUCTURES.clear()
    _power.cache_clear()


def _run_analytic(req: TrainRequest, st: _Structure | None = None) -> TrainEstimate:
    st = st or _Structure(req)
    spec = st.spec
    if req.distributed:
        return _run_parallel(req, spec)
    pspec = st.pspec
    from simcost.peft import tokens_added
    warns = [*req.notes, *check_seq(spec, req.seq, tokens_added(pspec))]
    device = st.device
    stack = st.stack
    n = st.numbers(req.batch, req.seq)
    return make_estimate(spec, device, pspec, n, batch=req.batch, seq=req.seq, dtype=req.dtype,
                         mixed_precision=req.mixed_precision, attn=req.attn,
                         optimizer=req.optimizer, checkpointing=req.grad_checkpointing,
                         warnings=[*warns, *n.warnings], loss_chunks=req.loss_chunks,
                         optimizer_in_backward=req.optimizer_in_backward, stack=stack)


def _build(spec: ModelSpec, req: TrainRequest, pspec: PeftSpec, device, batch, seq):
    """The analysed graph of ``batch`` x ``seq`` in the request's compute dtype; under AMP
    the parameters are stored in ``req.dtype`` and computed in the 16-bit type."""
    compute = req.mixed_precision if req.mixed_precision != "none" else req.dtype
    g, a = pipeline.build_graph(spec, batch, seq, dtype=compute, attn=req.attn, peft=pspec,
                                device_kind=pipeline.kernel_kind(device),
                                stack=load_stack(req.stack))
    if req.dtype != compute:
        for p, _ in g.params():
            if p.dtype == compute and p.role != "adapter":
                p.dtype = req.dtype
    return g, a


def _run_parallel(req: TrainRequest, spec: ModelSpec) -> TrainEstimate:
    from simcost.sim.parallel_api import estimate_parallel
    short = req.peft_shorthand()
    if req.deepspeed is not None:
        short["deepspeed"] = req.deepspeed
    r = estimate_parallel(
        spec, req.hardware, batch=req.batch, seq=req.seq, peft=req.peft,
        peft_config=req.peft_config, dtype=req.dtype, mixed_precision=req.mixed_precision,
        attn=req.attn, optimizer=req.optimizer, grad_checkpointing=req.grad_checkpointing,
        devices=req.devices, nodes=req.nodes, tp=req.tp, pp=req.pp, dp=req.dp, cp=req.cp,
        zero=req.zero, parallel=req.parallel, micro_batch=req.micro_batch,
        sequence_parallel=req.sequence_parallel, tp_overlap=req.tp_overlap,
        pp_schedule=req.pp_schedule, virtual_stages=req.virtual_stages, offload=req.offload,
        fp8_attention=req.fp8_attention, fp8_params=req.fp8_params,
        fp8_activation=req.fp8_activation, peft_options=short,
        ep=req.ep,
        loss_chunks=req.loss_chunks, optimizer_in_backward=req.optimizer_in_backward,
        stack=load_stack(req.stack))
    if req.notes:
        r = r.model_copy(update={"warnings": [*req.notes, *r.warnings]})
    return r


def estimate_multi_train(model: str | ModelSpec, hardware: str, *, jobs: int, batch: int,
                         seq: int, **options: Any) -> MultiTrainEstimate:
    """``jobs`` PEFT jobs (same model and adapter config, ``batch`` sequences each) trained in
    one process on one device, base GEMMs batched across jobs (see :mod:`simcost.sim.multi`).
    ``options`` as for :func:`estimate_train` (``peft`` defaults to ``'lora'``).

    ``comparison`` holds ``speedup`` (N sequential separate steps / one shared step),
    ``throughput_ratio`` (the same, as tokens/s), and the peak memory of the shared run vs N
    separate runs held at once (``memory_saved_bytes`` = (N-1) base copies, minus nothing)."""
    options.setdefault("peft", "lora")
    req = MultiTrainRequest.from_call(model, hardware, jobs=jobs, batch=batch, seq=seq,
                                      **options)
    return run_multi_train(req)


def run_multi_train(req: MultiTrainRequest) -> MultiTrainEstimate:
    from simcost.peft import tokens_added
    from simcost.sim.multi import multi_numbers
    if req.frontend == "traced":
        raise SimcostError("--jobs is priced on the hand-built graphs (--frontend analytic)")
    req = analytic_request(req)
    spec = _model(req.model, req.max_positions)
    pspec = request_peft(req)
    warns = [*req.notes, *check_seq(spec, req.seq, tokens_added(pspec))]
    device = load_profile(req.hardware).device()

    def build(b):
        return _build(spec, req, pspec, device, b, req.seq)

    stack = load_stack(req.stack)
    m = multi_numbers(build, device, jobs=req.jobs, batch=req.batch, seq=req.seq,
                      optimizer=req.optimizer, mixed=req.mixed_precision,
                      checkpointing=req.grad_checkpointing, stack=stack)
    kw = dict(seq=req.seq, dtype=req.dtype, mixed_precision=req.mixed_precision, attn=req.attn,
              optimizer=req.optimizer, checkpointing=req.grad_checkpointing, warnings=warns,
              stack=stack)
    shared = make_estimate(spec, device, pspec, m.shared, batch=req.batch, **kw)
    single = make_estimate(spec, device, pspec, m.single, batch=req.batch, **kw)
    jobs = req.jobs
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


def sweep_train(model: str | ModelSpec, hardware: str, *, batches, seqs, **options) -> dict:
    """Vectorised estimate over every (batch, seq) pair: numpy arrays throughout.

    Returns arrays shaped (len(batches), len(seqs)) for step time, tokens/s, peak memory,
    fits; every point equals :func:`estimate_train` at that (batch, seq). ``stack`` names the
    stack priced and ``intervals`` holds the p10-p90 arrays of ``step_s`` and ``peak_bytes``
    (or a ``note`` why there are none), as an estimate's. ``options`` as for
    :func:`estimate_train`, on one device."""
    b = sweep_points(batches, "batches", MAX_BATCH)
    s = sweep_points(seqs, "seqs", MAX_SEQ)
    base = TrainRequest.from_call(model, hardware, batch=int(b.min()), seq=int(s.min()),
                                  **options)
    return run_sweep(SweepRequest.build(base=base, batches=b, seqs=s))


def run_sweep(req: SweepRequest) -> dict:
    base = req.base
    frontend, why = resolve_frontend(base)
    if frontend == "traced":
        from simcost.trace.estimate import sweep_traced
        return sweep_traced(req, why)
    base = analytic_request(base)
    spec = _model(base.model, base.max_positions)
    pspec = request_peft(base)
    bb, ss = np.meshgrid(req.batches, req.seqs, indexing="ij")
    from simcost.peft import tokens_added
    warns = [*base.notes, *check_seq(spec, ss, tokens_added(pspec))]
    device = load_profile(base.hardware).device()
    flat_b, flat_s = bb.ravel(), ss.ravel()
    unit = flat_b == 1
    out = _sweep_numbers(spec, base, pspec, device, 1 if unit.all() else flat_b, flat_s, flat_b)
    if out.pop("unit_batch_layout") and unit.any() and not unit.all():
        # a batch of one is laid out differently (matmul's reshapes are views, not copies:
        # see simcost.models.attention), so its points get a graph of their own
        one = _sweep_numbers(spec, base, pspec, device, 1, flat_s[unit], flat_b[unit])
        one.pop("unit_batch_layout")
        for k, v in one.items():
            out[k][unit] = v
    shape = bb.shape
    arrays = {k: v.reshape(shape) for k, v in out.items()}
    return {"batch": bb, "seq": ss,
            "warnings": [*warns, *pspec.warnings, *device_warnings(device)], **arrays,
            "stack": load_stack(base.stack).label(),
            "intervals": estimate_intervals(load_stack(base.stack), device, arrays["step_s"],
                                            arrays["peak_bytes"])}


def _sweep_numbers(spec, base: TrainRequest, pspec, device, graph_batch, seqs, batches) -> dict:
    """Step time, tokens/s, peak and fits at each (batch, seq) point, from one graph built
    for ``graph_batch`` (a vector, or 1 for a batch of one) over ``seqs``."""
    g, a = _build(spec, base, pspec, device, graph_batch, seqs)
    n = train_numbers(g, a, device, batch=batches, seq=seqs, optimizer=base.optimizer,
                      mixed=base.mixed_precision, checkpointing=base.grad_checkpointing,
                      loss_chunks=base.loss_chunks,
                      optimizer_in_backward=base.optimizer_in_backward,
                      stack=load_stack(base.stack))
    k = len(seqs)
    return {"step_s": np.array(np.broadcast_to(n.time_s["step"], k), dtype=float),
            "tokens_per_s": np.array(np.broadcast_to(n.tokens_per_s, k), dtype=float),
            "peak_bytes": np.array(np.broadcast_to(n.memory_bytes["peak"], k), dtype=float),
            "fits": np.array(np.broadcast_to(n.fits, k), dtype=bool),
            "unit_batch_layout": bool(g.meta.get(UNIT_BATCH_LAYOUT))}


build_graph = graph
