"""The training-stack profile schema (pydantic, at the file edge only).

A *stack* is the software that runs a training step: the framework (HF transformers + peft,
torchtune, NeMo/Megatron, DeepSpeed), its kernels (Liger, Unsloth, TransformerEngine,
torch.compile) and its allocator. It decides three things the model and the device do not:

- **fusions**: which op patterns run as one kernel and what that kernel keeps for backward
  (names from :data:`simcost.stack.fusions.FUSIONS`);
- **host cost**: seconds of host (Python, dispatcher, autograd) work per kernel on an
  accelerator, and whether CUDA graphs remove it; fixed per-step work;
- **the caching allocator**: what ``torch.cuda.max_memory_reserved`` holds above
  ``max_memory_allocated``;
- **sustained kernel efficiency**: the fraction of the hardware profile's best-shape GEMM rate
  that the stack's GEMMs sustain on real shapes.

Every number is a :class:`StackNumber`: it names its source, or it was fitted (then it names
the script, the rows it was fitted on, the rows held out and the residuals). An *alias*
(axolotl, LLaMA-Factory) resolves to a stack, or with a named variant (``axolotl:liger``)
to another, with the launcher flags that select it.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number, got {v!r}")
    return v


Num = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fit(Strict):
    """How a fitted number was obtained: reproducible with ``script``."""
    script: str
    rows: list[str] = Field(min_length=1)            # dev rows the value was fitted on
    held_out: list[str] = []                          # dev rows left out of the fit
    residual: dict[str, Num] = {}                     # e.g. in_sample_mape, held_out_mape


class StackNumber(Strict):
    """A stack constant: sourced (``source``) or fitted (``fitted``), never neither."""
    value: Num
    source: str | None = None
    derived: bool = False
    fitted: Fit | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _provenance(self):
        if not self.source and self.fitted is None:
            raise ValueError("needs a source or a fitted record")
        return self


class NonNeg(StackNumber):
    value: Annotated[Num, Field(ge=0)]


class Frac(StackNumber):
    value: Annotated[Num, Field(gt=0, le=1)]


class Host(Strict):
    """Host work of the stack on an accelerator (a CPU device keeps its own profile's
    per-kernel dispatch time: there the host is the device)."""
    dispatch_s: NonNeg                  # host seconds per kernel (Python, dispatcher, autograd)
    cuda_graphs: bool = False           # kernels replayed from CUDA graphs: no per-kernel cost
    step_overhead_s: NonNeg | None = None   # fixed host work per optimizer step


class Allocator(Strict):
    """The CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp)."""
    # fraction of the step's transient (freed-and-reallocated) bytes the cache keeps reserved
    # above the allocated peak: blocks freed at one size and requested at another
    fragmentation: NonNeg
    # allocations of at least 1 MiB are carved from segments rounded up to 2 MiB
    round_bytes: NonNeg = NonNeg(value=2 ** 21, source="PyTorch c10/cuda/CUDACachingAllocator."
                                 "cpp: kRoundLarge = 2 MiB (large segments round up to it)")
    # memory the stack's libraries hold beyond the device profile's CUDA context
    extra_context_bytes: NonNeg | None = None


class Kernels(Strict):
    # sustained GEMM rate on real shapes as a fraction of the hardware profile's best-shape
    # (MAMF) rate; None: the profile's rate
    gemm_sustained: Frac | None = None


class Interval(Strict):
    """Quantiles of the out-of-fit errors (predicted / measured - 1) for one metric."""
    p10: Num
    p90: Num
    n: Annotated[int, Field(ge=0)]
    rows: list[str] = []


class Variant(Strict):
    """A named switch of an alias (``--stack axolotl:liger``): the stack it then runs and the
    launcher's flags that select it."""
    stack: str
    flags: dict[str, str]


class TrainingStack(Strict):
    name: str
    display_name: str
    kind: Literal["training"] = "training"
    versions: dict[str, str]            # package -> version range the profile describes
    description: str
    sources: list[str] = []
    fusions: list[str] = []
    planned_fusions: list[str] = []     # fusions the stack runs that are not modelled yet
    optimizer: Literal["default", "foreach", "fused", "for-loop"] = "default"
    checkpoint_offload: bool = False    # activation checkpoints kept in host memory
    host: Host
    allocator: Allocator
    kernels: Kernels = Kernels()
    # hardware class -> metric ("step_time", "memory") -> out-of-fit error quantiles;
    # written by validation/fit/fit_stacks.py
    intervals: dict[str, dict[str, Interval]] = {}
    interval_note: str | None = None    # why there are none (a stack without dev rows)


class Alias(Strict):
    """A launcher that runs a stack with its own defaults."""
    name: str
    display_name: str
    kind: Literal["alias"] = "alias"
    alias_of: str                       # the stack it runs by default
    flags: dict[str, str]               # the launcher's flags behind that default
    variants: dict[str, Variant] = {}
    description: str
    sources: list[str] = []
