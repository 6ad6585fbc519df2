"""Human-readable tables (rich). Units become human units only here."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

GiB = 2 ** 30


def _console() -> Console:
    c = Console(highlight=False, soft_wrap=False)
    if not c.is_terminal:          # piped output: don't squeeze tables to 80 columns
        c = Console(highlight=False, soft_wrap=False, width=160)
    return c


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def print_train(r) -> None:
    c = _console()
    p = r.peft
    sizes = r.sizes or {"batch": r.batch, "seq": r.seq}
    shape = " x ".join(f"{_SIZE.get(k, k)} {v}" for k, v in sizes.items())
    title = (f"{r.model} on {r.hardware}: {shape}, {p['method']}"
             + (f" r={p['r']}" if "r" in p else "") + f", {r.dtype}"
             + (f" + {r.mixed_precision} mixed" if r.mixed_precision != "none" else "")
             + f", attn {r.attn}, {r.optimizer}" + (
                 ", selective ckpt" if r.checkpointing == "selective"
                 else ", grad ckpt" if r.grad_checkpointing else ""))
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("parameters (base model)", f"{r.params['total']:,}")
    t.add_row("parameters trainable", f"{r.params['trainable']:,} "
              f"({100 * r.params['trainable'] / max(r.params['total'], 1):.3f} %)")
    f = r.flops
    t.add_row("FLOPs forward / backward", f"{_si(f['forward'], 'FLOP')} / {_si(f['backward'], 'FLOP')}")
    t.add_row("  backward: activation / weight grads",
              f"{_si(f['backward_activation'], 'FLOP')} / {_si(f['backward_weight'], 'FLOP')}")
    _memory_rows(t, r.memory_bytes)
    m = r.memory_bytes
    verdict = "[green]fits[/green]" if r.fits else "[red]does NOT fit[/red]"
    iv = r.intervals or {}
    t.add_row("[bold]peak memory[/bold] (reserved + context)",
              f"[bold]{m['peak'] / GiB:.2f} GiB[/bold]{_range(iv.get('peak_bytes'), _gib)} of "
              f"{m['capacity'] / GiB:.0f} GiB: {verdict}")
    if "peak_allocated" in m:
        t.add_row("  peak allocated / reserved (torch)",
                  f"{m['peak_allocated'] / GiB:.2f} / {m['peak_reserved'] / GiB:.2f} GiB")
    ts = r.time_s
    t.add_row("time forward / backward / optimizer",
              f"{_time(ts['forward'])} / {_time(ts['backward'])} / {_time(ts['optimizer'])}")
    t.add_row("[bold]step time[/bold]",
              f"[bold]{_time(ts['step'])}[/bold]{_range(iv.get('step_s'), _time)}")
    if r.tokens_per_s is not None:
        t.add_row("tokens/s", f"{r.tokens_per_s:,.0f}")
    else:
        t.add_row("samples/s", f"{r.samples_per_s:,.2f}")
    if r.cost_usd:
        c_ = r.cost_usd
        per_m = c_["per_million_tokens"]
        src = " from --price" if c_.get("price_source") == "--price" else ""
        t.add_row("cost", f"${c_['per_hour']:.2f}/h ({c_['devices']} x "
                  f"${c_['price_per_device_hour']:.2f}{src}), "
                  + (f"${per_m:.3f} per 1M tokens" if per_m else ""))
    if r.mfu is not None:
        t.add_row("MFU (forward + backward FLOPs / dense peak)", f"{100 * r.mfu:.1f} %")
    if r.energy:
        e = r.energy
        t.add_row("energy per step", f"{e['per_step_j']:,.0f} J ({e['power_w_per_device']:.0f} W "
                  f"per device of {e['tdp_w']:.0f} W TDP)")
    if r.job:
        _job_rows(t, r.job)
    c.print(t)
    if r.frontend:
        c.print(f"front end: {r.frontend}" + (" (the step as torch recorded it)"
                                             if r.frontend == "traced" else ""), style="dim")
    st = r.stack
    if st:
        via = f" (via {st['via']})" if st.get("via") else ""
        vers = ", ".join(f"{k} {v}" for k, v in st["versions"].items())
        c.print(f"stack: {st['name']}{via}: {st['display_name']}; {vers}", style="dim")
    from rich.markup import escape
    label = {"step_s": "step time", "peak_bytes": "peak memory"}
    for k, v in iv.items():
        if "note" in v:
            c.print(escape(f"no error bars for {label.get(k, k)}: {v['note']}"), style="dim")
    if any("p10" in v for v in iv.values()):
        c.print("p10-p90 in brackets: the range of the measured value, from the stack's "
                "out-of-fit validation errors on this hardware class", style="dim")


_SIZE = {"target_seq": "target", "image": "image"}


def hours(s: float) -> str:
    """A duration for people: minutes, hours or days."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.2f} h"
    return f"{s / 86400:.1f} days"


