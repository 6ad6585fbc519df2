"""The report: MAPE per source and kind, the JSON and Markdown files, the console tables."""
from __future__ import annotations

from dataclasses import asdict

from simcost.errors import SimcostError
from simcost.validate.published.predict import Result
from simcost.validate.published.rows import GIB
from simcost.validate.published.sources import SOURCES

KINDS = ("step_time", "tokens_per_s", "memory", "op_latency")
TIME_KINDS = ("step_time", "tokens_per_s")


def mape(results: list[Result]) -> float | None:
    errs = [abs(r.error) for r in results if r.error is not None]
    return sum(errs) / len(errs) if errs else None


def summarize(results: list[Result]) -> dict:
    """Per source: counts, MAPE of time (step time and tokens/s), memory and op latency,
    over all evaluated rows and over rows without caveats."""
    out = {}
    for src in sorted({r.source for r in results}):
        rs = [r for r in results if r.source == src]
        ev = [r for r in rs if r.status == "evaluated"]
        entry = {"rows": len(rs), "evaluated": len(ev), "unsupported": len(rs) - len(ev),
                 "with_caveats": sum(1 for r in ev if r.caveats)}
        for name, kinds in (("time", TIME_KINDS), ("memory", ("memory",)),
                            ("op_latency", ("op_latency",))):
            sel = [r for r in ev if r.kind in kinds]
            if sel:
                clean = [r for r in sel if not r.caveats]
                entry[name] = {"n": len(sel), "mape": mape(sel),
                               "n_exact": len(clean), "mape_exact": mape(clean),
                               "bias": sum(r.error for r in sel) / len(sel)}
        out[src] = entry
    return out


def fitted_rows(stack: str) -> set[str]:
    """The dev rows any fitted constant of ``stack``'s profile was fitted on."""
    from simcost.stack.registry import profile_of
    try:
        p = profile_of(stack)
    except SimcostError:    # a row priced with a profile file: nothing bundled was fitted
        return set()
    if p.kind == "alias":
        return set()
    out: set[str] = set()
    for q in (p.host.dispatch_s, p.host.step_overhead_s, p.allocator.fragmentation,
              p.kernels.gemm_sustained):
        if q is not None and q.fitted is not None:
            out.update(q.fitted.rows)
    return out


def summarize_by_stack(results: list[Result]) -> dict:
    """Per stack: time and memory MAPE over all its rows, over the rows its fits used
    (in-sample) and over the rows left out (what counts)."""
    out = {}
    ev = [r for r in results if r.status == "evaluated" and r.stack]
    for stack in sorted({r.stack for r in ev}):
        fit = fitted_rows(stack)
        entry = {}
        for name, kinds in (("time", TIME_KINDS), ("memory", ("memory",))):
            sel = [r for r in ev if r.stack == stack and r.kind in kinds]
            if not sel:
                continue
            ins = [r for r in sel if r.id in fit]
            outs = [r for r in sel if r.id not in fit]
            entry[name] = {"n": len(sel), "mape": mape(sel), "n_in_fit": len(ins),
                           "mape_in_fit": mape(ins), "n_out_of_fit": len(outs),
                           "mape_out_of_fit": mape(outs)}
        out[stack] = entry
    return out


def _fmt(kind: str, v: float | None) -> str:
    if v is None:
        return "-"
    if kind == "memory":
        return f"{v / GIB:.2f} GiB"
    if kind == "op_latency":
        return f"{v * 1e3:.3f} ms"
    if kind == "tokens_per_s":
        return f"{v:.0f} tok/s"
    return f"{v:.3f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def _ape(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def to_json(results: list[Result]) -> dict:
    rows = []
    for r in results:
        d = asdict(r)
        d["error"] = r.error
        rows.append(d)
    return {"summary": summarize(results), "by_stack": summarize_by_stack(results),
            "rows": rows}


