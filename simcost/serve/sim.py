"""Discrete-event, iteration-level simulation of an LLM server with many adapters.

Layout (after Vidur): :mod:`simcost.serve.workload` draws or replays the requests;
:func:`route` splits them over ``replicas`` (each a tensor-parallel group of ``tp`` devices);
each :class:`Replica` runs a small event loop, its batching policy a scheduler from
:mod:`simcost.serve.schedulers` (v1, fcfs, slora, mixed), its adapters an
:class:`~simcost.serve.adapters.AdapterPool`; :func:`merge` aggregates the replicas.

Events are iterations of the engine (one forward over the batch), arrivals are consumed between
them. Per iteration the work is O(batch) numpy, never per token per request in Python; nothing
is allocated per adapter, so time and memory are bounded by the simulated requests.

Routing over replicas: ``round-robin`` sends the k-th arriving request to replica
``k mod replicas``; ``adapter-affinity`` sends every request of one adapter to one replica, as
S-LoRA's cluster mode does: adapters are assigned greedily, heaviest expected load (prompt +
output tokens of its requests) first, each to the replica with the least load so far (ties:
the lower replica index, then the lower adapter id), so the assignment is deterministic.

Merged serving (``merged=True``) runs one adapter merged into the base weights: batches hold
that adapter's requests only; switching to another adapter (when the batch drains) costs an
unmerge and a merge (read and write every target weight, plus the ``B·A`` products).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from simcost.errors import SimcostError, unknown
from simcost.serve.adapters import AdapterPool, AdapterSet
from simcost.sim.breakdown import ReplicaLog, recorder
from simcost.serve.schedulers import SCHEDULER_CLASSES, SCHEDULERS, get_scheduler
from simcost.serve.workload import GENERATORS, MAX_REQUESTS, Workload

__all__ = ["Engine", "SimResult", "Replica", "Workload", "simulate", "route", "merge",
           "SCHEDULERS", "GENERATORS", "ROUTINGS", "MAX_REQUESTS"]

ROUTINGS = ("round-robin", "adapter-affinity")


@dataclass
class Engine:
    scheduler: str = "fcfs"
    max_num_seqs: int = 256
    max_num_tokens: int = 2048
    max_wait_tokens: int = 10
    block: int = 16
    prefetch: bool = False
    cuda_graphs: bool | None = None
    # engine facts (simcost.serve.engines)
    adapter_residency: str = "lru"          # or "running-batch" (S-LoRA)
    adapter_copies: int = 1                  # host-to-device transfers per adapter load
    batch_max_tokens_frac: float | None = None   # prefill batch limit as a pool fraction
    max_total_tokens: int | None = None      # KV pool in tokens (LightLLM --max_total_token_num)
    # eager host ops per sequence per iteration, serial with the GPU; and the full-vocabulary
    # sort of LightLLM's sampler (simcost.serve.engines). None: the scheduler's engine's facts
    host_ops_per_seq: int | None = None
    full_sort_sampling: bool | None = None
    # host seconds per iteration serial with the forward: fixed, and per running sequence
    step_overhead_s: float = 0.0
    seq_overhead_s: float = 0.0
    # "decode": only decode iterations replay CUDA graphs; "piecewise": every iteration of at
    # most graph_max_tokens tokens does (vLLM V1)
    graph_mode: str = "decode"
    graph_max_tokens: int | None = None

    def __post_init__(self):
        if self.host_ops_per_seq is None or self.full_sort_sampling is None:
            from simcost.serve.engines import SCHEDULER_ENGINE, all_engines
            e = all_engines().get(SCHEDULER_ENGINE.get(self.scheduler, ""))
            if self.host_ops_per_seq is None:
                self.host_ops_per_seq = e.host_ops_per_seq if e else 0
            if self.full_sort_sampling is None:
                self.full_sort_sampling = e.full_sort_sampling if e else False


@dataclass
class SimResult:
    ttft: np.ndarray
    latency: np.ndarray
    tpot: np.ndarray
    finish: np.ndarray
    out_tokens: np.ndarray
    makespan: float
    iterations: int
    adapters_resident_max: int
    adapters_served: int
    swaps: int
    swap_time: float
    preemptions: int
    max_batch: int
    extra: dict = field(default_factory=dict)


def switch_cost_s(step, max_rank: float) -> float:
    """Unmerge one adapter and merge another: read W, write W, and the B·A product, per target
    per layer."""
    cost = 0.0
    for tgt in step.targets:
        i, o = step.shapes[tgt]
        cost += 2 * (step.tm.gemm_time(step.act_dtype, 1, o, i, max_rank)
                     + step.tm.stream_time(2 * i * o * step.ab / step.tp))
    return cost * step.spec.layers


class Replica:
    """One tensor-parallel group serving its routed requests: state and event loop."""

    def __init__(self, step, mem, eng: Engine, requests, *, adapters: AdapterSet | None,
                 merged: bool, prefix: int, host_bw: float, host_lat: float, log=None):
        self.step, self.eng, self.prefix, self.merged = step, eng, prefix, merged
        self.log = log          # a simcost.sim.breakdown.ReplicaLog, or None: keep nothing
        self.arr, self.ad, self.prompt, self.out = requests
        self.adapters = adapters
        self.kvtok = mem.kv_per_token
        self.pool = self._pool(mem, eng)
        self.apool = None
        if adapters is not None and not merged:
            self.apool = AdapterPool(adapters, mem.adapter_bytes, host_bw=host_bw,
                                     host_lat=host_lat, layers=step.spec.layers,
                                     copies=eng.adapter_copies)
        self.sched = get_scheduler(eng.scheduler, eng)
        self.max_tokens = self.sched.max_tokens(self)
        self._tables(merged)
        n = self.arr.size
        self.ttft, self.finish, self.first_tok_t = (np.full(n, np.nan) for _ in range(3))
        self.gen = np.zeros(n, dtype=np.int64)      # tokens generated so far
        self.t, self.nxt, self.waiting = 0.0, 0, deque()
        self.r_id = np.zeros(0, dtype=np.int64)     # decoding set, rebuilt only on change
        self.r_ctx = np.zeros(0, dtype=np.int64)
        self.pf: list = []                          # prefilling [id, tokens done] (mixed)
        self.used = 0.0                             # KV bytes reserved or held
        self.preemptions = self.iterations = self.max_batch = 0
        self.cur_adapter, self.last_iter, self.lora_cache = -1, 0.0, None
        self.served: set = set()
        self.pending_merge = 0.0                    # merge/unmerge time not yet exposed

    @staticmethod
    def _pool(mem, eng) -> float:
        pool = mem.pool
        if eng.max_total_tokens:
            # the engine was started with a fixed pool of token slots (LightLLM/S-LoRA
            # --max_total_token_num; S-LoRA's adapters take 4r slots of it per rank-r adapter)
            pool = min(pool, eng.max_total_tokens * mem.kv_per_token)
        if pool <= 0:
            raise SimcostError(f"the weights ({mem.weights / 2**30:.1f} GiB per device) leave no "
                               "room for a KV cache on this device")
        return pool

    def _tables(self, merged: bool) -> None:
        step, eng = self.step, self.eng
        self.graphs = eng.cuda_graphs if eng.cuda_graphs is not None else self.sched.graphs
        self.lin = step.linear_table(self.max_tokens + eng.max_num_seqs + 8)
        self.head_tab = step.head_time(np.arange(0, eng.max_num_seqs + 2))
        self.host_per_kernel = step.tm.dispatch_s + step.tm.launch_s
        self.base_kernels = step.spec.layers * step.kernels_per_layer + 4
        self.switch_cost = switch_cost_s(step, self.adapters.max_rank()) \
            if merged and self.adapters is not None else 0.0

    # ---- helpers the schedulers use ---------------------------------------------------------
    def active_adapters(self) -> set:
        ids = list(self.r_id) + [p[0] for p in self.pf]
        return set(self.ad[ids].tolist()) if ids else set()

    def ensure_adapters(self, i, check: bool = True) -> bool:
        wanted = {int(self.ad[i])}
        return self.apool.ensure(wanted, lambda: self.active_adapters() | wanted, self.t,
                                 used=self.used, pool=self.pool, check=check)

    def preempt_newest(self, block: int) -> None:
        j = self.r_id[-1]
        self.used -= (-(-(self.r_ctx[-1] + self.prefix) // block)) * block * self.kvtok
        self.r_id, self.r_ctx = self.r_id[:-1], self.r_ctx[:-1]
        self.waiting.appendleft(j)
        self.preemptions += 1

    # ---- the event loop ---------------------------------------------------------------------
    def run(self) -> SimResult:
        n = self.arr.size
        while True:
            while self.nxt < n and self.arr[self.nxt] <= self.t:    # queue arrivals up to now
                self.waiting.append(self.nxt)
                self.nxt += 1
            busy = bool(self.r_id.size or self.pf)
            if not busy and not self.waiting:
                if self.nxt >= n:
                    break
                self.t = max(self.t, self.arr[self.nxt])
                continue
            new = self.admit(busy)
            plan = self.sched.plan(self, new)
            if plan.decode:
                self.sched.before_decode(self)
            n_dec = int(self.r_id.size) if plan.decode else 0
            n_pre = 0 if plan.pre_lens is None else plan.pre_lens.size
            T = n_dec + (0 if plan.pre_lens is None else int(plan.pre_lens.sum()))
            if T == 0:
                self._idle(busy, new)
                continue
            dt = self.iteration_time(plan, T, n_dec, n_pre)
            if self.log is not None:
                self.log.iterations.append((self.t, dt, n_dec, n_pre, T))
            self.t += dt
            self.last_iter = dt
            self.iterations += 1
            self.max_batch = max(self.max_batch, n_dec + n_pre)
            self.advance(plan, n_dec, new)
        return self.result()

    def _idle(self, busy: bool, new: list) -> None:
        """Nothing can run: memory is held by adapters or the head request cannot fit."""
        if not busy and self.waiting and not new:
            i = self.waiting[0]
            raise SimcostError(f"request of {self.prompt[i] + self.out[i]} tokens does not fit "
                               f"the KV pool ({int(self.pool // self.kvtok)} tokens)")
        self.t = max(self.t, self.arr[self.nxt]) if self.nxt < self.arr.size else self.t + 1e-3

    def _merged_switch(self, busy: bool) -> None:
        if self.merged and self.adapters is not None and not busy \
                and self.cur_adapter != self.ad[self.waiting[0]]:
            if self.cur_adapter >= 0:
                self.pending_merge += self.switch_cost
            self.cur_adapter = self.ad[self.waiting[0]]

    def admit(self, busy: bool) -> list:
        """One admission round of the scheduler; returns the admitted request ids."""
        new: list = []
        sch, w = self.sched, self.waiting
        if not (w and sch.may_admit(self, busy)):
            return new
        self._merged_switch(busy)
        budget = sch.budget(self)
        nseq = self.r_id.size + len(self.pf)
        sch.start_round(self)
        skipped = []
        while w and nseq < self.eng.max_num_seqs:
            i = w[0]
            if self.merged and self.adapters is not None and self.ad[i] != self.cur_adapter:
                skipped.append(w.popleft())          # other adapters wait for a switch
                if len(skipped) > 64:
                    break
                continue
            ptoks = self.prompt[i] + self.gen[i]
            if sch.stop_before(self, i, new, budget, ptoks):
                break
            nb = sch.need_bytes(self, i)
            if not sch.take(self, i, nb):
                break
            w.popleft()
            self.used += nb
            new.append(i)
            nseq += 1
            budget -= ptoks
        for s_ in reversed(skipped):
            w.appendleft(s_)
        return new

    # ---- one iteration ----------------------------------------------------------------------
    def iteration_time(self, plan, T: int, n_dec: int, n_pre: int) -> float:
        step, eng = self.step, self.eng
        dt = float(self.lin[T])
        if n_pre:
            dt += step.prefill_attn_time(plan.pre_lens, plan.pre_prior)
        if n_dec:
            dt += step.decode_attn_time(float(self.r_ctx.sum()) + self.prefix * n_dec)
        dt += float(self.head_tab[min(n_dec + n_pre, self.head_tab.size - 1)])
        kernels = self.base_kernels
        if self.apool is not None:
            lt, lk = self._lora_time(plan, T, n_dec, n_pre)
            dt += lt
            kernels += lk
        if eng.full_sort_sampling:
            dt += step.sample_time(n_dec + n_pre)
        if not self._replayed(T, n_pre):
            dt = max(dt, kernels * self.host_per_kernel)
        # per-sequence eager ops issued after the previous step's next-token .cpu() sync and
        # before this step's first kernel, and the engine's host work per iteration: the GPU
        # waits for them
        dt += ((n_dec + n_pre) * (eng.host_ops_per_seq * self.host_per_kernel + eng.seq_overhead_s)
               + eng.step_overhead_s)
        pending = self.pending_merge + (self.apool.take_pending() if self.apool else 0.0)
        self.pending_merge = 0.0
        if pending:
            dt += max(0.0, pending - self.last_iter) if eng.prefetch else pending
        return dt

    def _replayed(self, T: int, n_pre: int) -> bool:
        """The iteration replays CUDA graphs (no per-kernel host cost)."""
        eng = self.eng
        if not self.graphs or (n_pre and eng.graph_mode != "piecewise"):
            return False
        return eng.graph_max_tokens is None or T <= eng.graph_max_tokens

    def _lora_time(self, plan, T: int, n_dec: int, n_pre: int):
        """(time, kernels) of the LoRA path for this batch's adapters, cached per composition."""
        r_id, ad = self.r_id, self.ad
        ids = np.concatenate([r_id[:n_dec], np.asarray(plan.pre_ids, dtype=np.int64)]) \
            if n_pre else r_id
        slora_prefill = n_pre and self.sched.name == "slora"
        pmax = int(plan.pre_lens.max()) if slora_prefill else 0
        key = (T, ids.size, int(ids.sum()) if ids.size else 0, n_pre, pmax)
        if self.lora_cache is not None and self.lora_cache[0] == key:
            return self.lora_cache[1]
        u, cnt = np.unique(ad[ids], return_counts=True) if ids.size else (np.zeros(0, int), None)
        if slora_prefill and cnt is not None:
            # a prefill batch: each adapter's tokens are its requests' prompt tokens
            tpa = np.bincount(np.searchsorted(u, ad[ids]), weights=plan.pre_lens,
                              minlength=u.size)
        else:
            tpa = cnt * (T / max(ids.size, 1)) if cnt is not None else None
        val = self.step.lora_time(T, self.adapters.rank(u), tpa, prefill_max_len=pmax,
                                  n_seqs=n_pre if pmax else 0)
        self.lora_cache = (key, val)
        return val

    def advance(self, plan, n_dec: int, new: list) -> None:
        """Tokens out, prompts done, finished requests freed."""
        gen, r_id, r_ctx = self.gen, self.r_id, self.r_ctx
        if n_dec:
            r_ctx = r_ctx + 1
            gen[r_id] += 1
        if plan.pf_done:
            pd = np.asarray(plan.pf_done, dtype=np.int64)
            firsts = pd[np.isnan(self.ttft[pd])]
            self.ttft[firsts] = self.t - self.arr[firsts]
            self.first_tok_t[firsts] = self.t
            gen[pd] += 1
            self.served.update(self.ad[pd].tolist())
            r_id = np.concatenate([r_id, pd])
            r_ctx = np.concatenate([r_ctx, self.prompt[pd] + gen[pd]])
        self.sched.after_iteration(self, new)
        if r_id.size:
            fin = gen[r_id] >= self.out[r_id]
            if fin.any():
                self.finish[r_id[fin]] = self.t
                self.r_id, self.r_ctx = r_id, r_ctx
                self.used -= self.sched.release_bytes(self, fin)
                keep = ~fin
                r_id, r_ctx = r_id[keep], r_ctx[keep]
                if self.apool is not None and self.eng.adapter_residency == "running-batch":
                    # S-LoRA's router frees every adapter no running request uses
                    self.apool.release_unused(set(self.ad[r_id].tolist())
                                              | {self.ad[p[0]] for p in self.pf})
        self.r_id, self.r_ctx = r_id, r_ctx
        self.used = max(self.used, 0.0)

    def result(self) -> SimResult:
        n = self.arr.size
        o = self.out.astype(float)
        tpot = np.where(o > 1, (self.finish - self.first_tok_t) / np.maximum(o - 1, 1), np.nan)
        if self.log is not None:
            self.log.requests.update(arrival=self.arr, first_token=self.first_tok_t,
                                     finish=self.finish, prompt=self.prompt, output=self.out,
                                     adapter=self.ad)
        ap = self.apool
        resident = ap.max_resident if ap is not None else (1 if self.adapters is not None else 0)
        return SimResult(
            ttft=self.ttft, latency=self.finish - self.arr, tpot=tpot, finish=self.finish,
            out_tokens=self.out, makespan=float(np.nanmax(self.finish)) if n else 0.0,
            iterations=self.iterations, adapters_resident_max=resident,
            adapters_served=len(self.served), swaps=ap.swaps if ap else 0,
            swap_time=ap.swap_time if ap else 0.0, preemptions=self.preemptions,
            max_batch=self.max_batch,
            extra={"n_requests": int(n), "prompt_tokens": int(self.prompt.sum()),
                   "arrival_end": float(self.arr[-1]) if n else 0.0, "served": self.served})


