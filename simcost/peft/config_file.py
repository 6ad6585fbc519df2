"""peft's ``adapter_config.json``, read with peft 0.21's field types and rules.

One pydantic model per supported tuner (LORA, IA3, LN_TUNING, PREFIX_TUNING, PROMPT_TUNING)
checks every value: a bad one is one :class:`SimcostError` line naming the key and the value.
Keys are sorted into three kinds:
- read: they decide what trains and what a step computes (r, target_modules, rank_pattern, ...);
- ignored, with the reason in ``IGNORED``: they do not change the cost of a training step
  (metadata ``save_pretrained`` always writes, weight layout, initialisation);
- refused when set (``REFUSED``): they change the cost in a way simcost does not model.
A key no peft config has is ignored with a warning, as peft itself does (it drops unknown
keys with a warning, for configs written by a newer peft).

Returns plain keyword arguments for :class:`~simcost.peft.spec.PeftSpec` (this module does
not import it, so spec.py can import this one).
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, \
    field_validator

from simcost.errors import SimcostError, unknown
from simcost.peft.targeting import printable
from simcost.request.fields import MAX_RANK, MAX_VIRTUAL_TOKENS, int_like

# peft's PeftType names -> simcost method names
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt",
              "LN_TUNING": "ln_tuning"}
MAX_LAYER = 10 ** 6

Rank = Annotated[int, Field(strict=True, ge=1, le=MAX_RANK)]
Number = Annotated[float, Field(strict=True, ge=0, allow_inf_nan=False)]   # alphas: finite, >= 0
Dropout = Annotated[float, Field(strict=True, ge=0, lt=1, allow_inf_nan=False)]
OptPosInt = Annotated[int, Field(strict=True, ge=1)] | None

# keys that do not change a training step's cost, and why simcost does not read them
IGNORED = {
    "task_type": "simcost prices a causal LM (other task types are warned about)",
    "auto_mapping": "metadata", "peft_version": "metadata", "revision": "metadata",
    "base_model_name_or_path": "metadata: the model is given by --model",
    "inference_mode": "save_pretrained always writes true; training loads with is_trainable",
    "fan_in_fan_out": "weight layout only (peft sets it for GPT-2's Conv1D itself)",
    "init_lora_weights": "initialisation only", "init_ia3_weights": "initialisation only",
    "loftq_config": "initialisation only", "eva_config": "initialisation only",
    "corda_config": "initialisation only", "lora_ga_config": "initialisation only",
    "runtime_config": "loading only", "megatron_core": "used only with megatron_config",
    "qalora_group_size": "used only with use_qalora",
    "ensure_weight_tying": "matters only for LoRA on tied embeddings, which simcost refuses",
    "token_dim": "peft fills it from the base model", "num_layers": "peft fills it from the base model",
    "num_attention_heads": "peft fills it from the base model",
    "num_transformer_submodules": "peft fills it from the base model",
    "encoder_hidden_size": "used only with prefix_projection",
    "init_weights": "initialisation only", "prompt_tuning_init": "initialisation only",
    "prompt_tuning_init_text": "initialisation only", "tokenizer_name_or_path": "initialisation only",
    "tokenizer_kwargs": "initialisation only",
}
# keys that change the cost in ways simcost does not model: refused unless unset/false
REFUSED = {
    "target_parameters": "LoRA target_parameters", "lora_bias": "lora_bias (a bias on lora_B)",
    "use_qalora": "QA-LoRA (use_qalora)", "megatron_config": "Megatron parallel LoRA layers",
    "trainable_token_indices": "trainable_token_indices", "layer_replication": "layer_replication",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
    "arrow_config": "Arrow routing", "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "prefix_projection": "prefix_projection=true",
}


def _names(v, *, allow_str: bool = True):
    """A peft name field: a str (a regex, matched in full) or a list of str."""
    if v is None:
        return None
    if isinstance(v, str):
        if not allow_str:
            raise ValueError("must be a list of module names, not a string")
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"is not a valid regular expression ({e})") from None
        return v
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(dict.fromkeys(v))
    raise ValueError("must be a string (a regex) or a list of strings" if allow_str
                     else "must be a list of strings")


def _patterns(v):
    if not isinstance(v, dict):
        raise ValueError("must be an object mapping module-name patterns to values")
    for k in v:
        try:
            re.compile(rf"(.*\.)?({k})$")
        except re.error as e:
            raise ValueError(f"key '{printable(k, 40)}' is not a valid regular expression ({e})") \
                from None
    return v


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    peft_type: Any = None
    task_type: StrictStr | None = None
    inference_mode: StrictBool = False
    modules_to_save: Any = ()

    @field_validator("*", mode="before")
    @classmethod
    def _ints(cls, v):
        return int_like(v)

    @field_validator("modules_to_save")
    @classmethod
    def _save(cls, v):
        return _names(v, allow_str=False) or ()


class _Targets(_Base):
    target_modules: Any = None
    exclude_modules: Any = None

    @field_validator("target_modules", "exclude_modules")
    @classmethod
    def _name_fields(cls, v):
        return _names(v)


def _layers(v):
    """peft's layers_to_transform: an int or a list of ints (layer indices)."""
    if v is None:
        return None
    items = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(items, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                              for x in items):
        raise ValueError("must be a layer index or a list of layer indices")
    if any(not 0 <= x <= MAX_LAYER for x in items):
        raise ValueError(f"must be layer indices in [0, {MAX_LAYER}]")
    return tuple(sorted(set(items)))


