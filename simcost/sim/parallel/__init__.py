"""Distributed PEFT training: parallel plans, per-device work, collectives, memory, auto search.

A :class:`Plan` (dp x tp x pp x cp ranks, a ZeRO stage, micro-batches) maps the single-device
analysed graph onto one device's share of the step:

- **Tensor parallelism** (Megatron-LM, Shoeybi et al. 2019): column-parallel linears (q, k, v,
  gate, up) split their output features, row-parallel ones (o, down) their input features, so
  each GEMM's n or k shrinks by ``tp`` and is priced by :meth:`TimeModel.gemm_time` at the split
  shape. Attention heads, RoPE and the MLP activation split with them. LoRA follows Megatron /
  NeMo: on a column-parallel layer ``lora_A`` is replicated and ``lora_B`` column-split; on a
  row-parallel layer ``lora_A`` is row-split and ``lora_B`` replicated. Per block: 2 all-reduces
  of the hidden state forward and 2 backward (with sequence parallelism, an all-gather and a
  reduce-scatter each, the same volume, and norms / residuals split along the sequence).
  Embedding and LM head are vocabulary-parallel.
- **Pipeline parallelism**: the blocks split into ``pp`` stages (the slowest holds
  ceil(L/pp) blocks plus the embedding or the head). 1F1B runs m micro-batches in
  (m + p - 1) slots, bubble (p-1)/(m+p-1) (Narayanan et al. 2021); interleaved with v chunks per
  device, (m + (p-1)/v) slots. Activations cross stage boundaries point-to-point.
- **Context parallelism** (ring attention): each rank keeps S/cp of the sequence; attention
  over its queries sees all keys, so attention costs cp times the local-length attention; K and V
  circulate around the ring (cp-1 hops forward, twice that backward), overlapped with attention.
- **Data parallelism / ZeRO**: DDP all-reduces the *trainable* gradients only (for LoRA,
  megabytes), bucketed (25 MiB) and overlapped with the last micro-batch's backward. ZeRO-1
  shards the optimizer state (and fp32 master weights), ZeRO-2 also the gradients, ZeRO-3/FSDP
  also the parameters, *all* of them, frozen ones included: each micro-batch all-gathers every
  weight of the stage in forward and again in backward (prefetched, overlapped with compute).
- **Expert parallelism** (MoE, ``ep``): the experts of each MoE layer are sharded over ``ep``
  ranks inside the data-parallel group (GShard / DeepSpeed-MoE); each rank holds E/ep experts
  (weights, gradients, optimizer states / ep) and every MoE layer runs an all-to-all dispatch
  and combine of tokens·top_k·hidden activations forward and again backward, on the critical
  path. Expert gradients are all-reduced over the dp/ep replicas of each shard.
- **Gradient accumulation**: global batch = dp x micro-batch size x micro-batches.

Memory per device scales the single-device components: weights by the device's share (TP
split, PP stage, ZeRO-3 shard + two unsharded layers in flight), gradients / optimizer / master
weights by the trainable share (and 1/dp from ZeRO-2 / ZeRO-1), activations by the stage's
blocks x micro-batches in flight (min(m, p) on the first stage under 1F1B) and by TP:
with sequence parallelism 1/tp, without it (10 + 24/tp)/34 of the per-layer activations
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
Table 2: the 10·sbh bytes of norm inputs, residuals and dropout masks stay replicated).

DeepSpeed ZeRO (``Plan.deepspeed``, a :class:`DeepSpeedZero` holding the ``zero_optimization``
buffer sizes of the ds_config the run used) replaces the generic ZeRO memory with what
DeepSpeed's optimizers allocate (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py):

- the engine casts the module to bf16/fp16 (``bf16.enabled``), so trainable parameters are stored
  16-bit and an fp32 master partition (4 B x trainable / dp) plus fp32 Adam moments
  (8 B x trainable / dp) live in the optimizer; the update is DeepSpeed's fused Adam (no
  parameter-sized temporaries);
- gradients: the 16-bit reduced partition (``contiguous_gradients``: 2 B x trainable / dp,
  ZeRO-1 keeps the full 16-bit gradients) and, at the step, its fp32 copy (4 B x trainable / dp);
- ZeRO-1/2: ``backward()`` allocates the ``reduce_bucket_size``-element 16-bit IPG bucket, twice
  with ``overlap_comm`` (double buffering), whatever the trainable count (with LoRA the buckets
  can dwarf the gradients they carry); they are live through the backward, on top of the
  activations;
- ZeRO-3: the IPG bucket (``reduce_bucket_size``) and the flat 16-bit gradient partition are
  allocated once at initialisation and stay resident.

FP8 (``dtype='fp8'``, TransformerEngine style): weights and activations stay bf16, the base
linears' GEMMs run at the fp8 peak times the measured fp8 matmul efficiency, and each fp8 GEMM
pays a quantisation pass over its inputs (read bf16, write fp8) forward and backward.

The package, by concern:

- :mod:`.plans`: :class:`Plan`, :func:`make_plan` (checked sizes), :func:`enumerate_plans`;
- :mod:`.tensor`: how each op splits over TP ranks and its time there (:func:`segment_times`),
  TP overlap, the fp8 GEMM rate;
- :mod:`.stage`: parameters and activations by where they live, the slowest stage's share and
  compute;
- :mod:`.comm`: communication per axis (tp, cp, ZeRO-3, ep, pp, dp, offload) and its overlap;
- :mod:`.memory`: memory per device (:func:`plan_memory`), DeepSpeed's buffers
  (:mod:`.deepspeed` holds its config);
- :mod:`.context` and :mod:`.evaluate`: the plan-independent :class:`Context`,
  :func:`evaluate_plan` and :func:`search` (an exact branch and bound over
  :func:`step_lower_bound`).
"""
from simcost.sim.parallel.comm import (DDP_BUCKET_BYTES, AxisComm, comm_sm_fraction,
                                      overlap_slowdown)
from simcost.sim.parallel.context import Context
from simcost.sim.parallel.deepspeed import DeepSpeedZero
from simcost.sim.parallel.evaluate import PlanResult, evaluate_plan, search, step_lower_bound
from simcost.sim.parallel.memory import TP_REPLICATED_ACT_FRACTION, PlanMemory, plan_memory
from simcost.sim.parallel.plans import (MAX_PLANS, Plan, check_ep, check_size, divisors,
                                        enumerate_plans, make_plan)
from simcost.sim.parallel.tensor import (BLOCK_PREFIX, COLUMN, ROW, UB_PIPELINE_SPLITS,
                                         SegTimes, fp8_time_model, segment_times,
                                         tp_overlap_exposed)

__all__ = ["AxisComm", "BLOCK_PREFIX", "COLUMN", "Context", "DDP_BUCKET_BYTES", "DeepSpeedZero",
           "MAX_PLANS", "Plan", "PlanMemory", "PlanResult", "ROW", "SegTimes",
           "TP_REPLICATED_ACT_FRACTION", "UB_PIPELINE_SPLITS", "check_ep", "check_size",
           "comm_sm_fraction", "divisors", "enumerate_plans", "evaluate_plan", "fp8_time_model",
           "make_plan", "overlap_slowdown", "plan_memory", "search", "segment_times",
           "step_lower_bound", "tp_overlap_exposed"]