def _job_rows(t, j: dict) -> None:
    from rich.markup import escape
    what = f"{j['samples']:,} samples x {j['epochs']:g} epochs"
    if j["tokens"]:
        what += f" = {j['tokens']:,.0f} tokens"
    t.add_row("[bold]job[/bold]", f"{what}, {j['steps']:,} steps of {j['global_batch']}")
    iv = j["job_s_interval"]
    rng = escape(f" [p10 {hours(iv['p10'])} - p90 {hours(iv['p90'])}]") if iv else ""
    t.add_row("[bold]job time[/bold]", f"[bold]{hours(j['job_s'])}[/bold]{rng}")
    if j["job_usd"] is not None:
        t.add_row("[bold]job cost[/bold]", f"[bold]${j['job_usd']:,.2f}[/bold]")
    if j["energy_j"] is not None:
        t.add_row("job energy", f"{j['energy_j'] / 3.6e6:,.1f} kWh")


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _range(iv: dict | None, fmt) -> str:
    """' [p10 a - p90 b]' for an interval, '' without one."""
    if not iv or "p10" not in iv:
        return ""
    from rich.markup import escape
    return escape(f" [p10 {fmt(iv['p10'])} - p90 {fmt(iv['p90'])}]")


_ROW_NAMES = {"weights": "weights", "master_weights": "master weights (fp32)",
              "optimizer": "optimizer states", "temporaries": "op workspace (largest op)",
              "runtime_overhead": "runtime overhead (CUDA context, workspaces)",
              "allocator_cache": "allocator cache (reserved - allocated)",
              "deepspeed_buffers_resident": "DeepSpeed resident buffers",
              "activations": "activations saved for backward",
              "loss_transient": "transient: loss and logits",
              "gradients": "gradients",
              "gradient_transient": "transient: input grads, optimizer step"}
_PHASE = {"loss": "the loss (end of forward)", "gradients": "the end of backward / optimizer step"}


def _memory_rows(t, m: dict) -> None:
    """The rows live at the peak instant, which add up to the peak; what is not live there
    (activations are freed before the step, gradients appear only in backward) is shown after,
    marked as not counted."""
    from simcost.sim.memory import peak_rows
    phase, rows = peak_rows(m)
    t.add_row(f"[dim]memory at the peak, at {_PHASE[phase]}:[/dim]", "")
    for k, v in rows.items():
        t.add_row(f"  {_ROW_NAMES.get(k, k.replace('_', ' '))}", f"{v / GiB:.2f} GiB")
    for k in ("activations", "gradients"):
        if k not in rows and m.get(k):
            t.add_row(f"  [dim]{_ROW_NAMES[k]} (not live at the peak)[/dim]",
                      f"[dim]{m[k] / GiB:.2f} GiB[/dim]")


_BASIS = {"rental": "rental", "owned": "owned (amortised)", "none": "no price"}


def usd_per_hour(x: float) -> str:
    """'$2.99/h', '$0.0095/h': cents, or four decimals below a dime."""
    return f"${x:.2f}/h" if x >= 0.1 else f"${x:.4f}/h"


