"""The one-paragraph answer of ``simcost plan serve`` (text only; the numbers are the plan's)."""
from __future__ import annotations

import math


def seconds_text(x: float | None) -> str:
    """Seconds for people: ms below one second."""
    if x is None:
        return "n/a"
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def fleet_name(f) -> str:
    if f.tp == 1:
        return f"{f.devices} x {f.hardware}, tp 1"
    return (f"{f.devices} x {f.hardware} as {f.replicas} replica{'s' if f.replicas > 1 else ''} "
            f"of tp {f.tp}")


def settings_name(f, adapters: int) -> str:
    if adapters == 0:
        how = "base model"
    elif f.merged:
        how = "merged"
    else:
        how = f"unmerged, {f.lora_kernel} kernel"
    return f"{how}, max batch {f.max_num_seqs}"


def slo_text(req) -> str:
    parts = []
    if req.slo_ttft is not None:
        parts.append(f"TTFT p99 <= {seconds_text(req.slo_ttft)}")
    if req.slo_tpot is not None:
        parts.append(f"TPOT p99 <= {seconds_text(req.slo_tpot)}")
    return " and ".join(parts)


def _latencies(f) -> str:
    t, p = f.ttft_s, f.tpot_s
    return (f"TTFT p99 {seconds_text(t['p99'])} (p50 {seconds_text(t['p50'])}), TPOT p99 "
            f"{seconds_text(p['p99'])} (p50 {seconds_text(p['p50'])})")


def _usd_m(x: float | None) -> str:
    return "n/a" if x is None else f"${x:.3g}"


def answer(req, plan, capacity_misses) -> str:
    b = plan.best
    if b is not None:
        rate = (f"one replica sustains up to {b.max_rate_per_replica:.3g} req/s within the SLO"
                if b.max_rate_per_replica else "no rate meets the SLO on one replica alone")
        m = b.usd_per_million_tokens
        res = (f"; {b.adapters_resident_per_gpu} of {req.adapters} adapters fit resident per GPU"
               if req.adapters else "")
        return (f"{fleet_name(b)}, {settings_name(b, req.adapters)}: {_latencies(b)} at "
                f"{req.rate:g} req/s over {plan.n_requests} simulated requests; "
                f"${b.usd_per_hour:.2f}/h, {_usd_m(m['output'])} per million output tokens "
                f"({_usd_m(m['total'])} per million prompt + output tokens); {rate}{res}.")
    return _no_fleet(req, plan, capacity_misses)


def _no_fleet(req, plan, capacity_misses) -> str:
    head = (f"No fleet of at most {req.max_devices} devices meets {slo_text(req)} at "
            f"{req.rate:g} req/s.")
    helps = []
    m = plan.nearest_miss
    if m is not None:
        over = (" and is overloaded (the queue grows without bound)" if m.overloaded else "")
        head += (f" Nearest miss: {fleet_name(m)}, {settings_name(m, req.adapters)}: "
                 f"{_latencies(m)}, {m.slo_ratio:.3g}x the SLO{over}.")
        if m.overloaded or m.replicas * m.tp >= req.max_devices:
            helps.append(f"more devices (--max-devices {2 * req.max_devices})")
        if not m.overloaded:
            loose = []
            if req.slo_ttft is not None and m.ttft_s["p99"] is not None:
                loose.append(f"--slo-ttft {max(req.slo_ttft, m.ttft_s['p99']):.3g}")
            if req.slo_tpot is not None and m.tpot_s["p99"] is not None:
                loose.append(f"--slo-tpot {max(req.slo_tpot, m.tpot_s['p99']):.3g}")
            helps.append(f"a looser SLO ({' '.join(loose)} accepts it)")
    elif capacity_misses:
        s, mu, _ = max(capacity_misses, key=lambda x: x[1] / x[0].tp)
        r = math.ceil(req.rate / mu)
        head += (f" Each setting's capacity needs more: the nearest, {s.hardware} tp {s.tp} "
                 f"({s.label()}), serves about {mu:.3g} req/s per replica offline, so about "
                 f"{r} replicas ({r * s.tp} devices) would be needed.")
        helps.append(f"more devices (--max-devices {r * s.tp} or more)")
    if req.hardware is not None and req.hardware != ("all",):
        helps.append("a faster GPU (without --hardware every priced GPU profile is searched)")
    elif plan.left_out.get("no_price"):
        helps.append("a faster GPU: " + ", ".join(plan.left_out["no_price"][:4])
                     + " and others were left out for want of a price (a profile file with "
                       "price_usd_per_hour, passed to --hardware, brings one in)")
    if helps:
        head += " What would help: " + "; ".join(helps) + "."
    return head
