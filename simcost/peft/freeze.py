"""Partial fine-tuning: train only the last k blocks (and the head), or named modules."""
from simcost.errors import SimcostError
from simcost.peft.base import register, set_trainable
from simcost.peft.targeting import matches, module_name


@register("freeze")
def apply(g, model, spec) -> None:
    if spec.trainable_layers is None and not spec.trainable_modules:
        raise SimcostError("freeze needs --trainable-layers K or --trainable-modules NAMES")
    if spec.trainable_layers is not None:
        k = spec.trainable_layers
        if k > model.layers:
            raise SimcostError(f"--trainable-layers {k} exceeds the model's {model.layers} layers")
        top = set(range(model.layers - k, model.layers))
        g.split_layers(top)
        set_trainable(g, lambda seg, op, p: (seg.first_layer is None and seg.name == "head")
                      or (seg.first_layer is not None and seg.first_layer in top))
    if spec.trainable_modules:
        mods = list(spec.trainable_modules)
        n = set_trainable(g, lambda seg, op, p: matches(module_name(op, seg.first_layer), mods)
                          or matches(p.name.rsplit(".", 1)[0].replace("{i}", str(seg.first_layer)), mods))
        if n == 0:
            raise SimcostError(f"--trainable-modules {', '.join(mods)} match no module of this model")
