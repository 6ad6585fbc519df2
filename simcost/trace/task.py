"""What the traced front end traces: a :class:`TracedTask` (no torch at import).

A task says how to build the base model (before peft), which named sizes its inputs have
(``batch``, ``seq``, ``target_seq``, ``image``, or a factory's own names), and how to make
the input tensors from those sizes. Every model source is one kind of task:
- a Hugging Face ``config.json`` (:mod:`simcost.trace.hf`: the task head from
  ``architectures``, the loss the model computes from ``labels``);
- a diffusers UNet or DiT config (:mod:`simcost.trace.diffusion`: one noise-prediction step);
- your own module, ``path/to/file.py:factory`` (:mod:`simcost.trace.factory`).

``key`` identifies the model for the trace cache (:mod:`simcost.trace.cache`): the canonical
config, or the factory file's content.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TEXT_DIMS = ("batch", "seq")
TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class TracedTask:
    name: str                                   # the model's name in results
    kind: str                                   # causal-lm, masked-lm, seq-cls, seq2seq, ...
    dims: tuple[str, ...]                       # the named sizes of the inputs
    build: Callable[[str, str], Any]            # (dtype, device) -> base nn.Module
    inputs: Callable[[dict, str | None], dict]  # (sizes, peft_type) -> input tensors
    key: str                                    # identity of the model for the cache
    static: tuple[str, ...] = ()                # sizes traced at their value only
    # size defaults: a value (a ViT's image size) or another size's name (T5's target: 'seq')
    defaults: dict = field(default_factory=dict)
    max_positions: int | None = None            # a learned position table's length
    learned_positions: bool = False
    loss: Callable[[Any, Any], Any] | None = None  # (model output, inputs) -> scalar loss
    model_type: str | None = None               # a config's model_type (default targets)
    # the ModuleLists that repeat, by name (a diffusers UNet's 'transformer_blocks'); empty:
    # every outermost ModuleList of one class (simcost.trace.layers)
    stacks: tuple[str, ...] = ()

    @property
    def text(self) -> bool:
        return "seq" in self.dims

    def sizes(self, given: dict) -> dict:
        """The task's sizes from the request's (``seq``, ``target_seq``, ``image``, ...):
        defaults filled in, unknown or missing ones refused with the names this task takes."""
        from simcost.errors import SimcostError
        out = {}
        for d in self.dims:
            v = given.get(d)
            if v is None:
                v = self.defaults.get(d)
                if isinstance(v, str):        # another size's value (T5's target: --seq)
                    v = given.get(v)
            if v is None:
                raise SimcostError(f"{self.name} ({self.kind}) needs {_flag(d)}; its sizes are "
                                   f"{', '.join(_flag(x) for x in self.dims)}")
            out[d] = v
        extra = [k for k, v in given.items() if v is not None and k not in self.dims]
        if extra:
            raise SimcostError(f"{_flag(extra[0])} does not apply to {self.name} ({self.kind}); "
                               f"its sizes are {', '.join(_flag(x) for x in self.dims)}")
        return out


FLAGS = {"batch": "--batch", "seq": "--seq", "target_seq": "--target-seq",
         "image": "--image-size"}


def _flag(dim: str) -> str:
    return FLAGS.get(dim, f"size '{dim}'")


def require_torch(what: str = "the traced front end") -> None:
    """One line naming the extra to install when torch, transformers or peft is missing."""
    from simcost.errors import SimcostError
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise SimcostError(f"{what} needs the torch extra ({e.name} is missing): "
                           f"pip install torch==2.13.0 && pip install 'simcost[torch]'") from None


def weights_dtype_inputs(inputs: dict, dtype: str | None) -> dict:
    """``inputs`` with the floating tensors in the weights' dtype (``--dtype``; None: as made),
    the others (ids, labels) as made: what a model casting its own inputs would compute on."""
    if dtype is None:
        return inputs
    import torch
    fdt = getattr(torch, TORCH_DTYPE[dtype])
    return {k: v.to(fdt) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}
