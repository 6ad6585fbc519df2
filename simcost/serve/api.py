"""Python API for serving: one iteration (``estimate_serve``) and a traffic simulation
(``simulate_serve``), both returning pydantic models (SI units: seconds, bytes)."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from simcost.errors import SimcostError, unknown
from simcost.hardware import load_profile
from simcost.models.config import ModelSpec, load_model
from simcost.request.serve import ServeEstimateRequest, ServeSimRequest, read_trace
from simcost.result import SCHEMA_VERSION
from simcost.serve.adapters import AdapterSet
from simcost.serve.engines import (DEFAULT_ENGINE, SCHEDULER_ENGINE, EngineSpec, default_limits,
                                   get_engine)
from simcost.serve.memory import KV_BYTES, WEIGHT_BYTES, resolve_targets, serve_memory
from simcost.serve.overload import detect_overload
from simcost.serve.sim import SCHEDULERS, Engine, Workload, simulate
from simcost.serve.step import LORA_KERNELS, StepModel
from simcost.sim.timing import TimeModel


class ServeEstimate(BaseModel):
    schema_version: int = SCHEMA_VERSION
    model: str
    hardware: str
    phase: str
    batch: int
    context: int
    tp: int
    dtype: str
    weight_dtype: str
    peft: dict
    time_s: dict
    tokens_per_s: float
    memory_bytes: dict
    fits: bool
    devices: int = 1
    replicas: int = 1
    warnings: list[str] = []


class ServeSimulation(BaseModel):
    schema_version: int = SCHEMA_VERSION
    model: str
    hardware: str
    engine: str
    engine_display_name: str = ""
    engine_versions: dict[str, str] = {}
    scheduler: str
    tp: int
    adapters: int
    merged: bool
    n_requests: int
    duration_s: float
    makespan_s: float
    throughput_req_s: float
    throughput_tok_s: float
    ttft_s: dict
    tpot_s: dict
    latency_s: dict
    slo_attainment: float | None
    adapters_resident: int
    adapters_served: int
    swaps: int
    swap_time_s: float
    preemptions: int
    max_batch: int
    iterations: int
    memory_bytes: dict
    devices: int = 1
    replicas: int = 1
    routing: str = "round-robin"
    replica_requests: list[int] = []
    prompt_tokens: int = 0
    output_tokens: int = 0
    # the queue grows without bound (simcost.serve.overload): the percentiles then grow with
    # the simulated duration and describe no steady state
    overloaded: bool = False
    overload_reason: str | None = None
    warnings: list[str] = []


def _stats(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def _setup(model, hardware, dtype, weight_dtype, kv_dtype, tp, devices, lora_kernel, targets,
           cuda_graphs, decode_attn_overhead: float = 0.0):
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    if spec.family != "llama":
        raise SimcostError(f"serving supports Llama-family models (Llama, Mistral, Qwen2, Mixtral); "
                           f"'{spec.name}' is {spec.family}")
    prof = load_profile(hardware)
    dev = prof.device()
    if dtype not in ("fp16", "bf16", "fp32"):
        raise SimcostError(f"unknown dtype '{dtype}'; valid: fp16, bf16, fp32")
    wd = weight_dtype or dtype
    if wd not in WEIGHT_BYTES:
        raise SimcostError(f"unknown weight dtype '{wd}'; valid: {', '.join(WEIGHT_BYTES)}")
    kd = kv_dtype or dtype
    if kd not in KV_BYTES:
        raise SimcostError(f"unknown KV-cache dtype '{kd}'; valid: {', '.join(KV_BYTES)}")
    if devices is not None and (tp > devices or devices % tp):
        raise SimcostError(f"--devices {devices} is not a multiple of --tp {tp} "
                           "(devices = tp x replicas)")
    tm = TimeModel.from_device(dev)
    link_bw = link_lat = 0.0
    if prof.interconnect is not None and prof.interconnect.bandwidth_bytes_per_s is not None:
        link_bw = prof.interconnect.bandwidth_bytes_per_s.value
        link_lat = prof.interconnect.latency_s.value if prof.interconnect.latency_s else 0.0
    host_bw = host_lat = 0.0
    if prof.host_link is not None and prof.host_link.bandwidth_bytes_per_s is not None:
        host_bw = prof.host_link.bandwidth_bytes_per_s.value
        host_lat = prof.host_link.latency_s.value if prof.host_link.latency_s else 0.0
    tg = resolve_targets(spec, targets)
    step = StepModel(spec, tm, act_dtype=dtype, wdtype=wd, kv_dtype=kd, tp=tp, link_bw=link_bw,
                     link_lat=link_lat, cuda_graphs=bool(cuda_graphs), lora_kernel=lora_kernel,
                     targets=tuple(tg), decode_attn_overhead=decode_attn_overhead)
    return spec, prof, dev, step, tg, host_bw, host_lat


def _kernel(name: str) -> str:
    if name not in LORA_KERNELS:
        raise unknown("LoRA kernel", name, LORA_KERNELS)
    return name


def estimate_serve(model, hardware, *, phase: str = "decode", batch: int = 1, context: int = 512,
                   dtype: str = "fp16", weight_dtype: str | None = None, kv_dtype: str | None = None,
                   tp: int = 1, devices: int | None = None, peft: str = "none",
                   rank: int | None = None, ranks=None, distinct_adapters: int | None = None,
                   merged: bool = False, lora_kernel: str | None = None, targets=None,
                   num_virtual_tokens: int | None = None, cuda_graphs: bool = False,
                   gpu_memory_utilization: float = 0.9) -> ServeEstimate:
    """One prefill (``batch`` prompts of ``context`` tokens) or decode (``batch`` sequences each
    with ``context`` cached tokens) iteration of one tensor-parallel group of ``tp`` devices
    (``devices`` = tp x replicas: the estimate is per replica, with a warning).

    ``fits`` is true only when the memory left for the KV cache after weights, runtime and
    workspace (``memory_bytes['pool']``, of ``gpu_memory_utilization`` x capacity) holds the
    batch's KV cache and adapters."""
    req = ServeEstimateRequest.build(
        model=model, hardware=hardware, phase=phase, batch=batch, context=context, dtype=dtype,
        weight_dtype=weight_dtype, kv_dtype=kv_dtype, tp=tp, devices=devices, peft=peft,
        rank=rank, ranks=ranks, distinct_adapters=distinct_adapters, merged=merged,
        lora_kernel=lora_kernel, targets=targets, num_virtual_tokens=num_virtual_tokens,
        cuda_graphs=cuda_graphs, gpu_memory_utilization=gpu_memory_utilization)
    return estimate_from_request(req)


