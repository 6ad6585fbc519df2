"""Python API for serving: one iteration (``estimate_serve``) and a traffic simulation
(``simulate_serve``), both returning pydantic models (SI units: seconds, bytes)."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel

from simcost.errors import SimcostError
from simcost.hardware import load_profile
from simcost.models.config import ModelSpec, load_model
from simcost.serve.memory import KV_BYTES, WEIGHT_BYTES, resolve_targets, serve_memory
from simcost.serve.engines import ENGINES, SCHEDULER_ENGINE, get_engine
from simcost.serve.sim import GENERATORS, SCHEDULERS, Engine, Workload, simulate
from simcost.serve.step import LORA_KERNELS, StepModel
from simcost.sim.timing import TimeModel

PEFT_SERVE = ("none", "lora", "prefix", "prompt")


class ServeEstimate(BaseModel):
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


class ServeSimulation(BaseModel):
    model: str
    hardware: str
    engine: str
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
    if devices is not None and tp > devices:
        raise SimcostError(f"--tp {tp} exceeds --devices {devices}")
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


def estimate_serve(model, hardware, *, phase: str = "decode", batch: int = 1, context: int = 512,
                   dtype: str = "fp16", weight_dtype: str | None = None, kv_dtype: str | None = None,
                   tp: int = 1, devices: int | None = None, peft: str = "none", rank: int = 8,
                   ranks=None, distinct_adapters: int = 1, merged: bool = False,
                   lora_kernel: str = "mbgmv", targets=None, num_virtual_tokens: int = 0,
                   cuda_graphs: bool = False, gpu_memory_utilization: float = 0.9) -> ServeEstimate:
    """One prefill (``batch`` prompts of ``context`` tokens) or decode (``batch`` sequences each
    with ``context`` cached tokens) iteration."""
    if phase not in ("prefill", "decode"):
        raise SimcostError(f"unknown phase '{phase}'; valid: prefill, decode")
    if batch < 1 or context < 1:
        raise SimcostError("--batch and --context must be >= 1")
    if peft not in PEFT_SERVE:
        raise SimcostError(f"unknown serving peft '{peft}'; valid: {', '.join(PEFT_SERVE)}")
    if rank < 1:
        raise SimcostError("--rank must be >= 1")
    if not 1 <= distinct_adapters <= batch:
        raise SimcostError("--distinct-adapters must be between 1 and --batch")
    spec, prof, dev, step, tg, _, _ = _setup(model, hardware, dtype, weight_dtype, kv_dtype, tp,
                                              devices, lora_kernel, targets, cuda_graphs)
    if context > spec.max_positions:
        raise SimcostError(f"context {context} exceeds {spec.name}'s {spec.max_positions} positions")
    prefix = num_virtual_tokens if peft == "prefix" else 0
    extra_in = num_virtual_tokens if peft == "prompt" else 0
    rk = list(ranks) if ranks else [rank]
    per = np.array([rk[i % len(rk)] for i in range(distinct_adapters)], dtype=float)
    lora = peft == "lora" and not merged
    if phase == "prefill":
        lens = np.full(batch, context + extra_in, dtype=float)
        T = float(lens.sum())
        r = step.iteration(prefill_lens=lens, lora_ranks=per if lora else None,
                           lora_tokens=np.full(distinct_adapters, T / distinct_adapters), prefix=prefix)
        toks = T
    else:
        r = step.iteration(decode_ctx_sum=float(batch * (context + extra_in)), n_decode=batch,
                           lora_ranks=per if lora else None,
                           lora_tokens=np.full(distinct_adapters, batch / distinct_adapters), prefix=prefix)
        toks = batch
    mem = serve_memory(spec, dev, wdtype=step.wdtype, act_dtype=dtype, kv_dtype=step.kv_dtype, tp=tp,
                       ranks=per.astype(int).tolist(), targets=tg, max_tokens=int(toks),
                       max_seqs=batch, gpu_memory_utilization=gpu_memory_utilization)
    kv = batch * (context + extra_in + prefix + (1 if phase == "decode" else 0)) * mem.kv_per_token
    ad = sum(mem.adapter_bytes[int(x)] for x in per) if peft == "lora" else 0.0
    need = mem.weights + mem.runtime_overhead + mem.workspace + kv + ad
    md = mem.as_dict()
    md.update({"kv_cache": kv, "adapters": ad, "peak": need})
    return ServeEstimate(model=spec.name, hardware=prof.name, phase=phase, batch=batch,
                         context=context, tp=tp, dtype=dtype, weight_dtype=step.wdtype,
                         peft={"method": peft, "ranks": per.astype(int).tolist(), "merged": merged,
                               "kernel": lora_kernel if lora else None,
                               "targets": tg if peft == "lora" else [],
                               "num_virtual_tokens": num_virtual_tokens},
                         time_s={k: float(v) for k, v in r.items() if k != "kernels"},
                         tokens_per_s=toks / r["total"], memory_bytes=md,
                         fits=need <= dev.memory_bytes)


def _range(x, name):
    if isinstance(x, str):
        try:
            a, b = (int(v) for v in x.split(":"))
        except ValueError:
            raise SimcostError(f"--{name} must be MIN:MAX, got '{x}'") from None
        return a, b
    return tuple(int(v) for v in x)


def simulate_serve(model, hardware, *, dtype: str = "fp16", weight_dtype: str | None = None,
                   kv_dtype: str | None = None, devices: int | None = None, tp: int = 1,
                   adapters: int = 1, ranks=(8,), merged: bool = False, rate: float = 10.0,
                   cv: float = 1.0, popularity_alpha: float = 1.0, duration: float = 60.0,
                   input_len="8:512", output_len="8:512", trace: str | None = None,
                   scheduler: str = "fcfs", slo_ttft: float | None = None, seed: int = 0,
                   n_requests: int | None = None, lora_kernel: str | None = None,
                   targets=None, peft: str | None = None, num_virtual_tokens: int = 0,
                   max_num_seqs: int | None = None, max_num_tokens: int | None = None,
                   prefetch: bool = False, gpu_memory_utilization: float = 0.9,
                   cuda_graphs: bool | None = None, engine: str | None = None,
                   max_total_tokens: int | None = None,
                   generator: str = "default") -> ServeSimulation:
    """Simulate ``duration`` seconds of traffic (or a trace) against one TP group.

    ``engine`` (:data:`simcost.serve.engines.ENGINES`) fixes the engine's physical facts
    (scheduler, LoRA kernel, CUDA graphs, paged-attention overhead, adapter residency); without
    it the engine follows ``scheduler`` (fcfs: vllm, slora: slora, mixed: trtllm).
    ``max_total_tokens`` caps the KV pool in token slots (LightLLM's ``--max_total_token_num``).
    ``generator='slora'`` draws the requests as S-LoRA's benchmark does (``benchmarks/trace.py``;
    with ``seed=42`` they are the very requests of its published runs)."""
    if generator not in GENERATORS:
        raise SimcostError(f"unknown generator '{generator}'; valid: {', '.join(GENERATORS)}")
    if trace and generator != "default":
        raise SimcostError("--trace replays a file; --generator draws requests: give one")
    if engine is not None:
        espec = get_engine(engine)
        scheduler = espec.scheduler          # the engine's own batching policy
    else:
        if scheduler not in SCHEDULERS:
            raise SimcostError(f"unknown scheduler '{scheduler}'; valid: {', '.join(SCHEDULERS)}")
        espec = ENGINES[SCHEDULER_ENGINE[scheduler]]
    if scheduler not in SCHEDULERS:
        raise SimcostError(f"unknown scheduler '{scheduler}'; valid: {', '.join(SCHEDULERS)}")
    if adapters < 0:
        raise SimcostError("--adapters must be >= 0")
    if isinstance(ranks, str):
        try:
            ranks = [int(v) for v in ranks.split(",") if v]
        except ValueError:
            raise SimcostError(f"--ranks must be integers separated by commas, got '{ranks}'") from None
    if not ranks or min(ranks) < 1:
        raise SimcostError("--ranks must be positive integers")
    if duration <= 0 and not trace and not n_requests:
        raise SimcostError("--duration must be > 0")
    if lora_kernel is None:
        lora_kernel = espec.lora_kernel
    if lora_kernel not in LORA_KERNELS:
        raise SimcostError(f"unknown LoRA kernel '{lora_kernel}'; valid: {', '.join(LORA_KERNELS)}")
    spec, prof, dev, step, tg, host_bw, host_lat = _setup(
        model, hardware, dtype, weight_dtype, kv_dtype, tp, devices, lora_kernel, targets, False,
        espec.decode_attn_overhead or 0.0)
    peft = peft or ("lora" if adapters > 0 else "none")
    prefix = num_virtual_tokens if peft == "prefix" else 0
    ii, oo = _range(input_len, "input-len"), _range(output_len, "output-len")
    if peft == "prompt":
        ii = (ii[0] + num_virtual_tokens, ii[1] + num_virtual_tokens)
    if ii[1] + oo[1] + prefix > spec.max_positions:
        raise SimcostError(f"input + output length {ii[1] + oo[1]} exceeds {spec.name}'s "
                           f"{spec.max_positions} positions")
    eng = Engine(scheduler=scheduler, max_num_seqs=max_num_seqs or espec.max_num_seqs,
                 max_num_tokens=max_num_tokens or espec.max_num_tokens, prefetch=prefetch,
                 cuda_graphs=espec.cuda_graphs if cuda_graphs is None else cuda_graphs,
                 max_wait_tokens=espec.max_wait_tokens,
                 adapter_residency=espec.adapter_residency,
                 adapter_copies=espec.adapter_copies_per_load,
                 batch_max_tokens_frac=espec.batch_max_tokens_frac,
                 max_total_tokens=max_total_tokens, host_ops_per_seq=espec.host_ops_per_seq,
                 full_sort_sampling=espec.full_sort_sampling)
    wl = Workload(rate=rate, duration=duration, cv=cv, input_len=ii, output_len=oo,
                  adapters=max(adapters, 1), ranks=tuple(ranks), popularity_alpha=popularity_alpha,
                  requests=None, n_requests=n_requests, seed=seed, generator=generator)
    arank = None
    if peft == "lora" and adapters > 0:
        arank = np.array([ranks[k % len(ranks)] for k in range(adapters)], dtype=float)
    mem = serve_memory(spec, dev, wdtype=step.wdtype, act_dtype=dtype, kv_dtype=step.kv_dtype, tp=tp,
                       ranks=[int(r) for r in ranks], targets=tg,
                       max_tokens=eng.max_num_tokens, max_seqs=min(eng.max_num_seqs, 256),
                       gpu_memory_utilization=gpu_memory_utilization)
    res = simulate(step, mem, wl, eng, adapter_ranks=arank, merged=merged, prefix=prefix,
                   host_bw=host_bw, host_lat=host_lat)
    ms = res.makespan
    n = res.extra["n_requests"]
    slo = None
    if slo_ttft is not None:
        slo = float(np.mean(res.ttft <= slo_ttft))
    return ServeSimulation(
        model=spec.name, hardware=prof.name, engine=espec.name, scheduler=scheduler, tp=tp, adapters=adapters,
        merged=merged, n_requests=n, duration_s=float(duration), makespan_s=ms,
        throughput_req_s=n / ms if ms > 0 else 0.0,
        throughput_tok_s=float(res.out_tokens.sum()) / ms if ms > 0 else 0.0,
        ttft_s=_stats(res.ttft), tpot_s=_stats(res.tpot), latency_s=_stats(res.latency),
        slo_attainment=slo, adapters_resident=res.adapters_resident_max,
        adapters_served=res.adapters_served, swaps=res.swaps, swap_time_s=res.swap_time,
        preemptions=res.preemptions, max_batch=res.max_batch, iterations=res.iterations,
        memory_bytes=mem.as_dict())
