"""``simcost plan serve``: the cheapest fleet that meets a serving SLO (the parser, the table,
``--json`` and ``--csv``; the search is :mod:`simcost.plan.serve_search`)."""
from __future__ import annotations

import sys

DESCRIPTION = (
    "Plan a multi-adapter serving fleet: the cheapest hardware x devices x tensor parallelism "
    "and server settings (merged or unmerged adapters, LoRA kernel, max batch) that meet a p99 "
    "TTFT and/or TPOT SLO at a request rate, each priced by simulating the traffic with "
    "`simcost simulate serve`. Reports the best fleets, the highest rate one replica sustains, "
    "$ per million tokens, the adapters one GPU keeps resident, and the `simulate serve` "
    "arguments that reproduce the answer.")
D = " (default: %(default)s)"


def add_arguments(p) -> None:
    from simcost.argtypes import integer as i, number as f
    from simcost.serve.cli import add_request_lengths
    p.add_argument("--model", required=True, help="zoo name (simcost models), config.json path "
                                                  "or its directory")
    p.add_argument("--adapters", type=i, default=0,
                   help="distinct LoRA adapters served; 0 serves the base model" + D)
    p.add_argument("--ranks", default=None,
                   help="adapter ranks, cycled over adapter ids, e.g. 8,16 (default: 8)")
    p.add_argument("--rate", type=f, required=True, help="requests per second to serve")
    p.add_argument("--slo-ttft", type=f, default=None,
                   help="p99 time to first token, seconds (give this and/or --slo-tpot)")
    p.add_argument("--slo-tpot", type=f, default=None,
                   help="p99 time per output token after the first, seconds")
    p.add_argument("--hardware", default=None,
                   help="profiles to search, comma-separated, or 'all' (default: every bundled "
                        "GPU profile with a price; profiles without one are left out)")
    p.add_argument("--tp", default=None,
                   help="tensor-parallel degrees to search, e.g. 1,2 (default: the divisors of "
                        "the model's attention heads up to 8)")
    p.add_argument("--engine", default=None,
                   help="serving engine profile: vllm (V1), vllm-v0, slora, trtllm, or a profile "
                        "JSON (default: vllm)")
    p.add_argument("--lora-kernels", default=None,
                   help="LoRA kernels to search, comma-separated, or 'all' (mbgmv, sgmv, loop, "
                        "slora-bgmv) (default: the engine's own)")
    p.add_argument("--routing", default=None, choices=("round-robin", "adapter-affinity"),
                   help="how requests are split over replicas (default: round-robin)")
    add_request_lengths(p)
    p.add_argument("--popularity-alpha", type=f, default=None,
                   help="adapter popularity: 1 is uniform, smaller concentrates on low ids "
                        "(default: 1)")
    p.add_argument("--requests", type=i, default=None,
                   help="requests each simulation draws (over requests / rate seconds of "
                        "traffic) (default: 1000)")
    p.add_argument("--duration", default=None,
                   help="traffic per simulation instead of --requests: seconds, or 90s, 10m")
    p.add_argument("--seed", type=i, default=None, help="random seed (default: 0)")
    p.add_argument("--max-devices", type=i, default=16,
                   help="most devices a fleet may have" + D)
    p.add_argument("--top", type=i, default=3,
                   help="fleets shown in the table; the search stops once this many are known "
                        "and nothing left can be cheaper" + D)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="write every candidate fleet searched, best first, to FILE")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="write a self-contained HTML report (the report extra: plotly)")
    p.add_argument("--progress", action="store_true",
                   help="a progress bar on stderr even when it is not a terminal")


def run_cli(args) -> int:
    import json

    from simcost.plan.serve_search import plan_serve_from_request
    from simcost.request.plan_serve import ServePlanRequest
    a = args
    req = ServePlanRequest.build(
        model=a.model, adapters=a.adapters, ranks=a.ranks, rate=a.rate, slo_ttft=a.slo_ttft,
        slo_tpot=a.slo_tpot, hardware=a.hardware, tp=a.tp, engine=a.engine,
        lora_kernels=a.lora_kernels, routing=a.routing, input_len=a.input_len,
        output_len=a.output_len, popularity_alpha=a.popularity_alpha, requests=a.requests,
        duration=a.duration, seed=a.seed, max_devices=a.max_devices, top=a.top)
    from simcost.paths import check_output_file
    if a.csv:
        check_output_file(a.csv, "--csv")
    if a.html:
        from simcost.plan.html import require_plotly
        check_output_file(a.html, "--html")
        require_plotly()
    if a.progress or sys.stderr.isatty():
        plan = _with_progress(req, plan_serve_from_request)
    else:
        plan = plan_serve_from_request(req)
    for w in plan.warnings:
        print(f"simcost: warning: {w}", file=sys.stderr)
    if a.csv:
        write_csv(a.csv, plan)
    if a.html:
        from simcost.plan.html import write_html
        write_html(html_view(plan.model_dump()), a.html)
    if a.json:
        print(json.dumps(plan.model_dump()))
    else:
        print_plan(req, plan)
    return 0