class LoraFile(_Targets):
    r: Rank = 8
    lora_alpha: Number = 8
    lora_dropout: Dropout = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: StrictBool = False
    use_dora: StrictBool = False
    fan_in_fan_out: StrictBool = False
    init_lora_weights: StrictBool | StrictStr = True
    layers_to_transform: Any = None
    layers_pattern: Any = None
    rank_pattern: dict[StrictStr, Rank] = {}
    alpha_pattern: dict[StrictStr, Number] = {}

    @field_validator("layers_pattern")
    @classmethod
    def _lp(cls, v):
        return _names(v)

    @field_validator("layers_to_transform")
    @classmethod
    def _lt(cls, v):
        return _layers(v)

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _pat(cls, v):
        return _patterns({} if v is None else v)


class IA3File(_Targets):
    feedforward_modules: Any = None
    fan_in_fan_out: StrictBool = False

    @field_validator("feedforward_modules")
    @classmethod
    def _ff(cls, v):
        return _names(v)


class LnFile(_Targets):
    pass


class PromptFile(_Base):
    num_virtual_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_VIRTUAL_TOKENS)]
    token_dim: OptPosInt = None
    num_transformer_submodules: OptPosInt = None
    num_attention_heads: OptPosInt = None
    num_layers: OptPosInt = None
    prefix_projection: StrictBool = False


SCHEMAS = {"lora": LoraFile, "ia3": IA3File, "ln_tuning": LnFile, "prefix": PromptFile,
           "prompt": PromptFile}


def _shown(v) -> str:
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _describe(e: ValidationError, where: str) -> str:
    err = e.errors()[0]
    loc = err["loc"]
    key = str(loc[0]) if loc else "value"
    if key in ("rank_pattern", "alpha_pattern") and len(loc) > 1:
        key += f"[{loc[1]!r}]"
    msg = err["msg"]
    for a, b in (("Input should be ", "must be "), ("Value error, ", ""),
                 ("Field required", "is required")):
        msg = msg.replace(a, b)
    got = err.get("input")
    tail = "" if err["type"] == "missing" else f", got {_shown(got)}"
    return f"{where}: {key} {msg}{tail}"


def uncovered(cfg) -> str | None:
    """Why the hand-built graphs cannot express this adapter config (a tuner or an option
    they do not model; the traced front end runs peft itself), or None when they can."""
    if not isinstance(cfg, dict):
        return None
    ptype = cfg.get("peft_type")
    name = ptype.upper() if isinstance(ptype, str) else None
    if name is not None and name not in PEFT_TYPES:
        return f"peft_type {name}"
    for key, what in REFUSED.items():
        if cfg.get(key) not in (None, False, [], {}):
            return what
    return None


