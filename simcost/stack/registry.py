"""Loading training stacks by name, ``alias:variant`` or path, into a plain :class:`Stack`.

The simulator reads the frozen :class:`Stack` (SI floats), never the pydantic profile. A
profile that does not validate, names an unknown fusion, or an alias that points nowhere, is
one line naming the file and the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path


from simcost.errors import SimcostError, unknown
from simcost.jsonio import load_validated, profile_file, read_json
from simcost.paths import data_dir
from simcost.stack.schema import Alias, TrainingStack

STACK_DIR = data_dir("stack_profiles") / "training"
DEFAULT_STACK = "hf"


@dataclass(frozen=True)
class Stack:
    """A resolved training stack: what the graph transform, time and memory models read."""
    name: str                         # the profile's name (hf, hf-liger, unsloth, ...)
    display_name: str
    versions: dict
    fusions: tuple[str, ...]
    optimizer: str                    # default | foreach | fused | for-loop
    checkpoint_offload: bool
    dispatch_s: float                 # host seconds per kernel on an accelerator
    cuda_graphs: bool
    step_overhead_s: float
    fragmentation: float              # reserved above allocated, per transient byte
    round_bytes: float
    extra_context_bytes: float
    gemm_sustained: float | None
    intervals: dict = field(default_factory=dict)   # hardware class -> metric -> Interval
    interval_note: str | None = None
    via: str | None = None            # the alias (and variant) the user named

    def label(self) -> dict:
        """How an estimate names the stack it priced."""
        out = {"name": self.name, "display_name": self.display_name,
               "versions": dict(self.versions)}
        if self.via:
            out["via"] = self.via
        return out

    def interval(self, hw_class: str, metric: str):
        """The out-of-fit error quantiles for ``metric`` on ``hw_class``, or None."""
        return (self.intervals.get(hw_class) or {}).get(metric)


def stack_names() -> list[str]:
    return sorted(p.stem for p in STACK_DIR.glob("*.json"))


def load_stack(ref: "str | Stack | None") -> Stack:
    """``hf``, ``hf-liger``, ``axolotl``, ``axolotl:liger`` or a path to a profile file."""
    if isinstance(ref, Stack):
        return ref
    if ref is None:
        ref = DEFAULT_STACK
    if not isinstance(ref, str):
        raise SimcostError("--stack must name a stack or a profile file")
    return _load_ref(ref)


@lru_cache(maxsize=256)
def _load_ref(ref: str) -> Stack:
    """The resolved stack of one reference (cached: estimates in a sweep or a plan search
    name the same stack thousands of times)."""
    bundled = not ref.endswith(".json") and "/" not in ref
    name, _, variant = ref.partition(":") if bundled else (ref, "", "")
    file, shown, _ = profile_file(name, STACK_DIR, "stack", stack_names)
    return _resolve(file, shown, variant or None)


@lru_cache(maxsize=64)
def _resolve(path: str, shown: str, variant: str | None) -> Stack:
    prof = _read(path, shown)
    if isinstance(prof, Alias):
        target, via = prof.alias_of, prof.name
        if variant is not None:
            if variant not in prof.variants:
                raise unknown(f"variant of stack '{prof.name}'", variant, prof.variants)
            target, via = prof.variants[variant].stack, f"{prof.name}:{variant}"
        file = Path(path).with_name(f"{target}.json")
        if not file.is_file():
            raise SimcostError(f"stack alias {shown} points to '{target}', which has no profile")
        base = _read(str(file), file.name)
        if isinstance(base, Alias):
            raise SimcostError(f"stack alias {shown} points to another alias '{target}'")
        return _plain(base, via)
    if variant is not None:
        raise SimcostError(f"stack '{prof.name}' has no variants (only aliases such as "
                           f"axolotl have: axolotl:liger)")
    return _plain(prof, None)


@lru_cache(maxsize=64)
def _read(path: str, shown: str) -> "TrainingStack | Alias":
    data = read_json(path, "stack profile")
    kind = data.get("kind", "training") if isinstance(data, dict) else None
    prof = load_validated(Alias if kind == "alias" else TrainingStack, data, "stack profile",
                          shown)
    if isinstance(prof, TrainingStack):
        from simcost.stack.fusions import FUSIONS
        for f in prof.fusions:
            if f not in FUSIONS:
                raise SimcostError(f"invalid stack profile {shown}: fusions: "
                                   f"{unknown('fusion', f, FUSIONS)}")
    return prof


def profile_of(name: str) -> "TrainingStack | Alias":
    """The validated profile of a bundled stack or alias (for listing and showing)."""
    file = STACK_DIR / f"{name}.json"
    if not file.is_file():
        raise unknown("stack", name, stack_names())
    return _read(str(file), file.name)


def _plain(p: TrainingStack, via: str | None) -> Stack:
    h, a, k = p.host, p.allocator, p.kernels
    return Stack(
        name=p.name, display_name=p.display_name, versions=dict(p.versions),
        fusions=tuple(p.fusions), optimizer=p.optimizer, checkpoint_offload=p.checkpoint_offload,
        dispatch_s=h.dispatch_s.value, cuda_graphs=h.cuda_graphs,
        step_overhead_s=h.step_overhead_s.value if h.step_overhead_s else 0.0,
        fragmentation=a.fragmentation.value, round_bytes=a.round_bytes.value,
        extra_context_bytes=a.extra_context_bytes.value if a.extra_context_bytes else 0.0,
        gemm_sustained=k.gemm_sustained.value if k.gemm_sustained else None,
        intervals={hw: dict(m) for hw, m in p.intervals.items()},
        interval_note=p.interval_note, via=via)
