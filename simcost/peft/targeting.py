"""Which modules a peft config adapts: peft 0.21's matching rules, on simcost's graph.

The rules (``peft.tuners.tuners_utils.check_target_module_exists`` and friends), applied to
the full HF module name (``model.layers.3.self_attn.q_proj``, ``transformer.h.0.attn.c_attn``):
- ``exclude_modules``: a str is a full regex match; a list excludes a name equal to an entry
  or ending in '.' + entry;
- ``modules_to_save``: a module peft copies is never also adapted (a name matching
  ``(^|.*\\.)ENTRY($|\\..*)``); which modules are copied is a plain suffix test
  (``name.endswith(entry)``, no dot);
- ``target_modules``: a str is a full regex match (``"all-linear"``, any case, names every
  linear but the output head); a list matches a name equal to an entry, or ending in
  '.' + entry;
- ``layers_to_transform`` applies to that suffix match only (an exact name bypasses it): the
  layer index is the first number after ``LAYERS_PATTERN.`` (any segment when no pattern);
- ``rank_pattern`` / ``alpha_pattern``: the first key (in the file's order) for which
  ``(.*\\.)?(KEY)$`` matches the name gives that module's r / lora_alpha.

This module imports no PEFT method, so every method (and ``modules_to_save``) can use it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from simcost.graph.ir import ModelGraph, Op, Segment

EXCLUDED = "excluded"


def printable(text: str, limit: int = 80) -> str:
    """A user-given name as it may appear in a one-line message (escaped, shortened)."""
    t = text if text.isprintable() else json.dumps(text)[1:-1]
    return t if len(t) <= limit else t[:limit - 3] + "..."


def module_name(op: Op, layer: int | None) -> str:
    return op.module.replace("{i}", str(layer)) if layer is not None else op.module


def matches(name: str, targets) -> bool:
    """peft's target rule: a string is a full regex match; a list matches a name equal to an
    entry or ending in '.' + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_all_linear(targets) -> bool:
    return isinstance(targets, str) and targets.lower() == "all-linear"


def saved_by(name: str, modules_to_save) -> bool:
    """peft's ``_set_trainable``: a module is copied when its name ends with an entry."""
    return any(name.endswith(m) for m in modules_to_save)


def guarded_by_save(name: str, modules_to_save) -> bool:
    """peft never adapts a module inside (or equal to) a ``modules_to_save`` entry."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def layer_index(name: str, layers_pattern) -> int | None:
    """The layer index peft reads from a module name (None: the name has none)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for p in pats:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


@dataclass(frozen=True)
class TargetRule:
    """The matching part of a peft config (see the module docstring)."""
    targets: tuple[str, ...] | str
    layers: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    exclude: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()

    def check(self, name: str, is_site: bool):
        """True, False or EXCLUDED for module ``name`` (``is_site``: an adaptable linear,
        which is what ``"all-linear"`` expands to)."""
        ex = self.exclude
        if ex:
            if isinstance(ex, str):
                if re.fullmatch(ex, name):
                    return EXCLUDED
            elif matches(name, ex):
                return EXCLUDED
        if self.modules_to_save and guarded_by_save(name, self.modules_to_save):
            return EXCLUDED
        t = self.targets
        if isinstance(t, str):
            # "all-linear" expands to exact names. peft refuses layers_to_transform with a str
            # (the parser does too); a spec built in Python may restrict a str by layer
            hit = is_site if is_all_linear(t) else re.fullmatch(t, name) is not None
            if hit and self.layers is not None:
                hit = layer_index(name, self.layers_pattern) in self.layers
            return hit
        if name in t:
            return True
        if not any(name.endswith("." + k) for k in t):
            return False
        if self.layers is None:
            return True
        idx = layer_index(name, self.layers_pattern)
        return idx is not None and idx in self.layers


_CHECKS: dict[TargetRule, dict] = {}


def checker(rule: TargetRule):
    """``rule.check``, remembered per (rule, name, is_site): a rule gives a name the same
    answer in every graph (a parallel plan search builds one model many times)."""
    try:
        memo = _CHECKS.get(rule)
    except TypeError:              # a rule built in Python with list fields
        return rule.check
    if memo is None:
        if len(_CHECKS) >= 64:
            _CHECKS.clear()
        memo = _CHECKS[rule] = {}

    def check(name: str, is_site: bool):
        key = (name, is_site)
        hit = memo.get(key, memo)
        if hit is memo:
            hit = memo[key] = rule.check(name, is_site)
        return hit
    return check


def pattern_value(patterns, name: str, default):
    """peft's ``get_pattern_key``: the value of the first key matching the end of ``name``."""
    for key, value in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def all_module_names(g: ModelGraph) -> dict[str, tuple[Segment, Op] | None]:
    """Every module name of the model that holds parameters (with its op), and every module
    above one (a container: None)."""
    sig = tuple((seg.first_layer, seg.count, tuple(
        op.module if op.params and not op.attrs.get("adapter") and op.module else None
        for op in seg.ops)) for seg in g.segments)
    listing = _NAMES.get(sig)
    if listing is None:
        listing = _module_names(g)
        if len(_NAMES) >= 64:
            _NAMES.clear()
        _NAMES[sig] = listing
    segs = g.segments
    return {name: None if at is None else (segs[at[0]], segs[at[0]].ops[at[1]])
            for name, at in listing}


# the names depend on the modules' names and the layer groups only: one listing per shape of
# graph (a parallel plan search builds the same model for many micro-batch sizes)
_NAMES: dict[tuple, list] = {}


def _module_names(g: ModelGraph) -> list[tuple[str, tuple[int, int] | None]]:
    names: dict[str, tuple[int, int] | None] = {}
    for si, seg in enumerate(g.segments):
        for oi, op in enumerate(seg.ops):
            if not op.params or op.attrs.get("adapter") or not op.module:
                continue
            for lay in (seg.layers if seg.first_layer is not None else (None,)):
                name = module_name(op, lay)
                names[name] = (si, oi)
                parts = name.split(".")
                for k in range(1, len(parts)):
                    names.setdefault(".".join(parts[:k]), None)
    return list(names.items())


def assign(g: ModelGraph, decide, ops=None) -> list[tuple[Segment, Op, object]]:
    """(segment, op, value) for every op where ``decide(op, name)`` is not None.

    Block groups are split wherever two consecutive layers get different values, so each
    returned segment is uniform (its ``count`` layers all get ``value``). ``ops`` limits the
    ops asked about (default: all)."""
    wanted = None if ops is None else {id(o) for o in ops}
    out = []
    for seg in list(g.segments):
        ask = [o for o in seg.ops if wanted is None or id(o) in wanted]
        if not ask:
            continue
        if seg.first_layer is None:
            out += [(seg, o, v) for o in ask if (v := decide(o, o.module)) is not None]
            continue
        idx = [seg.ops.index(o) for o in ask]
        first = seg.first_layer
        sigs = [tuple(decide(o, module_name(o, lay)) for o in ask) for lay in seg.layers]
        parts, cur = [seg], seg
        for k in range(1, len(sigs)):
            if sigs[k] != sigs[k - 1]:
                _, cur = g.split_segment(cur, first + k)
                parts.append(cur)
        for part in parts:
            sig = sigs[part.first_layer - first]
            out += [(part, part.ops[i], v) for i, v in zip(idx, sig) if v is not None]
    return out