def html_view(plan: dict) -> dict:
    """The serving plan as the HTML report reads it: ``kind``, the question, and each fleet's
    p99 latencies (then p50s) as plain numbers first, so its scatter is cost against TTFT p99."""
    def flat(e: dict | None) -> dict | None:
        if e is None:
            return None
        lat = {f"{k.removesuffix('_s')}_{q}_s": e[k][q] for k in ("ttft_s", "tpot_s")
               if isinstance(e.get(k), dict) for q in ("p99", "p50") if q in e[k]}
        return {"fleet": f"{e['devices']} x {e['hardware']}", **lat,
                **{k: v for k, v in e.items() if k not in ("ttft_s", "tpot_s")}}
    question = {k: plan.get(k) for k in ("model", "adapters", "ranks", "rate_req_s", "engine",
                                         "n_requests")}
    question["slo"] = ", ".join(f"{k} {v}" for k, v in (plan.get("slo") or {}).items()
                                if v is not None)
    best = flat(plan.get("best"))
    cands = [flat(e) for e in plan.get("candidates") or []]
    if best is not None:        # the same dict object, so the report marks it as best
        cands = [best if c == best else c for c in cands]
    return {**plan, "kind": "serve", "question": question, "best": best, "candidates": cands}


def _with_progress(req, plan_fn):
    """The plan with a progress bar on stderr: settings searched or pruned, simulations run."""
    from simcost.plan.progress import progress_bar
    with progress_bar(True) as bar:
        task = bar.add_task("plan serve", total=None)
        n = [0]

        def tick(text):
            n[0] += 1
            bar.update(task, description=f"plan serve: {n[0]} simulations, now {text}")

        def progress(total):
            bar.reset(task, total=total)
            return lambda: bar.advance(task)
        return plan_fn(req, tick=tick, progress=progress)


# ---- output --------------------------------------------------------------------------------
CSV_COLUMNS = ("hardware", "tp", "replicas", "devices", "merged", "lora_kernel",
               "max_num_seqs", "meets_slo", "overloaded", "slo_ratio", "ttft_p50_s",
               "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "usd_per_hour",
               "usd_per_million_output_tokens", "usd_per_million_tokens", "simulate_args")


def _row(f) -> dict:
    d = f.model_dump()
    d.update(ttft_p50_s=f.ttft_s["p50"], ttft_p99_s=f.ttft_s["p99"], tpot_p50_s=f.tpot_s["p50"],
             tpot_p99_s=f.tpot_s["p99"],
             usd_per_million_output_tokens=f.usd_per_million_tokens["output"],
             usd_per_million_tokens=f.usd_per_million_tokens["total"],
             simulate_args=" ".join(f.simulate_args))
    return {k: d[k] for k in CSV_COLUMNS}


def write_csv(path: str, plan) -> None:
    import csv

    from simcost.errors import SimcostError
    try:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for f in plan.candidates:
                w.writerow(_row(f))
    except OSError as e:
        raise SimcostError(f"--csv {path}: {e.strerror}") from None


def _top_fleets(plan, n: int) -> list:
    """The best setting of each (hardware, tp), cheapest first, at most ``n``."""
    seen, out = set(), []
    for f in plan.candidates:
        if f.meets_slo and (f.hardware, f.tp) not in seen:
            seen.add((f.hardware, f.tp))
            out.append(f)
    return out[:n]


def print_plan(req, plan) -> None:
    from rich.console import Console
    from rich.table import Table

    from simcost.plan.serve_answer import seconds_text, settings_name, slo_text
    console = Console(width=max(Console().width, 150))
    print(f"{plan.model}, {plan.adapters} adapters (ranks {','.join(map(str, plan.ranks))}), "
          f"{plan.rate_req_s:g} req/s, {slo_text(req)}; {plan.engine}; "
          f"{plan.n_requests} requests per simulation")
    rows = _top_fleets(plan, req.top)
    if rows:
        t = Table(title="cheapest fleets that meet the SLO")
        for c in ("", "fleet", "tp", "replicas", "settings", "TTFT p50", "TTFT p99",
                  "TPOT p50", "TPOT p99", "$/h", "$/M out tok"):
            t.add_column(c, justify="left" if c in ("fleet", "settings") else "right")
        for k, f in enumerate(rows, 1):
            t.add_row(str(k), f"{f.devices} x {f.hardware}", str(f.tp), str(f.replicas),
                      settings_name(f, req.adapters), seconds_text(f.ttft_s["p50"]),
                      seconds_text(f.ttft_s["p99"]), seconds_text(f.tpot_s["p50"]),
                      seconds_text(f.tpot_s["p99"]), f"{f.usd_per_hour:.2f}",
                      "n/a" if f.usd_per_million_tokens["output"] is None
                      else f"{f.usd_per_million_tokens['output']:.3g}")
        console.print(t)
    print(plan.answer)
    if plan.best is not None:
        print("reproduce: simcost simulate serve " + " ".join(plan.best.simulate_args))
    left = "; ".join(f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in plan.left_out.items())
    print(f"searched {len(plan.candidates)} fleet(s) in {plan.simulations} simulations, "
          f"{plan.pruned} setting(s) pruned by cost or capacity"
          + (f"; left out ({left})" if left else ""))
