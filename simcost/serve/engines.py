"""Serving engines: the facts of each engine a serving simulation depends on, loaded from
``stack_profiles/serving/<engine>.json`` (schema: :mod:`simcost.serve.engine_profile`).

A serving measurement is a measurement of an *engine* (vLLM V1 or v0, S-LoRA, TensorRT-LLM, a
peft ``generate()`` loop) on a device, not of the device alone. Each profile records, for one
engine and version range, what the engine does per iteration, with the place each fact was
read (or, for S-LoRA's host cost per iteration, the fit that produced it:
``validation/fit/fit_engines.py``). Where a quantity the simulation would need has not been
published, the profile leaves it out and its ``unpublished`` note names the gap.

The simulator reads the frozen :class:`EngineSpec` (plain Python values), never the pydantic
profile. ``get_engine`` takes a name (``vllm``, ``vllm-v0``, ``slora``, ``trtllm``) or a path to
a profile file; an unknown name, or a profile file that does not validate, is one line naming
the nearest names or the field.

Fields and how the simulation uses them:

- ``scheduler``: the batching policy (:mod:`simcost.serve.schedulers`): ``v1`` (vLLM V1's
  unified token budget), ``fcfs`` (vLLM v0, prefill first), ``slora`` (LightLLM's router),
  ``mixed`` (in-flight batching with chunked prefill and reservation, TensorRT-LLM).
- ``lora_kernel``: the heterogeneous-adapter kernel (:mod:`simcost.serve.step`).
- ``graph_mode``: ``none`` (eager), ``decode`` (decode-only iterations replayed from CUDA graphs,
  no per-kernel host cost), ``piecewise`` (every iteration of at most ``graph_max_tokens``
  tokens replayed, vLLM V1); ``cuda_graphs`` is ``graph_mode != "none"``.
- ``kv_page_tokens``: KV-cache allocation granularity in tokens (vLLM block 16; S-LoRA /
  LightLLM one token per slot); vLLM's schedulers allocate blocks of 16.
- ``decode_attn_overhead``: fractional latency a paged decode-attention kernel adds over a
  contiguous-KV kernel streaming the same bytes; ``None``: not published, not applied.
- ``adapter_residency``: ``lru`` or ``running-batch`` (S-LoRA frees every adapter no running
  request uses); ``adapter_copies_per_load``: host-to-device transfers per adapter load.
- ``max_num_seqs`` / ``max_num_tokens`` / ``max_wait_tokens`` / ``batch_max_tokens_frac``: the
  engine's default batch limits; ``large_device``: (min bytes, excluded names, seqs, tokens),
  the defaults on large devices (:func:`default_limits`).
- ``host_ops_per_seq``: eager host ops per sequence per iteration issued while the GPU waits,
  each at the hardware profile's dispatch + launch time; ``step_overhead_s`` /
  ``seq_overhead_s``: host seconds per iteration, fixed and per running sequence, serial with
  the forward.
- ``full_sort_sampling``: the sampler sorts the full vocabulary of every sequence each step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache


from simcost.errors import SimcostError, unknown
from simcost.jsonio import load_validated, profile_file, read_json
from simcost.paths import data_dir
from simcost.serve.engine_profile import ServingEngine

ENGINE_DIR = data_dir("stack_profiles") / "serving"
DEFAULT_ENGINE = "vllm"
# the engine a bare --scheduler names (without --engine)
SCHEDULER_ENGINE = {"v1": "vllm", "fcfs": "vllm-v0", "slora": "slora", "mixed": "trtllm"}


@dataclass(frozen=True)
class EngineSpec:
    name: str
    display: str
    versions: dict
    scheduler: str
    lora_kernel: str
    graph_mode: str
    kv_page_tokens: int | None
    decode_attn_overhead: float | None
    adapter_residency: str
    adapter_copies_per_load: int
    max_num_seqs: int
    max_num_tokens: int
    max_wait_tokens: int = 10
    batch_max_tokens_frac: float | None = None
    large_device: tuple | None = None      # (min_memory_bytes, exclude_names, seqs, tokens)
    graph_max_tokens: int | None = None
    host_ops_per_seq: int = 0
    step_overhead_s: float = 0.0
    seq_overhead_s: float = 0.0
    full_sort_sampling: bool = False
    prefix_caching: bool = False
    chunked_prefill: bool = False
    simulated: bool = True
    sources: dict = field(default_factory=dict)
    unpublished: str = ""

    @property
    def cuda_graphs(self) -> bool:
        return self.graph_mode != "none"

    def label(self) -> dict:
        """How a serving result names the engine it simulated."""
        return {"name": self.name, "display_name": self.display, "versions": dict(self.versions)}


def engine_names() -> list[str]:
    return sorted(p.stem for p in ENGINE_DIR.glob("*.json"))


def all_engines() -> dict[str, EngineSpec]:
    """Every profile under ``stack_profiles/serving`` by name (simulated or described only)."""
    return {n: _load(str(ENGINE_DIR / f"{n}.json"), f"{n}.json") for n in engine_names()}


def __getattr__(name: str):
    if name == "ENGINES":                     # the registry, read when first asked for
        return all_engines()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_engine(ref: "str | EngineSpec") -> EngineSpec:
    """A profile by name or path (described-only engines included)."""
    if isinstance(ref, EngineSpec):
        return ref
    file, shown, _ = profile_file(ref, ENGINE_DIR, "serving engine", engine_names)
    return _load(file, shown)


def get_engine(ref: "str | EngineSpec") -> EngineSpec:
    """A simulated engine by name or path; a described-only one is refused with its reason."""
    e = load_engine(ref)
    if not e.simulated:
        raise SimcostError(f"engine '{e.name}' is described but not simulated: {e.unpublished}")
    return e


def default_limits(e: EngineSpec, memory_bytes: float, device_name: str) -> tuple[int, int]:
    """(max_num_seqs, max_num_tokens) the engine picks by default on this device."""
    if e.large_device is not None:
        min_bytes, exclude, seqs, tokens = e.large_device
        name = device_name.lower()
        if memory_bytes >= min_bytes and not any(x in name for x in exclude):
            return seqs, tokens
    return e.max_num_seqs, e.max_num_tokens


@lru_cache(maxsize=64)
def _load(path: str, shown: str) -> EngineSpec:
    prof = load_validated(ServingEngine, read_json(path, "serving engine profile"),
                          "serving engine profile", shown)
    if prof.simulated:
        from simcost.serve.schedulers import SCHEDULER_CLASSES
        from simcost.serve.step import LORA_KERNELS
        for what, val, valid in (("scheduler", prof.scheduler.value, SCHEDULER_CLASSES),
                                 ("lora_kernel", prof.lora_kernel.value, LORA_KERNELS)):
            if val not in valid:
                raise SimcostError(f"invalid serving engine profile {shown}: {what}.value: "
                                   f"{unknown(what.replace('_', ' '), str(val), valid)}")
    return _plain(prof)


def _num(x, default=None, cast=float):
    return default if x is None else cast(x.value)


def _plain(p: ServingEngine) -> EngineSpec:
    lim, h = p.limits, p.host
    large = None
    if lim is not None and lim.large_device is not None:
        ld = lim.large_device
        large = (ld.min_memory_bytes.value, tuple(x.lower() for x in ld.exclude_names),
                 int(ld.max_num_seqs.value), int(ld.max_num_tokens.value))
    sources = {k: getattr(p, k).source for k in ("scheduler", "lora_kernel", "cuda_graphs",
                                                  "adapter_residency")}
    for k in ("prefix_caching", "chunked_prefill", "full_sort_sampling"):
        if getattr(p, k) is not None:
            sources[k] = getattr(p, k).source
    from simcost.serve.engine_profile import numbers
    for path, n in numbers(p):
        sources[path] = n.source or f"fitted by {n.fitted.script}"
    flag = (lambda f: bool(f.value) if f is not None else False)
    return EngineSpec(
        name=p.name, display=p.display_name, versions=dict(p.versions),
        scheduler=str(p.scheduler.value), lora_kernel=str(p.lora_kernel.value),
        graph_mode=str(p.cuda_graphs.value), kv_page_tokens=_num(p.kv_block_tokens, cast=int),
        decode_attn_overhead=_num(p.decode_attn_overhead),
        adapter_residency=str(p.adapter_residency.value),
        adapter_copies_per_load=int(p.adapter_copies_per_load.value),
        max_num_seqs=_num(lim.max_num_seqs, 1, int) if lim else 1,
        max_num_tokens=_num(lim.max_num_tokens, 1, int) if lim else 1,
        max_wait_tokens=_num(lim.max_wait_tokens, 10, int) if lim else 10,
        batch_max_tokens_frac=_num(lim.batch_max_tokens_frac) if lim else None,
        large_device=large, graph_max_tokens=_num(p.graph_max_tokens, cast=int),
        host_ops_per_seq=_num(h.ops_per_seq, 0, int), step_overhead_s=_num(h.step_overhead_s, 0.0),
        seq_overhead_s=_num(h.seq_overhead_s, 0.0),
        full_sort_sampling=flag(p.full_sort_sampling), prefix_caching=flag(p.prefix_caching),
        chunked_prefill=flag(p.chunked_prefill), simulated=p.simulated, sources=sources,
        unpublished=p.unpublished)
