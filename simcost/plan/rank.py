"""Ranking the plan's candidates: constraints, objective, the Pareto frontier, nearest miss."""
from __future__ import annotations

import math

GiB = 2 ** 30


# Ranked by cost, candidates within this fraction of the cheapest count as equally cheap and
# the fastest of them comes first (and the same with time and cost swapped): a plan 0.1 % cheaper
# but twice as slow is not the better answer, the estimates are not that exact.
TIE_FRACTION = 0.01


def _usd(e) -> float:
    return e["job_usd"] if e["job_usd"] is not None else math.inf


def _order(entries: list[dict], objective: str) -> list[dict]:
    """Best first: by the objective, then the other measure, then a stable name order; the
    candidates within TIE_FRACTION of the best on the objective are ordered by the other."""
    first, second = (_usd, lambda e: e["job_s"]) if objective == "cost" else \
        (lambda e: e["job_s"], _usd)

    def key(e):
        return (first(e), second(e), e["devices"], e["hardware"], e["plan"], e["peft"],
                e["checkpointing"])
    out = sorted(entries, key=key)
    if not out or not math.isfinite(first(out[0])):
        return out
    edge = first(out[0]) * (1 + TIE_FRACTION)
    near = [e for e in out if first(e) <= edge]
    near.sort(key=lambda e: (second(e), first(e), e["devices"], e["hardware"], e["plan"],
                             e["peft"], e["checkpointing"]))
    return near + out[len(near):]


def rank(entries: list[dict], *, objective: str, deadline_s: float | None,
         budget_usd: float | None) -> tuple[list[dict], list[dict]]:
    """(the candidates meeting the deadline and budget, best first; those that do not). A
    candidate that meets the deadline only in part of its p10-p90 interval is flagged
    ``deadline_risk``: met by the estimate but not by its p90 (in the first list), or missed by
    the estimate but met by its p10 (in the second).
    Ranked by cost, candidates without a price cannot meet a budget and rank last."""
    ok, late = [], []
    for e in entries:
        iv = e["job_s_interval"]
        # the deadline is met in only part of the interval: at the estimate but not at p90,
        # or (a late candidate) at p10 only
        e["deadline_risk"] = bool(deadline_s is not None and iv and (
            iv["p90"] > deadline_s >= e["job_s"] or e["job_s"] > deadline_s >= iv["p10"]))
        over_time = deadline_s is not None and e["job_s"] > deadline_s
        over_budget = budget_usd is not None and (e["job_usd"] is None
                                                  or e["job_usd"] > budget_usd)
        (late if over_time or over_budget else ok).append(e)
    return _order(ok, objective), _order(late, objective)


def frontier(entries: list[dict]) -> list[dict]:
    """The Pareto set of job time against job cost (priced candidates), fastest first."""
    priced = sorted((e for e in entries if e["job_usd"] is not None),
                    key=lambda e: (e["job_s"], e["job_usd"]))
    out, best_usd = [], math.inf
    for e in priced:
        if e["job_usd"] < best_usd:
            out.append(e)
            best_usd = e["job_usd"]
    return out


def _linked(hardware: str) -> bool:
    from simcost.hardware import load_profile
    return load_profile(hardware).interconnect is not None


def nearest_miss(misses: list[dict], *, methods: tuple, checkpointing: tuple,
                 max_devices: int) -> dict | None:
    """When nothing fits: the configuration that came closest (least peak over capacity),
    and what would make it fit."""
    if not misses:
        return None
    m = min(misses, key=lambda d: (d["peak_bytes"] / d["capacity_bytes"], d["hardware"]))
    largest = max(misses, key=lambda d: d["capacity_bytes"])
    advice = []
    if "qlora" not in methods and any(x in methods for x in ("lora", "dora")):
        advice.append("--peft qlora (the frozen base in 4 bits)")
    if "full" not in checkpointing:
        advice.append("--checkpointing none,full (recompute activations)")
    if any(_linked(d["hardware"]) for d in misses):
        advice.append(f"--max-devices {2 * max_devices} (shard over more devices)")
    else:
        advice.append("a device with more memory, or one with a device-to-device link to "
                      "shard over several (--hardware)")
    why = (f"needs {m['peak_bytes'] / GiB:.1f} GiB per device on {m['devices']} x "
           f"{m['hardware']} ({m['plan']}, {m['peft']}, checkpointing {m['checkpointing']}); "
           f"the largest option has {largest['capacity_bytes'] / GiB:.0f} GiB")
    return {"entry": m, "why": why, "advice": advice}


def constraint_miss(closest: dict, *, deadline_s: float | None, budget_usd: float | None,
                    objective: str, max_devices: int) -> dict:
    """When plans fit but none meets the deadline and budget: the best of them, why it misses,
    and what would help (only the levers that apply to the miss)."""
    from simcost.report import hours
    why, advice = [], []
    if deadline_s is not None and closest["job_s"] > deadline_s:
        why.append(f"takes {hours(closest['job_s'])} against the {hours(deadline_s)} deadline")
        if _linked(closest["hardware"]):
            advice.append(f"--max-devices {2 * max_devices} (more devices finish sooner)")
        advice.append(f"a deadline of at least {hours(closest['job_s'])}")
    if budget_usd is not None:
        if closest["job_usd"] is None:
            why.append(f"{closest['hardware']} has no price, so no budget can be met")
            advice.append(f"--price {closest['hardware']}=USD")
        elif closest["job_usd"] > budget_usd:
            why.append(f"costs {_money(closest['job_usd'])} against the "
                       f"{_money(budget_usd)} budget")
            advice.append(f"a budget of at least {_money(closest['job_usd'])}")
            if objective == "time":
                advice.append("--objective cost (the cheapest plan first)")
    return {"entry": closest, "why": "; ".join(why) or "misses the constraints",
            "advice": advice}


def _money(x: float) -> str:
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"
