"""The traced step's live-memory timeline against a real CPU step (needs the torch extra).

The real step runs the whole model (every layer) with random weights at sizes other than the
ones traced, under :class:`simcost.validate.torch_peak.LiveMemory` (every storage an aten call
allocates, freed by a finalizer: exact to the byte), counting what the step allocates on top
of the parameters and inputs: the bytes alive at the end of forward (the loss computed, the
model's output dropped) and the peak over forward and backward. The traced side is the
timeline of a reduced-depth recording (:mod:`simcost.trace.timeline`), expanded to the full
depth and evaluated at the same sizes.
"""
from __future__ import annotations

import gc


def measure_real_memory(task, peft_config: dict | None, dims: dict, dtype: str = "fp32",
                        checkpointing: bool = False) -> dict:
    """``checkpointing``: the model's layers checkpointed as the traced step's are
    (:func:`simcost.trace.build.enable_checkpointing`)."""
    from simcost.trace.build import build_model, enable_checkpointing, peft_type
    from simcost.trace.record import _loss_of
    from simcost.validate.torch_peak import LiveMemory
    model = build_model(task, peft_config, dtype, device="cpu")
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    inputs = task.inputs(dims, peft_type(peft_config))
    gc.collect()
    live = LiveMemory(0)
    with live:
        out = model(**inputs)
        loss = _loss_of(out, inputs, task.loss)
        del out
        gc.collect()
        end_forward = live.cur
        loss.backward()
        del loss
    return {"end_forward": end_forward, "peak": live.peak}


def traced_memory(task, peft_config: dict | None, hints: dict, dims: dict,
                  dtype: str = "fp32", checkpointing: bool = False) -> dict:
    from simcost.trace.build import trace_task
    from simcost.trace.compiled import compile_trace
    from simcost.trace.numbers import timeline_of
    from simcost.trace.price import byte_values
    from simcost.trace.timeline import evaluate
    ct = compile_trace(trace_task(task, peft_config, dtype=dtype, hints=hints,
                                  checkpointing=checkpointing))
    if any(ct.specialized.get(k, v) != v for k, v in dims.items()):
        ct = compile_trace(trace_task(task, peft_config, dtype=dtype, hints=dims,
                                      checkpointing=checkpointing))
    t = evaluate(timeline_of(ct), byte_values(ct, ct.values(dims), ct.storage_bytes))
    return {"end_forward": int(t["end_forward"]),
            "peak": int(max(t["peak_loss"], t["peak_backward"]))}
