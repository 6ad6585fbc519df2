"""CPU step validation under the allocator of this process, before and after the host-allocator
term (issue 10, "on CPUs, the host allocator").

    python benchmarks/host_allocator_steps.py --budget 150s            # glibc
    LD_PRELOAD=/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/host_allocator_steps.py

1. ``simcost calibrate`` in this process (so every number, the allocator's included, is this
   process's), written to validation/reports/host_allocator/calibrated-cpu-<allocator>.json;
2. the cases of ``simcost validate steps`` plus three at 8 x 256 tokens (whose logits, 62.5 MiB,
   are above glibc's 32 MiB threshold), timed with the repo's torch step harness;
3. per case the page faults of 3 more steps (``getrusage`` minor faults x 4 KiB) against the
   bytes the term prices (:func:`simcost.sim.page_faults.fresh_block_bytes`);
4. predictions from the calibrated profile without the allocator fields (today's numbers,
   "before") and with them ("after"); with ``--cross PROFILE`` also from another allocator's
   calibration with ``host_allocator`` set to this process's allocator (the user states it).

Writes validation/reports/host_allocator/steps-<allocator>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simcost.hardware import host_allocator  # noqa: E402
from simcost.peft.spec import PeftSpec  # noqa: E402
from simcost.validate.steps import CASES, LORA8, MODELS, _label  # noqa: E402

OUT = ROOT / "validation" / "reports" / "host_allocator"
EXTRA = [("llama-512x4", PeftSpec("full"), 8, 256), ("llama-512x4", LORA8, 8, 256),
         ("gpt2-512x4", LORA8, 8, 256)]
TIMES = ("step", "forward", "backward", "optimizer")


def _jiffies() -> tuple[int, int]:
    """(all CPUs' busy jiffies, this process's jiffies) from /proc."""
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    busy = sum(cpu) - cpu[3] - cpu[4]
    mine = sum(int(x) for x in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:15])
    return busy, mine


class OthersLoad:
    """The CPU share other processes used while a block ran (0: a quiet machine, 1: all
    cores busy with others): the machine is shared, so every measurement records it."""
    def __enter__(self):
        self.t, self.j = time.monotonic(), _jiffies()
        return self

    def __exit__(self, *exc):
        b, m = _jiffies()
        dt = max(time.monotonic() - self.t, 1e-3) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
        self.share = max(0.0, ((b - self.j[0]) - (m - self.j[1])) / dt)


def wait_quiet(max_wait_s: float = 45, limit: float = 0.1) -> float:
    """Wait (up to ``max_wait_s``) until others use under ``limit`` of the CPUs for 3 s;
    returns the share last seen."""
    t0 = time.monotonic()
    while True:
        with OthersLoad() as o:
            time.sleep(3)
        if o.share < limit or time.monotonic() - t0 > max_wait_s:
            return o.share


def strip_allocator(profile: str, out: Path) -> str:
    """The profile without the host-allocator fields: what today's time model reads."""
    d = json.loads(Path(profile).read_text())
    for k in ("host_allocator", "fresh_alloc_bytes_per_s", "host_alloc_return_threshold_bytes"):
        d["time_model"].pop(k, None)
    out.write_text(json.dumps(d, indent=1))
    return str(out)


def fault_bytes_per_step(cfg, spec, b, s) -> float:
    """Minor faults x 4 KiB per step of a fresh model (simcost.validate.torch_measure)."""
    from simcost.validate.exact import harness_peft
    from simcost.validate.torch_measure import fault_bytes_per_step as measure
    return measure(cfg, harness_peft(cfg, spec), b, s)


def predict(profile: str, name, spec, b, s, host_alloc=None) -> dict:
    from simcost.api import estimate_train
    from simcost.models.config import spec_from_config
    est = estimate_train(spec_from_config(MODELS[name], name), profile, batch=b, seq=s,
                         peft=spec, dtype="fp32", attn="sdpa", optimizer="adamw",
                         host_allocator=host_alloc)
    return {**{k: est.time_s[k] for k in TIMES}, "page_faults": est.time_s.get("page_faults", 0.0)}


def mape(rows, key) -> float:
    return 100 * statistics.fmean(abs(r[key]["step"] / r["measured"]["step"] - 1) for r in rows)


def allocator_version(alloc: str) -> str | None:
    """The Debian package version of the allocator library (glibc: the C library's)."""
    import subprocess
    pkg = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2",
           "glibc": "libc6"}.get(alloc)
    if pkg is None:
        return None
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{pkg} {out.stdout.strip()}" if out.returncode == 0 else None


def mapes(rows, keys) -> dict:
    n = len(CASES)
    return {"validate_steps_cases": {k: mape(rows[:n], k) for k in keys},
            "all_cases": {k: mape(rows, k) for k in keys}}


