"""Serving: per-iteration prefill/decode cost, KV cache and adapter memory, multi-LoRA serving
(merged, Punica/S-LoRA batched kernels, peft's per-adapter loop) and a discrete-event simulator
with continuous batching. See :mod:`simcost.serve.api` for the entry points."""
from simcost.serve.api import ServeEstimate, ServeSimulation, estimate_serve, simulate_serve

__all__ = ["ServeEstimate", "ServeSimulation", "estimate_serve", "simulate_serve"]
