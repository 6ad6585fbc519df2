"""peft ``modules_to_save``: a trainable copy of each named module replaces it in forward;
the frozen original stays in memory."""
from __future__ import annotations

import dataclasses

from simcost.errors import SimcostError
from simcost.peft.base import matches, module_name


def apply_modules_to_save(g, model, spec) -> None:
    hit = 0
    for seg, op in g.iter_ops():
        if op.attrs.get("adapter") or not op.params:
            continue
        if matches(module_name(op, seg.first_layer), list(spec.modules_to_save)):
            copies = tuple(dataclasses.replace(
                p, name=p.name.replace(op.module, op.module + ".modules_to_save.default"), role="adapter",
                trainable=True) for p in op.params)
            op.attrs["held_params"] = op.params
            op.params = copies
            hit += 1
    if not hit:
        raise SimcostError(f"modules_to_save '{', '.join(spec.modules_to_save)}' match no module")
