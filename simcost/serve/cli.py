"""``simcost estimate serve`` and ``simcost simulate serve``.

The lead wires these into :mod:`simcost.cli` with two calls: ``add_commands(sub, _Parser)``
after the ``estimate`` / other sub-parsers are made, and ``dispatch(args)`` for
``args.command == "simulate"`` or ``(args.command, args.what) == ("estimate", "serve")``.
"""
from __future__ import annotations

import argparse
import json

from simcost.errors import SimcostError


def _int(s):
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{s}'") from None


def _common(p):
    p.add_argument("--model", required=True, help="zoo name, config.json path or its directory")
    p.add_argument("--hardware", required=True, help="profile name or profile JSON path")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--weight-dtype", default=None,
                   choices=("fp16", "bf16", "fp32", "fp8", "int8", "int4", "nf4"),
                   help="base weight storage (default: --dtype)")
    p.add_argument("--kv-dtype", default=None, choices=("fp16", "bf16", "fp32", "fp8", "int8"))
    p.add_argument("--devices", type=_int, default=None)
    p.add_argument("--tp", type=_int, default=1, help="tensor-parallel degree")
    p.add_argument("--targets", default=None, help="LoRA targets (default q,k,v,o_proj)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def add_commands(subparsers, parser_class) -> None:
    """Add ``estimate serve`` (to the existing ``estimate`` group) and ``simulate serve``."""
    est = subparsers.choices.get("estimate")
    if est is None:
        est = subparsers.add_parser("estimate", help="estimate one step")
        est.add_subparsers(dest="what", required=True, parser_class=parser_class)
    est_sub = next(a for a in est._actions if isinstance(a, argparse._SubParsersAction))
    e = est_sub.add_parser("serve", help="one prefill or decode iteration of a server",
                           description="Time and memory of one serving iteration.")
    _common(e)
    e.add_argument("--phase", default="decode", choices=("prefill", "decode"))
    e.add_argument("--batch", type=_int, required=True)
    e.add_argument("--context", type=_int, required=True,
                   help="prompt length (prefill) or cached tokens per sequence (decode)")
    e.add_argument("--peft", default="none", choices=("none", "lora", "prefix", "prompt"))
    e.add_argument("--rank", type=_int, default=8)
    e.add_argument("--ranks", default=None, help="ranks of the distinct adapters, e.g. 8,16")
    e.add_argument("--distinct-adapters", type=_int, default=1)
    e.add_argument("--merged", action="store_true")
    e.add_argument("--lora-kernel", default="mbgmv", choices=("mbgmv", "sgmv", "loop"))
    e.add_argument("--num-virtual-tokens", type=_int, default=0)
    e.add_argument("--cuda-graphs", action="store_true")

    sim = subparsers.add_parser("simulate", help="simulate traffic against a server")
    sim_sub = sim.add_subparsers(dest="what", required=True, parser_class=parser_class)
    s = sim_sub.add_parser("serve", help="discrete-event simulation of multi-adapter serving",
                           description="Simulate requests arriving at a server with continuous "
                                       "batching; TTFT, TPOT, latency, throughput.")
    _common(s)
    s.add_argument("--adapters", type=_int, default=0)
    s.add_argument("--ranks", default="8")
    s.add_argument("--merged", action="store_true")
    s.add_argument("--rate", type=float, default=10.0, help="requests per second")
    s.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gaps")
    s.add_argument("--popularity-alpha", type=float, default=1.0)
    s.add_argument("--duration", type=float, default=60.0)
    s.add_argument("--input-len", default="8:512")
    s.add_argument("--output-len", default="8:512")
    s.add_argument("--trace", default=None, help="CSV: time,adapter,prompt_len,output_len")
    s.add_argument("--scheduler", default="fcfs", choices=("fcfs", "slora", "mixed"))
    s.add_argument("--slo-ttft", type=float, default=None)
    s.add_argument("--seed", type=_int, default=0)
    s.add_argument("--generator", default="default", choices=("default", "slora"),
                   help="how requests are drawn: 'slora' as S-LoRA's benchmarks/trace.py does "
                        "(with --seed 42, the requests of its published runs)")
    s.add_argument("--prefetch", action="store_true")
    s.add_argument("--engine", default=None, choices=("vllm", "slora", "trtllm"),
                   help="serving engine whose physical facts to use (overrides --scheduler; "
                        "see simcost/serve/engines.py)")
    s.add_argument("--max-total-tokens", type=_int, default=None,
                   help="KV pool in token slots (LightLLM/S-LoRA --max_total_token_num)")


def dispatch(args) -> int:
    from simcost.serve.api import estimate_serve, simulate_serve

    if args.command == "estimate" and args.what == "serve":
        ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else None
        r = estimate_serve(args.model, args.hardware, phase=args.phase, batch=args.batch,
                           context=args.context, dtype=args.dtype, weight_dtype=args.weight_dtype,
                           kv_dtype=args.kv_dtype, tp=args.tp, devices=args.devices,
                           peft=args.peft, rank=args.rank, ranks=ranks,
                           distinct_adapters=args.distinct_adapters, merged=args.merged,
                           lora_kernel=args.lora_kernel, targets=args.targets,
                           num_virtual_tokens=args.num_virtual_tokens, cuda_graphs=args.cuda_graphs)
        if args.json:
            print(json.dumps(r.model_dump()))
        else:
            t = r.time_s
            print(f"{r.model} on {r.hardware}: {r.phase} batch {r.batch} x {r.context} tokens")
            for k in ("total", "linear", "attention", "lora", "head", "host"):
                print(f"  {k:<10} {t[k] * 1e3:10.3f} ms")
            print(f"  tokens/s   {r.tokens_per_s:10.1f}")
            print(f"  memory     {r.memory_bytes['peak'] / 2**30:10.2f} GiB  fits: {r.fits}")
        return 0
    if args.command == "simulate" and args.what == "serve":
        r = simulate_serve(args.model, args.hardware, dtype=args.dtype,
                           weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype,
                           devices=args.devices, tp=args.tp, adapters=args.adapters,
                           ranks=args.ranks, merged=args.merged, rate=args.rate, cv=args.cv,
                           popularity_alpha=args.popularity_alpha, duration=args.duration,
                           input_len=args.input_len, output_len=args.output_len, trace=args.trace,
                           scheduler=args.scheduler, slo_ttft=args.slo_ttft, seed=args.seed,
                           generator=args.generator,
                           targets=args.targets, prefetch=args.prefetch, engine=args.engine,
                           max_total_tokens=args.max_total_tokens)
        if args.json:
            print(json.dumps(r.model_dump()))
        else:
            print(f"{r.model} on {r.hardware} ({r.engine}: {r.scheduler}, {r.adapters} adapters): "
                  f"{r.n_requests} requests in {r.makespan_s:.1f} s")
            print(f"  throughput {r.throughput_req_s:.3f} req/s, {r.throughput_tok_s:.0f} tok/s")
            for name, d in (("TTFT", r.ttft_s), ("TPOT", r.tpot_s), ("latency", r.latency_s)):
                print(f"  {name:<8} mean {d['mean']:.4f}  p50 {d['p50']:.4f}  p90 {d['p90']:.4f}  "
                      f"p99 {d['p99']:.4f} s")
            if r.slo_attainment is not None:
                print(f"  SLO attainment {r.slo_attainment:.3f}")
            print(f"  adapters resident {r.adapters_resident}, swaps {r.swaps}, "
                  f"preemptions {r.preemptions}, max batch {r.max_batch}")
        return 0
    raise SimcostError(f"unknown serving command '{args.command} {getattr(args, 'what', '')}'")
