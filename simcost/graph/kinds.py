"""Op kinds: the names an :class:`~simcost.graph.ir.Op` may carry, each the key of one cost
formula in :mod:`simcost.costs.formulas`. Code that picks ops by kind compares against these
constants, so a misspelt kind fails at import instead of matching nothing."""
from __future__ import annotations

LINEAR = "linear"
EMBEDDING = "embedding"
MATMUL = "matmul"
SDPA = "sdpa"                      # fused attention: sdpa or flash (attrs["impl"])
MUL_PARAM = "mul_param"            # (IA)³ scaling vector
ADD_PARAM = "add_param"
ADD, SUB, SCALE, NEG = "add", "sub", "scale", "neg"
COPY = "copy"
VIEW = "view"
MUL = "mul"
POW, SILU, GELU = "pow", "silu", "gelu"
TANH, RSQRT, SIGMOID = "tanh", "rsqrt", "sigmoid"
SOFTMAX = "softmax"
DROPOUT = "dropout"
REDUCE = "reduce"
RMS_NORM = "rms_norm"
LAYER_NORM = "layer_norm"
ROPE = "rope"
GELU_NEW = "gelu_new"
CROSS_ENTROPY = "cross_entropy"
MOE_ROUTER = "moe_router"
MOE_EXPERTS = "moe_experts"
LORA_PARAM_DELTA = "lora_param_delta"
DEQUANTIZE = "dequantize"
DORA_WEIGHT_NORM = "dora_weight_norm"
DORA_BASE_LINEAR = "dora_base_linear"
DORA_COMBINE = "dora_combine"
# fused kernels a training stack runs in place of eager patterns (simcost.stack.fusions;
# their cost formulas are in simcost.costs.fused)
RMS_NORM_FUSED = "rms_norm_fused"                # one kernel each way (Liger, Unsloth, TE)
ROPE_FUSED = "rope_fused"                        # q and k (or one tensor) rotated in one kernel
SWIGLU_FUSED = "swiglu_fused"                    # silu(gate) * up, silu recomputed in backward
LINEAR_CROSS_ENTROPY = "linear_cross_entropy"    # lm_head + loss in token chunks (Liger)
CROSS_ENTROPY_INPLACE = "cross_entropy_inplace"  # loss writing its gradient into the logits
CUT_CROSS_ENTROPY = "cut_cross_entropy"          # lm_head + loss, logits only in on-chip tiles
POINTWISE_FUSED = "pointwise_fused"              # a group of element-wise / norm ops as one
#                                                  generated kernel each way (TorchInductor)
LORA_FUSED = "lora_fused"                        # a LoRA branch added into its base output in
#                                                  the base dtype, keeping only x (Unsloth)

# a recorded aten call of a traced step (simcost.trace.ir): its cost comes priced with it
ATEN = "aten"

NORMS = (RMS_NORM, LAYER_NORM, RMS_NORM_FUSED)
LOSSES = (CROSS_ENTROPY, CROSS_ENTROPY_INPLACE, LINEAR_CROSS_ENTROPY,    # the head's loss op
          CUT_CROSS_ENTROPY)
FUSED_HEADS = (LINEAR_CROSS_ENTROPY, CUT_CROSS_ENTROPY)      # the lm_head GEMM inside the loss
ATTENTION_MATMULS = (MATMUL, SDPA)     # where an attention core's compute starts

ALL = frozenset(v for k, v in dict(globals()).items()
                if k.isupper() and isinstance(v, str))