def estimate_from_request(req: ServeEstimateRequest) -> ServeEstimate:
    kernel = _kernel(req.lora_kernel or "mbgmv")
    spec, prof, dev, step, tg, _, _ = _setup(req.model, req.hardware, req.dtype, req.weight_dtype,
                                              req.kv_dtype, req.tp, req.devices, kernel,
                                              req.targets, req.cuda_graphs)
    nvt = req.virtual_tokens
    prefix = nvt if req.peft == "prefix" else 0
    extra_in = nvt if req.peft == "prompt" else 0
    if req.context + prefix + extra_in > spec.max_positions:
        raise SimcostError(f"context {req.context + prefix + extra_in} exceeds {spec.name}'s "
                           f"{spec.max_positions} positions")
    batch, n_ad, rk = req.batch, req.n_adapters, req.adapter_ranks
    per = np.array([rk[i % len(rk)] for i in range(n_ad)], dtype=float)
    lora = req.peft == "lora" and not req.merged
    if req.phase == "prefill":
        lens = np.full(batch, req.context + extra_in, dtype=float)
        toks = float(lens.sum())
        r = step.iteration(prefill_lens=lens, lora_ranks=per if lora else None,
                           lora_tokens=np.full(n_ad, toks / n_ad), prefix=prefix)
    else:
        r = step.iteration(decode_ctx_sum=float(batch * (req.context + extra_in)), n_decode=batch,
                           lora_ranks=per if lora else None,
                           lora_tokens=np.full(n_ad, batch / n_ad), prefix=prefix)
        toks = batch
    mem = serve_memory(spec, dev, wdtype=step.wdtype, act_dtype=req.dtype, kv_dtype=step.kv_dtype,
                       tp=req.tp, ranks=per.astype(int).tolist(), targets=tg,
                       max_tokens=int(toks), max_seqs=batch,
                       gpu_memory_utilization=req.gpu_memory_utilization)
    ctx = req.context + extra_in + prefix + (1 if req.phase == "decode" else 0)
    kv = batch * ctx * mem.kv_per_token
    ad = sum(mem.adapter_bytes[int(x)] for x in per) if req.peft == "lora" else 0.0
    need = mem.weights + mem.runtime_overhead + mem.workspace + kv + ad
    md = mem.as_dict()
    md.update({"kv_cache": kv, "adapters": ad, "peak": need})
    return ServeEstimate(
        model=spec.name, hardware=prof.name, phase=req.phase, batch=batch, context=req.context,
        tp=req.tp, dtype=req.dtype, weight_dtype=step.wdtype,
        peft={"method": req.peft, "ranks": per.astype(int).tolist(), "merged": req.merged,
              "kernel": kernel if lora else None, "targets": tg if req.peft == "lora" else [],
              "num_virtual_tokens": nvt},
        time_s={k: float(v) for k, v in r.items() if k != "kernels"},
        tokens_per_s=toks / r["total"], memory_bytes=md,
        # the KV pool (usable memory less weights, runtime and workspace) must hold the batch
        fits=bool(mem.pool > 0 and kv + ad <= mem.pool),
        devices=req.n_devices, replicas=req.replicas, warnings=req.warnings())


