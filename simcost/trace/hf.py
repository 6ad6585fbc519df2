"""Hugging Face ``config.json`` tasks for the traced front end (torch imported lazily).

The task head comes from the config's ``architectures``; the inputs and the loss are the ones
the Hugging Face model computes from ``labels``:

| task (class suffix)             | inputs (symbolic sizes)                          |
|---------------------------------|--------------------------------------------------|
| ForCausalLM, LMHeadModel        | input_ids, labels (batch, seq)                   |
| ForMaskedLM                     | input_ids, labels (batch, seq)                   |
| ForSequenceClassification       | input_ids (batch, seq), labels (batch)           |
| ForConditionalGeneration (T5…)  | input_ids (batch, seq), labels (batch, target_seq) |
| ForImageClassification          | pixel_values (batch, channels, image, image), labels (batch) |

Causal LMs also get ``shift_labels`` (the labels shifted by one, as the HF loss makes them):
the loss is the same, and torch's padding kernel, which needs a concrete batch size, is not
run on the symbolic labels. Prompt-learning methods lengthen the sequence inside peft (which
pads ``labels`` but not ``shift_labels``), so they get no ``shift_labels``.
"""
from __future__ import annotations

import json

from simcost.errors import SimcostError
from simcost.trace.task import TEXT_DIMS, TORCH_DTYPE, TracedTask, weights_dtype_inputs

# class-name suffix -> task kind
TASKS = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForMaskedLM": "masked-lm",
         "ForSequenceClassification": "seq-cls", "ForConditionalGeneration": "seq2seq",
         "ForImageClassification": "image-cls"}
DIMS = {"seq2seq": ("batch", "seq", "target_seq"), "image-cls": ("batch", "image"),
        "speech-seq2seq": ("batch", "target_seq")}
PROMPT_LEARNING = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")


def task_of(cfg: dict) -> tuple[str, str]:
    """(architecture class name, task kind) from the config's ``architectures``; a config
    naming none (deberta-v3-base's) gets its model type's masked-LM head, else its causal-LM
    head, as transformers' auto classes map them."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else _default_head(cfg)
    arch = DUAL_ENCODERS.get(arch, arch)
    if arch in SPEECH:
        return arch, "speech-seq2seq"
    for suffix, kind in TASKS.items():
        if arch.endswith(suffix):
            if kind == "seq2seq" and not _encoder_decoder(cfg):
                # a decoder-only vision-language model (LLaVA, Gemma 3): its language step
                return arch, "causal-lm"
            return arch, kind
    raise SimcostError(f"architecture '{arch or cfg.get('model_type')}': the traced front end "
                       f"builds the heads {', '.join(TASKS)} from a config's architectures")


# encoder-decoders whose encoder reads log-mel features, not tokens
SPEECH = ("WhisperForConditionalGeneration",)
# contrastive image-text models, fine-tuned as their vision tower with a classifier (the class
# transformers ships for that, reading the same config)
DUAL_ENCODERS = {"CLIPModel": "CLIPForImageClassification",
                 "SiglipModel": "SiglipForImageClassification"}


def _encoder_decoder(cfg: dict) -> bool:
    """Whether the config's model type is an encoder-decoder (its config class says so)."""
    import transformers
    try:
        cls = transformers.AutoConfig.for_model(cfg.get("model_type", "")).__class__
    except (ValueError, KeyError):
        return bool(cfg.get("is_encoder_decoder"))
    return bool(cfg.get("is_encoder_decoder", getattr(cls(), "is_encoder_decoder", False)))


def _default_head(cfg: dict) -> str:
    from transformers.models.auto import modeling_auto as auto
    mt = cfg.get("model_type")
    return (auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(mt)
            or auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt) or "")