# ---- replicas -------------------------------------------------------------------------------
def route(requests, replicas: int, routing: str = "round-robin") -> list[np.ndarray]:
    """Indices of the requests each replica serves (see the module docstring)."""
    n = requests[0].size
    if routing not in ROUTINGS:
        raise unknown("routing policy", routing, ROUTINGS)
    if replicas == 1:
        return [np.arange(n)]
    if routing == "round-robin":
        return [np.arange(r, n, replicas) for r in range(replicas)]
    _, ad, prompt, out = requests
    uniq, inv = np.unique(ad, return_inverse=True)
    load = np.bincount(inv, weights=(prompt + out).astype(float), minlength=uniq.size)
    order = np.lexsort((uniq, -load))             # heaviest first, then lower adapter id
    home = np.empty(uniq.size, dtype=np.int64)
    acc = np.zeros(replicas)
    for k in order:
        r = int(np.argmin(acc))                   # least loaded, lower index on ties
        home[k] = r
        acc[r] += load[k]
    dest = home[inv]
    return [np.flatnonzero(dest == r) for r in range(replicas)]


def merge(parts: list[SimResult], idx: list[np.ndarray], n: int) -> SimResult:
    """Per-request arrays back in arrival order; counts summed, peaks the largest replica's."""
    if len(parts) == 1:
        return parts[0]

    def cat(name):
        x = np.full(n, np.nan)
        for p, i in zip(parts, idx):
            x[i] = getattr(p, name)
        return x
    out = np.zeros(n, dtype=np.int64)
    for p, i in zip(parts, idx):
        out[i] = p.out_tokens
    served = set().union(*(p.extra["served"] for p in parts))
    finish = cat("finish")
    return SimResult(
        ttft=cat("ttft"), latency=cat("latency"), tpot=cat("tpot"), finish=finish,
        out_tokens=out, makespan=float(np.nanmax(finish)) if n else 0.0,
        iterations=sum(p.iterations for p in parts),
        adapters_resident_max=max(p.adapters_resident_max for p in parts),
        adapters_served=len(served), swaps=sum(p.swaps for p in parts),
        swap_time=sum(p.swap_time for p in parts),
        preemptions=sum(p.preemptions for p in parts),
        max_batch=max(p.max_batch for p in parts),
        extra={"n_requests": int(n), "prompt_tokens": sum(p.extra["prompt_tokens"] for p in parts),
               "arrival_end": max(p.extra["arrival_end"] for p in parts), "served": served,
               "replica_requests": [int(i.size) for i in idx]})