def print_hardware_list(profiles) -> None:
    t = Table(show_header=True, header_style="bold")
    for col in ("name", "device", "kind", "memory", "bandwidth", "bf16 peak", "fp32 peak",
                "price/device-h", "basis"):
        t.add_column(col)
    for p in profiles:
        pk = p.peak_flops_per_s
        q = p.price_usd_per_hour
        t.add_row(p.name, p.display_name, p.kind, f"{p.memory_bytes.value / GiB:.0f} GiB",
                  f"{p.memory_bandwidth_bytes_per_s.value / 1e9:.0f} GB/s",
                  _si(pk.bf16.value, "FLOP/s") if pk.bf16 else "-", _si(pk.fp32.value, "FLOP/s"),
                  usd_per_hour(q.value) if q is not None else "-", _BASIS[p.price_basis])
    _console().print(t)


def hardware_list_json(profiles) -> list[dict]:
    """One row per profile for ``hardware list --json``: the list's columns in SI units plus
    the price's basis, source and date."""
    rows = []
    for p in profiles:
        q, pk = p.price_usd_per_hour, p.peak_flops_per_s
        rows.append({"name": p.name, "display_name": p.display_name, "kind": p.kind,
                     "memory_bytes": p.memory_bytes.value,
                     "memory_bandwidth_bytes_per_s": p.memory_bandwidth_bytes_per_s.value,
                     "bf16_flops_per_s": pk.bf16.value if pk.bf16 else None,
                     "fp32_flops_per_s": pk.fp32.value,
                     "price_usd_per_hour": q.value if q is not None else None,
                     "price_basis": p.price_basis,
                     "price_source": q.source if q is not None else None,
                     "price_date": q.date if q is not None else None,
                     "price_note": (q.note if q is not None
                                    else (p.notes or {}).get("price_usd_per_hour"))})
    return rows


