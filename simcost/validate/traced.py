"""Check a traced step against the real one (needs the torch extra).

:func:`measure_real` runs the same model with random weights on the CPU at concrete sizes
(other than the ones traced), with ``torch.utils.flop_counter.FlopCounterMode`` counting
matmul FLOPs per phase and saved-tensor hooks keeping the storages autograd saves (those
still alive at the end of forward, parameters and buffers excluded), the way
:mod:`simcost.validate.torch_measure` measures the hand-built path."""
from __future__ import annotations

import gc
import weakref

from simcost.trace.record import Packed
from dataclasses import dataclass


@dataclass(frozen=True)
class RealStep:
    params_total: int
    params_trainable: int
    fwd_matmul_flops: int
    bwd_matmul_flops: int
    saved_bytes: int


def measure_real(cfg: dict, peft_config: dict | None, dims: dict, dtype: str = "fp32") -> RealStep:
    import torch

    from simcost.trace.build import build_model, input_maker, task_of
    from simcost.validate.torch_measure import _flop_counter

    model = build_model(cfg, peft_config, dtype, device="cpu")
    model.train()
    params = {id(p): p for p in model.parameters()}.values()
    skip = {t.untyped_storage()._cdata for t in (*params, *model.buffers())}
    _, task = task_of(cfg)
    inputs = input_maker(cfg, task, (peft_config or {}).get("peft_type"))(dims)
    boxes = []

    def pack_keep(t):
        if t.untyped_storage()._cdata in skip:
            return t
        b = Packed(t)
        boxes.append(weakref.ref(b))
        return b

    with _flop_counter() as fc:
        with torch.autograd.graph.saved_tensors_hooks(pack_keep, Packed.unpack):
            out = model(**inputs)
        fwd = fc.get_total_flops()
        loss = out if isinstance(out, torch.Tensor) else out.loss
        del out
        gc.collect()
        live = {}
        for r in boxes:
            b = r()
            if b is not None:
                st = b.t.untyped_storage()
                live[st._cdata] = st.nbytes()
        loss.backward()
        total = fc.get_total_flops()
    return RealStep(sum(p.numel() for p in params),
                    sum(p.numel() for p in params if p.requires_grad),
                    int(fwd), int(total - fwd), int(sum(live.values())))

