"""Speed of ``simcost plan train``: the README's question (b), and the same 70B LoRA job over
every bundled profile on up to 1024 devices.

    python benchmarks/bench_plan_train.py [--repeat 1] [--skip-1024] [--json OUT]

Each plan runs in a fresh process (graphs are cached within a process, so a second plan in the
same process would be faster than a user's first); the figure is the plan's own
``elapsed_s`` (the search, not the interpreter's start-up), with the cells, plans and fitting
candidates it searched.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "question_b_70b_16dev_deadline_24h": [
        "--model", "llama-2-70b", "--peft", "lora", "--tokens", "200000000", "--seq", "4096",
        "--max-devices", "16", "--deadline", "24h"],
    "70b_lora_all_profiles_1024dev": [
        "--model", "llama-2-70b", "--peft", "lora", "--tokens", "200000000", "--seq", "4096",
        "--max-devices", "1024"],
}


def run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "simcost.cli", "plan", "train", *args, "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    d = json.loads(out.stdout)
    return {"elapsed_s": d["elapsed_s"], **d["searched"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-1024", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_estimate import machine
    res = {"machine": machine()}
    for name, args in CASES.items():
        if a.skip_1024 and "1024" in name:
            continue
        runs = [run(args) for _ in range(a.repeat)]
        res[name] = {**runs[0], "elapsed_s_median": statistics.median(r["elapsed_s"]
                                                                      for r in runs)}
        print(f"{name:<40} {res[name]['elapsed_s_median']:8.1f} s  {runs[0]['groups']} cells, "
              f"{runs[0]['plans']:,} plans, {runs[0]['fitting']} fit")
    print(res["machine"])
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
