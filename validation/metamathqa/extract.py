"""Rebuild validation/metamathqa/ from a git checkout (or bare mirror) of huggingface/peft.

Usage:
    python validation/metamathqa/extract.py /path/to/peft/git-dir [commit]

Reads only data files of method_comparison/MetaMathQA/ (adapter_config.json, training_params.json,
default_training_params.json, results/*.json) with `git show`, at one commit (default: HEAD), and writes:

  experiments/<method>--<experiment>/adapter_config.json   byte-exact copy (when the experiment has one)
  experiments/<method>--<experiment>/training_params.json  byte-exact copy (when the experiment has one)
  default_training_params.json                             byte-exact copy
  experiments.csv           one row per experiment: key config values, default-per-method flag
  results.csv               one row per published result (results/*.json at that commit)
  results_intervals.csv     the 20 per-250-step records inside each result (train time, tokens/s, memory)
  results_history.csv       every earlier version of each result file on the mirror's main line

No peft code is copied or imported; only the JSON data are read.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from typing import Any

BENCH = "method_comparison/MetaMathQA"
REPO = "huggingface/peft"
HERE = os.path.dirname(os.path.abspath(__file__))

# One default experiment per method (see README.md, "Default experiment per method", for the rule).
DEFAULTS = {
    "adalora": "llama-3.2-3B-rank32",
    "adamss": "llama-3.2-3B-rank32",
    "adaptionprompt": "llama-3.2-3B-lr_0.0005",
    "beft": "llama-3.2-3B-target-v_proj",
    "boft": "llama-3.2-3B-default",
    "c3a": "llama-3.2-3B-default",
    "deft": "llama-3.2-3B-rank32",
    "delora": "llama-3.2-3B-rank32",
    "fourierft": "llama-3.2-3B-default",
    "frod": "llama-3.2-3B-default",
    "full-finetuning": "llama-3.2-3B-lr_0.00001",
    "glora": "llama-3.2-3B-default",
    "gralora": "llama-3.2-3B-rank32",
    "hira": "llama-3.2-3B-rank32-lr4.5e-3",
    "ia3": "llama-3.2-3B-default",
    "lily": "llama-3.2-3B-rank896-a2-b2-s2.0",
    "ln_tuning": "llama-3.2-3B-default",
    "loha": "llama-3.2-3B-rank32",
    "lokr": "llama-3.2-3B-rank32-factor4-lr0.003",
    "lora": "llama-3.2-3B-rank32",
    "miss": "llama-3.2-3B-default",
    "oft": "llama-3.2-3B-rank32",
    "osf": "llama-3.2-3B-rank128",
    "peanut": "llama-3.2-3B-rank32-relu-depth0-s2.0",
    "prefixtuning": "llama-3.2-3B-lr_0.001",
    "prompt_tuning": "llama-3.2-3B-default",
    "psoft": "llama-3.2-3B-default",
    "ptuning": "llama-3.2-3B-default",
    "pvera": "llama-3.2-3B-default",
    "randlora": "llama-3.2-3B-default",
    "road": "llama-3.2-3B-lr_0.001",
    "shira": "llama-3.2-3B-lr_0.0003-random_seed_42",
    "supertuning": "llama-3.2-3B-s99-supra-r32",
    "tinylora": "llama-3.2-3B-default",
    "trainable_tokens": "llama-3.2-3B-sos+eos",
    "unilora": "llama-3.2-3B-default",
    "vblora": "llama-3.2-3B-default",
    "vera": "llama-3.2-3B-default",
    "waveft": "llama-3.2-3B-n_frequency-5000",
}

# Config keys shown in experiments.csv as "key values" (whichever the config has and sets).
RANK_KEYS = ["r", "init_r", "target_r", "mini_r", "boft_block_size", "boft_n_butterfly_factor", "block_size",
             "n_frequency", "num_virtual_tokens", "adapter_len", "adapter_layers", "sparse_rate", "sparsity",
             "num_vectors", "vector_length", "topk", "u", "group_size", "num_subspaces", "subspace_rank",
             "gralora_k", "decompose_factor", "num_B", "stride_A", "theta_d_length", "encoder_num_layers", "token_indices"]
ALPHA_KEYS = ["lora_alpha", "alpha", "randlora_alpha", "psoft_alpha", "scaling", "delora_lambda"]
# (ref, path) of experiment configs that exist only on unmerged PR branches; copied to experiments_unmerged/
UNMERGED = [
    ("refs/pull/3185/head", f"{BENCH}/experiments/hra/llama-3.2-3B-rank32/adapter_config.json"),
]
IGNORED_KEYS = {"auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "task_type", "peft_type",
                "peft_version", "megatron_core", "megatron_config"}


def git(gitdir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", gitdir, *args], check=True, capture_output=True, text=True).stdout


def git_bytes(gitdir: str, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", gitdir, *args], check=True, capture_output=True).stdout


def short(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, sort_keys=isinstance(v, dict), separators=(",", ":"))
    return str(v)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: short(r.get(k)) for k in cols})


def result_row(d: dict, name: str, source: str, result_commit: str) -> dict[str, Any]:
    ri, ti, mi = d["run_info"], d["train_info"], d["meta_info"]
    tc, pc = ri["train_config"], ri.get("peft_config")
    pk, si = mi["package_info"], mi["system_info"]
    metrics = ti["metrics"]
    intervals = [m for m in metrics if "valid accuracy" in m]
    final = [m for m in metrics if "test accuracy" in m]
    final = final[-1] if final else {}
    method, exp = name.split("--", 1)
    max_steps = tc["max_steps"]
    # memory keys were called cuda_* before 2025-07-22 (f650b08ab), accelerator_* after
    mem = lambda k: ti.get("accelerator_" + k, ti.get("cuda_" + k))  # noqa: E731
    dur = [m["train time"] for m in intervals if "train time" in m]
    steps_timed = len(dur) * tc["eval_steps"]
    step_time = sum(dur) / steps_timed if dur and steps_timed == max_steps else None
    total_tokens = final.get("train total tokens")
    alloc = [m["mem allocated avg"] for m in intervals if "mem allocated avg" in m]
    resv = [m["mem reserved avg"] for m in intervals if "mem reserved avg" in m]
    opt = tc.get("optimizer_kwargs", {})
    return {
        "experiment": name,
        "method": method,
        "experiment_name": exp,
        "peft_type": (pc or {}).get("peft_type") or "FULL_FINETUNING",
        "is_default": DEFAULTS.get(method) == exp,
        "hardware": si.get("accelerator") or si.get("gpu"),
        "created_at": ri["created_at"],
        "status": ti["status"],
        "train_time_s": ti["train_time"],
        "total_time_s": ri.get("total_time"),
        "max_steps": max_steps,
        "step_time_s": step_time,
        "train_time_per_step_s": ti["train_time"] / max_steps,
        "sum_step_durations_s": sum(dur) if dur else None,
        "train_total_tokens": total_tokens,
        "train_samples": final.get("train samples"),
        "train_tokens_per_s": (total_tokens / sum(dur)) if (dur and total_tokens and steps_timed == max_steps) else None,
        "accelerator_memory_max_bytes": mem("memory_max"),
        "accelerator_memory_reserved_avg_bytes": mem("memory_reserved_avg"),
        "accelerator_memory_reserved_99th_bytes": mem("memory_reserved_99th"),
        "mem_allocated_avg_bytes": (sum(alloc) / len(alloc)) if alloc else None,
        "mem_allocated_avg_min_interval_bytes": min(alloc) if alloc else None,
        "mem_allocated_avg_max_interval_bytes": max(alloc) if alloc else None,
        "mem_reserved_avg_max_interval_bytes": max(resv) if resv else None,
        "num_trainable_params": ti.get("num_trainable_params"),
        "num_total_params": ti.get("num_total_params"),
        "file_size_bytes": ti.get("file_size"),
        "model": tc["model_id"],
        "model_sha": (mi.get("model_info") or {}).get("sha") or mi.get("model_sha"),
        "dtype": tc["dtype"],
        "batch_size": tc["batch_size"],
        "max_seq_len": tc["max_seq_length"],
        "use_gc": tc.get("use_gc"),
        "compile": tc.get("compile"),
        "use_amp": tc.get("use_amp"),
        "autocast_adapter_dtype": tc.get("autocast_adapter_dtype"),
        "attn_implementation": tc.get("attn_implementation"),
        "optimizer_type": tc.get("optimizer_type", "AdamW"),
        "lr": opt.get("lr"),
        "weight_decay": opt.get("weight_decay"),
        "lr_scheduler": tc.get("lr_scheduler"),
        "target_modules_resolved": (pc or {}).get("target_modules"),
        "test_accuracy": final.get("test accuracy"),
        "forgetting": final.get("forgetting"),
        "torch_version": pk.get("torch-version"),
        "transformers_version": pk.get("transformers-version"),
        "peft_version": pk.get("peft-version"),
        "peft_commit": pk.get("peft-commit-hash"),
        "datasets_version": pk.get("datasets-version"),
        "bitsandbytes_version": pk.get("bitsandbytes-version"),
        "peft_branch": ri.get("peft_branch"),
        "peft_worktree_is_dirty": ri.get("peft_worktree_is_dirty"),
        "source": source,
        "result_commit": result_commit,
    }


def main(gitdir: str, commit: str = "HEAD") -> None:
    sha = git(gitdir, "rev-parse", commit).strip()
    files = git(gitdir, "ls-tree", "-r", "--name-only", sha, BENCH).split()

    # default training params
    with open(os.path.join(HERE, "default_training_params.json"), "wb") as f:
        f.write(git_bytes(gitdir, "show", f"{sha}:{BENCH}/default_training_params.json"))
    defaults = json.loads(git(gitdir, "show", f"{sha}:{BENCH}/default_training_params.json"))

    # published results at this commit
    results: dict[str, dict] = {}
    result_rows = []
    interval_rows = []
    for path in sorted(p for p in files if p.startswith(f"{BENCH}/results/") and p.endswith(".json")):
        name = os.path.basename(path)[: -len(".json")]
        d = json.loads(git(gitdir, "show", f"{sha}:{path}"))
        results[name] = d
        last = git(gitdir, "log", "-1", "--format=%H", sha, "--", path).strip()
        result_rows.append(result_row(d, name, f"{REPO}:{path}@{sha}", last))
        for m in d["train_info"]["metrics"]:
            if "valid accuracy" not in m:
                continue
            interval_rows.append({
                "experiment": name,
                "step": m["step"],
                "train_time_s_250_steps": m.get("train time"),
                "tokens_per_s": m.get("tokens / sec"),
                "mem_allocated_avg_bytes": m.get("mem allocated avg"),
                "mem_reserved_avg_bytes": m.get("mem reserved avg"),
                "eval_time_s": m.get("eval time"),
                "train_loss": m.get("train loss"),
                "valid_accuracy": m.get("valid accuracy"),
            })

    # experiments
    exp_dirs = sorted({os.path.dirname(p) for p in files if p.startswith(f"{BENCH}/experiments/")})
    exp_rows = []
    for d in exp_dirs:
        method, exp = d.split("/")[-2:]
        name = f"{method}--{exp}"
        out = os.path.join(HERE, "experiments", name)
        os.makedirs(out, exist_ok=True)
        cfg, tp = None, {}
        for fn in ("adapter_config.json", "training_params.json"):
            if f"{d}/{fn}" in files:
                raw = git_bytes(gitdir, "show", f"{sha}:{d}/{fn}")
                with open(os.path.join(out, fn), "wb") as f:
                    f.write(raw)
                if fn == "adapter_config.json":
                    cfg = json.loads(raw)
                else:
                    tp = json.loads(raw)
        train = {**defaults, **tp}
        res = results.get(name)
        res_pc = (res or {}).get("run_info", {}).get("peft_config") or {}
        cfg_ = cfg or {}
        key_values = {k: cfg_[k] for k in RANK_KEYS if cfg_.get(k) not in (None, False, [], {})}
        alphas = {k: cfg_[k] for k in ALPHA_KEYS if cfg_.get(k) not in (None, False)}
        shown = set(RANK_KEYS) | set(ALPHA_KEYS) | IGNORED_KEYS | {"target_modules"}
        other = {k: v for k, v in cfg_.items() if k not in shown and v not in (None, False, [], {})}
        exp_rows.append({
            "experiment": name,
            "method": method,
            "experiment_name": exp,
            "peft_type": cfg_.get("peft_type") or "FULL_FINETUNING (no adapter_config.json)",
            "is_default": DEFAULTS.get(method) == exp,
            "has_training_params": bool(tp),
            "has_published_result": res is not None,
            "target_modules_config": cfg_.get("target_modules"),
            "target_modules_resolved": res_pc.get("target_modules") if res else None,
            "key_values": key_values,
            "alpha_or_scaling": alphas,
            "other_config": other,
            "num_trainable_params": (res or {}).get("train_info", {}).get("num_trainable_params"),
            "optimizer_type": train.get("optimizer_type"),
            "lr": train["optimizer_kwargs"].get("lr"),
            "weight_decay": train["optimizer_kwargs"].get("weight_decay"),
            "batch_size": train["batch_size"],
            "max_seq_length": train["max_seq_length"],
            "dtype": train["dtype"],
            "use_gc": train["use_gc"],
            "source_dir": f"{REPO}:{d}@{sha}",
        })

    # history: every run ever published in each current result file (git log of `commit`), one row per run
    # (experiment, created_at), attributed to the oldest commit carrying it (later commits may only rename keys)
    hist_rows = []
    for path in sorted(p for p in files if p.startswith(f"{BENCH}/results/") and p.endswith(".json")):
        name = os.path.basename(path)[: -len(".json")]
        runs: dict[str, dict[str, Any]] = {}
        for c in git(gitdir, "log", "--format=%H", sha, "--", path).split():  # newest first
            try:
                d = json.loads(git(gitdir, "show", f"{c}:{path}"))
            except subprocess.CalledProcessError:
                continue
            row = result_row(d, name, f"{REPO}:{path}@{c}", c)
            row["published_at"] = git(gitdir, "show", "-s", "--format=%cs", c).strip()
            row["is_current"] = d == results[name]
            runs[d["run_info"]["created_at"]] = row  # oldest commit wins
        hist_rows.extend(sorted(runs.values(), key=lambda r: r["created_at"]))

    # methods whose MetaMathQA experiment exists only on an unmerged pull-request branch of the mirror
    for ref, path in UNMERGED:
        try:
            c = git(gitdir, "rev-parse", ref).strip()
            raw = git_bytes(gitdir, "show", f"{c}:{path}")
        except subprocess.CalledProcessError:
            continue
        method, exp = path.split("/")[-3:-1]
        out = os.path.join(HERE, "experiments_unmerged", f"{method}--{exp}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, os.path.basename(path)), "wb") as f:
            f.write(raw)
        with open(os.path.join(out, "SOURCE"), "w") as f:
            f.write(f"{REPO}:{path}@{c} ({ref}); not on main at {sha}; no published result\n")

    write_csv(os.path.join(HERE, "experiments.csv"), exp_rows)
    write_csv(os.path.join(HERE, "results.csv"), result_rows)
    write_csv(os.path.join(HERE, "results_intervals.csv"), interval_rows)
    write_csv(os.path.join(HERE, "results_history.csv"), hist_rows)
    print(f"source {REPO}@{sha}: {len(exp_rows)} experiments, {len(result_rows)} results, "
          f"{len(interval_rows)} interval records, {len(hist_rows)} result versions")


if __name__ == "__main__":
    main(*sys.argv[1:])
