"""PEFT configuration: shorthand flags or a peft ``adapter_config.json`` → :class:`PeftSpec`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from simcost.errors import SimcostError, unknown

# peft's PeftType names -> simcost method names
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt",
              "LN_TUNING": "ln_tuning"}


@dataclass(frozen=True)
class PeftSpec:
    method: str = "full"
    r: int = 8
    alpha: float = 8
    targets: tuple[str, ...] | str | None = None   # None = peft's default for the architecture
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    bias: str = "none"                 # LoRA: none | all | lora_only
    layers: tuple[int, ...] | None = None          # layers_to_transform
    num_virtual_tokens: int = 20
    feedforward_modules: tuple[str, ...] | str | None = None   # (IA)³
    modules_to_save: tuple[str, ...] = ()
    trainable_layers: int | None = None            # freeze: train only the last k blocks
    trainable_modules: tuple[str, ...] = ()        # freeze: train modules whose name matches
    adapter_dim: int = 64                           # serial (Houlsby) adapter bottleneck
    side_reduction: int = 8                         # LST: side network width = hidden / this
    adapter_dtype: str | None = None   # None: fp32 adapters on a 16-bit base (peft's autocast)
    extra: dict = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5) if self.rslora else self.alpha / self.r

    def with_(self, **kw) -> "PeftSpec":
        return replace(self, **kw)


def _tuple(v):
    if v is None or isinstance(v, str):
        return v
    return tuple(v)


def from_adapter_config(path: str) -> PeftSpec:
    """Read what ``PeftConfig.save_pretrained`` writes (the file or its directory)."""
    p = Path(path)
    file = p / "adapter_config.json" if p.is_dir() else p
    if not file.is_file():
        raise SimcostError(f"no adapter_config.json at '{path}'")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise SimcostError(f"malformed JSON in {file}: {e.msg} at line {e.lineno}") from None
    if not isinstance(cfg, dict):
        raise SimcostError(f"{file} is not a JSON object")
    return from_peft_dict(cfg, str(file))


def from_peft_dict(cfg: dict, where: str = "adapter config") -> PeftSpec:
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype not in PEFT_TYPES:
        raise unknown(f"peft_type in {where}", ptype or "(missing)", PEFT_TYPES)
    method = PEFT_TYPES[ptype]
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    kw = dict(targets=_tuple(cfg.get("target_modules")), layers=_tuple(layers),
              modules_to_save=tuple(cfg.get("modules_to_save") or ()))
    if method == "lora":
        if cfg.get("fan_in_fan_out"):
            pass  # only changes the weight layout, not the cost
        kw.update(r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
                  dropout=float(cfg.get("lora_dropout", 0.0)),
                  rslora=bool(cfg.get("use_rslora", False)), dora=bool(cfg.get("use_dora", False)),
                  bias=str(cfg.get("bias", "none")))
        if cfg.get("target_parameters"):
            raise SimcostError(f"{where}: LoRA target_parameters is not supported yet")
    elif method == "ia3":
        kw.update(feedforward_modules=_tuple(cfg.get("feedforward_modules")))
    elif method in ("prefix", "prompt"):
        kw.update(num_virtual_tokens=int(cfg.get("num_virtual_tokens", 20)))
        if method == "prefix" and cfg.get("prefix_projection"):
            raise SimcostError(f"{where}: prefix_projection=true is not supported yet")
    spec = PeftSpec(method=method, **kw)
    validate(spec)
    return spec


def validate(spec: PeftSpec) -> None:
    if spec.r <= 0:
        raise SimcostError(f"LoRA rank must be positive, got {spec.r}")
    if not 0 <= spec.dropout < 1:
        raise SimcostError(f"dropout must be in [0, 1), got {spec.dropout}")
    if spec.num_virtual_tokens <= 0:
        raise SimcostError(f"num_virtual_tokens must be positive, got {spec.num_virtual_tokens}")
    if spec.bias not in ("none", "all", "lora_only"):
        raise SimcostError(f"LoRA bias must be none, all or lora_only, got '{spec.bias}'")
    if spec.adapter_dim <= 0:
        raise SimcostError(f"adapter bottleneck must be positive, got {spec.adapter_dim}")
    if spec.side_reduction < 1:
        raise SimcostError(f"LST reduction must be >= 1, got {spec.side_reduction}")
    if spec.trainable_layers is not None and spec.trainable_layers < 0:
        raise SimcostError(f"trainable layers must be >= 0, got {spec.trainable_layers}")


def to_peft_dict(spec: PeftSpec, default_targets) -> dict | None:
    """The peft config dict equivalent to ``spec`` (for the torch harness), or None when the
    method is not a peft tuner (full, freeze, bitfit are applied by requires_grad)."""
    targets = spec.targets if spec.targets is not None else default_targets
    targets = targets if isinstance(targets, str) or targets is None else list(targets)
    common = {"task_type": "CAUSAL_LM"}
    if spec.layers is not None:
        common["layers_to_transform"] = list(spec.layers)
    if spec.modules_to_save:
        common["modules_to_save"] = list(spec.modules_to_save)
    if spec.method in ("lora", "dora"):
        return {"peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha,
                "target_modules": targets, "lora_dropout": spec.dropout,
                "use_rslora": spec.rslora, "use_dora": spec.dora or spec.method == "dora",
                "bias": spec.bias, **common}
    if spec.method == "ia3":
        ff = spec.feedforward_modules
        d = {"peft_type": "IA3", "target_modules": targets, **common}
        if ff is not None:
            d["feedforward_modules"] = ff if isinstance(ff, str) else list(ff)
        return d
    if spec.method == "prefix":
        return {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": spec.num_virtual_tokens,
                "task_type": "CAUSAL_LM"}
    if spec.method == "prompt":
        return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": spec.num_virtual_tokens,
                "task_type": "CAUSAL_LM"}
    if spec.method == "ln_tuning":
        d = {"peft_type": "LN_TUNING", "task_type": "CAUSAL_LM"}
        if spec.targets is not None:
            d["target_modules"] = targets
        return d
    return None
