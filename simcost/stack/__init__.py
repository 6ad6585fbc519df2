"""Software stacks: what the framework really runs (fusions, host cost, allocator, kernels).

``load_stack("hf")`` gives the resolved :class:`Stack` the pipeline reads; profiles live in
``stack_profiles/training/*.json`` (schema: :mod:`simcost.stack.schema`)."""
from __future__ import annotations

from simcost.stack.registry import DEFAULT_STACK, Stack, load_stack, stack_names

__all__ = ["DEFAULT_STACK", "Stack", "load_stack", "stack_names", "optimizer_impl"]


def optimizer_impl(stack: Stack | None, device_kind: str) -> str:
    """'fused', 'foreach' or 'for-loop': the stack's choice, or torch's default (foreach off
    the CPU, the for-loop implementation on it)."""
    choice = stack.optimizer if stack is not None else "default"
    if choice == "default":
        return "for-loop" if device_kind == "cpu" else "foreach"
    return choice
