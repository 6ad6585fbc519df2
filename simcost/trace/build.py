"""Build a model from its config on the meta device, apply peft, and trace one training step
(needs the torch extra).

The task head comes from the config's ``architectures``; the inputs and the loss are the ones
the Hugging Face model computes from ``labels``:

| task (class suffix)             | inputs (symbolic sizes)                          |
|---------------------------------|--------------------------------------------------|
| ForCausalLM                     | input_ids, labels (batch, seq)                   |
| ForMaskedLM                     | input_ids, labels (batch, seq)                   |
| ForSequenceClassification       | input_ids (batch, seq), labels (batch)           |
| ForConditionalGeneration (T5…)  | input_ids (batch, seq), labels (batch, target_seq) |
| ForImageClassification          | pixel_values (batch, channels, image, image), labels (batch) |

Causal LMs also get ``shift_labels`` (the labels shifted by one, as the HF loss makes them):
the loss is the same, and torch's padding kernel, which needs a concrete batch size, is not
run on the symbolic labels.
"""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.trace.layers import reduce_depth
from simcost.trace.record import Trace, count_params, fakeify, trace_step

TASKS = ("ForCausalLM", "ForMaskedLM", "ForSequenceClassification", "ForConditionalGeneration",
         "ForImageClassification")
TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _require_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as e:
        raise SimcostError(f"the traced front end needs the torch extra ({e.name} is missing): "
                           f"pip install torch==2.13.0 && pip install 'simcost[torch]'") from None


def task_of(cfg: dict) -> tuple[str, str]:
    """(architecture class name, task suffix) from the config's ``architectures``."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else ""
    for t in TASKS:
        if arch.endswith(t):
            return arch, t
    raise SimcostError(f"architecture '{arch or cfg.get('model_type')}': the traced front end "
                       f"builds the tasks {', '.join(TASKS)} from a config's architectures")


def build_model(cfg: dict, peft_config: dict | None, dtype: str = "bf16", device: str = "meta"):
    """The peft-wrapped model on ``device`` (meta: no memory; cpu: random weights, for
    checking a trace against a real step)."""
    _require_torch()
    import torch
    import transformers
    arch, _ = task_of(cfg)
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise SimcostError(f"transformers {transformers.__version__} has no class '{arch}'")
    body = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "dtype")}
    try:
        config = transformers.AutoConfig.for_model(**body)
    except (ValueError, KeyError, TypeError) as e:
        raise SimcostError(f"transformers cannot read this config: {e}") from None
    config.architectures = [arch]
    config._attn_implementation = "sdpa"
    if device != "meta":
        torch.manual_seed(0)
    with torch.device(device):
        try:
            model = cls(config).to(getattr(torch, TORCH_DTYPE[dtype]))
        except Exception as e:  # noqa: BLE001 -- any build error is the config's
            raise SimcostError(f"torch cannot build {arch} from this config: "
                               f"{type(e).__name__}: {e}") from None
    if peft_config:
        model = apply_peft(model, peft_config)
    return model


def apply_peft(model, peft_config: dict):
    """Apply an adapter config exactly as peft does (``get_peft_config`` + ``get_peft_model``)."""
    import peft

    from simcost.trace.workarounds import building
    try:
        pcfg = peft.get_peft_config(dict(peft_config))
        with building():
            return peft.get_peft_model(model, pcfg)
    except Exception as e:  # noqa: BLE001 -- peft's refusal, whatever its type
        raise SimcostError(f"peft refuses this adapter config: {type(e).__name__}: {e}") from None


PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
TASK_IDS = ("MULTITASK_PROMPT_TUNING", "POLY")       # peft's forward needs task_ids


def input_maker(cfg: dict, task: str, peft_type: str | None = None):
    """``make(sizes) -> inputs``: the task's input tensors from symbolic sizes. Prompt-learning
    methods lengthen the sequence inside peft (which pads ``labels`` but not ``shift_labels``),
    so they get no ``shift_labels``."""
    import torch
    long = torch.long

    def lm(s):
        ids = torch.zeros(s["batch"], s["seq"], dtype=long)
        out = {"input_ids": ids, "labels": torch.zeros(s["batch"], s["seq"], dtype=long)}
        if task == "ForCausalLM" and (peft_type or "").upper() not in PROMPT_LEARNING:
            out["shift_labels"] = torch.zeros(s["batch"], s["seq"], dtype=long)
        return out

    def cls(s):
        return {"input_ids": torch.zeros(s["batch"], s["seq"], dtype=long),
                "labels": torch.zeros(s["batch"], dtype=long)}

    def s2s(s):
        return {"input_ids": torch.zeros(s["batch"], s["seq"], dtype=long),
                "labels": torch.zeros(s["batch"], s["target_seq"], dtype=long)}

    def img(s):
        ch = int(cfg.get("num_channels", 3))
        return {"pixel_values": torch.zeros(s["batch"], ch, s["image"], s["image"]),
                "labels": torch.zeros(s["batch"], dtype=long)}

    make = {"ForCausalLM": lm, "ForMaskedLM": lm, "ForSequenceClassification": cls,
            "ForConditionalGeneration": s2s, "ForImageClassification": img}[task]
    if (peft_type or "").upper() in TASK_IDS:      # one task id per example (task 0)
        return lambda s: {**make(s), "task_ids": torch.zeros(s["batch"], dtype=long)}
    return make


def dims_of(task: str) -> tuple[str, ...]:
    return {"ForConditionalGeneration": ("batch", "seq", "target_seq"),
            "ForImageClassification": ("batch", "image")}.get(task, ("batch", "seq"))


def trace_config(cfg: dict, peft_config: dict | None = None, *, dtype: str = "bf16",
                 hints: dict, reduce: bool = True) -> Trace:
    """Trace one training step of the config's model with the adapter config applied.
    ``hints``: the sizes the trace follows where model code branches (the request's own).
    ``reduce``: trace one layer of each kind and count the rest
    (:mod:`simcost.trace.layers`); False traces every layer."""
    _require_torch()
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    if dtype not in TORCH_DTYPE:
        raise SimcostError(f"traced dtype '{dtype}'; valid: {', '.join(TORCH_DTYPE)}")
    _, task = task_of(cfg)
    need = dims_of(task)
    missing = [d for d in need if d not in hints]
    if missing:
        raise SimcostError(f"a {task} model needs the sizes {', '.join(need)}; "
                           f"missing: {', '.join(missing)}")
    model = build_model(cfg, peft_config, dtype)
    model.train()
    params = count_params(model)
    counts = reduce_depth(model) if reduce else None
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)   # peft's prompt ids
    fakeify(model, mode)
    return trace_step(model, input_maker(cfg, task, (peft_config or {}).get("peft_type")), {d: hints[d] for d in need}, env, mode,
                      static=("image",) if task == "ForImageClassification" else (),
                      counts=counts, params=params)
