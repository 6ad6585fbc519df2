"""Full fine-tuning: every parameter is trainable."""
from simcost.peft.base import register, set_trainable


@register("full")
def apply(g, model, spec) -> None:
    set_trainable(g, lambda seg, op, p: True)
