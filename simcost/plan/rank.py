"""Ranking the plan's candidates: constraints, objective, the Pareto frontier, nearest miss."""
from __future__ import annotations

import math

GiB = 2 ** 30


def _key(objective: str):
    def cost_first(e):
        usd = e["job_usd"] if e["job_usd"] is not None else math.inf
        return (usd, e["job_s"], e["devices"], e["hardware"], e["plan"], e["peft"],
                e["checkpointing"])

    def time_first(e):
        usd = e["job_usd"] if e["job_usd"] is not None else math.inf
        return (e["job_s"], usd, e["devices"], e["hardware"], e["plan"], e["peft"],
                e["checkpointing"])
    return cost_first if objective == "cost" else time_first


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
    key = _key(objective)
    return sorted(ok, key=key), sorted(late, key=key)


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
    advice.append(f"--max-devices {2 * max_devices} (shard over more devices)")
    why = (f"needs {m['peak_bytes'] / GiB:.1f} GiB per device on {m['devices']} x "
           f"{m['hardware']} ({m['plan']}, {m['peft']}, checkpointing {m['checkpointing']}); "
           f"the largest option has {largest['capacity_bytes'] / GiB:.0f} GiB")
    return {"entry": m, "why": why, "advice": advice}
