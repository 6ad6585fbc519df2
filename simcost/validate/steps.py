"""``simcost validate steps``: predicted vs measured training-step time on the local device.

Runs real training steps of small HF models (random weights) wrapped by peft in torch, and
compares step, forward, backward and optimizer time, and the per-op-class breakdown, with
simcost's estimate from a (calibrated) profile. Writes Markdown + PNG plots + JSON.
"""
from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from simcost.peft.spec import PeftSpec
from simcost.validate.published.outdir import make_out_dir

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
         "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 8, "vocab_size": 8000, "max_position_embeddings": 1024}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 512,
         "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "vocab_size": 8000, "max_position_embeddings": 1024,
         "tie_word_embeddings": True}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 512, "n_layer": 4,
        "n_head": 8, "vocab_size": 8000, "n_positions": 1024}
MODELS = {"llama-512x4": LLAMA, "qwen2-512x4": QWEN2, "gpt2-512x4": GPT2}

LORA8 = PeftSpec("lora", r=8, alpha=16)
CASES = [
    ("llama-512x4", PeftSpec("full"), 4, 128),
    ("llama-512x4", LORA8, 4, 128),
    ("llama-512x4", PeftSpec("prefix", num_virtual_tokens=16), 4, 128),
    ("llama-512x4", PeftSpec("ia3"), 2, 256),
    ("llama-512x4", LORA8, 1, 512),
    ("llama-512x4", PeftSpec("full"), 8, 64),
    ("qwen2-512x4", PeftSpec("full"), 2, 256),
    ("qwen2-512x4", PeftSpec("lora", r=16, alpha=32, targets="all-linear"), 4, 128),
    ("qwen2-512x4", PeftSpec("ia3"), 8, 64),
    ("qwen2-512x4", PeftSpec("prompt", num_virtual_tokens=16), 4, 128),
    ("gpt2-512x4", PeftSpec("full"), 4, 128),
    ("gpt2-512x4", LORA8, 4, 128),
    ("gpt2-512x4", PeftSpec("prefix", num_virtual_tokens=16), 2, 256),
    ("gpt2-512x4", PeftSpec("ia3"), 2, 256),
]


@dataclass
class StepCase:
    model: str
    method: str
    batch: int
    seq: int
    predicted: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    @property
    def error(self) -> float:
        return self.predicted["step"] / self.measured["step"] - 1


def _label(spec: PeftSpec) -> str:
    if spec.method == "lora":
        t = "all" if spec.targets == "all-linear" else "qv"
        return f"lora-r{spec.r}-{t}"
    if spec.method in ("prefix", "prompt"):
        return f"{spec.method}-{spec.num_virtual_tokens}"
    return spec.method


def op_class(name: str) -> str:
    """Coarse class of a torch op or a simcost op kind, for the breakdown plot."""
    n = name.lower()
    if any(k in n for k in ("aten::mm", "aten::addmm", "aten::bmm", "linear", "matmul", "moe_experts")):
        return "matmul"
    if "scaled_dot_product" in n or n in ("sdpa",):
        return "attention"
    if any(k in n for k in ("adam", "lerp", "addcdiv", "addcmul", "_foreach", "optimizer")):
        return "optimizer"
    return "other"


def run_steps(profile: str, *, repeats: int = 5, warmup: int = 2, cases=None, progress=None):
    from simcost.api import estimate_train
    from simcost.models.config import spec_from_config
    from simcost.validate.exact import harness_peft
    from simcost.validate.torch_steps import time_steps

    out = []
    for name, spec, b, s in cases or CASES:
        cfg = MODELS[name]
        model = spec_from_config(cfg, name)
        est = estimate_train(model, profile, batch=b, seq=s, peft=spec, dtype="fp32", attn="sdpa",
                             optimizer="adamw")
        m = time_steps(cfg, harness_peft(cfg, spec), batch=b, seq=s, dtype="fp32", attn="sdpa",
                       warmup=warmup, repeats=repeats)
        c = StepCase(name, _label(spec), b, s,
                     predicted={k: est.time_s[k] for k in ("step", "forward", "backward", "optimizer")},
                     measured={"step": m.median_s, "forward": m.forward_s, "backward": m.backward_s,
                               "optimizer": m.optimizer_s, "min": m.min_s, "max": m.max_s,
                               "spread": (m.max_s - m.min_s) / m.median_s, "threads": m.threads})
        out.append(c)
        if progress:
            progress(c)
    return out


