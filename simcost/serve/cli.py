"""``simcost estimate serve`` and ``simcost simulate serve``.

The lead wires these into :mod:`simcost.cli` with two calls: ``add_commands(sub, _Parser)``
after the ``estimate`` / other sub-parsers are made, and ``dispatch(args)`` for
``args.command == "simulate"`` or ``(args.command, args.what) == ("estimate", "serve")``.
Both commands build the validated request (:mod:`simcost.request.serve`) the API builds; an
option left out is ``None`` there, so an option given where it has no effect is warned about.
"""
from __future__ import annotations

import argparse
import json
import sys

from simcost.argtypes import integer, number
from simcost.errors import SimcostError

D = " (default: %(default)s)"


def _common(p):
    p.add_argument("--model", required=True, help="zoo name, config.json path or its directory")
    p.add_argument("--hardware", required=True, help="profile name or profile JSON path")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"),
                   help="activation and adapter dtype" + D)
    p.add_argument("--weight-dtype", default=None,
                   choices=("fp16", "bf16", "fp32", "fp8", "int8", "int4", "nf4"),
                   help="base weight storage (default: --dtype)")
    p.add_argument("--kv-dtype", default=None, choices=("fp16", "bf16", "fp32", "fp8", "int8"),
                   help="KV-cache dtype (default: --dtype)")
    p.add_argument("--tp", type=integer, default=1, help="tensor-parallel degree of a replica" + D)
    p.add_argument("--targets", default=None,
                   help="LoRA target projections, comma-separated, or all-linear "
                        "(default: q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _estimate_parser(est_sub):
    e = est_sub.add_parser("serve", help="one prefill or decode iteration of a server",
                           description="Time and memory of one serving iteration of one "
                                       "tensor-parallel group.")
    _common(e)
    e.add_argument("--devices", type=integer, default=None,
                   help="devices = tp x replicas, a multiple of --tp; the estimate is per "
                        "replica (default: --tp)")
    e.add_argument("--phase", default="decode", choices=("prefill", "decode"),
                   help="prefill: batch prompts of --context tokens; decode: one token for each "
                        "of batch sequences" + D)
    e.add_argument("--batch", type=integer, required=True, help="sequences in the iteration")
    e.add_argument("--context", type=integer, required=True,
                   help="prompt length (prefill) or cached tokens per sequence (decode)")
    e.add_argument("--peft", default="none", choices=("none", "lora", "prefix", "prompt"),
                   help="adapter method served" + D)
    e.add_argument("--rank", type=integer, default=None, help="LoRA rank (default: 8)")
    e.add_argument("--ranks", default=None,
                   help="ranks of the distinct adapters, e.g. 8,16, cycled over "
                        "--distinct-adapters (default: --rank)")
    e.add_argument("--distinct-adapters", type=integer, default=None,
                   help="distinct LoRA adapters in the batch, at most --batch (default: 1)")
    e.add_argument("--merged", action="store_true", help="LoRA merged into the base weights")
    e.add_argument("--lora-kernel", default=None,
                   help="heterogeneous-adapter kernel: mbgmv, sgmv, loop, slora-bgmv "
                        "(default: mbgmv)")
    e.add_argument("--num-virtual-tokens", type=integer, default=None,
                   help="prefix/prompt tuning virtual tokens (default: 0)")
    e.add_argument("--cuda-graphs", action="store_true",
                   help="kernels replayed from CUDA graphs (no per-kernel host cost)")


def add_request_lengths(p) -> None:
    """``--input-len`` and ``--output-len``, as ``simulate serve`` and ``plan serve`` take
    them (both parsed by :class:`simcost.request.serve.Traffic`)."""
    p.add_argument("--input-len", default=None,
                   help="prompt length N or MIN:MAX, uniform (default: 8:512)")
    p.add_argument("--output-len", default=None,
                   help="output length N or MIN:MAX, uniform (default: 8:512)")


def _sim_traffic(s):
    s.add_argument("--rate", type=number, default=None,
                   help="requests per second; inf is refused here (default: 10)")
    s.add_argument("--cv", type=number, default=None,
                   help="coefficient of variation of the gamma inter-arrival gaps, 1 = Poisson, "
                        "at most 100 (default: 1)")
    s.add_argument("--popularity-alpha", type=number, default=None,
                   help="adapter popularity: adapter = floor(N x X), X ~ Power(alpha); 1 is "
                        "uniform, smaller concentrates on low ids (default: 1)")
    s.add_argument("--duration", default=None,
                   help="traffic duration: seconds, or 90s, 10m, 1h; at most 10^7 requests "
                        "(rate x duration) (default: 60s)")
    add_request_lengths(s)
    s.add_argument("--trace", default=None,
                   help="replay a CSV with columns time,adapter,prompt_len,output_len instead of "
                        "drawing requests")
    s.add_argument("--seed", type=integer, default=None, help="random seed, 0..2^32-1 (default: 0)")
    s.add_argument("--generator", default="default", choices=("default", "slora"),
                   help="how requests are drawn: 'slora' as S-LoRA's benchmarks/trace.py does "
                        "(with --seed 42, the requests of its published runs)" + D)


def _sim_parser(subparsers, parser_class):
    sim = subparsers.add_parser("simulate", help="simulate traffic against a server")
    sim_sub = sim.add_subparsers(dest="what", required=True, parser_class=parser_class)
    s = sim_sub.add_parser("serve", help="discrete-event simulation of multi-adapter serving",
                           description="Simulate requests arriving at a server with continuous "
                                       "batching; TTFT, TPOT, latency, throughput.")
    _common(s)
    s.add_argument("--devices", type=integer, default=None,
                   help="devices = tp x replicas, a multiple of --tp; each replica simulates "
                        "the requests routed to it (default: --tp)")
    s.add_argument("--routing", default=None, choices=("round-robin", "adapter-affinity"),
                   help="how requests are split over replicas: round-robin in arrival order, or "
                        "adapter-affinity (all requests of an adapter on one replica, heaviest "
                        "adapters first to the least-loaded replica) (default: round-robin)")
    s.add_argument("--adapters", type=integer, default=0,
                   help="distinct LoRA adapters; 0 serves the base model" + D)
    s.add_argument("--ranks", default=None,
                   help="adapter ranks, cycled over adapter ids, e.g. 8,16 (default: 8)")
    s.add_argument("--merged", action="store_true",
                   help="one adapter at a time merged into the weights")
    _sim_traffic(s)
    s.add_argument("--scheduler", default=None, choices=("v1", "fcfs", "slora", "mixed"),
                   help="batching policy without --engine: v1 (vLLM V1), fcfs (vLLM v0), slora, "
                        "mixed (TensorRT-LLM); each runs that engine (default: the --engine's own)")
    s.add_argument("--slo-ttft", type=number, default=None,
                   help="report the fraction of requests with TTFT <= this many seconds "
                        "(default: not reported)")
    s.add_argument("--prefetch", action="store_true",
                   help="overlap adapter loads with the previous iteration")
    s.add_argument("--engine", default=None,
                   help="serving engine profile: vllm (V1), vllm-v0, slora, trtllm, or a path to "
                        "a profile JSON (stack_profiles/serving/); sets the scheduler and the "
                        "engine's facts (default: vllm, or the --scheduler's engine)")
    s.add_argument("--max-num-seqs", type=integer, default=None,
                   help="largest batch in sequences (vLLM --max-num-seqs) "
                        "(default: the engine's on this device)")
    s.add_argument("--lora-kernel", default=None,
                   help="heterogeneous-adapter kernel instead of the engine's own: mbgmv, sgmv, "
                        "loop, slora-bgmv (default: the --engine's)")
    s.add_argument("--max-total-tokens", type=integer, default=None,
                   help="KV pool in token slots (LightLLM/S-LoRA --max_total_token_num) "
                        "(default: the memory left after weights)")
    s.add_argument("--trace-out", default=None, metavar="FILE",
                   help="also write the run as a Chrome/Perfetto trace (JSON; open in "
                        "ui.perfetto.dev or chrome://tracing): per replica, one span per "
                        "engine iteration and per request its queue+prefill and decode")


def add_commands(subparsers, parser_class) -> None:
    """Add ``estimate serve`` (to the existing ``estimate`` group) and ``simulate serve``."""
    est = subparsers.choices.get("estimate")
    if est is None:
        est = subparsers.add_parser("estimate", help="estimate one step")
        est.add_subparsers(dest="what", required=True, parser_class=parser_class)
    est_sub = next(a for a in est._actions if isinstance(a, argparse._SubParsersAction))
    _estimate_parser(est_sub)
    _sim_parser(subparsers, parser_class)


def _common_kw(a) -> dict:
    return dict(model=a.model, hardware=a.hardware, dtype=a.dtype, weight_dtype=a.weight_dtype,
                kv_dtype=a.kv_dtype, tp=a.tp, devices=a.devices, targets=a.targets)


def _warn(r) -> None:
    for w in r.warnings:
        print(f"simcost: warning: {w}", file=sys.stderr)
    if getattr(r, "overloaded", False):
        print(f"simcost: warning: overloaded: {r.overload_reason}; the latency percentiles grow "
              "with the simulated duration", file=sys.stderr)


def _print_estimate(r) -> None:
    t = r.time_s
    print(f"{r.model} on {r.hardware}: {r.phase} batch {r.batch} x {r.context} tokens")
    for k in ("total", "linear", "attention", "lora", "head", "host"):
        print(f"  {k:<10} {t[k] * 1e3:10.3f} ms")
    print(f"  tokens/s   {r.tokens_per_s:10.1f}")
    m = r.memory_bytes
    print(f"  memory     {m['peak'] / 2**30:10.2f} GiB  KV pool {m['pool'] / 2**30:.2f} GiB, "
          f"KV cache {m['kv_cache'] / 2**30:.2f} GiB  fits: {r.fits}")


def _print_simulation(r) -> None:
    dev = f", {r.replicas} replicas x tp {r.tp} ({r.routing})" if r.replicas > 1 else ""
    print(f"{r.model} on {r.hardware} ({r.engine}: {r.scheduler}, {r.adapters} adapters{dev}): "
          f"{r.n_requests} requests in {r.makespan_s:.1f} s")
    vers = ", ".join(f"{k} {v}" for k, v in r.engine_versions.items())
    print(f"  engine     {r.engine_display_name} [{vers}]")
    print(f"  throughput {r.throughput_req_s:.3f} req/s, {r.throughput_tok_s:.0f} tok/s")
    for name, d in (("TTFT", r.ttft_s), ("TPOT", r.tpot_s), ("latency", r.latency_s)):
        if d["mean"] is None:
            print(f"  {name:<8} n/a (no request with a value)")
            continue
        print(f"  {name:<8} mean {d['mean']:.4f}  p50 {d['p50']:.4f}  p90 {d['p90']:.4f}  "
              f"p99 {d['p99']:.4f} s")
    if r.slo_attainment is not None:
        print(f"  SLO attainment {r.slo_attainment:.3f}")
    print(f"  adapters resident {r.adapters_resident}, swaps {r.swaps}, "
          f"preemptions {r.preemptions}, max batch {r.max_batch}")
    print(f"  overloaded {'yes: ' + r.overload_reason if r.overloaded else 'no'}")


def dispatch(args) -> int:
    from simcost.request.serve import ServeEstimateRequest, ServeSimRequest
    from simcost.serve.api import estimate_from_request, simulate_from_request

    a = args
    if a.command == "estimate" and a.what == "serve":
        req = ServeEstimateRequest.build(
            **_common_kw(a), phase=a.phase, batch=a.batch, context=a.context, peft=a.peft,
            rank=a.rank, ranks=a.ranks, distinct_adapters=a.distinct_adapters, merged=a.merged,
            lora_kernel=a.lora_kernel, num_virtual_tokens=a.num_virtual_tokens,
            cuda_graphs=a.cuda_graphs)
        r = estimate_from_request(req)
        show = _print_estimate
    elif a.command == "simulate" and a.what == "serve":
        if a.rate is not None and a.rate == float("inf"):
            raise SimcostError("--rate must be finite (the offline mode, every request at "
                               "t = 0, is the API's n_requests)")
        req = ServeSimRequest.build(
            **_common_kw(a), routing=a.routing, adapters=a.adapters, ranks=a.ranks,
            merged=a.merged, rate=a.rate, cv=a.cv, popularity_alpha=a.popularity_alpha,
            duration=a.duration, input_len=a.input_len, output_len=a.output_len, trace=a.trace,
            scheduler=a.scheduler, slo_ttft=a.slo_ttft, seed=a.seed, generator=a.generator,
            prefetch=a.prefetch, engine=a.engine, max_total_tokens=a.max_total_tokens,
            max_num_seqs=a.max_num_seqs, lora_kernel=a.lora_kernel)
        if a.trace_out:
            from simcost import perfetto
            from simcost.sim.breakdown import recording
            path = perfetto.check_trace_out(a.trace_out)
            with recording() as rec:
                r = simulate_from_request(req)
            perfetto.write_trace(path, perfetto.serve_trace(r, rec))
        else:
            r = simulate_from_request(req)
        show = _print_simulation
    else:
        raise SimcostError(f"unknown serving command '{a.command} {getattr(a, 'what', '')}'")
    _warn(r)
    if a.json:
        print(json.dumps(r.model_dump()))
    else:
        show(r)
    return 0
