"""``--html``: the plan report is one self-contained page (plotly.js inline, nothing fetched),
holds the frontier plot, both breakdowns, the table and the assumptions, escapes every string,
and really draws: headless Chromium, with every host name unresolvable, screenshots it and the
frontier plot's region must show the frontier's and the best plan's colours."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from simcost.errors import SimcostError
from simcost.plan import html as report

GiB = 2 ** 30
SEQ, GLOBAL_BATCH, TOKENS = 2048, 64, 2_000_000_000
DEADLINE_S = 120 * 3600.0
# hardware: ($ per device-hour, peak FLOP/s bf16, capacity bytes); only the fixture uses these
HW = {"a100-80gb-sxm": (1.79, 312e12, 80 * GiB), "h100-80gb-sxm": (2.99, 989e12, 80 * GiB),
      "l40s-48gb": (0.99, 362e12, 48 * GiB)}
FLOPS_PER_TOKEN = 6 * 7e9 * 2 / 3          # a 7B model under LoRA: no weight gradients


def _entry(hw, devices, tp=1, pp=1, mb=1, ckpt="none", peft="lora", eff=0.42):
    price, peak_flops, cap = HW[hw]
    dp = devices // (tp * pp)
    ga = GLOBAL_BATCH // (dp * mb)
    compute = GLOBAL_BATCH * SEQ * FLOPS_PER_TOKEN / (devices * peak_flops * eff)
    if ckpt == "full":
        compute *= 4 / 3
    comm = 0.09 * compute * math.log2(devices) * (1 + tp / 4) * (1.5 if devices > 8 else 1)
    parts = {"compute": compute, "communication": comm, "host": 0.012 * ga, "optimizer": 0.004}
    step_s = sum(parts.values())
    steps = TOKENS // (GLOBAL_BATCH * SEQ)
    job_s = step_s * steps
    acts = (9.5 if ckpt == "none" else 1.6) * mb * GiB / (tp * pp)
    memory = {"weights": 13.5 * GiB / (tp * pp), "lora_weights": 0.08 * GiB,
              "gradients": 0.08 * GiB, "optimizer": 0.32 * GiB, "activations": acts,
              "temporaries": 1.1 * GiB, "runtime_overhead": 1.4 * GiB}
    peak = sum(memory.values())
    nodes = max(1, devices // 8)
    plan = f"dp{dp} tp{tp} pp{pp} cp1 zero0 mb{mb}x{ga}"
    return {"hardware": hw, "devices": devices, "nodes": nodes, "plan": plan, "peft": peft,
            "micro_batch": mb, "grad_accum": ga, "checkpointing": ckpt,
            "global_batch": GLOBAL_BATCH, "step_s": step_s, "steps": steps, "job_s": job_s,
            "job_s_interval": {"p10": 0.88 * job_s, "p90": 1.17 * job_s},
            "job_usd": job_s / 3600 * devices * price,
            "usd_per_million_tokens": job_s / 3600 * devices * price / (TOKENS / 1e6),
            "energy_j": job_s * devices * 520.0, "tokens_per_s": GLOBAL_BATCH * SEQ / step_s,
            "mfu": compute * eff / step_s, "peak_bytes": peak, "capacity_bytes": cap,
            "fits": peak <= cap, "deadline_risk": 1.17 * job_s > DEADLINE_S,
            "memory_breakdown_bytes": memory, "time_breakdown_s": parts,
            "estimate_args": ["--model", "llama-2-7b", "--peft", peft, "--hardware", hw,
                              "--devices", str(devices), "--parallel", plan, "--batch", str(mb),
                              "--seq", str(SEQ), "--grad-accum", str(ga)]
                             + (["--grad-checkpointing"] if ckpt == "full" else [])}


def _pareto(entries):
    out, best_usd = [], float("inf")
    for e in sorted(entries, key=lambda e: (e["job_s"], e["job_usd"])):
        if e["job_usd"] < best_usd:
            out.append(e)
            best_usd = e["job_usd"]
    return out


def train_plan():
    cands = [_entry(hw, n, tp=tp, mb=mb, ckpt=ck)
             for hw, n, tp, mb, ck in [
                 ("a100-80gb-sxm", 8, 1, 2, "none"), ("a100-80gb-sxm", 4, 1, 1, "none"),
                 ("a100-80gb-sxm", 16, 2, 1, "none"), ("h100-80gb-sxm", 8, 1, 2, "none"),
                 ("h100-80gb-sxm", 2, 1, 4, "full"), ("h100-80gb-sxm", 16, 1, 1, "none"),
                 ("l40s-48gb", 8, 2, 1, "full"), ("l40s-48gb", 4, 1, 2, "full"),
                 ("a100-80gb-sxm", 2, 1, 4, "full"), ("h100-80gb-sxm", 4, 2, 1, "none"),
                 ("l40s-48gb", 2, 1, 1, "none"), ("l40s-48gb", 1, 1, 1, "none"),
                 ("h100-80gb-sxm", 1, 1, 2, "none")]]
    cands.sort(key=lambda e: e["job_usd"])
    return {
        "schema_version": 2, "kind": "train",
        "question": {"model": "llama-2-7b", "peft": ["lora"], "tokens": TOKENS, "seq": SEQ,
                     "global_batch": GLOBAL_BATCH, "hardware": list(HW), "max_devices": 16,
                     "deadline_s": DEADLINE_S, "budget_usd": 400.0, "stack": "hf-trainer",
                     "objective": "cost"},
        "best": cands[0], "candidates": cands, "frontier": _pareto(cands),
        "nearest_miss": None,
        "excluded": [{"hardware": "tpu-v5e", "why": "no price, and the plan is ranked by cost"}],
        "searched": 1532, "elapsed_s": 3.4,
        "assumptions": {
            "stack": {"name": "hf-trainer", "label": "Hugging Face Trainer 4.x",
                      "version": "4.46"},
            "profiles": {hw: {"display_name": hw.upper(), "price_usd_per_hour": p,
                              "price_basis": "on-demand, per GPU", "price_source": "vendor list",
                              "price_date": "2026-11", "tdp_w": 400.0, "tdp_source": "datasheet"}
                         for hw, (p, _, _) in HW.items()},
            "intervals": "p10-p90 of the job time from the step-time model's error on the "
                         "validation runs",
            "energy": "devices x TDP x job time (an upper bound)",
            "notes": ["prices are list prices; spot is cheaper"]},
    }


def miss_plan():
    p = train_plan()
    miss = _entry("l40s-48gb", 4, mb=8)
    assert not miss["fits"]
    p.update(best=None, candidates=[], frontier=[],
             nearest_miss={"entry": miss, "why": "peak 92.6 GiB exceeds 48 GiB",
                           "advice": ["turn on --grad-checkpointing", "micro-batch 2 or less"]})
    return p


class _Tables(HTMLParser):
    """The page's tags with a src/href, and each table's body rows."""

    def __init__(self):
        super().__init__()
        self.refs, self.tables, self.ids = [], [], set()
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        self.refs += [(tag, a[k]) for k in ("src", "href") if a.get(k)]
        if tag == "table":
            self.tables.append(0)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.tables[-1] += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False


def _parse(page):
    t = _Tables()
    t.feed(page)
    return t


def test_train_page_holds_every_part_and_fetches_nothing():
    plan = train_plan()
    page = report.render_html(plan)
    t = _parse(page)
    assert {"frontier", "memory", "steptime"} <= t.ids
    assert t.refs == [], f"the page links out: {t.refs[:3]}"
    assert not re.search(r"""<(script|link|img|iframe)[^>]*\s(src|href)\s*=""", page, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?https?:", page, re.I)
    assert "plotly" in page and "Plotly.newPlot" in page       # the library inline, used
    assert t.tables[0] == len(plan["candidates"])                # the candidates' table first
    assert t.tables[1] == len(plan["assumptions"]["profiles"])
    best = plan["best"]
    assert f"simcost estimate train --model llama-2-7b --peft lora --hardware {best['hardware']}" \
        in page
    for text in ("Pareto frontier", "deadline at risk", "Hugging Face Trainer 4.x", "vendor list",
                 "tpu-v5e", "p10-p90 of the job time", "runtime_overhead", "communication"):
        assert text in page, text
    assert 4e6 < len(page.encode()) < 8e6     # plotly.js (4.8 MB) plus the page


def test_every_string_is_escaped():
    plan = train_plan()
    plan["question"]["model"] = "<script>alert(1)</script>"
    plan["excluded"] = [{"hardware": "x<img src=y>", "why": "a & b"}]
    plan["assumptions"]["notes"] = ['"quoted" <b>bold</b>']
    for e in plan["candidates"]:            # strings that reach the plots' JSON too
        e["memory_breakdown_bytes"]["</script><i>x"] = 1.0
    plan["candidates"][1]["hardware"] = "</script>hw"
    page = report.render_html(plan)
    assert page.count("</script>") == page.count("<script") == 4     # plotly.js + 3 plots
    assert "<script>alert(1)" not in page and "<img src=y>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "a &amp; b" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page


def test_no_best_shows_the_nearest_miss_and_its_advice():
    page = report.render_html(miss_plan())
    assert "No plan fits" in page and "peak 92.6 GiB exceeds 48 GiB" in page
    assert "<li>turn on --grad-checkpointing</li>" in page
    assert "nearest miss (does not fit)" in page            # its point on the plot
    assert {"frontier", "memory", "steptime"} <= _parse(page).ids


def test_unpriced_candidates_fall_back_to_energy():
    plan = train_plan()
    for e in plan["candidates"] + plan["frontier"] + [plan["best"]]:
        e["job_usd"] = e["usd_per_million_tokens"] = None
    page = report.render_html(plan)
    assert "job energy (kWh; no candidate has a price)" in page


def test_serve_plan_gets_a_table_and_a_scatter():
    cands = [{"hardware": "a100-80gb-sxm", "devices": n, "tp": 1, "usd_per_hour": 1.79 * n,
              "ttft_p99_s": 2.0 / n, "meets_slo": n >= 2} for n in (1, 2, 4)]
    page = report.render_html({"kind": "serve", "question": {"model": "llama-2-7b"},
                               "best": cands[1], "candidates": cands})
    t = _parse(page)
    assert "frontier" in t.ids and t.tables[0] == 3 and "ttft_p99_s" in page


def test_bad_input_is_one_line():
    with pytest.raises(SimcostError, match="kind must be 'train' or 'serve'"):
        report.render_html({"kind": "nope"})
    plan = train_plan()
    del plan["assumptions"]
    with pytest.raises(SimcostError, match="no 'assumptions'"):
        report.render_html(plan)


def test_without_plotly_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(SimcostError, match=re.escape("pip install 'simcost[report]'")):
        report.render_html(train_plan())


def test_write_html(tmp_path):
    out = tmp_path / "r.html"
    report.write_html(train_plan(), out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(SimcostError, match="cannot write the --html report"):
        report.write_html(train_plan(), tmp_path / "no" / "such" / "dir" / "r.html")


def test_import_simcost_stays_free_of_plotly():
    code = ("import sys, simcost, simcost.plan.html; "
            "assert 'plotly' not in sys.modules, 'plotly imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the page in a browser ----------------------------------------------------------------------

FRONTIER_RGB = (0x1F, 0x5F, 0xBF)     # simcost.plan.html's frontier, best and other colours
BEST_RGB = (0xF2, 0xB7, 0x05)
OTHER_RGB = (0x9A, 0xA7, 0xB8)


def _screenshot(page: str, tmp_path):
    """The page as headless Chromium draws it in a 1280 x 1600 window, with every host name
    unresolvable (so nothing can come from a network), as an RGB numpy array."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("the --html report test needs headless Chromium: apt-get install -y chromium "
                    "(the README's test command installs it)")
    from PIL import Image
    import numpy as np
    src, png = tmp_path / "report.html", tmp_path / "shot.png"
    src.write_text(page, encoding="utf-8")
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1280,1600", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000", "--host-resolver-rules=MAP * ~NOTFOUND",
           "--no-first-run", "--disable-extensions", f"--screenshot={png}", src.as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png.exists(), f"chromium wrote no screenshot (exit {run.returncode}): {run.stderr[-800:]}"
    return np.asarray(Image.open(png).convert("RGB")).astype(int)