def simulate_serve(model, hardware, *, dtype: str = "fp16", weight_dtype: str | None = None,
                   kv_dtype: str | None = None, devices: int | None = None, tp: int = 1,
                   routing: str | None = None, adapters: int = 1, ranks=None,
                   merged: bool = False, rate: float | None = None, cv: float | None = None,
                   popularity_alpha: float | None = None, duration=None, input_len=None,
                   output_len=None, trace: str | None = None, scheduler: str | None = None,
                   slo_ttft: float | None = None, seed: int | None = None,
                   n_requests: int | None = None, lora_kernel: str | None = None,
                   targets=None, peft: str | None = None, num_virtual_tokens: int | None = None,
                   max_num_seqs: int | None = None, max_num_tokens: int | None = None,
                   prefetch: bool = False, gpu_memory_utilization: float = 0.9,
                   cuda_graphs: bool | None = None, engine=None,
                   max_total_tokens: int | None = None,
                   generator: str = "default") -> ServeSimulation:
    """Simulate ``duration`` seconds of traffic (or a trace) against ``devices`` = ``tp`` x
    replicas (default: one replica of ``tp`` devices); requests are split over the replicas by
    ``routing`` (``round-robin`` or ``adapter-affinity``, :mod:`simcost.serve.sim`).

    Defaults (None = not given): rate 10 req/s, cv 1, popularity_alpha 1, duration 60 s (a
    number of seconds or '90s', '10m', '1h'), input and output lengths 8:512 ('512' = 512:512),
    ranks 8, seed 0, engine vllm (V1). At most 10^7 requests (rate x duration) are simulated.
    ``engine`` (a name or a profile file, :mod:`simcost.serve.engines`) fixes the engine's
    facts (scheduler, LoRA kernel, CUDA graphs, paged-attention overhead, adapter residency,
    default batch limits, host cost); without it the engine follows ``scheduler`` (v1: vllm,
    fcfs: vllm-v0, slora: slora, mixed: trtllm), or is vLLM V1.
    ``max_total_tokens`` caps the KV pool in token slots (LightLLM's ``--max_total_token_num``).
    ``generator='slora'`` draws the requests as S-LoRA's benchmark does (``benchmarks/trace.py``;
    with ``seed=42`` they are the very requests of its published runs). ``engine`` may also be
    an :class:`~simcost.serve.engines.EngineSpec` (a profile with changed constants: the fits)."""
    spec = engine if isinstance(engine, EngineSpec) else None
    if spec is not None:
        engine = spec.name
    req = ServeSimRequest.build(
        model=model, hardware=hardware, dtype=dtype, weight_dtype=weight_dtype,
        kv_dtype=kv_dtype, devices=devices, tp=tp, routing=routing, adapters=adapters,
        ranks=ranks, merged=merged, rate=rate, cv=cv, popularity_alpha=popularity_alpha,
        duration=duration, input_len=input_len, output_len=output_len, trace=trace,
        scheduler=scheduler, slo_ttft=slo_ttft, seed=seed, n_requests=n_requests,
        lora_kernel=lora_kernel, targets=targets, peft=peft,
        num_virtual_tokens=num_virtual_tokens, max_num_seqs=max_num_seqs,
        max_num_tokens=max_num_tokens, prefetch=prefetch,
        gpu_memory_utilization=gpu_memory_utilization, cuda_graphs=cuda_graphs, engine=engine,
        max_total_tokens=max_total_tokens, generator=generator)
    return simulate_from_request(req, spec)


