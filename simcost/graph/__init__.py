"""The operator graph: ops with shapes, dtypes and parameters, grouped in repeated segments."""
from simcost.graph.ir import ModelGraph, Op, Param, Segment, Tensor

__all__ = ["ModelGraph", "Op", "Param", "Segment", "Tensor"]
