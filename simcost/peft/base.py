"""The PEFT transform registry, peft's default targets, and target selection on the graph
(the matching rules themselves are in :mod:`simcost.peft.targeting`).

Every method is a function ``apply(g, model, spec)`` in its own module that rewrites the
operator graph: marks parameters trainable, inserts adapter ops, or changes the sequence.
"""
from __future__ import annotations

from collections.abc import Callable

from simcost.errors import SimcostError, unknown
from simcost.graph import kinds as K
from simcost.graph.ir import ModelGraph, Segment
from simcost.models.config import ModelSpec
from simcost.peft.modules_to_save import apply_modules_to_save
from simcost.peft.targeting import (TargetRule, all_module_names, assign, checker,  # noqa: F401
                                    matches, module_name, printable)

Transform = Callable[[ModelGraph, ModelSpec, object], None]
METHODS: dict[str, Transform] = {}


def register(name: str):
    def deco(fn: Transform) -> Transform:
        if name in METHODS:
            raise ValueError(f"PEFT method '{name}' is registered twice")
        METHODS[name] = fn
        return fn
    return deco


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


def linear_sites(g: ModelGraph):
    """(segment, op) for every nn.Linear-like op peft can wrap, lm_head excluded."""
    for seg, op in g.iter_ops():
        if op.kind == K.LINEAR and op.module != "lm_head" and not op.attrs.get("adapter") \
                and not op.module.endswith("mlp.gate"):
            yield seg, op


def rule_of(spec, targets) -> TargetRule:
    """The matching rule of ``spec`` with ``targets`` resolved (peft's default when None)."""
    return TargetRule(targets, spec.layers, getattr(spec, "layers_pattern", None),
                      getattr(spec, "exclude", None), tuple(spec.modules_to_save))


def select(g: ModelGraph, rule: TargetRule, sites, what: str, value=None) -> list:
    """(seg, op, value) for every site ``rule`` adapts, block groups split so each group is
    uniform; ``value(name)`` gives the per-module value (default True).

    Raises when a target names a module the model lacks, matches a module the method
    cannot adapt, or nothing matches."""
    site_ops = [op for _, op in sites]
    site_ids = {id(op) for op in site_ops}
    names = all_module_names(g)
    check = checker(rule)
    _check_targets(rule, names, site_ids, what, check)

    def decide(op, name):
        if check(name, True) is not True:
            return None
        return True if value is None else value(name)

    out = assign(g, decide, site_ops)
    if not out:
        leaf = sorted({n.split(".")[-1] for n, so in names.items() if so and id(so[1]) in site_ids})
        t = printable(_joined(rule.targets))
        raise SimcostError(f"{what} target modules '{t}' match no module of this model "
                           f"(after layers_to_transform, exclude_modules and modules_to_save); "
                           f"its modules are: {', '.join(leaf)}")
    return out


def _check_targets(rule: TargetRule, names: dict, site_ids: set[int], what: str,
                   check=None) -> None:
    """Refuse a list entry naming no module, and any match on a module that is no site."""
    t = rule.targets
    if not isinstance(t, str):
        for entry in t:
            if not any(matches(n, [entry]) for n in names):
                leaf = sorted({n.split(".")[-1] for n, so in names.items()
                               if so and id(so[1]) in site_ids})
                raise SimcostError(f"{what} target module '{printable(entry)}' is not in this model; "
                                   f"its modules are: {', '.join(leaf)}")
    for name, so in names.items():
        if so is not None and id(so[1]) in site_ids:
            continue
        if (check or rule.check)(name, False) is True:
            raise SimcostError(f"{what} target_modules '{printable(_joined(t))}' "
                               f"match {name} ({_describe(so)}), which simcost cannot adapt "
                               f"with {what}")


def _joined(targets) -> str:
    return targets if isinstance(targets, str) else ", ".join(targets)


def _describe(so) -> str:
    if so is None:
        return "a container of modules; peft refuses it too"
    op = so[1]
    if op.module == "lm_head":
        return "the output head: peft can adapt it, simcost does not model that"
    if op.kind == K.EMBEDDING:
        return "an embedding: peft can adapt it, simcost does not model that"
    if op.kind == K.LINEAR:
        return "Mixtral's router: only LoRA adapts it, as a parameter, when named 'gate'"
    return f"a {op.kind.replace('_', ' ')}; peft refuses it too"


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
        apply_modules_to_save(g, spec.modules_to_save)
    resync_views(g)


def resync_views(g: ModelGraph) -> None:
    """A view shares its *input's* storage. Transforms rewire consumers (``insert_after``):
    a view that now reads the adapter's output (v_heads over LoRA's sum, over (IA)³'s scaled
    tensor) must take that tensor's storage, or a kernel that saves the view (SDPA keeps q, k,
    v as passed) would be de-duplicated against the base projection's output."""
    for _, op in g.iter_ops():
        if op.kind == K.VIEW and op.inputs:
            src = g.tensors[op.inputs[0]]
            out = g.tensors[op.outputs[0]]
            out.storage = src.storage
            out.is_global = src.is_global


def blocks(g: ModelGraph) -> list[Segment]:
    return g.block_segments()
