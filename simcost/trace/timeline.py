"""The live-memory timeline of a traced step (no torch here: numpy only).

While a step is recorded (:mod:`simcost.trace.record`), every storage an aten call makes is a
*birth* and every storage torch frees is a *death* (a finalizer on the storage, which fires
when the last tensor on it goes, autograd's saved references included). Parameters and the
inputs are not counted: the timeline is what a step allocates on top of them, so its running
sum is ``torch.cuda.memory_allocated()`` less the weights (and less the gradients and
optimizer state of the previous step, which ``zero_grad(set_to_none=True)`` freed).

A reduced-depth recording (:mod:`simcost.trace.layers`) runs one layer of each kind; the
timeline of the whole model is that of the recording with each kept layer's runs (a *region*:
consecutive calls of one layer in one phase) repeated ``count`` times. How many copies an event
stands for:
- a birth in a region happens once per instance;
- a death of a storage born by the same layer (its own saved tensors, its temporaries) happens
  once per instance;
- a death of the hidden state entering a layer (its first tensor argument), in that layer's
  region, happens once per instance (each frees its predecessor's output); so does, in
  backward, a death of what the region just before made (the gradient flowing down);
- a death of a hidden state a layer returned, anywhere else, frees one copy (the last
  instance's: the others entered the instances after it);
- a death of any other storage (a mask or table shared by all layers, a layer's key/value kept
  in a cache until the output is dropped) frees every copy made: as many as its birth region
  has instances, after the last instance of a repeated region.
With ``d`` the running sum of one instance and ``net`` its end value, a region's peak is
``start + max(0, (count - 1) * net) + max(d)``; it ends at ``start + count * net`` plus its
one-off deaths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Region:
    phase: str
    layer: object                 # a kept layer (its id), or None outside the layers
    count: int
    events: tuple                 # (sign x copies, storage id, per_instance) in order


@dataclass(frozen=True)
class Timeline:
    """The regions of one recording and the split between the loss instant and the rest of
    backward (the first backward region inside the layers)."""
    regions: tuple
    loss_regions: int             # regions [0, loss_regions) end at the loss's backward


def build_timeline(calls, events, births: dict, counts: dict,
                   layer_outputs=frozenset(), layer_inputs=None) -> Timeline:
    """``calls``: the recorded calls (phase, layer); ``events``: (sign, storage id, call index)
    in the order they happened; ``births``: storage id -> index of the call that made it;
    ``layer_outputs``: the hidden states a kept layer returned; ``layer_inputs``: hidden state
    -> the kept layers it entered."""
    layer_inputs = layer_inputs or {}
    run_of_call = []
    runs: list[tuple[str, object]] = []
    for c in calls:
        # a checkpointed layer's recomputation and its backward are one instance's work: each
        # instance recomputes, then runs its backward, before the next one does
        phase = "bwd" if c.phase == "rec" and c.layer is not None else c.phase
        key = (phase, c.layer)
        if not runs or runs[-1] != key:
            runs.append(key)
        run_of_call.append(len(runs) - 1)
    if not runs:
        return Timeline((), 0)
    count = [counts.get(lay, 1) if lay is not None else 1 for _, lay in runs]
    per_run: list[list] = [[] for _ in runs]
    for sign, sid, idx in events:
        r = run_of_call[min(idx, len(calls) - 1)]
        if sign > 0:
            per_run[r].append((1, sid, True))
            continue
        b = births.get(sid)
        copies, inst = _death(r, run_of_call[b] if b is not None else None, sid, runs, count,
                              layer_outputs, layer_inputs)
        per_run[r].append((-copies, sid, inst))
    regions = tuple(Region(ph, lay, c, tuple(ev))
                    for (ph, lay), c, ev in zip(runs, count, per_run))
    split = next((i for i, (ph, lay) in enumerate(runs) if ph != "fwd" and lay is not None),
                 len(runs))
    return Timeline(regions, split)


def _death(r: int, born, sid, runs, count, layer_outputs, layer_inputs) -> tuple[int, bool]:
    """(copies freed, once per instance) of a death in region ``r`` of a storage born in
    region ``born`` (see the module docstring)."""
    if born is None:
        return 1, count[r] == 1
    phase, layer = runs[r]
    if born == r or (layer is not None and runs[born][1] == layer):
        return 1, True              # the layer's own storage
    if layer is not None and layer in layer_inputs.get(sid, ()):
        return 1, True              # the hidden state entering each instance
    if sid in layer_outputs:
        return 1, count[r] == 1     # the last instance's hidden state
    prev = next((i for i in range(r - 1, -1, -1) if runs[i][0] == phase), None)
    if phase != "fwd" and born == prev:
        return 1, True              # the gradient flowing down from the region above
    return count[born], count[r] == 1


def evaluate(tl: Timeline, nbytes: dict) -> dict:
    """Bytes live at the step's instants, at the sizes ``nbytes`` (storage id -> bytes, numbers
    or numpy arrays of one sweep): ``end_forward`` (what autograd keeps, the loss computed),
    ``peak_loss`` (the worst instant up to the loss's backward), ``peak_backward`` (the worst
    instant after it) and ``end_backward`` (the gradients left)."""
    cur = 0.0
    peak_loss = peak_bwd = 0.0
    end_fwd = None
    for i, reg in enumerate(tl.regions):
        if end_fwd is None and reg.phase != "fwd":
            end_fwd = cur
        per = [s * nbytes[sid] for s, sid, inst in reg.events if inst]
        once = [s * nbytes[sid] for s, sid, inst in reg.events if not inst]
        top = net = 0.0
        for d in per:
            net = net + d
            top = np.maximum(top, net)
        peak = cur + np.maximum(0.0, (reg.count - 1) * net) + top
        cur = cur + reg.count * net + (sum(once) if once else 0.0)
        if i < tl.loss_regions:
            peak_loss = np.maximum(peak_loss, peak)
        else:
            peak_bwd = np.maximum(peak_bwd, peak)
    if end_fwd is None:
        end_fwd = cur
    return {"end_forward": end_fwd, "peak_loss": peak_loss, "peak_backward": peak_bwd,
            "end_backward": cur}