def to_markdown(results: list[Result], worst: int = 15) -> str:
    summ = summarize(results)
    ev = [r for r in results if r.status == "evaluated"]
    lines = ["# simcost vs published measurements", "",
             f"Rows: {len(results)}; evaluated: {len(ev)}; unsupported: "
             f"{len(results) - len(ev)}. Error = predicted / measured - 1. MAPE over evaluated "
             "rows; 'exact' = rows whose framework features simcost models in full "
             "(no caveats).", "",
             "| source | rows | evaluated | time n | time MAPE | time MAPE exact (n) | "
             "memory n | memory MAPE | memory MAPE exact (n) | op n | op MAPE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for src, e in summ.items():
        t, m, o = e.get("time"), e.get("memory"), e.get("op_latency")
        lines.append(
            f"| {src} | {e['rows']} | {e['evaluated']} | {t['n'] if t else 0} | "
            f"{_ape(t['mape']) if t else '-'} | "
            f"{(_ape(t['mape_exact']) + ' (' + str(t['n_exact']) + ')') if t else '-'} | "
            f"{m['n'] if m else 0} | {_ape(m['mape']) if m else '-'} | "
            f"{(_ape(m['mape_exact']) + ' (' + str(m['n_exact']) + ')') if m else '-'} | "
            f"{o['n'] if o else 0} | {_ape(o['mape']) if o else '-'} |")
    lines += ["", "## Per stack (in-fit rows were used by the stack's fitted constants: "
              "validation/fit/fit_stacks.py; out-of-fit rows count)", "",
              "| stack | time n | time MAPE out-of-fit (n) | time MAPE in-fit (n) | memory n | "
              "memory MAPE out-of-fit (n) | memory MAPE in-fit (n) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for stack, e in summarize_by_stack(results).items():
        cells = []
        for name in ("time", "memory"):
            x = e.get(name)
            cells += ["0", "-", "-"] if not x else [
                str(x["n"]), f"{_ape(x['mape_out_of_fit'])} ({x['n_out_of_fit']})",
                f"{_ape(x['mape_in_fit'])} ({x['n_in_fit']})"]
        lines.append(f"| {stack} | " + " | ".join(cells) + " |")
    lines += ["", f"## Worst {worst} rows", "",
              "| id | metric | measured | predicted | error | caveats |", "|---|---|---:|---:|---:|---|"]
    for r in sorted(ev, key=lambda r: -abs(r.error))[:worst]:
        lines.append(f"| {r.id} | {r.metric} | {_fmt(r.kind, r.measured)} | "
                     f"{_fmt(r.kind, r.predicted)} | {_pct(r.error)} | {'; '.join(r.caveats)} |")
    for src in summ:
        rs = [r for r in ev if r.source == src]
        if not rs:
            continue
        lines += ["", f"## {src}: {SOURCES.get(src, '')}", "",
                  "| id | metric | measured | predicted | error | mapping |",
                  "|---|---|---:|---:|---:|---|"]
        for r in rs:
            mp = r.mapping or {}
            desc = ", ".join(f"{k}={v}" for k, v in mp.items() if k in
                             ("model", "hardware", "stack", "batch", "seq", "grad_accum",
                              "optimizer", "grad_checkpointing", "m", "n", "k"))
            lines.append(f"| {r.id} | {r.metric} | {_fmt(r.kind, r.measured)} | "
                         f"{_fmt(r.kind, r.predicted)} | {_pct(r.error)} | {desc} |")
    lines += ["", "## Unsupported rows", "", "| id | metric | reason |", "|---|---|---|"]
    for r in results:
        if r.status != "evaluated":
            lines.append(f"| {r.id} | {r.metric} | {r.reason} |")
    return "\n".join(lines) + "\n"


def print_report(results: list[Result], worst: int = 15, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    con = console or Console(width=None if sys.stdout.isatty() else 200)
    summ = summarize(results)
    ev = [r for r in results if r.status == "evaluated"]
    for src in summ:
        rs = [r for r in ev if r.source == src]
        if not rs:
            continue
        t = Table(title=f"{src}: {SOURCES.get(src, '')}", title_justify="left")
        for c in ("row", "metric", "measured", "predicted", "error", "caveats"):
            t.add_column(c, justify="right" if c in ("measured", "predicted", "error") else "left")
        for r in rs:
            t.add_row(r.id, r.metric, _fmt(r.kind, r.measured), _fmt(r.kind, r.predicted),
                      _pct(r.error), "; ".join(r.caveats))
        con.print(t)
    t = Table(title="MAPE per source (time = step time and tokens/s)", title_justify="left")
    for c in ("source", "rows", "evaluated", "unsupported", "time MAPE (n)", "exact (n)",
              "memory MAPE (n)", "exact (n)", "op MAPE (n)"):
        t.add_column(c, justify="left" if c == "source" else "right")

    def cell(e, key, exact=False):
        x = e.get(key)
        if not x:
            return "-"
        return (f"{_ape(x['mape_exact'])} ({x['n_exact']})" if exact
                else f"{_ape(x['mape'])} ({x['n']})")
    for src, e in summ.items():
        t.add_row(src, str(e["rows"]), str(e["evaluated"]), str(e["unsupported"]),
                  cell(e, "time"), cell(e, "time", True), cell(e, "memory"),
                  cell(e, "memory", True), cell(e, "op_latency"))
    con.print(t)
    t = Table(title="MAPE per stack (out-of-fit rows count; in-fit: used by a fitted constant)",
              title_justify="left")
    for c in ("stack", "time out-of-fit (n)", "time in-fit (n)", "memory out-of-fit (n)",
              "memory in-fit (n)"):
        t.add_column(c, justify="left" if c == "stack" else "right")
    for stack, e in summarize_by_stack(results).items():
        cells = []
        for name in ("time", "memory"):
            x = e.get(name)
            cells += ["-", "-"] if not x else [f"{_ape(x['mape_out_of_fit'])} ({x['n_out_of_fit']})",
                                               f"{_ape(x['mape_in_fit'])} ({x['n_in_fit']})"]
        t.add_row(stack, *cells)
    con.print(t)
    t = Table(title=f"Worst {worst} rows", title_justify="left")
    for c in ("row", "metric", "measured", "predicted", "error", "caveats"):
        t.add_column(c)
    for r in sorted(ev, key=lambda r: -abs(r.error))[:worst]:
        t.add_row(r.id, r.metric, _fmt(r.kind, r.measured), _fmt(r.kind, r.predicted),
                  _pct(r.error), "; ".join(r.caveats))
    con.print(t)
    t = Table(title="Unsupported rows", title_justify="left")
    t.add_column("row")
    t.add_column("metric")
    t.add_column("reason")
    for r in results:
        if r.status != "evaluated":
            t.add_row(r.id, r.metric, r.reason)
    con.print(t)

