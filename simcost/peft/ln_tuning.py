"""LayerNorm tuning (peft LN_TUNING): a trainable copy of each target norm; the base stays
frozen, so total parameters grow by the norm parameters."""
from simcost.graph.ir import Param
from simcost.peft.base import LN_DEFAULTS, matches, model_type, module_name, register
from simcost.errors import SimcostError


@register("ln_tuning")
def apply(g, model, spec) -> None:
    targets = spec.targets if spec.targets is not None else LN_DEFAULTS[model_type(model)]
    n = 0
    for seg, op in g.iter_ops():
        if op.kind in ("rms_norm", "layer_norm") and matches(module_name(op, seg.first_layer), targets):
            copies = tuple(Param(p.name.replace(".weight", ".ln_tuning_layers.default.weight")
                                 .replace(".bias", ".ln_tuning_layers.default.bias"),
                                 p.shape, p.dtype, True, "adapter") for p in op.params)
            op.attrs["held_params"] = op.params
            op.params = copies
            n += 1
    if n == 0:
        raise SimcostError("LN tuning target modules match no norm of this model")
