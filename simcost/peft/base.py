"""The PEFT transform registry and the target-matching rules peft uses.

Every method is a function ``apply(g, model, spec)`` in its own module that rewrites the
operator graph: marks parameters trainable, inserts adapter ops, or changes the sequence.
"""
from __future__ import annotations

import re
from collections.abc import Callable

from simcost.errors import SimcostError, unknown
from simcost.graph.ir import ModelGraph, Op, Segment
from simcost.models.config import ModelSpec

Transform = Callable[[ModelGraph, ModelSpec, object], None]
METHODS: dict[str, Transform] = {}


def register(name: str):
    def deco(fn: Transform) -> Transform:
        METHODS[name] = fn
        return fn
    return deco


def module_name(op: Op, layer: int | None) -> str:
    return op.module.replace("{i}", str(layer)) if layer is not None else op.module


# peft's default targets (peft/utils/constants.py) for the supported architectures
LORA_DEFAULTS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                 "qwen2": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
                 "gpt2": ["c_attn"], "qwen": ["c_attn"]}
IA3_DEFAULTS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
                "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
                # peft's default names the v4 expert linear w2; on transformers 5 the experts are
                # fused 3-D parameters, peft's v4->v5 config conversion moves w2 to
                # target_parameters, which (IA)3 ignores: only k_proj and v_proj get vectors
                "mixtral": (["k_proj", "v_proj"], []),
                "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
                "qwen": (["c_attn", "mlp.c_proj", "w2"], ["mlp.c_proj", "w2"])}
LN_DEFAULTS = {"llama": ["input_layernorm", "post_attention_layernorm", "norm"],
               "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
               "qwen2": ["post_attention_layernorm"],
               "mixtral": ["input_layernorm", "post_attention_layernorm", "norm"],
               "gpt2": ["ln_1", "ln_2", "ln_f"], "qwen": ["ln_1", "ln_2", "ln_f"]}


def model_type(model: ModelSpec) -> str:
    return (model.config or {}).get("model_type", model.family)


def matches(name: str, targets) -> bool:
    """peft's rule: a string is a full regex match; a list matches a name equal to an entry
    or ending in '.' + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_sites(g: ModelGraph):
    """(segment, op) for every nn.Linear-like op peft can wrap, lm_head excluded."""
    for seg, op in g.iter_ops():
        if op.kind == "linear" and op.module != "lm_head" and not op.attrs.get("adapter") \
                and not op.module.endswith("mlp.gate"):
            yield seg, op


def select(g: ModelGraph, targets, layers, sites, what: str, check_all_linear: bool = True):
    """Split block groups so a target set is uniform per group; return matched (seg, op).

    Raises when nothing matches (a target module the model lacks)."""
    all_linear = targets == "all-linear"
    sites = list(sites)
    # which layers hold a match (regex targets may name layer indices)
    hit_layers: set[int] = set()
    for seg, op in sites:
        if seg.first_layer is None:
            continue
        for lay in seg.layers:
            if (layers is None or lay in layers) and (all_linear or matches(module_name(op, lay), targets)):
                hit_layers.add(lay)
    if layers is not None or isinstance(targets, str):
        g.split_layers(hit_layers)
    out = []
    for seg, op in list(_sites_again(g, sites)):
        lay = seg.first_layer
        if seg.first_layer is not None and layers is not None and lay not in layers:
            continue
        if all_linear or matches(module_name(op, lay), targets):
            out.append((seg, op))
    if not out:
        names = sorted({op.module.replace("{i}.", "").split(".")[-1] for _, op in sites})
        t = targets if isinstance(targets, str) else ", ".join(targets)
        raise SimcostError(f"{what} target modules '{t}' match no module of this model; "
                           f"its modules are: {', '.join(names)}")
    if not isinstance(targets, str):
        known = {op.module.split(".")[-1] for _, op in sites} | {
            ".".join(op.module.split(".")[-2:]) for _, op in sites}
        missing = [t for t in targets if t not in known]
        if missing:
            raise SimcostError(f"{what} target module '{missing[0]}' is not in this model; "
                               f"its modules are: {', '.join(sorted(n for n in known if '.' not in n))}")
    return out


def _sites_again(g: ModelGraph, sites):
    """Re-enumerate sites after segment splits (ops were cloned into new segments)."""
    kinds = {(op.kind, op.name) for _, op in sites}
    for seg, op in g.iter_ops():
        if (op.kind, op.name) in kinds and not op.attrs.get("adapter"):
            yield seg, op


def set_trainable(g: ModelGraph, pred) -> int:
    n = 0
    for seg, op in g.iter_ops():
        for p in op.params:
            if pred(seg, op, p):
                p.trainable = True
                n += 1
    return n


def apply_peft(g: ModelGraph, model: ModelSpec, spec) -> None:
    method = "dora" if spec.method == "lora" and spec.dora else spec.method
    if method not in METHODS:
        raise unknown("PEFT method", spec.method, METHODS)
    METHODS[method](g, model, spec)
    if spec.modules_to_save:
        from simcost.peft.modules_to_save import apply_modules_to_save
        apply_modules_to_save(g, model, spec)
    resync_views(g)


def resync_views(g: ModelGraph) -> None:
    """A view shares its *input's* storage. Transforms rewire consumers (``insert_after``):
    a view that now reads the adapter's output (v_heads over LoRA's sum, over (IA)³'s scaled
    tensor) must take that tensor's storage, or a kernel that saves the view (SDPA keeps q, k,
    v as passed) would be de-duplicated against the base projection's output."""
    for _, op in g.iter_ops():
        if op.kind == "view" and op.inputs:
            src = g.tensors[op.inputs[0]]
            out = g.tensors[op.outputs[0]]
            out.storage = src.storage
            out.is_global = src.is_global


def blocks(g: ModelGraph) -> list[Segment]:
    return g.block_segments()
