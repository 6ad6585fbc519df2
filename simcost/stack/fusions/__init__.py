"""Fusion rules: graph transforms that make a stack's fused kernels out of the eager ops.

A rule is a function ``rule(g: ModelGraph) -> int`` that rewrites the op graph in place, after
the PEFT transform and before analysis, and returns how many patterns it fused. A fused op
carries its own op kind and cost formula (:mod:`simcost.costs.formulas`): one kernel each
way, and only what the fused kernel really keeps for backward. One file per rule, each
registered here by name; stack profiles list the names they use.
"""
from __future__ import annotations

from collections.abc import Callable

from simcost.errors import SimcostError

Fusion = Callable[..., int]
FUSIONS: dict[str, Fusion] = {}


def register(name: str) -> Callable[[Fusion], Fusion]:
    def deco(fn: Fusion) -> Fusion:
        if name in FUSIONS:
            raise SimcostError(f"fusion '{name}' is already registered")
        FUSIONS[name] = fn
        return fn
    return deco


def apply_fusions(g, names) -> dict[str, int]:
    """Apply the named rules in order; returns the number of patterns each one fused."""
    return {n: FUSIONS[n](g) for n in names}


# the rules (each module registers its names on import)
from simcost.stack.fusions import (cross_entropy_inplace, cut_cross_entropy,  # noqa: E402,F401
                                   inductor_pointwise, linear_cross_entropy, lora_unsloth,
                                   qkv_lora, rms_norm, rope, swiglu)
