"""``simcost validate exact``: simcost's graph against what torch really does.

For each case (architecture config x PEFT method x dtype x attention implementation) the same
HF model (random weights) is wrapped by peft and one training step is measured in torch
(:mod:`simcost.validate.torch_measure`); simcost's estimate must agree:
- trainable parameters: exactly; total parameters (with adapters): exactly;
- matmul FLOPs, forward and backward: within 0.01 % (they are exact in practice);
- saved activations: within 1 %.
The ``tiny`` suite runs small odd-sized configs for real on the CPU; the ``zoo`` suite builds
real-size zoo models on fake tensors (meta device → FakeTensorMode), so a 7B step costs seconds.
The ``traced`` suite checks the traced front end (:mod:`simcost.validate.traced`): encoders,
an encoder-decoder, a ViT and a decoder under peft's tuners, traced once with symbolic sizes and
compared with real CPU steps at other sizes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict

from simcost.models.config import load_config_dict, spec_from_config
from simcost.peft.base import LORA_DEFAULTS, model_type
from simcost.peft.spec import PeftSpec, to_peft_dict
from simcost import pipeline
from simcost.validate.cases import CaseResult

# small configs with odd sizes (so no dimension coincides with another)
TINY_CONFIGS: dict[str, dict] = {
    "llama-gqa": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                  "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "vocab_size": 101, "max_position_embeddings": 64},
    "llama-mha-bias": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                       "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
                       "num_attention_heads": 3, "num_key_value_heads": 3, "vocab_size": 97,
                       "max_position_embeddings": 64, "attention_bias": True, "mlp_bias": True},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "hidden_size": 64, "intermediate_size": 72, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 89,
                "max_position_embeddings": 64, "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
              "intermediate_size": 88, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 1, "vocab_size": 103, "max_position_embeddings": 64,
              "tie_word_embeddings": True},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 83,
                "max_position_embeddings": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 48,
             "n_layer": 2, "n_head": 4, "vocab_size": 91, "n_positions": 64},
}

METHODS: dict[str, PeftSpec] = {
    "full": PeftSpec("full"),
    "lora-qv": PeftSpec("lora", r=4, alpha=8),
    "lora-all": PeftSpec("lora", r=4, alpha=8, targets="all-linear"),
    "dora": PeftSpec("lora", r=4, alpha=8, dora=True),
    "ia3": PeftSpec("ia3"),
    "prefix": PeftSpec("prefix", num_virtual_tokens=3),
    "prompt": PeftSpec("prompt", num_virtual_tokens=3),
    "bitfit": PeftSpec("bitfit"),
}

ZOO_CASES = [(m, meth) for m in ("llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen2.5-7b",
                                 "mixtral-8x7b") for meth in ("full", "lora-qv")] + [
    ("mixtral-8x7b", "lora-all")]   # peft's LoRA on the router and fused expert parameters


def applicable(config: dict, method: str) -> str | None:
    """Why a case cannot run (None when it can)."""
    spec = spec_from_config(config)
    if method == "bitfit" and not (spec.attn_bias or spec.mlp_bias or spec.family == "gpt2"):
        return "model has no biases"
    return None


def harness_peft(config: dict, spec: PeftSpec):
    """What the torch side applies: a peft config dict, or a requires_grad selection."""
    m = spec_from_config(config)
    if spec.method == "full":
        return {"trainable_names": None}
    if spec.method == "bitfit":
        return {"trainable_names": [".bias"]}
    defaults = LORA_DEFAULTS.get(model_type(m)) if spec.method in ("lora", "dora") else None
    return to_peft_dict(spec, defaults)


def simcost_numbers(config: dict, spec: PeftSpec, batch: int, seq: int, dtype: str, attn: str) -> dict:
    model = spec_from_config(config)
    g, a = pipeline.build_graph(model, batch, seq, dtype=dtype, attn=attn, peft=spec)
    total = sum(p.numel * c for p, c in g.params())
    trainable = sum(p.numel * c for p, c in g.params() if p.trainable)
    return {"params_total": int(total), "params_trainable": int(trainable),
            "flops_matmul_forward": float(a.total("fwd_matmul_flops")),
            "flops_matmul_backward": float(a.total("bwd_act_matmul_flops") + a.total("bwd_weight_matmul_flops")),
            "activations_bytes": float(a.activations_bytes)}


def run_case(name: str, config: dict, method: str, dtype: str, attn: str, batch: int, seq: int,
             fake: bool) -> CaseResult:
    from simcost.validate.torch_measure import measure_step

    res = CaseResult(name, method, dtype, attn, batch, seq)
    why = applicable(config, method)
    if why:
        res.skipped = why
        return res
    spec = METHODS[method]
    t0 = time.perf_counter()
    res.simcost = simcost_numbers(config, spec, batch, seq, dtype, attn)
    m = measure_step(config, harness_peft(config, spec), batch=batch, seq=seq, dtype=dtype,
                     attn=attn, fake=fake)
    res.torch = {"params_total": m.params_total, "params_trainable": m.params_trainable,
                 "flops_matmul_forward": m.flops_matmul_forward,
                 "flops_matmul_backward": m.flops_matmul_backward,
                 "activations_bytes": m.activations_bytes}
    res.seconds = time.perf_counter() - t0
    res.ok = not res.mismatches()
    return res


def tiny_cases(attns=("eager", "sdpa"), dtypes=("fp32", "bf16")):
    for name, cfg in TINY_CONFIGS.items():
        for method in METHODS:
            for dt in dtypes:
                for at in attns:
                    yield name, cfg, method, dt, at, 2, 7, False


def zoo_cases(attns=("eager", "sdpa")):
    for name, method in ZOO_CASES:
        _, cfg = load_config_dict(name)
        for at in attns:
            yield name, cfg, method, "bf16", at, 1, 512, True


def suite_cases(suite: str) -> list:
    """The cases of a suite: 'tiny', 'zoo' or 'all'."""
    cases = []
    if suite in ("tiny", "all"):
        cases += list(tiny_cases())
    if suite in ("zoo", "all"):
        cases += list(zoo_cases())
    return cases


def run_cli(args) -> int:
    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    from simcost.errors import SimcostError
    import importlib.util
    if importlib.util.find_spec("torch") is None:
        raise SimcostError("simcost validate needs the torch extra: pip install torch==2.13.0 "
                           "'simcost[torch]'")
    results = [run_case(*c) for c in track(suite_cases(args.suite), description="validating",
                                           transient=True)]
    if args.suite in ("traced", "all"):
        from simcost.validate.traced import GAPS, run_traced_case, traced_cases
        results += [run_traced_case(*c) for c in track(list(traced_cases()),
                                                        description="traced", transient=True)]
        results += [CaseResult("any", tuner, "-", "-", 0, 0, skipped=f"not traced: {why}")
                    for tuner, why in GAPS.items()]
    t = Table(title=f"simcost vs torch ({args.suite})", header_style="bold")
    for col in ("model", "method", "dtype", "attn", "result"):
        t.add_column(col)
    for r in results:
        if r.skipped:
            verdict = f"[dim]n/a: {r.skipped}[/dim]"
        elif r.ok:
            verdict = "[green]exact[/green]"
        else:
            verdict = "[red]" + "; ".join(f"{k}: {s:,.0f} vs {v:,.0f}" for k, (s, v) in r.mismatches().items()) + "[/red]"
        t.add_row(r.model, r.method, r.dtype, r.attn, verdict)
    Console().print(t)
    ran = [r for r in results if not r.skipped]
    ok = sum(r.ok for r in ran)
    print(f"{ok} passed, {len(ran) - ok} failed, {len(results) - len(ran)} not applicable")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0 if ok == len(ran) else 1