def print_hardware(p) -> None:
    t = Table(title=f"{p.name}: {p.display_name}", show_header=True, header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("source")
    for k, q in p.peak_flops_per_s:
        if q is not None:
            t.add_row(f"peak {k}", _si(q.value, "FLOP/s"), _src(q))
    t.add_row("memory", f"{p.memory_bytes.value / GiB:.1f} GiB", _src(p.memory_bytes))
    t.add_row("bandwidth", f"{p.memory_bandwidth_bytes_per_s.value / 1e9:.0f} GB/s",
              _src(p.memory_bandwidth_bytes_per_s))
    t.add_row("runtime overhead", f"{p.runtime_overhead_bytes.value / GiB:.2f} GiB",
              _src(p.runtime_overhead_bytes))
    t.add_row("launch overhead", f"{p.launch_overhead_s.value * 1e6:.1f} us", _src(p.launch_overhead_s))
    q = p.price_usd_per_hour
    if q is not None:
        t.add_row("price per device-hour", usd_per_hour(q.value), _src(q))
        t.add_row("  basis", _BASIS[p.price_basis], q.note[:90] if q.note else "")
        t.add_row("  date of the price", q.date or "-", "")
    else:
        t.add_row("price per device-hour", "none",
                  ((p.notes or {}).get("price_usd_per_hour") or "no price in the profile")[:90])
    _console().print(t)


def _src(q) -> str:
    return ("[derived] " if q.derived else "") + q.source[:90]


def print_models(rows) -> None:
    """The zoo: ``rows`` of (:func:`~simcost.models.config.zoo_entry`, its
    :class:`~simcost.models.config.ModelSpec` or ``None`` for a model only the traced front end
    covers, whose sizes are left blank)."""
    t = Table(show_header=True, header_style="bold")
    for col in ("name", "architecture", "library", "front end", "layers", "hidden", "heads/kv",
                "ffn", "vocab"):
        t.add_column(col)
    for e, s in rows:
        arch = s.architecture if s else (e["class_name"] or e["model_type"] or "?")
        sizes = (str(s.layers), str(s.hidden), f"{s.heads}/{s.kv_heads}", str(s.ffn),
                 str(s.vocab)) if s else ("",) * 5
        t.add_row(e["name"], arch, e["library"], e["frontend"], *sizes)
    _console().print(t)


def print_stack_list(profiles) -> None:
    t = Table(show_header=True, header_style="bold")
    for col in ("name", "stack", "runs", "fusions", "host per kernel", "versions"):
        t.add_column(col)
    for p in profiles:
        if p.kind == "alias":
            variants = ", ".join(f"{k}->{v.stack}" for k, v in p.variants.items())
            t.add_row(p.name, p.display_name, f"alias of {p.alias_of}"
                      + (f" ({variants})" if variants else ""), "", "", "")
            continue
        t.add_row(p.name, p.display_name, "training", ", ".join(p.fusions) or "-",
                  "CUDA graphs" if p.host.cuda_graphs else f"{p.host.dispatch_s.value * 1e6:.1f} us",
                  ", ".join(f"{k} {v}" for k, v in p.versions.items()))
    _console().print(t)


def print_stack(p, via: str | None = None) -> None:
    """One training stack's constants with where each comes from."""
    c = _console()
    t = Table(title=f"{p.name}: {p.display_name}" + (f" (via {via})" if via else ""),
              show_header=True, header_style="bold")
    for col in ("quantity", "value", "source"):
        t.add_column(col)
    t.add_row("versions", ", ".join(f"{k} {v}" for k, v in p.versions.items()), "")
    t.add_row("fusions", ", ".join(p.fusions) or "none (eager)", "")
    if p.planned_fusions:
        t.add_row("not modelled yet", ", ".join(p.planned_fusions), "")
    t.add_row("optimizer", p.optimizer, "")
    for label, q, fmt in (("host per kernel", p.host.dispatch_s, lambda v: f"{v * 1e6:.1f} us"),
                          ("host per step", p.host.step_overhead_s, lambda v: f"{v * 1e3:.2f} ms"),
                          ("allocator fragmentation", p.allocator.fragmentation,
                           lambda v: f"{100 * v:.1f} % of transient bytes"),
                          ("sustained GEMM fraction", p.kernels.gemm_sustained,
                           lambda v: f"{v:.3f}")):
        if q is not None:
            t.add_row(label, fmt(q.value), _provenance(q))
    c.print(t)
    for hw, metrics in p.intervals.items():
        for m, q in metrics.items():
            c.print(f"error bars {hw} {m}: p10 {100 * q.p10:+.1f} %, p90 {100 * q.p90:+.1f} % "
                    f"over {q.n} out-of-fit rows", style="dim")
    if p.interval_note:
        c.print(f"no error bars: {p.interval_note}", style="dim")


def _provenance(q) -> str:
    if q.fitted is not None:
        f = q.fitted
        res = ", ".join(f"{k} {v:.3g}" for k, v in f.residual.items())
        return f"fitted by {f.script} on {len(f.rows)} rows ({res})"
    return q.source


def print_find(f: dict, capacity_bytes: float) -> None:
    """What --find searched and found."""
    c = _console()
    what = f["what"].removeprefix("max-")
    if f["value"] is None:
        c.print(f"--find {f['what']}: even {what} 1 does not fit (savers below)")
        return
    line = f"--find {f['what']}: the largest {what} that fits is [bold]{f['value']:,}[/bold]"
    nxt = f.get("first_not_fitting")
    if nxt:
        need = (f"needs {nxt['peak_bytes'] / GiB:.1f} GiB of {capacity_bytes / GiB:.0f} GiB"
                if nxt["peak_bytes"] is not None else nxt["why"])
        line += f"; {what} {nxt['value']:,} {need}"
    if f.get("limit"):
        line += f" ({f['limit']})"
    c.print(line + f" ({f['probes']} estimates)")


def print_advice(r) -> None:
    """The memory savers that would make a request fit, with the peak each gives."""
    from rich.markup import escape
    c = _console()
    m = r.memory_bytes
    c.print(f"[red]does not fit[/red]: needs {m['peak'] / GiB:.1f} GiB per device, the device "
            f"has {m['capacity'] / GiB:.0f} GiB. Memory savers:")
    for a in r.advice:
        verdict = (f"[green]fits[/green], step {_time(a['step_s'])}" if a["fits"]
                   else "still does not fit")
        c.print(f"  {escape(a['change']):<48} peak {a['peak_bytes'] / GiB:6.1f} GiB  {verdict}")
