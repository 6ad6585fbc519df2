"""Measured training steps in torch (the ground truth of the time model).

A step is exactly what a training loop does: forward with the loss, backward,
``optimizer.step()`` (AdamW over the trainable parameters, torch's default implementation
for the device), ``optimizer.zero_grad(set_to_none=True)``. After warm-up, the median of
``repeats`` steps is reported with the spread; an optional profiled step gives per-op
self times (``torch.profiler``, CPU activities, ``key_averages``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from simcost.validate.torch_measure import build_peft_model


@dataclass
class StepTiming:
    median_s: float
    min_s: float
    max_s: float
    samples_s: list
    forward_s: float
    backward_s: float
    optimizer_s: float
    per_op_self_s: dict = field(default_factory=dict)
    threads: int = 0


def time_steps(config: dict, peft_config, *, batch: int, seq: int, dtype: str = "fp32",
               attn: str = "sdpa", warmup: int = 2, repeats: int = 5, profile: bool = False,
               device: str = "cpu") -> StepTiming:
    model = build_peft_model(config, peft_config, dtype, attn, meta=False).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config["vocab_size"]), (batch, seq), generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(phases=None):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if phases is not None:
            phases.append((t1 - t0, t2 - t1, t3 - t2))
        return t3 - t0

    for _ in range(warmup):
        step()
    phases: list = []
    samples = [step(phases) for _ in range(repeats)]
    med = statistics.median(samples)
    i = samples.index(sorted(samples)[len(samples) // 2])
    f, b, o = phases[i]
    per_op = {}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with prof(activities=acts) as p:
            step()
        for e in p.key_averages():
            t = (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total) / 1e6
            if t > 0:
                per_op[e.key] = t
    return StepTiming(med, min(samples), max(samples), samples, f, b, o, per_op,
                      torch.get_num_threads())
