"""LayerNorm tuning (peft LN_TUNING): a trainable copy of each target norm; the base stays
frozen, so total parameters grow by the norm parameters. Targets match as in peft
(:mod:`simcost.peft.targeting`); peft's LN_TUNING would copy any module it matches, simcost
models norms only and refuses a target matching anything else."""
from simcost.graph.ir import Param
from simcost.peft.base import LN_DEFAULTS, model_type, register, rule_of, select

NORMS = ("rms_norm", "layer_norm")


@register("ln_tuning")
def apply(g, model, spec) -> None:
    targets = spec.targets if spec.targets is not None else LN_DEFAULTS[model_type(model)]
    sites = [op for _, op in g.iter_ops() if op.kind in NORMS and op.params]
    for seg, op, _ in select(g, rule_of(spec, targets), [(None, o) for o in sites], "LN tuning"):
        copies = tuple(Param(p.name.replace(".weight", ".ln_tuning_layers.default.weight")
                             .replace(".bias", ".ln_tuning_layers.default.bias"),
                             p.shape, p.dtype, True, "adapter") for p in op.params)
        op.attrs["held_params"] = op.params
        op.params = copies