def _near(img, rgb, tol=20):
    import numpy as np
    return np.all(np.abs(img - np.array(rgb)) <= tol, axis=-1)


def _plot_drawn(img) -> str:
    """'' when the frontier plot is on the screenshot, else what is missing. The frontier's
    colour must cover a wide region (its line joins plans hours apart); inside that region, the
    best plan's star and the other candidates' colour must show, and more than 1.5 % of its
    pixels be ink (markers, lines, error bars, tick labels; the drawn plot has about 2.3 %,
    the same page without plotly.js 0.8 % in the same place)."""
    import numpy as np
    front = _near(img, FRONTIER_RGB)
    if front.sum() < 300:
        return f"only {front.sum()} pixels of the frontier's colour"
    ys, xs = np.nonzero(front)
    y0, y1, x0, x1 = ys.min() - 40, ys.max() + 40, xs.min() - 40, xs.max() + 40
    if x1 - x0 < 300 or y1 - y0 < 120:
        return f"the frontier spans only {x1 - x0} x {y1 - y0} px"
    region = img[max(y0, 0):y1, max(x0, 0):x1]
    ink = (np.abs(region - 255).max(axis=-1) > 20).mean()
    star, other = _near(region, BEST_RGB).sum(), _near(region, OTHER_RGB).sum()
    if ink < 0.015 or star < 100 or other < 50:
        return f"plot region: {100 * ink:.1f} % ink, {star} star pixels, {other} candidate pixels"
    return ""


