"""``--html report.html``: a plan (the planner's ``--json`` dict) as one self-contained page.

The page carries plotly.js inline, no web fonts and no links to fetch, so it opens without a
network. Train plans get the frontier plot (job time against job cost), a memory and a
step-time breakdown per candidate, the candidates' table and the assumptions; serve plans
get their table and a cost / latency scatter. This module reads only the plan dict, never the
planner, so the planner may import it. Units become human units (hours, GiB, kWh) only here.
"""
from __future__ import annotations

import html
import shlex
from pathlib import Path

from simcost.errors import SimcostError

GiB = 2 ** 30
_J_PER_KWH = 3.6e6
_S_PER_H = 3600.0
_PLOTLY_MISSING = "--html needs plotly: pip install 'simcost[report]'"
_TIME_PARTS = ("compute", "communication", "host", "optimizer")
_TIME_COLOURS = {"compute": "#1f77b4", "communication": "#ff7f0e", "host": "#7f7f7f",
                 "optimizer": "#2ca02c"}
_MEMORY_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b",
                   "#b279a2", "#ff9da6", "#9d755d", "#bab0ac")
_FRONTIER_COLOUR = "#1f5fbf"
_OTHER_COLOUR = "#9aa7b8"
_BEST_COLOUR = "#f2b705"
_RISK_COLOUR = "#d9480f"
_MISS_COLOUR = "#c92a2a"
_PLOT_CONFIG = {"displaylogo": False, "responsive": True,
                "modeBarButtonsToRemove": ["sendDataToCloud"]}


def write_html(plan: dict, path) -> None:
    """Render ``plan`` and write the page to ``path`` (UTF-8)."""
    page = render_html(plan)
    try:
        Path(path).write_text(page, encoding="utf-8")
    except OSError as e:
        raise SimcostError(f"cannot write the --html report to {path}: {e.strerror or e}") from None


def render_html(plan: dict) -> str:
    """The whole page for a train or serve plan, as one string."""
    go, plotly_js = _plotly()
    kind = plan.get("kind") if isinstance(plan, dict) else None
    if kind == "train":
        title, body = _train_body(go, plan)
    elif kind == "serve":
        title, body = _serve_body(go, plan)
    else:
        raise SimcostError(f"--html: a plan's kind must be 'train' or 'serve', not {kind!r}")
    return _page(title, body, plotly_js)


# -- plotly and the page ------------------------------------------------------------------------

def require_plotly() -> None:
    """Refuse --html in one line when plotly (the report extra) is missing, before a search."""
    try:
        import plotly.graph_objects  # noqa: F401
        import plotly.offline  # noqa: F401
    except ImportError:
        raise SimcostError(_PLOTLY_MISSING) from None


def _plotly():
    require_plotly()
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs
    return go, get_plotlyjs()


