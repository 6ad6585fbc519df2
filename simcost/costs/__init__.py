"""Per-op cost formulas: one pure function per op kind, looked up by ``op.kind``."""
from simcost.costs.registry import OpCost, cost_of, register

__all__ = ["OpCost", "cost_of", "register"]
from simcost.costs import formulas as _formulas  # noqa: E402,F401  (registers the formulas)
from simcost.costs import fused as _fused  # noqa: E402,F401  (the stacks' fused kernels)
