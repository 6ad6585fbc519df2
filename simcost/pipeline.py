"""The linear pipeline: model x workload → graph → PEFT transform → stack fusions → analysis."""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.graph.ir import ModelGraph
from simcost.models import build_model_graph
from simcost.models.config import ModelSpec
from simcost.peft import apply_peft, tokens_added
from simcost.peft.spec import PeftSpec, validate
from simcost.sim.analysis import Analysis, analyse


def build_graph(model: ModelSpec, batch, seq, *, dtype: str = "bf16", attn: str = "sdpa",
                peft: PeftSpec | None = None, device_kind: str = "cpu",
                stack=None, fp8_activation: bool = False) -> tuple[ModelGraph, Analysis]:
    """``device_kind`` ('cpu' or 'gpu') picks the kernels whose saved tensors differ by device
    (dropout masks, layer-norm statistics, the SDPA path). ``stack`` (a
    :class:`simcost.stack.Stack`) rewrites the graph into the stack's fused kernels.
    ``fp8_activation``: a fused SwiGLU keeps its inputs for backward in fp8 (Megatron's
    ``activation_func_fp8_input_store``, NeMo ``FP8_ACTIVATION``)."""
    if attn == "flash" and device_kind == "cpu":
        raise SimcostError("--attn flash needs an accelerator; on a CPU torch runs sdpa or "
                           "eager attention")
    peft = peft or PeftSpec("full")
    validate(peft)
    seq_total = seq + tokens_added(peft)
    g = build_model_graph(model, batch, seq_total, dtype, attn, device_kind)
    g.meta["seq"] = seq
    g.meta["fp8_activation_store"] = bool(fp8_activation)
    apply_peft(g, model, peft)
    if stack is not None and stack.checkpoint_offload:
        g.meta["checkpoint_offload"] = True     # read by simcost.sim.memory (full checkpointing)
    if stack is not None and stack.fusions:
        from simcost.stack.fusions import apply_fusions
        g.meta["fusions"] = apply_fusions(g, stack.fusions)
    return g, analyse(g)


def kernel_kind(device) -> str:
    """Which kernel set runs: torch's CPU kernels, or the accelerator ones."""
    return "cpu" if device.kind == "cpu" else "gpu"