def _figure_div(fig, div_id: str) -> str:
    import plotly.io as pio
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config=_PLOT_CONFIG, default_height=f"{fig.layout.height or 480}px")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 margin:0;background:#f4f6f9;color:#1d2430;font-size:15px;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:20px 28px 40px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:18px;margin:0 0 10px}
section{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:16px 20px;margin:16px 0}
.question{color:#556;font-size:14px}.answer{font-size:16px}
.answer.none{border-left:5px solid #c92a2a}.answer.best{border-left:5px solid #f2b705}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e3e8ee;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#eef2f7}td.n,th.n{text-align:right}td.n{white-space:nowrap}
table.wide{font-size:12.5px}table.wide td{white-space:nowrap}
table.wide td:nth-child(2),table.wide td:nth-child(4){white-space:normal;min-width:90px}ol.cmds li{margin:2px 0}
tr.best td{background:#fff8e1}tr.frontier td:first-child{box-shadow:inset 3px 0 #1f5fbf}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;
 background:#f1f3f5;padding:1px 4px;border-radius:3px;overflow-wrap:anywhere}
details summary{cursor:pointer;color:#1f5fbf}.tag{font-size:11px;padding:0 5px;border-radius:3px;
 margin-right:4px;white-space:nowrap}.tag.risk{background:#ffe3d3;color:#a8380b}
.tag.front{background:#dbe7fb;color:#1f5fbf}.tag.best{background:#fff0b3;color:#7a5b00}
.muted{color:#667}ul{margin:4px 0 4px 20px;padding:0}
"""


def _page(title: str, body: list[str], plotly_js: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style>"
            # plotly.js inline: the page must open without a network
            f"<script type=\"text/javascript\">{plotly_js}</script></head>\n"
            f"<body><main>\n<h1>{_e(title)}</h1>\n" + "\n".join(body) + "\n</main></body></html>\n")


def _section(heading: str, inner: str, cls: str = "") -> str:
    c = f" class=\"{cls}\"" if cls else ""
    return f"<section{c}><h2>{_e(heading)}</h2>{inner}</section>"


def _table(head: list[str], rows: list[tuple[str, list[str]]], numeric=frozenset()) -> str:
    """An HTML table; ``rows`` are (tr class, already-escaped cells); the columns in
    ``numeric`` are right-aligned, the others left-aligned."""
    def cls(i):
        return " class=\"n\"" if i in numeric else ""
    th = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(head))
    trs = "".join(f"<tr class=\"{c}\">" + "".join(f"<td{cls(i)}>{v}</td>"
                                                   for i, v in enumerate(cells)) + "</tr>"
                  for c, cells in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


# -- people's units -----------------------------------------------------------------------------

def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _usd(x) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"${x:,.0f}"
    return f"${x:,.2f}" if abs(x) >= 1 else f"${x:.3g}"


def _hours(e: dict) -> str:
    text = _num(e["job_s"] / _S_PER_H)
    iv = e.get("job_s_interval")
    if iv:
        text += f" ({_num(iv['p10'] / _S_PER_H)}–{_num(iv['p90'] / _S_PER_H)})"
    return text


def _key(e: dict) -> tuple:
    return tuple(e.get(k) for k in ("hardware", "devices", "nodes", "plan", "peft",
                                    "micro_batch", "grad_accum", "checkpointing"))


def _estimate_command(args) -> str:
    args = list(args or [])
    if args[:1] == ["simcost"]:
        args = args[1:]
    if args[:2] != ["estimate", "train"]:
        args = ["estimate", "train", *args]
    return shlex.join(["simcost", *args])


def _describe(e: dict) -> str:
    """One line naming a plan: devices, hardware, plan, method, batch split, checkpointing."""
    ckpt = "full checkpointing" if e.get("checkpointing") == "full" else "no checkpointing"
    nodes = e.get("nodes")
    where = "" if nodes is None else f" ({nodes} node{'s' if nodes != 1 else ''})"
    split = ""
    if e.get("micro_batch") is not None:
        ga = e.get("grad_accum") or 1
        split = (f", micro-batch {e['micro_batch']}, {ga} accumulation step"
                 f"{'s' if ga != 1 else ''}")
    return f"{e['devices']} × {e['hardware']}{where}, {e['plan']}, {e['peft']}{split}, {ckpt}"


def _hover(e: dict) -> str:
    lines = [f"<b>{_e(e['devices'])} × {_e(e['hardware'])}</b>"
             + (f" ({_e(e['nodes'])} node(s))" if e.get("nodes") is not None else ""),
             f"plan {_e(e['plan'])}", f"method {_e(e['peft'])}, mb {_e(e['micro_batch'])} × "
             f"ga {_e(e['grad_accum'])}, ckpt {_e(e.get('checkpointing'))}",
             f"job {_hours(e)} h, {_usd(e.get('job_usd'))}",
             f"{_usd(e.get('usd_per_million_tokens'))} per M tokens, step {_num(e['step_s'])} s,"
             f" MFU {100 * e['mfu']:.1f} %"]
    if e.get("deadline_risk"):
        lines.append("<b>deadline at risk</b> (p90 past the deadline)")
    return "<br>".join(lines)


# -- train --------------------------------------------------------------------------------------

def _train_body(go, plan: dict) -> tuple[str, list[str]]:
    for k in ("question", "candidates", "frontier", "assumptions"):
        if k not in plan:
            raise SimcostError(f"--html: the train plan has no '{k}'")
    q = plan["question"]
    cands = list(plan["candidates"])
    miss = plan.get("nearest_miss")
    rows = [(f"#{i}", e) for i, e in enumerate(cands, 1)]
    if plan.get("best") is None and miss:
        rows.append(("miss", miss["entry"]))
    body = [_question(q), _answer(plan)]
    body.append(_section("Time against cost", _frontier(go, plan)))
    if rows:
        body.append(_section("Memory per device",
                             "<p class=\"muted\">Each bar stacks one candidate's peak memory on "
                             "one device; the black tick is the device's capacity.</p>"
                             + _figure_div(_memory_figure(go, rows), "memory")))
        body.append(_section("Step time",
                             "<p class=\"muted\">One optimizer step (all micro-batches), split "
                             "into compute, communication, host and optimizer time.</p>"
                             + _figure_div(_time_figure(go, rows), "steptime")))
    body.append(_section(f"Candidates ({len(cands)})", _candidates_table(plan)))
    if plan.get("excluded"):
        body.append(_section("Excluded hardware", "<ul>" + "".join(
            f"<li><b>{_e(x['hardware'])}</b>: {_e(x['why'])}</li>" for x in plan["excluded"])
            + "</ul>"))
    body.append(_section("Assumptions", _assumptions(plan)))
    return f"simcost plan train: {q.get('model', '?')}", body


def _job(q: dict) -> str:
    """'2e+08 tokens in sequences of 4096' or '10000 samples of 2048 tokens', x epochs."""
    if q.get("tokens") is not None:
        text = f"{_num(q['tokens'])} tokens in sequences of {_e(q.get('seq'))}"
    else:
        text = f"{_num(q.get('samples'))} samples" + (
            f" of {_e(q['seq'])} tokens" if q.get("seq") else "")
    epochs = q.get("epochs")
    return text + (f" × {_num(epochs)} epochs" if epochs not in (None, 1, 1.0) else "")


def _question(q: dict) -> str:
    parts = [f"model <b>{_e(q.get('model'))}</b>",
             f"methods {_e(', '.join(q.get('peft') or []))}",
             _job(q),
             f"global batch {_e(q.get('global_batch'))}",
             f"hardware {_e(', '.join(q.get('hardware') or []))}",
             f"up to {_e(q.get('max_devices'))} devices", f"stack {_e(q.get('stack'))}",
             f"ranked by {_e(q.get('objective'))}"]
    if q.get("deadline_s") is not None:
        parts.append(f"deadline {_num(q['deadline_s'] / _S_PER_H)} h")
    if q.get("budget_usd") is not None:
        parts.append(f"budget {_usd(q['budget_usd'])}")
    return "<p class=\"question\">" + " · ".join(parts) + "</p>"


def _answer(plan: dict) -> str:
    best, q = plan.get("best"), plan["question"]
    if best is not None:
        by = "cheapest" if q.get("objective") == "cost" else "fastest"
        text = (f"The {by} plan that fits: <b>{_e(_describe(best))}</b>. The job takes "
                f"<b>{_hours(best)} h</b> (p10–p90) and costs <b>{_usd(best.get('job_usd'))}</b>"
                f" ({_usd(best.get('usd_per_million_tokens'))} per million tokens), using "
                f"{'—' if best.get('energy_j') is None else _num(best['energy_j'] / _J_PER_KWH)}"
                f" kWh; a step takes "
                f"{_num(best['step_s'])} s at {_num(best['tokens_per_s'])} tokens/s "
                f"(MFU {100 * best['mfu']:.1f} %), peak {best['peak_bytes'] / GiB:.1f} of "
                f"{best['capacity_bytes'] / GiB:.0f} GiB per device.")
        if best.get("deadline_risk"):
            text += " <b>The deadline is at risk</b>: the p90 job time passes it."
        cmd = f"<p>Check it: <code>{_e(_estimate_command(best.get('estimate_args')))}</code></p>"
        return _section("Answer", f"<p>{text}</p>{cmd}", "answer best")
    miss = plan.get("nearest_miss")
    if not miss:
        return _section("Answer", "<p>No plan fits, and none came near.</p>", "answer none")
    advice = "".join(f"<li>{_e(a)}</li>" for a in miss.get("advice") or [])
    return _section("Answer", (
        f"<p><b>No plan fits.</b> The nearest miss: {_e(_describe(miss['entry']))}"
        + (f", {_hours(miss['entry'])} h, {_usd(miss['entry'].get('job_usd'))}"
           if "job_s" in miss["entry"] else "") + ". "
        f"Why: {_e(miss['why'])}.</p>" + (f"<p>What would make it fit:</p><ul>{advice}</ul>"
                                         if advice else "")), "answer none")


def _frontier(go, plan: dict) -> str:
    """The scatter of every candidate (job hours against job USD, or kWh when no candidate has
    a price), the Pareto frontier connected, the best starred, deadline risks ringed."""
    best, miss = plan.get("best"), plan.get("nearest_miss")
    entries = {}
    for e in [*plan["candidates"], *plan["frontier"], *([best] if best else [])]:
        entries.setdefault(_key(e), e)
    missed = [miss["entry"]] if best is None and miss and "job_s" in miss["entry"] else []
    priced = any(e.get("job_usd") is not None for e in [*entries.values(), *missed])
    y_of = ((lambda e: e.get("job_usd")) if priced else
            (lambda e: None if e.get("energy_j") is None else e["energy_j"] / _J_PER_KWH))
    ytitle = "job cost (USD)" if priced else "job energy (kWh; no candidate has a price)"
    plotted = [e for e in entries.values() if y_of(e) is not None]
    unplotted = len(entries) - len(plotted)
    if not plotted and not missed:
        return "<p class=\"muted\">No candidate to plot.</p>"
    front = {_key(e) for e in plan["frontier"]}
    fig = go.Figure()
    others = [e for e in plotted if _key(e) not in front]
    frontier = sorted((e for e in plotted if _key(e) in front), key=lambda e: e["job_s"])
    _scatter(go, fig, others, y_of, "other candidates", dict(color=_OTHER_COLOUR, size=9), "markers")
    _scatter(go, fig, frontier, y_of, "Pareto frontier",
             dict(color=_FRONTIER_COLOUR, size=11), "lines+markers")
    if best is not None and y_of(best) is not None:
        _scatter(go, fig, [best], y_of, "best", dict(color=_BEST_COLOUR, size=24, symbol="star",
                                                     line=dict(color="#5c4400", width=1.5)),
                 "markers", error_bars=False)
    _scatter(go, fig, [e for e in missed if y_of(e) is not None], y_of,
             "nearest miss (does not fit)", dict(color=_MISS_COLOUR, size=14, symbol="x"),
             "markers")
    _scatter(go, fig, [e for e in plotted if e.get("deadline_risk")], y_of, "deadline at risk",
             dict(color=_RISK_COLOUR, size=20, symbol="circle-open", line=dict(width=2.5)),
             "markers", error_bars=False)
    _limits(fig, plan["question"], priced)
    xs = [e["job_s"] / _S_PER_H for e in [*plotted, *missed]]
    ys = [y_of(e) for e in [*plotted, *missed] if y_of(e) is not None]
    fig.update_layout(height=520, template="plotly_white", hovermode="closest",
                      margin=dict(l=70, r=20, t=70, b=60),
                      legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0),
                      xaxis=dict(title="job time (hours; bars: p10–p90)", **_scale(xs)),
                      yaxis=dict(title=ytitle, **_scale(ys)))
    note = (f"<p class=\"muted\">{unplotted} candidate(s) have no price and are not plotted.</p>"
            if unplotted else "")
    return _figure_div(fig, "frontier") + note


def _scatter(go, fig, entries, y_of, name, marker, mode, error_bars=True) -> None:
    if not entries:
        return
    xs = [e["job_s"] / _S_PER_H for e in entries]
    err = None
    if error_bars and any(e.get("job_s_interval") for e in entries):
        iv = [e.get("job_s_interval") or {"p10": e["job_s"], "p90": e["job_s"]} for e in entries]
        err = dict(type="data", symmetric=False, thickness=1.2, width=3,
                   array=[i["p90"] / _S_PER_H - x for i, x in zip(iv, xs)],
                   arrayminus=[x - i["p10"] / _S_PER_H for i, x in zip(iv, xs)])
    fig.add_trace(go.Scatter(x=xs, y=[y_of(e) for e in entries], mode=mode, name=name,
                             marker=marker, error_x=err, text=[_hover(e) for e in entries],
                             hovertemplate="%{text}<extra></extra>",
                             line=dict(color=marker.get("color"), width=2)))


def _limits(fig, q: dict, priced: bool) -> None:
    """The deadline (vertical) and the budget (horizontal) as dashed lines across the plot."""
    dash = dict(color="#868e96", width=1.5, dash="dash")
    if q.get("deadline_s") is not None:
        d = q["deadline_s"] / _S_PER_H
        fig.add_shape(type="line", xref="x", yref="paper", x0=d, x1=d, y0=0, y1=1, line=dash,
                      showlegend=True, name=f"deadline {_num(d)} h")
    if priced and q.get("budget_usd") is not None:
        b = q["budget_usd"]
        fig.add_shape(type="line", xref="paper", yref="y", x0=0, x1=1, y0=b, y1=b,
                      line={**dash, "dash": "dot"}, showlegend=True, name=f"budget {_usd(b)}")


def _scale(values) -> dict:
    """A log axis (ticks at 1, 2 and 5 per decade) when the values span more than 30x."""
    v = [x for x in values if x and x > 0]
    return dict(type="log", dtick="D2") if v and max(v) / min(v) > 30 else dict(type="linear")


def _row_label(tag: str, e: dict) -> str:
    return f"{tag} {e['devices']}× {e['hardware']} {e['peft']}"


def _memory_figure(go, rows):
    parts = []
    for _, e in rows:
        parts += [k for k in e.get("memory_breakdown_bytes", {}) if k not in parts]
    labels = [_row_label(t, e) for t, e in rows]
    fig = go.Figure()
    for i, part in enumerate(parts):
        fig.add_trace(go.Bar(
            y=labels, x=[e.get("memory_breakdown_bytes", {}).get(part, 0) / GiB for _, e in rows],
            name=part, orientation="h", marker_color=_MEMORY_COLOURS[i % len(_MEMORY_COLOURS)],
            hovertemplate=f"{_e(part)}: %{{x:.2f}} GiB<extra>%{{y}}</extra>"))
    fig.add_trace(go.Scatter(
        y=labels, x=[e["capacity_bytes"] / GiB for _, e in rows], mode="markers",
        name="capacity", marker=dict(symbol="line-ns", size=22, line=dict(width=3, color="#111")),
        text=[f"peak {e['peak_bytes'] / GiB:.2f} of {e['capacity_bytes'] / GiB:.1f} GiB"
              for _, e in rows], hovertemplate="%{text}<extra>%{y}</extra>"))
    return _bar_layout(fig, len(rows), "GiB per device")


def _time_figure(go, rows):
    labels = [_row_label(t, e) for t, e in rows]
    fig = go.Figure()
    for part in _TIME_PARTS:
        fig.add_trace(go.Bar(
            y=labels, x=[e.get("time_breakdown_s", {}).get(part, 0.0) for _, e in rows],
            name=part, orientation="h", marker_color=_TIME_COLOURS[part],
            hovertemplate=f"{part}: %{{x:.4g}} s<extra>%{{y}}</extra>"))
    return _bar_layout(fig, len(rows), "seconds per step")


def _bar_layout(fig, n: int, xtitle: str):
    fig.update_layout(barmode="stack", template="plotly_white", height=150 + 28 * n,
                      margin=dict(l=10, r=20, t=70, b=50), xaxis=dict(title=xtitle),
                      yaxis=dict(autorange="reversed", automargin=True),
                      legend=dict(orientation="h", yanchor="bottom", y=1.01, x=0,
                                  traceorder="normal"))
    return fig


def _candidates_table(plan: dict) -> str:
    cands = plan["candidates"]
    if not cands:
        return "<p>No candidate fits.</p>"
    front = {_key(e) for e in plan["frontier"]}
    best = _key(plan["best"]) if plan.get("best") else None
    head = ["#", "hardware", "devices (nodes)", "plan", "method", "mb × ga", "ckpt", "step s",
            "tokens/s", "MFU", "peak / cap. GiB", "$ / M tokens", "job h (p10–p90)", "job $",
            "energy kWh"]
    rows, cmds = [], []
    for i, e in enumerate(cands, 1):
        k = _key(e)
        tags = ("<span class=\"tag best\">best</span>" if k == best else "") + (
            "<span class=\"tag front\">frontier</span>" if k in front else "") + (
            "<span class=\"tag risk\">deadline risk</span>" if e.get("deadline_risk") else "")
        rows.append((("best " if k == best else "") + ("frontier" if k in front else ""), [
            str(i), _e(e["hardware"]) + (f"<div>{tags}</div>" if tags else ""), f"{_e(e['devices'])} ({_e(e.get('nodes'))})",
            f"<code>{_e(e['plan'])}</code>", _e(e["peft"]),
            f"{_e(e['micro_batch'])} × {_e(e['grad_accum'])}", _e(e.get("checkpointing")),
            _num(e["step_s"]), _num(e["tokens_per_s"]), f"{100 * e['mfu']:.1f} %",
            f"{e['peak_bytes'] / GiB:.1f} / {e['capacity_bytes'] / GiB:.0f}",
            _usd(e.get("usd_per_million_tokens")), _hours(e), _usd(e.get("job_usd")),
            "—" if e.get("energy_j") is None else _num(e["energy_j"] / _J_PER_KWH)]))
        cmds.append(f"<li value=\"{i}\"><code>{_e(_estimate_command(e.get('estimate_args')))}"
                    "</code></li>")
    table = _table(head, rows, numeric=frozenset({0, 2, *range(5, len(head))}))
    return ("<div style=\"overflow-x:auto\">" + table.replace("<table>", "<table class=\"wide\">")
            + "</div><p class=\"muted\">Job hours in brackets: the p10–p90 interval. Each row's "
              "numbers are what its <code>simcost estimate train</code> command prints, times "
              "the job's steps:</p><details open><summary>the command of each row</summary>"
              f"<ol class=\"cmds\">{''.join(cmds)}</ol></details>")


def _assumptions(plan: dict) -> str:
    a = plan["assumptions"]
    stack = a.get("stack") or {}
    extra = ", ".join(f"{_e(k)} {_e(v)}" for k, v in stack.items()
                      if k not in ("name", "label") and isinstance(v, (str, int, float, bool)))
    out = [f"<p><b>Stack</b>: {_e(stack.get('label', stack.get('name', '?')))} "
           f"(<code>{_e(stack.get('name', '?'))}</code>){'; ' + extra if extra else ''}.</p>"]
    profiles = a.get("profiles") or {}
    if profiles:
        rows = [("", [f"<code>{_e(name)}</code> {_e(p.get('display_name', ''))}",
                      "—" if p.get("price_usd_per_hour") is None
                      else f"${p['price_usd_per_hour']:.2f}", _e(p.get("price_basis") or "—"),
                      _e(p.get("price_source") or "—"), _e(p.get("price_date") or "—"),
                      _num(p.get("tdp_w")), _e(p.get("tdp_source") or "—")])
                for name, p in profiles.items()]
        out.append(_table(["hardware profile", "$ / device-hour", "price basis", "price source",
                           "price date", "TDP W", "TDP source"], rows, numeric=frozenset({1, 5})))
    for label, key in (("Error bars", "intervals"), ("Energy", "energy")):
        if a.get(key):
            out.append(f"<p><b>{label}</b>: {_e(a[key])}</p>")
    if a.get("notes"):
        out.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in a["notes"]) + "</ul>")
    out.append(f"<p class=\"muted\">{_e(plan.get('searched', '?'))} configurations searched in "
               f"{_num(plan.get('elapsed_s'))} s.</p>")
    return "".join(out)


# -- serve (its planner's schema is still open: a generic table and a cost / latency scatter) ---

def _serve_body(go, plan: dict) -> tuple[str, list[str]]:
    q = plan.get("question") or {}
    cands = [e for e in plan.get("candidates") or [] if isinstance(e, dict)]
    best = plan.get("best")
    body = ["<p class=\"question\">" + " · ".join(
        f"{_e(k)} <b>{_e(v)}</b>" for k, v in q.items() if _scalar(v)) + "</p>"]
    if best and isinstance(plan.get("answer"), str):
        args = best.get("simulate_args") or []
        check = (f"<p>Check it: <code>simcost simulate serve {_e(' '.join(map(str, args)))}"
                 f"</code></p>" if args else "")
        body.append(_section("Answer", f"<p>{_e(plan['answer'])}</p>{check}", "answer best"))
    elif best:
        body.append(_section("Answer", "<p>" + ", ".join(
            f"{_e(k)} <b>{_e(_cell(v))}</b>" for k, v in best.items() if _scalar(v)) + "</p>",
            "answer best"))
    elif plan.get("nearest_miss"):
        m = plan["nearest_miss"]
        advice = "".join(f"<li>{_e(a)}</li>" for a in m.get("advice") or [])
        body.append(_section("Answer", f"<p><b>No fleet meets the SLO.</b> {_e(m.get('why', ''))}"
                             f"</p>{'<ul>' + advice + '</ul>' if advice else ''}", "answer none"))
    cost, latency = _first_key(cands, ("usd",)), _first_key(cands, ("latency", "ttft", "tpot"))
    if cost and latency:
        fig = go.Figure(go.Scatter(
            x=[e.get(latency) for e in cands], y=[e.get(cost) for e in cands], mode="markers",
            marker=dict(color=_FRONTIER_COLOUR, size=11), name="candidates",
            text=["<br>".join(f"{_e(k)} {_e(_cell(v))}" for k, v in e.items() if _scalar(v))
                  for e in cands], hovertemplate="%{text}<extra></extra>"))
        if best and best.get(latency) is not None and best.get(cost) is not None:
            fig.add_trace(go.Scatter(x=[best[latency]], y=[best[cost]], mode="markers", name="best",
                                     marker=dict(color=_BEST_COLOUR, size=24, symbol="star")))
        fig.update_layout(height=480, template="plotly_white", xaxis_title=latency,
                          yaxis_title=cost, margin=dict(l=70, r=20, t=30, b=60))
        body.append(_section("Cost against latency", _figure_div(fig, "frontier")))
    cols = []
    for e in cands:
        cols += [k for k, v in e.items() if _scalar(v) and k not in cols]
    rows = [("best" if best is not None and e == best else "",
             [str(i)] + [_e(_cell(e.get(k))) for k in cols]) for i, e in enumerate(cands, 1)]
    body.append(_section(f"Candidates ({len(cands)})", "<div style=\"overflow-x:auto\">"
                         + _table(["#", *cols], rows, numeric=frozenset({0})) + "</div>"))
    return f"simcost plan serve: {q.get('model', '?')}", body


def _scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _cell(v) -> str:
    return _num(v) if isinstance(v, float) else "—" if v is None else str(v)


def _first_key(entries, words) -> str | None:
    for e in entries:
        for k, v in e.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and any(w in k for w in words):
                return k
    return None
