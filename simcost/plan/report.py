"""The plan as people read it: the answer, the best candidates, the frontier, what missed."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from simcost.report import _console, hours

GiB = 2 ** 30


def _usd(x) -> str:
    return "-" if x is None else f"${x:,.2f}" if x < 1000 else f"${x:,.0f}"


def answer(e: dict, q: dict) -> str:
    """One paragraph: what to run and what it will cost."""
    iv = e["job_s_interval"]
    rng = f" (p10-p90 {hours(iv['p10'])} - {hours(iv['p90'])})" if iv else ""
    cost = f", {_usd(e['job_usd'])}" if e["job_usd"] is not None else ""
    energy = f", {e['energy_j'] / 3.6e6:,.1f} kWh" if e["energy_j"] is not None else ""
    risk = " - at risk: the p90 job time misses the deadline" if e["deadline_risk"] else ""
    return (f"{e['devices']} x {e['hardware']}, {e['peft']}, {e['plan']}, checkpointing "
            f"{e['checkpointing']}: {e['steps']:,} steps of {e['step_s']:.2f} s = "
            f"{hours(e['job_s'])}{rng}{cost}{energy}; peak {e['peak_bytes'] / GiB:.1f} of "
            f"{e['capacity_bytes'] / GiB:.0f} GiB per device{risk}")


def print_plan(plan: dict, top: int = 5) -> None:
    c = _console()
    q = plan["question"]
    job = (f"{q['tokens']:,} tokens" if q["tokens"] else f"{q['samples']:,} samples") \
        + (f" x {q['epochs']:g} epochs" if q["epochs"] != 1 else "") \
        + (f" at seq {q['seq']:,}" if q["seq"] else "")
    s = plan["searched"]
    c.print(f"[bold]{q['model']}[/bold], {', '.join(q['peft'])}: {job}, global batch "
            f"{q['global_batch']}; {len(q['hardware'])} hardware profile(s), up to "
            f"{q['max_devices']} devices; {s['groups']} groups, {s['plans']:,} plans searched "
            f"({s['priced']:,} priced) in {plan['elapsed_s']:.1f} s on {s['ran_on']}, "
            f"{s['fitting']} fit")
    best = plan["best"]
    if best is not None:
        c.print(f"[bold green]best by {q['objective']}[/bold green]: {escape(answer(best, q))}")
        c.print("  reproduce: simcost estimate train " + escape(" ".join(best["estimate_args"])),
                style="dim")
    miss = plan["nearest_miss"]
    if miss is not None:
        c.print(f"[bold red]no candidate meets the request[/bold red]: nearest miss "
                f"{escape(miss['why'])}")
        c.print("  would help: " + escape("; ".join(miss["advice"])))
    if plan["candidates"]:
        c.print(_table(plan["candidates"][:top], {id(e) for e in plan["frontier"]},
                       f"best {min(top, len(plan['candidates']))} by {q['objective']} "
                       f"(* = on the time/cost frontier)"))
    late = plan.get("over_constraints") or []
    if late and best is not None:
        c.print(f"{len(late)} more fitting plan(s) miss the deadline or budget, the best of "
                f"them: {escape(answer(late[0], q))} (--json 'over_constraints')", style="dim")
    if len(plan["frontier"]) > 1:
        c.print("time/cost frontier: " + "; ".join(
            f"{e['devices']} x {e['hardware']} {e['peft']} {hours(e['job_s'])} "
            f"{_usd(e['job_usd'])}" for e in plan["frontier"]))
    if plan["excluded"]:
        c.print(f"left out, no price (give --price NAME=USD, or rank with --objective time): "
                f"{', '.join(x['hardware'] for x in plan['excluded'])}", style="dim")
    if plan["skipped"]:
        c.print(f"{len(plan['skipped'])} hardware x device-count cells skipped before "
                f"pricing (weights alone too large, no interconnect, refused): see --json "
                f"'skipped'", style="dim")
    c.print("plan notation: dpD tpT[+sp] ppP cpC zeroZ mbMxA = D data-parallel replicas, "
            "tensor parallelism T (with sequence parallelism), P pipeline stages, context "
            "parallelism C, ZeRO stage Z, micro-batches of M samples with A accumulated per "
            "step", style="dim")


def _short(x: float, like: float) -> str:
    """``x`` as a bare number in the unit :func:`hours` picks for ``like`` (s, min, h, days)."""
    unit = 1 if like < 60 else 60 if like < 3600 else 3600 if like < 2 * 86400 else 86400
    return f"{x / unit:.1f}"


def _table(entries: list[dict], frontier: set, title: str) -> Table:
    t = Table(title=title, header_style="bold")
    for col in ("#", "hardware", "dev", "plan", "method", "ckpt", "step", "tokens/s", "MFU",
                "peak/cap GiB", "$/M tok", "job time [p10-p90]", "job $", "kWh"):
        t.add_column(col, justify="left" if col in ("hardware", "plan", "method", "ckpt")
                     else "right", no_wrap=col in ("plan", "job time [p10-p90]"))
    for i, e in enumerate(entries, 1):
        iv = e["job_s_interval"]
        rng = f" [{_short(iv['p10'], e['job_s'])}-{_short(iv['p90'], e['job_s'])}]" if iv else ""
        t.add_row(f"{i}{'*' if id(e) in frontier else ''}", e["hardware"], str(e["devices"]),
                  e["plan"], e["peft"], e["checkpointing"], f"{e['step_s']:.2f} s",
                  f"{e['tokens_per_s']:,.0f}" if e["tokens_per_s"] else "-",
                  f"{100 * e['mfu']:.0f} %" if e["mfu"] is not None else "-",
                  f"{e['peak_bytes'] / GiB:.1f}/{e['capacity_bytes'] / GiB:.0f}",
                  f"{e['usd_per_million_tokens']:.2f}" if e["usd_per_million_tokens"] is not None
                  else "-",
                  escape(hours(e["job_s"]) + rng) + (" !" if e["deadline_risk"] else ""),
                  _usd(e["job_usd"]),
                  f"{e['energy_j'] / 3.6e6:,.1f}" if e["energy_j"] is not None else "-")
    return t