def hf_task(cfg: dict, name: str = "model") -> TracedTask:
    arch, kind = task_of(cfg)
    dims = DIMS.get(kind, TEXT_DIMS)
    defaults = {}
    if kind == "image-cls":
        img = cfg.get("image_size") or (cfg.get("vision_config") or {}).get("image_size")
        if isinstance(img, (list, tuple)):
            img = img[0]
        if img:
            defaults["image"] = int(img)
    if kind == "seq2seq":
        defaults["target_seq"] = "seq"       # the request's --seq when not given
    max_pos = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    learned = cfg.get("model_type") in ("gpt2", "bert", "roberta", "deberta-v2", "vit",
                                        "bart", "whisper", "clip_vision_model", "opt")
    built = {}                    # the dtype of the last build: float inputs follow it

    def build(dtype, device):
        built["dtype"] = dtype
        return build_hf(cfg, arch, dtype, device)

    return TracedTask(name=name, kind=kind, dims=dims, build=build,
                      inputs=lambda sizes, peft_type: hf_inputs(cfg, kind, sizes, peft_type,
                                                                built.get("dtype")),
                      key=json.dumps(cfg, sort_keys=True, default=str),
                      static=("image",) if kind == "image-cls" else (),
                      defaults={k: v for k, v in defaults.items() if v is not None},
                      max_positions=int(max_pos) if isinstance(max_pos, int) else None,
                      learned_positions=learned, model_type=cfg.get("model_type"))


def build_hf(cfg: dict, arch: str, dtype: str, device: str):
    """The base model on ``device`` (meta: no memory; cpu: random weights)."""
    import torch
    import transformers
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise SimcostError(f"transformers {transformers.__version__} has no class '{arch}'")
    body = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "dtype")}
    try:
        config = transformers.AutoConfig.for_model(**body)
    except (ValueError, KeyError, TypeError) as e:
        raise SimcostError(f"transformers cannot read this config: {e}") from None
    config.architectures = [arch]
    if device != "meta":
        torch.manual_seed(0)
    for impl in ("sdpa", "eager"):   # eager where transformers has no SDPA path (Gemma 2)
        config._attn_implementation = impl
        with torch.device(device):
            try:
                return cls(config).to(getattr(torch, TORCH_DTYPE[dtype]))
            except ValueError as e:
                if impl == "sdpa" and "scaled_dot_product_attention" in str(e):
                    continue
                raise SimcostError(f"torch cannot build {arch} from this config: "
                                   f"{type(e).__name__}: {' '.join(str(e).split())}") from None
            except Exception as e:  # noqa: BLE001 -- any build error is the config's
                raise SimcostError(f"torch cannot build {arch} from this config: "
                                   f"{type(e).__name__}: {' '.join(str(e).split())}") from None


TASK_IDS = ("MULTITASK_PROMPT_TUNING", "POLY")       # peft's forward needs task_ids


def hf_inputs(cfg: dict, kind: str, s: dict, peft_type: str | None,
              dtype: str | None = None) -> dict:
    """The task's input tensors from (symbolic) sizes, floating ones in the weights' dtype
    (Whisper's features: the model does not cast them); methods whose forward needs
    ``task_ids`` get one per example (task 0)."""
    import torch
    out = weights_dtype_inputs(_inputs(cfg, kind, s, peft_type), dtype)
    if (peft_type or "").upper() in TASK_IDS:
        out["task_ids"] = torch.zeros(s["batch"], dtype=torch.long)
    return out


def _inputs(cfg: dict, kind: str, s: dict, peft_type: str | None) -> dict:
    import torch
    long = torch.long
    if kind in ("causal-lm", "masked-lm"):
        out = {"input_ids": torch.zeros(s["batch"], s["seq"], dtype=long),
               "labels": torch.zeros(s["batch"], s["seq"], dtype=long)}
        if kind == "causal-lm" and (peft_type or "").upper() not in PROMPT_LEARNING:
            out["shift_labels"] = torch.zeros(s["batch"], s["seq"], dtype=long)
        return out
    if kind == "seq-cls":
        return {"input_ids": torch.zeros(s["batch"], s["seq"], dtype=long),
                "labels": torch.zeros(s["batch"], dtype=long)}
    if kind == "seq2seq":
        return {"input_ids": torch.zeros(s["batch"], s["seq"], dtype=long),
                "labels": torch.zeros(s["batch"], s["target_seq"], dtype=long)}
    if kind == "speech-seq2seq":      # Whisper: 30 s of log-mel frames (2 per encoder position)
        frames = 2 * int(cfg.get("max_source_positions", 1500))
        return {"input_features": torch.zeros(s["batch"], int(cfg.get("num_mel_bins", 80)),
                                              frames),
                "labels": torch.zeros(s["batch"], s["target_seq"], dtype=long)}
    ch = int(cfg.get("num_channels") or (cfg.get("vision_config") or {}).get("num_channels", 3))
    return {"pixel_values": torch.zeros(s["batch"], ch, s["image"], s["image"]),
            "labels": torch.zeros(s["batch"], dtype=long)}