def method_of(cfg: dict, where: str) -> str:
    ptype = cfg.get("peft_type")
    name = ptype.upper() if isinstance(ptype, str) else ("(missing)" if ptype is None else _shown(ptype))
    if name not in PEFT_TYPES:
        raise unknown(f"peft_type in {where}", printable(name, 40), PEFT_TYPES)
    return PEFT_TYPES[name]


def parse(cfg: dict, where: str) -> tuple[str, dict, list[str]]:
    """(method, PeftSpec keyword arguments, warnings) for a peft config dict."""
    where = printable(where, 200)
    if not isinstance(cfg, dict):
        raise SimcostError(f"{where} is not a JSON object")
    method = method_of(cfg, where)
    schema = SCHEMAS[method]
    try:
        f = schema(**{k: v for k, v in cfg.items() if k in schema.model_fields})
    except ValidationError as e:
        raise SimcostError(_describe(e, where)) from None
    for key, what in REFUSED.items():
        v = cfg.get(key)
        if v not in (None, False, [], {}):
            raise SimcostError(f"{where}: {what} is not supported yet ({key}: {_shown(v)})")
    warns = _warnings(cfg, f, schema, where)
    kw: dict[str, Any] = dict(modules_to_save=f.modules_to_save)
    if method in ("prefix", "prompt"):
        kw["num_virtual_tokens"] = f.num_virtual_tokens
        return method, kw, warns
    t = f.target_modules
    if t == ():
        raise SimcostError(f"{where}: target_modules is empty (peft adapts nothing)")
    kw.update(targets="all-linear" if isinstance(t, str) and t.lower() == "all-linear" else t,
              exclude=f.exclude_modules)
    if method == "lora":
        kw.update(_lora(f, where))
    elif method == "ia3":
        kw.update(_ia3(f, where))
    return method, kw, warns


def _lora(f: LoraFile, where: str) -> dict:
    layers = f.layers_to_transform or None          # peft: an empty list restricts nothing
    restricted = f.layers_to_transform is not None or f.layers_pattern is not None
    if isinstance(f.target_modules, str) and restricted:
        raise SimcostError(f"{where}: layers_to_transform and layers_pattern cannot be used when "
                           f"target_modules is a string ({_shown(f.target_modules)}); peft refuses it")
    if f.layers_pattern and f.layers_to_transform is None:
        raise SimcostError(f"{where}: layers_pattern needs layers_to_transform (peft refuses it alone)")
    lp = f.layers_pattern
    return dict(r=f.r, alpha=float(f.lora_alpha), dropout=float(f.lora_dropout),
                rslora=f.use_rslora, dora=f.use_dora, bias=f.bias, layers=layers,
                layers_pattern=lp if lp else None,
                rank_pattern=tuple(f.rank_pattern.items()),
                alpha_pattern=tuple((k, float(v)) for k, v in f.alpha_pattern.items()))


def _ia3(f: IA3File, where: str) -> dict:
    ff, t = f.feedforward_modules, f.target_modules
    if isinstance(ff, tuple) and isinstance(t, tuple) and not set(ff) <= set(t):
        raise SimcostError(f"{where}: feedforward_modules {_shown(list(ff))} must be a subset "
                           f"of target_modules {_shown(list(t))} (peft refuses it)")
    return dict(feedforward_modules=ff)


def _warnings(cfg: dict, f, schema, where: str) -> list[str]:
    warns = []
    known = set(schema.model_fields) | set(IGNORED) | set(REFUSED)
    extra = sorted(printable(str(k), 40) for k in cfg if k not in known)
    if extra:
        more = f" and {len(extra) - 8} more" if len(extra) > 8 else ""
        warns.append(f"{where}: ignored keys {', '.join(extra[:8])}{more} (no peft "
                     f"{schema.__name__[:-4]} config has them; peft ignores them too)")
    if f.task_type not in (None, "CAUSAL_LM"):
        warns.append(f"{where}: task_type {printable(f.task_type, 40)} ignored: simcost prices "
                     f"a causal-LM step")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower() != "gaussian":
        warns.append(f"{where}: init_lora_weights '{printable(init, 40)}' changes the "
                     f"initialisation only; its one-off preprocessing is not priced")
    return warns
