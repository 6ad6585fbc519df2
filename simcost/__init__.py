"""simcost: an operator-graph cost model and simulator for PEFT training and serving.

The import is light (numpy and pydantic; networkx only when a graph is exported); torch is
used only by :mod:`simcost.validate` and ``simcost calibrate`` (the ``torch`` extra).
"""
from simcost.errors import SimcostError

__version__ = "0.1.0"

__all__ = ["SimcostError", "__version__", "estimate_train", "sweep_train", "build_graph",
           "TrainEstimate", "estimate_serve", "simulate_serve"]


def __getattr__(name):  # lazy: keep `import simcost` cheap
    if name in ("estimate_train", "sweep_train", "build_graph", "TrainEstimate"):
        from simcost import api

        return getattr(api, name)
    if name in ("estimate_serve", "simulate_serve"):
        from simcost.serve import api as serve_api

        return getattr(serve_api, name)
    raise AttributeError(name)
