"""The serving-engine profile schema (pydantic, at the file edge only).

A serving measurement measures an *engine* (vLLM V1 or v0, S-LoRA, TensorRT-LLM, ...) on a
device. ``stack_profiles/serving/<engine>.json`` records, for one engine and version range,
what the engine does per iteration: its batching policy, LoRA kernel, CUDA-graph mode, KV
page size, default batch limits, adapter residency and host work. The simulator reads the
frozen :class:`simcost.serve.engines.EngineSpec` built from it, never this model.

Every number is a :class:`~simcost.stack.schema.StackNumber` (the training stacks' class,
reused): it names its source, or is ``derived`` (with the source it is derived from), or was
``fitted`` (then it names the script, the dev rows it was fitted on, the rows held out and the
residuals). Every categorical fact is a :class:`Fact` with its source. A quantity the engine
has but nobody has published is left out (``None``) and named in ``unpublished``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from simcost.stack.schema import Frac, NonNeg, StackNumber, Strict

__all__ = ["Fact", "Count", "Limits", "LargeDeviceLimits", "Host", "ServingEngine"]


class Count(NonNeg):
    """A non-negative whole number (sequences, tokens, copies) with its provenance."""

    @field_validator("value")
    @classmethod
    def _whole(cls, v: float) -> float:
        if v != int(v):
            raise ValueError(f"must be a whole number, got {v!r}")
        return v


class Fact(Strict):
    """A categorical fact (a policy, a kernel, a switch) and where it was read."""
    value: str | bool
    source: str = Field(min_length=1)
    note: str | None = None


class LargeDeviceLimits(Strict):
    """Default batch limits the engine picks on large devices (vLLM V1's
    ``EngineArgs.get_batch_defaults``: devices of at least ``min_memory_bytes`` whose name
    does not contain any of ``exclude_names``)."""
    min_memory_bytes: NonNeg
    exclude_names: list[str] = []
    max_num_seqs: Count
    max_num_tokens: Count
    source: str = Field(min_length=1)


class Limits(Strict):
    max_num_seqs: Count                       # sequences in one iteration
    max_num_tokens: Count                     # tokens in one iteration (or one prefill)
    max_wait_tokens: Count | None = None      # decode steps between admissions (LightLLM)
    batch_max_tokens_frac: Frac | None = None  # prefill batch limit as a pool fraction
    large_device: LargeDeviceLimits | None = None


class Host(Strict):
    """Host work of one iteration that the GPU waits for (serial with the forward)."""
    ops_per_seq: Count | None = None          # eager ops per sequence per iteration
    step_overhead_s: NonNeg | None = None     # fixed host seconds per iteration
    seq_overhead_s: NonNeg | None = None      # host seconds per running sequence per iteration


GraphMode = Literal["none", "decode", "piecewise"]


class ServingEngine(Strict):
    name: str = Field(min_length=1)
    display_name: str
    kind: Literal["serving"] = "serving"
    versions: dict[str, str] = Field(min_length=1)   # package -> version range described
    description: str
    sources: list[str] = []
    simulated: bool = True
    scheduler: Fact                 # a name of simcost.serve.schedulers.SCHEDULER_CLASSES
    lora_kernel: Fact               # a name of simcost.serve.step.LORA_KERNELS
    # none: eager; decode: decode-only batches replayed from graphs; piecewise: every batch
    # up to graph_max_tokens (attention between the captured pieces)
    cuda_graphs: Fact
    graph_max_tokens: Count | None = None
    kv_block_tokens: Count | None = None
    prefix_caching: Fact | None = None
    chunked_prefill: Fact | None = None
    decode_attn_overhead: NonNeg | None = None
    adapter_residency: Fact         # lru | running-batch
    adapter_copies_per_load: Count
    limits: Limits | None = None       # required when simulated
    host: Host = Host()
    full_sort_sampling: Fact | None = None
    unpublished: str = ""

    @model_validator(mode="after")
    def _facts(self):
        g = self.cuda_graphs.value
        if g not in ("none", "decode", "piecewise"):
            raise ValueError(f"cuda_graphs.value must be none, decode or piecewise, got {g!r}")
        if self.simulated and self.limits is None:
            raise ValueError("limits is missing (a simulated engine needs its batch limits)")
        r = self.adapter_residency.value
        if r not in ("lru", "running-batch"):
            raise ValueError(f"adapter_residency.value must be lru or running-batch, got {r!r}")
        for name in ("prefix_caching", "chunked_prefill", "full_sort_sampling"):
            f = getattr(self, name)
            if f is not None and not isinstance(f.value, bool):
                raise ValueError(f"{name}.value must be true or false, got {f.value!r}")
        return self


def numbers(profile: ServingEngine) -> list[tuple[str, StackNumber]]:
    """Every number of the profile with its dotted path (for provenance checks)."""
    out: list[tuple[str, StackNumber]] = []

    def walk(obj, path):
        if isinstance(obj, StackNumber):
            out.append((path, obj))
        elif isinstance(obj, Strict):
            for k in type(obj).model_fields:
                walk(getattr(obj, k), f"{path}.{k}" if path else k)
    walk(profile, "")
    return out

