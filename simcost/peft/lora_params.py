"""LoRA on parameters (peft ``target_parameters``, ``ParamWrapper``): Mixtral's router and experts.

On transformers 5 Mixtral's router is no ``nn.Linear`` and its experts are two fused 3-D
parameters, so peft converts the v4 target names (``transformers_weight_conversion``):
``gate`` -> ``gate.weight``, ``w1``/``w3`` -> ``gate_up_proj`` (rank 2r, alpha 2α: the two fused
branches keep α/r), ``w2`` -> ``down_proj``; ``"all-linear"`` names all four. Each becomes a
``ParamWrapper`` with ``lora_A`` = Linear(in, r·E) and ``lora_B`` = Linear(r·E, out) (E = 1 for
the router; for the experts in/out are swapped to the ``(E, out, in)`` layout).

On every forward the wrapper registers a parametrisation of the base parameter:
- router (E = 1): ``ΔW = (B @ A) · s`` (one mm, adapter dtype), cast to the base dtype, then
  ``W' = W + ΔW`` (registration evaluates the add once more; no matmul);
- experts: ``W' = baddbmm(W, lhs, rhs, alpha=s)`` with ``lhs`` = B as (E, out, r) and ``rhs`` = A
  as (E, r, in), both ``.to(base dtype)`` (fresh copies on a 16-bit base, which baddbmm keeps;
  views of the fp32 factors otherwise). ``register_parametrization`` evaluates it once to check
  it, the cached access once more: two baddbmm per forward, only the second in the graph.
The router linear and the grouped experts then run on ``W'``, which requires grad: they keep
their inputs for the weight gradient and ``W'`` itself (a fresh storage) for the input gradient.
``layers_to_transform`` does not restrict the parameter targets (peft adapts them in every layer).
"""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.graph.ir import Op, Param
from simcost.peft.base import model_type

# v4 names -> what peft adapts on transformers 5 (peft's _MOE_TARGET_MODULE_MAPPING)
MOE_PARAM_TARGETS = {"mixtral": {"gate": "router", "w1": "gate_up", "w3": "gate_up", "w2": "down"}}


def split_targets(model, targets):
    """(module targets, parameter targets) as peft resolves them; parameter targets is a set of
    'router' | 'gate_up' | 'down'. Only list and ``"all-linear"`` targets are resolved here."""
    mapping = MOE_PARAM_TARGETS.get(model_type(model))
    if not mapping or not getattr(model, "experts", 0):
        return targets, set()
    if targets == "all-linear":
        return targets, set(mapping.values())
    if isinstance(targets, str):
        return targets, set()
    mods, hits, old = [], set(), set()
    for t in targets:
        leaf = next((o for o in mapping if t == o or t.endswith("." + o)), None)
        if leaf is None:
            mods.append(t)
        else:
            hits.add(mapping[leaf])
            old.add(leaf)
    if ("w1" in old) != ("w3" in old):
        raise SimcostError("peft cannot target only one of w1, w3 on Mixtral: they are fused "
                           "into experts.gate_up_proj (target both)")
    return mods, hits


def apply_param_targets(g, model, spec, which: set[str]) -> None:
    if not which:
        return
    if spec.dropout > 0:
        raise SimcostError("peft's LoRA on parameters (Mixtral's router and experts) does not "
                           "work with lora_dropout != 0")
    ad = spec.adapter_dtype or "fp32"
    # peft wraps target_parameters in every layer: layers_to_transform does not restrict them
    for seg in g.block_segments():
        router = next((o for o in seg.ops if o.kind == "linear" and o.module.endswith("mlp.gate")
                       and not o.attrs.get("adapter")), None)
        experts = next((o for o in seg.ops if o.kind == "moe_experts"), None)
        if router is None or experts is None:
            continue
        if "router" in which:
            _router(g, seg, router, spec, ad)
        wp = [None, None]
        new_ops = []
        for i, (key, fused) in enumerate((("gate_up", 2), ("down", 1))):
            if key in which:
                ops, w = _expert_delta(g, experts, i, key, spec, ad, fused)
                new_ops += ops
                wp[i] = w
        if new_ops:
            idx = seg.ops.index(experts)
            seg.ops[idx:idx] = new_ops
            experts.inputs = tuple(experts.inputs[:2]) + tuple(w for w in wp if w is not None)
            # which of (gate_up, down) is read from an input (the parametrised weight)
            experts.attrs["weight_inputs"] = tuple(w is not None for w in wp)


def _emit(g, ops, base, name, kind, inputs, shape, dtype, params=(), attrs=None):
    t = g.new_tensor(shape, dtype)
    ops.append(Op(f"{base.name}.{name}", kind, tuple(inputs), (t,), tuple(params),
                  dict(attrs or {}, adapter=True), f"{base.module}.{name}"))
    return t


def _router(g, seg, op, spec, ad):
    w = op.params[0]
    e, d = w.shape
    dt = w.dtype
    r = spec.r
    A = Param(f"{op.module}.lora_A.default.weight", (r, d), ad, True, "adapter")
    B = Param(f"{op.module}.lora_B.default.weight", (e, r), ad, True, "adapter")
    ops: list[Op] = []
    delta = _emit(g, ops, op, "lora_delta", "lora_param_delta", [], (e, d), ad, [B, A],
                  {"experts": 1, "rank": r, "out": e, "in": d, "evals": 1, "factor_copies": False})
    if ad != dt:
        delta = _emit(g, ops, op, "lora_delta_cast", "copy", [delta], (e, d), dt)
    wp = _emit(g, ops, op, "lora_weight", "add", [delta], (e, d), dt)
    i = seg.ops.index(op)
    seg.ops[i:i] = ops
    op.inputs = (op.inputs[0], wp)
    op.attrs["weight_input"] = True


def _expert_delta(g, op, i, key, spec, ad, fused):
    w = op.params[i]
    e, out, inn = w.shape
    dt = w.dtype
    r = spec.r * fused
    A = Param(f"{op.module}.lora_A.default.weight" if key == "down" else
              f"{op.module}.base_layer.lora_A.default.weight", (r * e, inn), ad, True, "adapter")
    B = Param(f"{op.module}.lora_B.default.weight" if key == "down" else
              f"{op.module}.base_layer.lora_B.default.weight", (out, r * e), ad, True, "adapter")
    ops: list[Op] = []
    wp = _emit(g, ops, op, f"{key}_lora_weight", "lora_param_delta", [], (e, out, inn), dt,
               [B, A, w], {"experts": e, "rank": r, "out": out, "in": inn, "evals": 2,
                           "factor_copies": ad != dt})
    return ops, wp