def write_report(cases: list[StepCase], profile: str, out_dir: str, title: str) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    d = Path(out_dir)
    make_out_dir(d)
    errs = [abs(c.error) for c in cases]
    mape = 100 * statistics.fmean(errs)
    summary = {"title": title, "profile": profile, "mape_step_pct": mape, "allocator": allocator(),
               "max_abs_error_pct": 100 * max(errs), "cases": [asdict(c) for c in cases],
               "torch": torch.__version__, "python": platform.python_version(),
               "machine": platform.machine()}
    stem = d / "cpu_steps"
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=1))

    fig, ax = plt.subplots(figsize=(5.5, 5))
    meas = [c.measured["step"] for c in cases]
    pred = [c.predicted["step"] for c in cases]
    ax.errorbar(meas, pred, xerr=[[c.measured["step"] - c.measured["min"] for c in cases],
                                  [c.measured["max"] - c.measured["step"] for c in cases]],
                fmt="o", ms=4, capsize=2)
    lo, hi = min(meas + pred) * 0.8, max(meas + pred) * 1.2
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="0.9")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step time (s, median; bars min-max)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(f"{title}\nMAPE {mape:.1f} % over {len(cases)} cases (band: ±10 %)", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{stem}_pred_vs_meas.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{c.model}\n{c.method} {c.batch}x{c.seq}" for c in cases]
    x = range(len(cases))
    w = 0.38
    bottom_m = [0] * len(cases)
    bottom_p = [0] * len(cases)
    for phase, color in (("forward", "C0"), ("backward", "C1"), ("optimizer", "C2")):
        mv = [c.measured[phase] for c in cases]
        pv = [c.predicted[phase] for c in cases]
        ax.bar([i - w / 2 for i in x], mv, w, bottom=bottom_m, color=color, label=f"{phase} (measured)")
        ax.bar([i + w / 2 for i in x], pv, w, bottom=bottom_p, color=color, alpha=0.45, hatch="//",
               label=f"{phase} (predicted)")
        bottom_m = [a + b for a, b in zip(bottom_m, mv)]
        bottom_p = [a + b for a, b in zip(bottom_p, pv)]
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("seconds per step")
    ax.set_title("per-phase breakdown: measured (solid) vs predicted (hatched)", fontsize=9)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(f"{stem}_breakdown.png", dpi=120)
    plt.close(fig)

    rows = ["| model | method | batch x seq | measured s (min-max) | predicted s | error |",
            "|---|---|---|---|---|---|"]
    for c in cases:
        m = c.measured
        rows.append(f"| {c.model} | {c.method} | {c.batch}x{c.seq} | {m['step']:.3f} "
                    f"({m['min']:.3f}-{m['max']:.3f}) | {c.predicted['step']:.3f} | {100 * c.error:+.1f} % |")
    md = [f"# {title}", "", f"Profile: `{profile}`; torch {torch.__version__}; allocator "
          f"{allocator()}; "
          f"{len(cases)} cases; step-time MAPE **{mape:.1f} %** (max {100 * max(errs):.1f} %).", "",
          "A step = forward with loss, backward, AdamW step (torch default implementation), "
          "zero_grad(set_to_none=True); median of the timed steps after warm-up.", "",
          *rows, "", f"![predicted vs measured]({stem.name}_pred_vs_meas.png)", "",
          f"![breakdown]({stem.name}_breakdown.png)", ""]
    Path(f"{stem}.md").write_text("\n".join(md))
    return summary


TCMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
                  "/usr/lib/libtcmalloc_minimal.so.4")


def allocator() -> str:
    from simcost.hardware.host_allocator import detect
    return detect()


def _reexec_with_tcmalloc() -> None:
    """glibc returns large freed blocks to the OS and page-faults them back in the next step,
    which adds 2-20x to some kernels at random (validation_feasibility.md §5); measure with
    tcmalloc, as recommended there, by re-running this command with it preloaded."""
    import os
    import sys
    if allocator() == "tcmalloc":
        return
    lib = next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)
    if lib is None:
        return
    env = dict(os.environ, LD_PRELOAD=(lib + " " + os.environ.get("LD_PRELOAD", "")).strip())
    os.execve(sys.executable, [sys.executable, "-m", "simcost.cli", *sys.argv[1:]], env)


def run_cli(args) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from simcost.errors import SimcostError
    try:
        import torch
    except ImportError:
        raise SimcostError("simcost validate needs the torch extra") from None
    if args.allocator == "tcmalloc":
        _reexec_with_tcmalloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = args.hardware
    out_dir, keep = _out_dir(getattr(args, "out_dir", None))
    if profile is None:
        from types import SimpleNamespace

        from simcost.hardware.calibrate import run_cli as calibrate
        make_out_dir(out_dir)
        profile = str(out_dir / "calibrated-cpu.json")
        calibrate(SimpleNamespace(device="cpu", threads=args.threads, dtypes="fp32", base=None,
                                  out=profile))
    from simcost.hardware import load_profile
    load_profile(profile)
    cases = CASES[: args.limit] if args.limit else CASES
    with Progress(transient=True) as bar:
        task = bar.add_task("measuring steps", total=len(cases))
        res = run_steps(profile, repeats=args.repeats, cases=cases,
                        progress=lambda c: bar.advance(task))
    summary = write_report(res, profile, str(out_dir), "simcost vs measured CPU training steps")
    con = Console()
    for c in res:
        con.print(f"{c.model:12s} {c.method:16s} {c.batch}x{c.seq:<4d} measured "
                  f"{c.measured['step']:.3f} s (spread {100 * c.measured['spread']:.0f} %) "
                  f"predicted {c.predicted['step']:.3f} s  {100 * c.error:+.1f} %")
    con.print(f"step-time MAPE {summary['mape_step_pct']:.1f} % over {len(res)} cases; "
              + (f"report in {out_dir}/cpu_steps.md" if keep else "report files not kept"))
    return 0


def _out_dir(value: str | None) -> tuple[Path, bool]:
    """The folder for the report (and the calibrated profile) and whether it is kept:
    ``--out-dir``, else the checkout's validation/reports, else (an installed package) a
    temporary folder removed at exit, said in one line on stderr."""
    import atexit
    import shutil
    import sys
    import tempfile

    from simcost.validate.published.outdir import NOT_WRITTEN, resolve_out_dir
    out = resolve_out_dir(value)
    if out is not None:
        return out, True
    print(f"simcost: warning: {NOT_WRITTEN}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="simcost-steps-"))
    atexit.register(shutil.rmtree, tmp, True)
    return tmp, False