def test_chromium_draws_the_frontier_plot(tmp_path):
    img = _screenshot(report.render_html(train_plan()), tmp_path)
    assert img.shape[:2] == (1600, 1280)
    assert _plot_drawn(img) == ""


def test_the_screenshot_check_sees_a_page_without_its_plot(tmp_path):
    """The check above fails on the same page with plotly.js taken out (every plot div empty)."""
    from plotly.offline import get_plotlyjs
    page = report.render_html(train_plan())
    img = _screenshot(page.replace(get_plotlyjs(), ""), tmp_path)
    assert _plot_drawn(img) != ""


def test_plan_train_and_serve_write_html(tmp_path, capsys):
    """The commands' --html: the real plans rendered (the screenshot test above checks a page
    of the same renderer in Chromium)."""
    from simcost.cli import main
    train = tmp_path / "train.html"
    assert main(["plan", "train", "--model", "llama-3.2-1b", "--samples", "500", "--seq", "512",
                 "--hardware", "h100-sxm,a100-80gb-sxm", "--max-devices", "2",
                 "--html", str(train), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    page = train.read_text()
    assert "Time against cost" in page and plan["best"]["plan"] in page
    assert page.count("simcost estimate train --model llama-3.2-1b") >= len(plan["candidates"])
    serve = tmp_path / "serve.html"
    assert main(["plan", "serve", "--model", "llama-3.2-1b", "--adapters", "4", "--rate", "1",
                 "--slo-ttft", "2", "--requests", "100", "--hardware", "l4,a10g",
                 "--html", str(serve), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    page = serve.read_text()
    assert "Cost against latency" in page and "simcost simulate serve" in page
    assert best["hardware"] in page
    assert main(["plan", "train", "--model", "llama-3.2-1b", "--samples", "5", "--seq", "8",
                 "--html", str(tmp_path / "no" / "x.html")]) == 2
