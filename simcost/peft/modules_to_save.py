"""peft ``modules_to_save``: a trainable copy of each named module replaces it in forward;
the original stays in memory, frozen (peft freezes it even where another option, such as
``bias="all"``, had made its bias trainable).

peft copies every module whose full name *ends with* an entry (a plain suffix test:
``"head"`` copies ``lm_head``); a copied container (``mlp``) copies every parameter under it.
Refused, where peft fails or does something no one means: an entry that copies nothing
(peft ignores it silently), entries that nest (``mlp`` and ``down_proj``), and a copied
module that another method already adapted (peft raises a TypeError there).
"""
from __future__ import annotations

import dataclasses

from simcost.errors import SimcostError
from simcost.peft.targeting import all_module_names, assign, module_name, printable, saved_by


def _adapted_names(g) -> set[str]:
    """Full names of the modules a method already changed (adapter ops, LN-tuning copies)."""
    out = set()
    for seg, op in g.iter_ops():
        if op.attrs.get("adapter") or op.attrs.get("held_params"):
            for lay in (seg.layers if seg.first_layer is not None else (None,)):
                out.add(module_name(op, lay))
    return out


def saved_modules(g, entries) -> list[str]:
    """The module names peft copies for ``entries``; refuses what peft cannot do."""
    entries = list(entries)
    names = all_module_names(g)
    saved = sorted(n for n in names if saved_by(n, entries))
    for e in entries:
        if not any(n.endswith(e) for n in saved):
            leaf = sorted({n.split(".")[-1] for n, so in names.items() if so is not None})
            raise SimcostError(f"modules_to_save '{printable(e)}' matches no module of this model; "
                               f"its modules are: {', '.join(leaf)}")
    chosen = set(saved)
    for b in saved:
        parts = b.split(".")
        a = next((".".join(parts[:k]) for k in range(1, len(parts))
                  if ".".join(parts[:k]) in chosen), None)
        if a is not None:
            raise SimcostError(f"modules_to_save copies both {a} and {b}, which is inside it; "
                               f"name one of them")
    adapted = _adapted_names(g)
    for s in saved:
        hit = next((n for n in adapted if n == s or n.startswith(s + ".")), None)
        if hit is not None:
            raise SimcostError(f"modules_to_save copies {s}, which the PEFT method already "
                               f"adapts ({hit}); peft refuses that too")
    return saved


def apply_modules_to_save(g, entries) -> None:
    saved = saved_modules(g, entries)
    roots = tuple(saved)
    ops = [op for _, op in g.iter_ops() if op.params and not op.attrs.get("adapter")]

    def decide(op, name):
        return True if any(name == s or name.startswith(s + ".") for s in roots) else None

    for seg, op, _ in assign(g, decide, ops):
        for p in op.params:
            p.trainable = False   # peft: original_module.requires_grad_(False) (a tied weight too)
        op.attrs["held_params"] = op.params
        op.params = tuple(dataclasses.replace(
            p, name=p.name.replace(op.module, op.module + ".modules_to_save.default"),
            role="adapter", trainable=True) for p in op.params)