def _engine(req: ServeSimRequest, spec: EngineSpec | None = None):
    """(engine facts, scheduler name, LoRA kernel) of the request: ``spec``, else ``--engine``
    (a name or a profile file), else the engine a bare ``--scheduler`` names, else vLLM (V1)."""
    if spec is not None:
        espec = get_engine(spec)
    elif req.engine is not None:
        espec = get_engine(req.engine)
    elif req.scheduler is not None:
        if req.scheduler not in SCHEDULERS:
            raise unknown("scheduler", req.scheduler, SCHEDULERS)
        espec = get_engine(SCHEDULER_ENGINE[req.scheduler])
    else:
        espec = get_engine(DEFAULT_ENGINE)
    return espec, espec.scheduler, _kernel(req.lora_kernel or espec.lora_kernel)


def _requests(req: ServeSimRequest, spec, prefix: int):
    """The workload's length ranges, and the validated trace's arrays (or None)."""
    ii, oo = req.eff("input_len"), req.eff("output_len")
    nvt = req.virtual_tokens if req.peft == "prompt" else 0
    if req.trace:
        return ii, oo, read_trace(req.trace, adapters=req.adapters,
                                  max_positions=spec.max_positions, extra_tokens=prefix + nvt)
    ii = (ii[0] + nvt, ii[1] + nvt)
    if ii[1] + oo[1] + prefix > spec.max_positions:
        raise SimcostError(f"input + output length {ii[1] + oo[1]} exceeds {spec.name}'s "
                           f"{spec.max_positions} positions")
    return ii, oo, None


