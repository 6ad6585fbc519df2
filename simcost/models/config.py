"""HF ``config.json`` → :class:`ModelSpec`, the architecture facts the graph builders need."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from simcost.errors import SimcostError, unknown
from simcost.jsonio import read_json_object
from simcost.paths import data_dir

ZOO_DIR = data_dir("models_zoo")

# architecture name -> family builder key
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "QWenLMHeadModel": "qwen",
    "GPT2LMHeadModel": "gpt2",
}
_MODEL_TYPE_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                    "qwen": "QWenLMHeadModel", "gpt2": "GPT2LMHeadModel"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    architecture: str
    family: str                 # llama | gpt2 | qwen
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int                    # per-branch FFN width (Qwen v1: intermediate_size / 2)
    vocab: int
    max_positions: int
    tie_embeddings: bool
    attn_bias: bool             # q/k/v biases
    o_bias: bool
    mlp_bias: bool
    act: str
    experts: int = 0
    top_k: int = 0
    dropout_embd: float = 0.0
    dropout_attn: float = 0.0
    dropout_resid: float = 0.0
    config: dict | None = None  # the raw config.json (for the torch harness)

    @property
    def learned_positions(self) -> bool:
        """Absolute position embeddings (a ``max_positions``-row table: longer inputs cannot
        run); otherwise rotary positions, computed for any length."""
        return self.family == "gpt2"

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim


def zoo_names() -> list[str]:
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "config.json").is_file())


def zoo_entry(name: str) -> dict:
    """One zoo model as stored: ``config`` (its raw ``config.json``), ``library`` (the one that
    builds it: ``"diffusers"`` where the file names a ``_class_name``, else ``"transformers"``),
    ``class_name`` (that ``_class_name``, or the file's first ``architectures`` entry; ``None``
    where the official file names none, as in ``deberta-v3-base``, built as the base model),
    ``model_type`` and ``frontend``: ``"analytic"`` where :data:`ARCHITECTURES` has a hand-built
    graph for it, else ``"traced"`` (the ``--frontend traced`` path, which needs the torch extra)."""
    if not isinstance(name, str) or name not in zoo_names():
        raise unknown("zoo model", str(name), zoo_names())
    file = ZOO_DIR / name / "config.json"
    cfg = read_json_object(file, "model config")
    if cfg.get("_class_name"):
        library, class_name = "diffusers", cfg["_class_name"]
    else:
        archs = cfg.get("architectures") or []
        library = "transformers"
        class_name = archs[0] if archs else _MODEL_TYPE_ARCH.get(cfg.get("model_type", ""))
    return {"name": name, "config": cfg, "library": library, "class_name": class_name,
            "model_type": cfg.get("model_type"),
            "frontend": "analytic" if class_name in ARCHITECTURES else "traced"}


def load_config_dict(model: str) -> tuple[str, dict]:
    """Resolve a zoo name, a config.json path or a directory holding one."""
    path = Path(model)
    if path.suffix == ".json" or path.is_dir() or path.exists():
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise SimcostError(f"no config.json at '{model}'")
        name = file.parent.name if file.name == "config.json" else file.stem
    else:
        file = ZOO_DIR / model / "config.json"
        if not file.is_file():
            raise unknown("model", model, zoo_names())
        name = model
    return name, read_json_object(file, "model config")


def load_model(model: str) -> ModelSpec:
    name, cfg = load_config_dict(model)
    return spec_from_config(cfg, name)


def spec_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """The checked :class:`ModelSpec` of an HF config dict (see :func:`check_spec`)."""
    return check_spec(_spec_from_config(cfg, name))


def _req(cfg: dict, *keys, name: str):
    for k in keys:
        if k in cfg and cfg[k] is not None:
            v = cfg[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v \
                    or v in (float("inf"), float("-inf")) or v != int(v) or v < 1:
                raise SimcostError(f"config of '{name}': {k} must be a positive integer, "
                                   f"got {v!r}")
            return v
    raise SimcostError(f"config of '{name}' lacks '{keys[0]}'")


# sizes a real model has, with room to spare; beyond them the config is a typo or an attack
LIMITS = {"layers": 10_000, "hidden": 10 ** 6, "heads": 10 ** 5, "head_dim": 10 ** 5,
          "ffn": 10 ** 7, "vocab": 10 ** 8, "max_positions": 10 ** 9, "experts": 10 ** 5}


def check_spec(spec: ModelSpec) -> ModelSpec:
    """Refuse a config no model can have: sizes below 1 or beyond :data:`LIMITS`, heads that do
    not divide the hidden size (unless ``head_dim`` is given, as in Gemma and Qwen3), KV heads
    that do not divide the heads, top-k above the expert count, dropout outside [0, 1)."""
    where = f"config of '{spec.name}'"
    for field, top in LIMITS.items():
        v = getattr(spec, field)
        low = 0 if field == "experts" else 1
        if not low <= v <= top:
            raise SimcostError(f"{where}: {field} must be in [{low}, {top:,}], got {v}")
    if spec.kv_heads < 1 or spec.heads % spec.kv_heads:
        raise SimcostError(f"{where}: {spec.heads} attention heads are not divisible by "
                           f"{spec.kv_heads} key-value heads")
    explicit_head_dim = bool((spec.config or {}).get("head_dim") or
                             (spec.config or {}).get("kv_channels"))
    if not explicit_head_dim and spec.hidden % spec.heads:
        raise SimcostError(f"{where}: hidden size {spec.hidden} is not divisible by "
                           f"{spec.heads} heads (and no head_dim is given)")
    if spec.experts and not 1 <= spec.top_k <= spec.experts:
        raise SimcostError(f"{where}: num_experts_per_tok {spec.top_k} must be in "
                           f"[1, {spec.experts}]")
    for field in ("dropout_embd", "dropout_attn", "dropout_resid"):
        v = getattr(spec, field)
        if not 0 <= v < 1:
            raise SimcostError(f"{where}: {field} must be in [0, 1), got {v}")
    return spec


def architecture_of(cfg: dict, name: str = "model") -> str:
    """The config's architecture class name (its first ``architectures`` entry, or the one of
    its ``model_type``; '' when neither names one)."""
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise SimcostError(f"config of '{name}': architectures must be a list of names")
    return archs[0] if archs else _MODEL_TYPE_ARCH.get(cfg.get("model_type", ""), "")


def _spec_from_config(cfg: dict, name: str) -> ModelSpec:
    arch = architecture_of(cfg, name)
    if arch not in ARCHITECTURES:
        raise SimcostError(f"unsupported architecture '{arch or cfg.get('model_type')}' in '{name}'; "
                           f"supported: {', '.join(sorted(ARCHITECTURES))}; the traced front end "
                           f"(--frontend traced, needs the torch extra) covers it")
    family = ARCHITECTURES[arch]
    try:
        if family == "gpt2":
            d = int(_req(cfg, "n_embd", "hidden_size", name=name))
            heads = int(_req(cfg, "n_head", "num_attention_heads", name=name))
            return ModelSpec(
                name=name, architecture=arch, family=family, hidden=d,
                layers=int(_req(cfg, "n_layer", "num_hidden_layers", name=name)),
                heads=heads, kv_heads=heads, head_dim=d // heads,
                ffn=int(cfg.get("n_inner") or 4 * d), vocab=int(_req(cfg, "vocab_size", name=name)),
                max_positions=int(_req(cfg, "n_positions", "max_position_embeddings", name=name)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                attn_bias=True, o_bias=True, mlp_bias=True,
                act=cfg.get("activation_function", "gelu_new"),
                dropout_embd=float(cfg.get("embd_pdrop", 0.1)),
                dropout_attn=float(cfg.get("attn_pdrop", 0.1)),
                dropout_resid=float(cfg.get("resid_pdrop", 0.1)), config=cfg)
        if family == "qwen":
            d = int(_req(cfg, "hidden_size", name=name))
            heads = int(_req(cfg, "num_attention_heads", name=name))
            return ModelSpec(
                name=name, architecture=arch, family=family, hidden=d,
                layers=int(_req(cfg, "num_hidden_layers", name=name)), heads=heads, kv_heads=heads,
                head_dim=int(cfg.get("kv_channels") or d // heads),
                ffn=int(_req(cfg, "intermediate_size", name=name)) // 2,
                vocab=int(_req(cfg, "vocab_size", name=name)),
                max_positions=int(cfg.get("seq_length") or cfg.get("max_position_embeddings") or 2048),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attn_bias=True, o_bias=not cfg.get("no_bias", True),
                mlp_bias=not cfg.get("no_bias", True),
                act="silu", config=cfg)
        d = int(_req(cfg, "hidden_size", name=name))
        heads = int(_req(cfg, "num_attention_heads", name=name))
        kv = int(cfg.get("num_key_value_heads") or heads)
        model_type = cfg.get("model_type", "llama")
        attn_bias = bool(cfg.get("attention_bias", False)) or model_type == "qwen2"
        return ModelSpec(
            name=name, architecture=arch, family=family, hidden=d,
            layers=int(_req(cfg, "num_hidden_layers", name=name)), heads=heads, kv_heads=kv,
            head_dim=int(cfg.get("head_dim") or d // heads),
            ffn=int(_req(cfg, "intermediate_size", name=name)),
            vocab=int(_req(cfg, "vocab_size", name=name)),
            max_positions=int(cfg.get("max_position_embeddings") or 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attn_bias=attn_bias, o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)), act=cfg.get("hidden_act", "silu"),
            experts=int(cfg.get("num_local_experts") or 0),
            top_k=int(cfg.get("num_experts_per_tok") or 0),
            dropout_attn=float(cfg.get("attention_dropout", 0.0) or 0.0), config=cfg)
    except SimcostError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise SimcostError(f"bad value in config of '{name}': {e}") from None
