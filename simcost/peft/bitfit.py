"""BitFit: only bias terms train (norm biases included, as in the BitFit paper)."""
from simcost.errors import SimcostError
from simcost.peft.base import register, set_trainable


@register("bitfit")
def apply(g, model, spec) -> None:
    n = set_trainable(g, lambda seg, op, p: p.name.endswith(".bias"))
    if n == 0:
        raise SimcostError(f"BitFit needs biases, and {model.name} has none "
                           "(set attention_bias/mlp_bias in its config, or pick another method)")
