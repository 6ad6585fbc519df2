"""Page faults of a training step's fresh large blocks on a CPU (the host allocator's term).

An allocator that returns blocks of at least ``T`` bytes to the OS on free (glibc malloc:
above its mmap threshold, at most 32 MiB on 64-bit; jemalloc: above ``oversize_threshold``,
8 MiB; see :mod:`simcost.hardware.host_allocator`) hands out a fresh mapping for every such
allocation, and its pages fault in on first touch. The extra time of a step is

    t = Σ_{allocations of a step, size >= T} size / fresh_alloc_bytes_per_s

with the page-fault rate the calibration measured. Which allocations a step makes, from the
op graph (every block counted once per allocation: a block above the threshold is never
reused, so activations kept from forward to backward fault once, and fault again the next
step since they are freed by the end of backward):

- forward, per op instance: each output with its own storage (views allocate nothing), each
  tensor the op saves for backward beyond its inputs and outputs (``("new", bytes)`` entries
  of :class:`simcost.costs.OpCost`: cross-entropy's fp32 log-probabilities), and its workspace
  (``temp_bytes``). A block recomputed under checkpointing is allocated again in backward.
- backward, per op instance on the gradient path: one gradient per input that requires one
  (the input's size; element-wise ``add``/``sub`` and views pass the output gradient through
  without allocating), and one per trainable parameter (``zero_grad(set_to_none=True)``, the
  default since torch 2.0, frees gradients every step). Gradients accumulated by autograd
  for a tensor used twice are not counted twice. The cross-entropy (``log_softmax`` +
  ``nll_loss``) allocates one more fp32 logits-sized gradient inside (``nll_loss_backward``'s
  dense ``grad_input``, then ``_log_softmax_backward_data``'s output; with 16-bit logits the
  latter is fp32 too and the logits' own gradient comes on top), and its forward upcasts
  16-bit logits into an fp32 copy.
- optimizer: torch's AdamW makes two parameter-sized temporaries per tensor in its for-loop
  implementation (the CPU default: ``exp_avg_sq.sqrt() / bias_correction2_sqrt``,
  torch/optim/adam.py ``_single_tensor_adam``) and one in its foreach one (``_foreach_sqrt``);
  fused AdamW, SGD and 8-bit AdamW update in place.

Approximations: glibc below its maximum threshold (a dynamic threshold under 32 MiB, heap
trimming by ``M_TRIM_THRESHOLD``) is not modelled; blocks under the threshold are taken as
reused. On the 2-vCPU dev machine this left 0-90 MiB of erratic faults per step in the full
fine-tuning cases of ``simcost validate steps`` (validation/reports/host_allocator.json).
"""
from __future__ import annotations

import numpy as np

from simcost.dtypes import BYTES
from simcost.graph import kinds as K
from simcost.sim.timing import recomputed

PASS_THROUGH = (K.ADD, K.SUB, K.VIEW)


def big_block(nbytes, threshold: float):
    """``nbytes`` where it reaches the threshold, else 0 (numbers or sweep arrays)."""
    if isinstance(nbytes, np.ndarray):
        return np.where(nbytes >= threshold, nbytes, 0.0)
    return float(nbytes) if nbytes >= threshold else 0.0


def forward_blocks(g, r, threshold: float):
    """Bytes of one instance of record ``r``'s forward allocations of at least ``threshold``."""
    c = r.cost
    total = big_block(c.temp_bytes, threshold)
    for t in r.op.outputs:
        ten = g.tensors[t]
        if ten.storage == t and r.op.kind != K.VIEW:
            total = total + big_block(ten.nbytes, threshold)
    for s in c.saved:
        if isinstance(s, tuple):
            total = total + big_block(s[1], threshold)
    if r.op.kind == K.CROSS_ENTROPY:
        f32, up = _loss_fp32(g, r)
        if up:
            total = total + big_block(f32, threshold)      # logits.float()
    return total


def _loss_fp32(g, r):
    """(bytes of the logits in fp32, whether the loss upcasts them)."""
    logits = g.tensors[r.op.inputs[0]]
    return logits.nbytes / BYTES[logits.dtype] * 4, logits.dtype != "fp32"


def backward_blocks(g, r, threshold: float, grad_bytes):
    """Bytes of one instance of record ``r``'s gradient allocations of at least
    ``threshold``; ``grad_bytes(param)`` is a trainable parameter's gradient size."""
    if not r.rg_out or not r.cost.bwd_kernels:
        return 0.0
    total = 0.0
    if r.op.kind not in PASS_THROUGH:
        for t, needs in zip(r.op.inputs, r.rg_in):
            if needs:
                total = total + big_block(g.tensors[t].nbytes, threshold)
    if r.op.kind == K.CROSS_ENTROPY and r.rg_in[0]:
        f32, up = _loss_fp32(g, r)
        total = total + big_block(f32, threshold) * (2 if up else 1)
    for p in r.op.params:
        if p.trainable:
            total = total + big_block(grad_bytes(p), threshold)
    return total


def fresh_block_bytes(g, analysis, threshold: float, *, optimizer: str, impl: str, mixed: str,
                      checkpointing=False) -> dict:
    """{"forward", "backward", "optimizer": bytes} of a step's allocations of at least
    ``threshold`` bytes (see the module docstring for the rule)."""
    def grad_bytes(p):
        return p.numel * (4 if mixed != "none" else BYTES[p.dtype])

    fwd = 0.0
    bwd = 0.0
    for r in analysis.records:
        if r.cost.fwd_kernels:
            f = forward_blocks(g, r, threshold) * r.count
            fwd = fwd + f
            if recomputed(r, checkpointing):
                bwd = bwd + f
        bwd = bwd + backward_blocks(g, r, threshold, grad_bytes) * r.count
    return {"forward": fwd, "backward": bwd,
            "optimizer": optimizer_blocks(g, threshold, optimizer=optimizer, impl=impl,
                                          mixed=mixed)}


def optimizer_blocks(g, threshold: float, *, optimizer: str, impl: str, mixed: str):
    """Bytes of the optimizer step's temporaries of at least ``threshold`` (see the module
    docstring: torch's AdamW, two per tensor for-loop, one foreach)."""
    per_tensor = {"for-loop": 2, "foreach": 1}.get(impl, 0) if optimizer == "adamw" else 0
    opt = 0.0
    if per_tensor:
        for p, count in g.params():
            if p.trainable:
                gb = p.numel * (4 if mixed != "none" else BYTES[p.dtype])
                opt = opt + per_tensor * big_block(gb, threshold) * count
    return opt


def fault_times(g, analysis, policy, *, optimizer: str, impl: str, mixed: str,
                checkpointing=False) -> dict | None:
    """Seconds of page faults per phase under ``policy``
    (:class:`simcost.hardware.host_allocator.AllocPolicy`), None when it prices none."""
    if not policy.active:
        return None
    b = fresh_block_bytes(g, analysis, policy.threshold_bytes, optimizer=optimizer, impl=impl,
                          mixed=mixed, checkpointing=checkpointing)
    return {k: v / policy.fault_bytes_per_s for k, v in b.items()}
