"""Speed of ``simcost plan train``: the README's question (b), and the same 70B LoRA job over
every bundled profile on up to 1024 devices, each as a user runs it (the default: one process
per usable CPU) and in one process (``--jobs 1``).

    python benchmarks/bench_plan_train.py [--repeat 3] [--skip-1024] [--json OUT]

Each plan runs in a fresh process (graphs are cached within a process, so a second plan in the
same process would be faster than a user's first); the figure is the plan's own
``elapsed_s`` (the search, not the interpreter's start-up), with the cells, plans searched,
plans priced (the rest ruled out by the search's lower bound) and fitting candidates.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B = ["--model", "llama-2-70b", "--peft", "lora", "--tokens", "200000000", "--seq", "4096"]
CASES = {
    "question_b_70b_16dev_deadline_24h": [*B, "--max-devices", "16", "--deadline", "24h"],
    "question_b_one_process": [*B, "--max-devices", "16", "--deadline", "24h", "--jobs", "1"],
    "70b_lora_all_profiles_1024dev": [*B, "--max-devices", "1024"],
    "70b_lora_all_profiles_1024dev_one_process": [*B, "--max-devices", "1024", "--jobs", "1"],
}


def run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "simcost.cli", "plan", "train", *args, "--json"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    d = json.loads(out.stdout)
    return {"elapsed_s": d["elapsed_s"], **d["searched"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
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
        r = res[name]
        print(f"{name:<42} median {r['elapsed_s_median']:5.1f} s (max "
              f"{max(x['elapsed_s'] for x in runs):5.1f}) on {r['ran_on']}: {r['groups']} cells, "
              f"{r['plans']:,} plans, {r['priced']:,} priced, {r['fitting']} fit")
    print(res["machine"])
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
