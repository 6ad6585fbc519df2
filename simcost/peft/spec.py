"""PEFT configuration: shorthand flags or a peft ``adapter_config.json`` → :class:`PeftSpec`."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path

from simcost.errors import SimcostError
from simcost.jsonio import read_json
from simcost.peft.config_file import parse
from simcost.request.fields import MAX_RANK


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
    layers_pattern: tuple[str, ...] | str | None = None   # peft layers_pattern
    exclude: tuple[str, ...] | str | None = None          # peft exclude_modules
    rank_pattern: tuple[tuple[str, int], ...] = ()        # (regex key, r), the file's order
    alpha_pattern: tuple[tuple[str, float], ...] = ()     # (regex key, lora_alpha): scaling only
    warnings: tuple[str, ...] = ()     # what the adapter config reader ignored, one line each

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r ** 0.5) if self.rslora else self.alpha / self.r

    def with_(self, **kw) -> "PeftSpec":
        return replace(self, **kw)


MAX_CONFIG_BYTES = 16 * 2 ** 20   # an adapter_config.json is a few kB


def read_adapter_config(path: str) -> tuple[object, str]:
    """(the JSON value, the file's path) of what ``PeftConfig.save_pretrained`` writes (the
    file or its directory)."""
    try:
        p = Path(path)
        file = p / "adapter_config.json" if p.is_dir() else p
        ok = file.is_file()
    except (TypeError, ValueError, OSError):
        raise SimcostError(f"--peft-config: not a usable path: {path!r}") from None
    if not ok:
        raise SimcostError(f"no adapter_config.json at '{path}'")
    return read_json(file, "adapter config", MAX_CONFIG_BYTES), str(file)


def from_adapter_config(path: str) -> PeftSpec:
    """Read what ``PeftConfig.save_pretrained`` writes (the file or its directory)."""
    cfg, file = read_adapter_config(path)
    return from_peft_dict(cfg, file)


def from_peft_dict(cfg: dict, where: str = "adapter config") -> PeftSpec:
    """A peft config dict (what ``adapter_config.json`` holds) as a :class:`PeftSpec`, with
    peft 0.21's semantics (see :mod:`simcost.peft.config_file`); bad input is one
    :class:`SimcostError` line."""
    method, kw, warns = parse(cfg, where)
    spec = PeftSpec(method=method, warnings=tuple(warns), **kw)
    validate(spec)
    return spec


def validate(spec: PeftSpec) -> None:
    if not isinstance(spec.r, numbers.Integral) or isinstance(spec.r, bool):
        raise SimcostError(f"LoRA rank must be an integer, got {spec.r!r}")
    if spec.r <= 0:
        raise SimcostError(f"LoRA rank must be positive, got {spec.r}")
    if spec.r > MAX_RANK:
        raise SimcostError(f"LoRA rank must be at most {MAX_RANK}, got {spec.r}")
    if not isinstance(spec.alpha, numbers.Real) or not math.isfinite(spec.alpha):
        raise SimcostError(f"LoRA alpha must be a finite number, got {spec.alpha}")
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
    for key, r in spec.rank_pattern:
        if not isinstance(r, numbers.Integral) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
            raise SimcostError(f"rank_pattern['{key}'] must be an integer in [1, {MAX_RANK}], got {r}")


def to_peft_dict(spec: PeftSpec, default_targets) -> dict | None:
    """The peft config dict equivalent to ``spec`` (for the torch harness), or None when the
    method is not a peft tuner (full, freeze, bitfit are applied by requires_grad)."""
    targets = spec.targets if spec.targets is not None else default_targets
    targets = targets if isinstance(targets, str) or targets is None else list(targets)
    common = {"task_type": "CAUSAL_LM"}
    if spec.modules_to_save:
        common["modules_to_save"] = list(spec.modules_to_save)
    if spec.exclude is not None:
        common["exclude_modules"] = _jsonable(spec.exclude)
    if spec.method in ("lora", "dora"):
        d = {"peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha,
             "target_modules": targets, "lora_dropout": spec.dropout,
             "use_rslora": spec.rslora, "use_dora": spec.dora or spec.method == "dora",
             "bias": spec.bias, **common}
        if spec.layers is not None:
            d["layers_to_transform"] = list(spec.layers)
        if spec.layers_pattern is not None:
            d["layers_pattern"] = _jsonable(spec.layers_pattern)
        if spec.rank_pattern:
            d["rank_pattern"] = dict(spec.rank_pattern)
        if spec.alpha_pattern:
            d["alpha_pattern"] = dict(spec.alpha_pattern)
        return d
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


def _jsonable(v):
    return v if isinstance(v, str) or v is None else list(v)