def repredict(path: Path) -> None:
    """Predictions of a written report again, from its profiles, with the current code (the
    measurements stay as they were)."""
    d = json.loads(path.read_text())
    profile = str(ROOT / d["profile"]) if not Path(d["profile"]).is_absolute() else d["profile"]
    before = strip_allocator(profile, Path("/tmp") / f"before-{path.stem}.json")
    cross = d.get("cross_profile")
    if cross and not Path(cross).is_absolute():
        cross = str(ROOT / cross)
    rate = (json.loads(Path(profile).read_text())["time_model"].get("fresh_alloc_bytes_per_s")
            or {}).get("value", 0.0)
    for row, (name, spec, b, s) in zip(d["cases"], [*CASES, *EXTRA]):
        assert (row["model"], row["batch"], row["seq"]) == (name, b, s)
        row["before"] = predict(before, name, spec, b, s)
        row["after"] = predict(profile, name, spec, b, s)
        row["fresh_bytes_priced"] = row["after"]["page_faults"] * rate
        if cross:
            row["cross"] = predict(cross, name, spec, b, s, host_alloc=d["allocator"])
    d["mape_step_pct"] = mapes(d["cases"], ("before", "after", *(["cross"] if cross else [])))
    d["repredicted"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(json.dumps(d, indent=1))
    print(json.dumps(d["mape_step_pct"]), "->", path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="150s")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cross", default=None, help="another allocator's calibrated profile")
    ap.add_argument("--profile", default=None, help="skip calibration, use this profile")
    ap.add_argument("--cpu-clock", action="store_true",
                    help="one torch thread, every timer the thread's CPU time (time.thread_time, "
                         "page-fault kernel time included): numbers that hold on a machine "
                         "other processes keep busy")
    ap.add_argument("--repredict", default=None, metavar="STEPS_JSON",
                    help="only redo the predictions of a written report with the current code")
    args = ap.parse_args()
    if args.repredict:
        repredict(Path(args.repredict))
        return 0
    import torch
    if args.cpu_clock:
        torch.set_num_threads(1)
        time.perf_counter = time.thread_time     # calibrate and the step harness read it

    from simcost.hardware.calibrate import run_cli as calibrate
    from simcost.validate.exact import harness_peft
    from simcost.validate.torch_steps import time_steps
    alloc = host_allocator.detect()
    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"{alloc}{'-cpu-clock' if args.cpu_clock else ''}"
    profile = args.profile or str(OUT / f"calibrated-cpu-{tag}.json")
    calib_load = None
    tries = 0 if args.profile else 1 if args.cpu_clock else 3
    for _ in range(tries):           # recalibrate when others took the CPUs (wall clock)
        if not args.cpu_clock:
            wait_quiet()
        with OthersLoad() as o:
            calibrate(SimpleNamespace(device="cpu", threads=1 if args.cpu_clock else None,
                                      dtypes="fp32", base=None,
                                      out=profile, budget=args.budget))
        calib_load = o.share
        print(f"calibration: others used {100 * o.share:.0f} % of the CPUs", flush=True)
        if o.share < 0.15:
            break
    rate = (json.loads(Path(profile).read_text())["time_model"].get("fresh_alloc_bytes_per_s")
            or {}).get("value", 0.0)
    before = strip_allocator(profile, Path("/tmp") / f"calibrated-cpu-{alloc}-before.json")
    rows = []
    for name, spec, b, s in [*CASES, *EXTRA]:
        cfg = MODELS[name]
        for _ in range(1 if args.cpu_clock else 3):   # re-measure a case others disturbed
            if not args.cpu_clock:
                wait_quiet()
            with OthersLoad() as o:
                m = time_steps(cfg, harness_peft(cfg, spec), batch=b, seq=s, dtype="fp32",
                               attn="sdpa", warmup=2, repeats=args.repeats)
            if o.share < 0.15:
                break
        row = {"model": name, "method": _label(spec), "batch": b, "seq": s,
               "measured": {"step": m.median_s, "forward": m.forward_s,
                            "backward": m.backward_s, "optimizer": m.optimizer_s,
                            "min": m.min_s, "max": m.max_s},
               "others_cpu_share": o.share,
               "fault_bytes_per_step_measured": fault_bytes_per_step(cfg, spec, b, s),
               "before": predict(before, name, spec, b, s),
               "after": predict(profile, name, spec, b, s)}
        row["fresh_bytes_priced"] = row["after"]["page_faults"] * rate
        if args.cross:
            row["cross"] = predict(args.cross, name, spec, b, s, host_alloc=alloc)
        rows.append(row)
        print(f"{name} {row['method']} {b}x{s}: measured {m.median_s:.3f} s, before "
              f"{row['before']['step']:.3f}, after {row['after']['step']:.3f} (faults "
              f"{row['fault_bytes_per_step_measured'] / 2**20:.0f} MiB/step measured, "
              f"{row['fresh_bytes_priced'] / 2**20:.0f} MiB priced)", flush=True)
    prof = json.loads(Path(profile).read_text())["time_model"]
    summary = {
        "title": "CPU training steps under one host allocator, before/after the allocator term",
        "allocator": alloc, "ld_preload": host_allocator.os.environ.get("LD_PRELOAD", ""),
        "allocator_fields": {k: prof.get(k) for k in (
            "host_allocator", "fresh_alloc_bytes_per_s", "host_alloc_return_threshold_bytes")},
        "profile": str(Path(profile).relative_to(ROOT)) if Path(profile).is_relative_to(ROOT)
        else profile,
        "cross_profile": (str(Path(args.cross).resolve().relative_to(ROOT))
                          if args.cross and Path(args.cross).resolve().is_relative_to(ROOT)
                          else args.cross),
        "calibration_others_cpu_share": calib_load,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "python": platform.python_version(),
        "glibc": "-".join(platform.libc_ver()), "machine": platform.machine(),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "clock": "thread CPU time (time.thread_time), 1 torch thread" if args.cpu_clock
        else "wall (time.perf_counter)",
        "allocator_version": allocator_version(alloc),
        "mape_step_pct": mapes(rows, ("before", "after", *(["cross"] if args.cross else []))),
        "cases": rows}
    path = OUT / f"steps-{alloc}{'-cpu-clock' if args.cpu_clock else ''}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["mape_step_pct"]), "->", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
