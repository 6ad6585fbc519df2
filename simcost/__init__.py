"""simcost: an operator-graph cost model and simulator for PEFT training and serving.

The import is light: numpy, networkx and pydantic only; torch is used only by
:mod:`simcost.validate` (the ``torch`` extra).
"""
from simcost.errors import SimcostError

__version__ = "0.1.0"

__all__ = ["SimcostError", "__version__", "estimate_train", "sweep_train", "build_graph",
           "TrainEstimate"]


def __getattr__(name):  # lazy: keep `import simcost` cheap
    if name in ("estimate_train", "sweep_train", "build_graph", "TrainEstimate"):
        from simcost import api

        return getattr(api, name)
    raise AttributeError(name)