def simulate_from_request(req: ServeSimRequest, spec: EngineSpec | None = None) -> ServeSimulation:
    espec, sched, kernel = _engine(req, spec)
    spec, prof, dev, step, tg, host_bw, host_lat = _setup(
        req.model, req.hardware, req.dtype, req.weight_dtype, req.kv_dtype, req.tp, req.devices,
        kernel, req.targets, False, espec.decode_attn_overhead or 0.0)
    peft = req.peft or ("lora" if req.adapters > 0 else "none")
    prefix = req.virtual_tokens if peft == "prefix" else 0
    ii, oo, trace = _requests(req, spec, prefix)
    seqs, tokens = default_limits(espec, dev.memory_bytes, f"{prof.name} {dev.name}")
    eng = Engine(scheduler=sched, max_num_seqs=req.max_num_seqs or seqs,
                 max_num_tokens=req.max_num_tokens or tokens, prefetch=req.prefetch,
                 cuda_graphs=espec.cuda_graphs if req.cuda_graphs is None else req.cuda_graphs,
                 max_wait_tokens=espec.max_wait_tokens, adapter_residency=espec.adapter_residency,
                 adapter_copies=espec.adapter_copies_per_load,
                 batch_max_tokens_frac=espec.batch_max_tokens_frac,
                 max_total_tokens=req.max_total_tokens, host_ops_per_seq=espec.host_ops_per_seq,
                 full_sort_sampling=espec.full_sort_sampling,
                 step_overhead_s=espec.step_overhead_s, seq_overhead_s=espec.seq_overhead_s,
                 graph_mode=espec.graph_mode, graph_max_tokens=espec.graph_max_tokens)
    ranks = req.eff("ranks")
    wl = Workload(rate=req.eff("rate"), duration=req.eff("duration"), cv=req.eff("cv"),
                  input_len=ii, output_len=oo, adapters=max(req.adapters, 1), ranks=ranks,
                  popularity_alpha=req.eff("popularity_alpha"), requests=trace,
                  n_requests=req.n_requests, seed=req.eff("seed"), generator=req.generator)
    adapters = AdapterSet(req.adapters, ranks) if peft == "lora" and req.adapters > 0 else None
    mem = serve_memory(spec, dev, wdtype=step.wdtype, act_dtype=req.dtype, kv_dtype=step.kv_dtype,
                       tp=req.tp, ranks=list(ranks), targets=tg, max_tokens=eng.max_num_tokens,
                       max_seqs=min(eng.max_num_seqs, 256),
                       gpu_memory_utilization=req.gpu_memory_utilization)
    res = simulate(step, mem, wl, eng, adapter_ranks=adapters, merged=req.merged, prefix=prefix,
                   host_bw=host_bw, host_lat=host_lat, replicas=req.replicas,
                   routing=req.eff("routing"))
    return _summary(req, res, spec, prof, espec, sched, mem)


def _summary(req, res, spec, prof, espec, sched, mem) -> ServeSimulation:
    ms = res.makespan
    n = res.extra["n_requests"]
    slo = None if req.slo_ttft is None else float(np.mean(res.ttft <= req.slo_ttft))
    rate = None if req.trace else float(req.eff("rate"))
    over, why = detect_overload(res.finish - res.latency, res.ttft,
                                completed_per_s=n / ms if ms > 0 else 0.0,
                                offered_per_s=rate if rate is not None and np.isfinite(rate)
                                else None)
    return ServeSimulation(
        model=spec.name, hardware=prof.name, engine=espec.name,
        engine_display_name=espec.display, engine_versions=dict(espec.versions),
        scheduler=sched, tp=req.tp,
        adapters=req.adapters, merged=req.merged, n_requests=n,
        duration_s=float(req.eff("duration")), makespan_s=ms,
        throughput_req_s=n / ms if ms > 0 else 0.0,
        throughput_tok_s=float(res.out_tokens.sum()) / ms if ms > 0 else 0.0,
        ttft_s=_stats(res.ttft), tpot_s=_stats(res.tpot), latency_s=_stats(res.latency),
        slo_attainment=slo, adapters_resident=res.adapters_resident_max,
        adapters_served=res.adapters_served, swaps=res.swaps, swap_time_s=res.swap_time,
        preemptions=res.preemptions, max_batch=res.max_batch, iterations=res.iterations,
        memory_bytes=mem.as_dict(), devices=req.n_devices, replicas=req.replicas,
        routing=req.eff("routing"),
        replica_requests=res.extra.get("replica_requests", [n]),
        prompt_tokens=int(res.extra["prompt_tokens"]), output_tokens=int(res.out_tokens.sum()),
        overloaded=over, overload_reason=why, warnings=req.warnings())