def simulate(step, mem, wl: Workload, eng: Engine, *, adapter_ranks=None, merged: bool,
             prefix: int = 0, host_bw: float = 0.0, host_lat: float = 0.0, replicas: int = 1,
             routing: str = "round-robin") -> SimResult:
    """Run the simulation. ``step`` is a :class:`StepModel` (one replica's TP group), ``mem`` a
    :class:`ServeMemory` (per device); ``adapter_ranks`` an :class:`AdapterSet`, a per-adapter
    rank array, or None for the bare base model. ``replicas`` groups share the requests by
    ``routing``."""
    if eng.scheduler not in SCHEDULER_CLASSES:
        raise unknown("scheduler", eng.scheduler, SCHEDULER_CLASSES)
    if not (isinstance(replicas, int) and replicas >= 1):
        raise SimcostError(f"replicas must be a positive integer, got {replicas!r}")
    adapters = AdapterSet.of(adapter_ranks)
    reqs = wl.generate()
    if adapters is not None:
        adapters.check_ids(reqs[1])
    idx = route(reqs, replicas, routing)
    rec = recorder()
    parts = []
    for r, i in enumerate(idx):
        if i.size == 0:
            continue
        sub = tuple(a[i] for a in reqs) if replicas > 1 else reqs
        log = None
        if rec is not None:
            log = ReplicaLog(r, step.tp, requests={"index": i})
            rec.replicas.append(log)
        parts.append(Replica(step, mem, eng, sub, adapters=adapters, merged=merged,
                             prefix=prefix, host_bw=host_bw, host_lat=host_lat, log=log).run())
    return merge(parts, [i for i in idx if i.size], reqs[0].size)
