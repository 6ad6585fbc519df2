"""Config → operator graph, per architecture family."""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.graph.ir import ModelGraph
from simcost.models.config import ModelSpec, load_model, spec_from_config, zoo_names
from simcost.models.gpt2 import build_gpt2
from simcost.models.llama import build_llama
from simcost.models.qwen import build_qwen

ATTN_IMPLS = ("eager", "sdpa", "flash")

__all__ = ["ModelSpec", "build_model_graph", "load_model", "spec_from_config", "zoo_names"]


def build_model_graph(spec: ModelSpec, batch, seq, dtype: str, attn: str = "sdpa",
                      device_kind: str = "cpu") -> ModelGraph:
    """The training-step graph of ``spec`` for ``batch`` x ``seq`` tokens (ints or arrays)."""
    if attn not in ATTN_IMPLS:
        raise SimcostError(f"unknown attention implementation '{attn}'; valid: {', '.join(ATTN_IMPLS)}")
    g = ModelGraph(batch, seq, dtype)
    g.meta["attn"] = attn
    g.meta["device_kind"] = device_kind
    if spec.family == "llama":
        build_llama(spec, g, attn)
    elif spec.family == "gpt2":
        build_gpt2(spec, g, attn)
    elif spec.family == "qwen":
        build_qwen(spec, g, attn)
    else:  # pragma: no cover - ARCHITECTURES guards this
        raise SimcostError(f"no graph builder for family '{spec.family}'")
    return g
