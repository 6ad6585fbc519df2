"""Live-allocation peak of a steady-state training step on CPU (the CPU analogue of
``torch.cuda.max_memory_allocated``).

A ``TorchDispatchMode`` records every storage an op allocates and frees it through a
finalizer, so the running total is exact to the byte. The step measured is the second one
(AdamW's state exists by then), gradients are set to None before forward, as
``zero_grad(set_to_none=True)`` leaves them.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from simcost.trace.record import storages
from simcost.validate.torch_measure import build_peft_model


class LiveMemory(TorchDispatchMode):
    def __init__(self, baseline: int = 0):
        super().__init__()
        self.cur = baseline
        self.peak = baseline
        self._live: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.cur -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {st.data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) for st in storages(t)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            for st in storages(t):      # a sparse tensor: its indices and values
                nb = st.nbytes()
                if nb == 0 or st.data_ptr() in inputs or id(st) in self._live:
                    continue   # a view or an in-place result
                self._live[id(st)] = nb
                self.cur += nb
                self.peak = max(self.peak, self.cur)
                weakref.finalize(st, self._free, id(st), nb)
        return out


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measure_peak(config: dict, peft_config, *, batch: int, seq: int, dtype: str = "fp32",
                 attn: str = "eager") -> dict:
    """Peak live bytes of the second training step (AdamW, default implementation)."""
    model = build_peft_model(config, peft_config, dtype, attn, meta=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config["vocab_size"]), (batch, seq), generator=g)

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    static = _storage_bytes(list(model.parameters()) + list(model.buffers()) + state) \
        + ids.untyped_storage().nbytes()
    tracker = LiveMemory(static)
    with tracker:
        step()
    return {"peak_bytes": tracker.peak, "static_bytes": static}
