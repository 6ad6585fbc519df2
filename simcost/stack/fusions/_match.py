"""Pattern-matching helpers shared by the fusion rules."""
from __future__ import annotations


def consumers(seg, tid) -> list:
    """The ops of ``seg`` that read tensor ``tid``."""
    return [op for op in seg.ops if tid in op.inputs]


def only_feeds(g, seg, tid, op) -> bool:
    """Whether ``tid`` is read by ``op`` alone: no other op of the segment, not the segment's
    carried state, not a global (shared) tensor."""
    if g.tensors[tid].is_global or tid in (seg.output_tid, seg.aux_out):
        return False
    return consumers(seg, tid) == [op]


def from_model(op) -> bool:
    """An op of the model itself (peft's added ops carry ``attrs['adapter']``): the stacks
    patch the model's modules, not peft's."""
    return not op.attrs.get("adapter")
