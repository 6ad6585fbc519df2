"""The op-cost registry (in the spirit of ``torch.utils.flop_counter``'s formula registry).

A formula is a pure function ``f(op, g, rg, train) -> OpCost`` of the op, the graph's tensor
table, which inputs require grad and which parameters are trainable. FLOPs count 2 per
multiply-add; bytes are what the kernel reads plus what it writes; ``saved`` lists the storages
autograd keeps for backward (tensor ids of the op's inputs/outputs, or ``("new", nbytes)``
for storages only this op creates).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simcost.graph.kinds import ALL as ALL_KINDS

Number = Any  # int, float or numpy array (vectorised over batch x sequence)


@dataclass(slots=True)
class OpCost:
    fwd_flops: Number = 0            # all forward FLOPs (matmul + vector)
    fwd_matmul_flops: Number = 0     # the part torch's FlopCounterMode counts
    fwd_bytes: Number = 0
    fwd_kernels: int = 1
    bwd_act_flops: Number = 0        # activation-gradient work
    bwd_act_matmul_flops: Number = 0
    bwd_weight_flops: Number = 0     # weight-gradient work (trainable params only)
    bwd_weight_matmul_flops: Number = 0
    bwd_bytes: Number = 0
    bwd_kernels: int = 0
    saved: list = field(default_factory=list)   # tensor ids or ("new", nbytes)
    temp_bytes: Number = 0           # transient forward workspace beyond inputs/outputs
    gemms_fwd: list = field(default_factory=list)   # (batch, m, n, k) per GEMM, for the time model
    gemms_bwd: list = field(default_factory=list)
    # element-wise work whose speed is not set by bandwidth on every device (transcendentals,
    # random numbers): {"exp" | "rng" | "log_softmax_bwd": elements}
    special_fwd: dict = field(default_factory=dict)
    special_bwd: dict = field(default_factory=dict)


Formula = Callable[..., OpCost]
_REGISTRY: dict[str, Formula] = {}


def register(*kinds: str) -> Callable[[Formula], Formula]:
    """Register ``fn`` as the formula of each op kind; a kind is registered once."""
    def deco(fn: Formula) -> Formula:
        for k in kinds:
            if k not in ALL_KINDS:
                raise ValueError(f"'{k}' is not an op kind of simcost.graph.kinds")
            if k in _REGISTRY:
                raise ValueError(f"op kind '{k}' already has a cost formula "
                                 f"({_REGISTRY[k].__name__})")
            _REGISTRY[k] = fn
        return fn
    return deco


def cost_of(op, g, rg: tuple[bool, ...], train: tuple[bool, ...]) -> OpCost:
    try:
        fn = _REGISTRY[op.kind]
    except KeyError:
        raise KeyError(f"no cost formula registered for op kind '{op.kind}'") from None
    return fn(op, g, rg, train)


def kinds() -> list[str]:
    return sorted(_REGISTRY)
