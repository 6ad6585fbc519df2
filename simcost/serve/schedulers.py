"""Batching policies of the serving simulation, one class each, behind a registry.

A scheduler decides, at each iteration of a :class:`simcost.serve.sim.Replica`, which waiting
requests join (``admit``) and what the iteration computes (``plan``); the replica owns the
state (queues, KV bytes, adapter pool) and the event loop.

- ``fcfs``: vLLM's continuous batching (v0 scheduler): FCFS, waiting prompts are admitted at
  every iteration when their KV blocks fit (prefill iterations take priority over decode),
  up to ``max_num_seqs`` sequences and ``max_num_batched_tokens`` prefill tokens; the KV cache
  grows block by block (16 tokens) and, when it runs out, the newest request is preempted and
  later recomputed. Decode runs under CUDA graphs. LoRA through Punica's SGMV kernels.
- ``slora``: S-LoRA's router (LightLLM base, arXiv:2311.03285): new requests are admitted only
  when nothing runs or after ``max_wait_tokens`` = 10 decode steps; admission is LightLLM's
  peak-usage test (the running and new requests, each run to its maximum new tokens and
  freed when done, must fit the unified pool minus the adapters' slots; no preemption); a
  prefill batch holds at most ``batch_max_tokens`` tokens (LightLLM default: 1/6 of the
  pool); the adapters of the new batch are swapped in from host memory before its prefill
  (exposed, or overlapped with the previous iteration with ``prefetch``).
- ``v1``: vLLM V1 (:class:`V1Scheduler`): the ``mixed`` iteration (decodes plus prompt chunks
  under one token budget, running requests first) with vLLM's paged KV: blocks allocated as
  tokens arrive, the newest running request preempted and recomputed when they run out.
- ``mixed``: in-flight batching with chunked prefill as TensorRT-LLM (and vLLM with chunked
  prefill): each iteration carries every decoding sequence plus prompt chunks up to
  ``max_num_tokens``; admission reserves prompt + output (GUARANTEED_NO_EVICT); CUDA graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simcost.errors import SimcostError, unknown

SCHEDULER_CLASSES: dict[str, type] = {}


def register(name: str):
    """Class decorator adding a scheduler under ``name``; a second class of that name raises."""
    def deco(cls):
        if name in SCHEDULER_CLASSES:
            raise SimcostError(f"scheduler '{name}' is already registered")
        cls.name = name
        SCHEDULER_CLASSES[name] = cls
        return cls
    return deco


def get_scheduler(name: str, engine) -> "Scheduler":
    cls = SCHEDULER_CLASSES.get(name)
    if cls is None:
        raise unknown("scheduler", name, SCHEDULER_CLASSES)
    return cls(engine)


@dataclass
class Plan:
    """What one iteration computes: prompt tokens (``pre_lens`` of requests ``pre_ids`` after
    ``pre_prior`` cached tokens), whether the running sequences decode, and which requests
    finish their prompt (``pf_done``)."""
    pre_lens: np.ndarray | None = None
    pre_prior: object = 0
    pre_ids: list | None = None
    pf_done: list | None = None
    decode: bool = True


class Scheduler:
    name = ""
    reserve = False        # KV bytes reserved for prompt + all output at admission
    graphs = False         # CUDA graphs when the engine does not say

    def __init__(self, engine):
        self.eng = engine

    # ---- policy hooks -----------------------------------------------------------------------
    def max_tokens(self, rep) -> int:
        return self.eng.max_num_tokens

    def may_admit(self, rep, busy: bool) -> bool:
        return True

    def start_round(self, rep) -> None:
        """Before the admission round."""

    def budget(self, rep) -> int:
        return rep.max_tokens

    def stop_before(self, rep, i, new: list, budget: int, ptoks: int) -> bool:
        return bool(new) and ptoks > budget

    def need_bytes(self, rep, i) -> float:
        if self.reserve:
            return (rep.prompt[i] + rep.out[i] + rep.prefix) * rep.kvtok
        tok = rep.prompt[i] + rep.gen[i] + rep.prefix
        return -(-tok // self.eng.block) * self.eng.block * rep.kvtok

    def take(self, rep, i, nb: float) -> bool:
        """Admit request ``i`` (``nb`` KV bytes) if it fits the pool; False stops the round."""
        lim = rep.pool * (0.99 if not self.reserve else 1.0)
        ap = rep.apool
        if ap is not None and rep.used + ap.bytes + nb > lim:
            ap.evict_idle(rep.used + ap.bytes + nb - lim, rep.active_adapters() | {rep.ad[i]})
        held = ap.bytes if ap is not None else 0.0
        if rep.used + held + nb > lim:
            return False
        return ap is None or rep.ensure_adapters(i)

    def plan(self, rep, new: list) -> Plan:
        if new:
            # a prefill of the new prompts (and the recompute of any preempted output)
            lens = (rep.prompt[new] + rep.gen[new]).astype(float)
            return Plan(lens, rep.prefix, list(new), list(new), decode=False)
        return Plan()

    def before_decode(self, rep) -> None:
        """Grow the running sequences' KV for the token this iteration decodes."""

    def after_iteration(self, rep, new: list) -> None:
        pass

    def release_bytes(self, rep, fin) -> float:
        f = rep.r_id[fin]
        if self.reserve:
            return float(np.sum(rep.prompt[f] + rep.out[f] + rep.prefix)) * rep.kvtok
        blocks = -(-(rep.r_ctx[fin] + rep.prefix) // self.eng.block) * self.eng.block
        return float(np.sum(blocks)) * rep.kvtok


@register("fcfs")
class FCFSScheduler(Scheduler):
    """vLLM v0: paged KV growing block by block, preempting the newest when it runs out."""
    graphs = True

    def max_tokens(self, rep) -> int:
        return max(self.eng.max_num_tokens, int(rep.prompt.max()) + rep.prefix)

    def _grow_bytes(self, rep) -> float:
        blk = self.eng.block
        return float(np.sum((rep.r_ctx + rep.prefix) % blk == 0)) * blk * rep.kvtok

    def before_decode(self, rep) -> None:
        if not rep.r_id.size:
            return
        grow = self._grow_bytes(rep)
        held = rep.apool.bytes if rep.apool is not None else 0.0
        while rep.r_id.size and rep.used + held + grow > rep.pool:
            rep.preempt_newest(self.eng.block)
            grow = self._grow_bytes(rep)
        rep.used += grow


@register("slora")
class SLoRAScheduler(Scheduler):
    """LightLLM's router as S-LoRA runs it (peak-usage admission, waits between admissions)."""
    reserve = True

    def __init__(self, engine):
        super().__init__(engine)
        self.since_admit = 10 ** 9
        self._run = self._left = None
        self._ads: set = set()
        self._ad_tok = 0.0

    def max_tokens(self, rep) -> int:
        frac = self.eng.batch_max_tokens_frac or 1 / 6
        return max(int(rep.pool // rep.kvtok * frac), int(rep.prompt.max() + rep.out.max()))

    def may_admit(self, rep, busy: bool) -> bool:
        return not busy or self.since_admit >= self.eng.max_wait_tokens

    def start_round(self, rep) -> None:
        """(cached tokens, tokens still to come) of each running request, and the slots its
        adapters take, as ReqQueue._init_cache_list builds them."""
        r = rep.r_id
        self._run = (rep.prompt[r] + rep.gen[r] + rep.prefix).astype(float)
        self._left = (rep.out[r] - rep.gen[r] - 1).astype(float)
        lora = rep.apool is not None
        self._ads = set(rep.ad[r].tolist()) if lora else set()
        self._ad_tok = float(sum(rep.apool.bytes_of(a) for a in self._ads)) / rep.kvtok \
            if lora else 0.0

    def _fits(self, rep, i) -> bool:
        """LightLLM's admission test (S-LoRA/S-LoRA slora/server/router/req_queue.py
        ReqQueue._can_add_new_req): not a reservation of prompt + max_new_tokens per request,
        but the peak token usage if every admitted request runs to its max_new_tokens and frees
        its slots when it finishes: with (cached, left) pairs sorted by tokens left,
        max_k Σ_{j<=k} cached_j + (k+1)·left_k, which must stay below the pool minus 4r slots
        per distinct rank-r adapter of the running and new requests."""
        run = np.append(self._run, rep.prompt[i] + rep.gen[i] + 1 + rep.prefix)
        left = np.append(self._left, rep.out[i] - rep.gen[i] - 1)
        ad_tok = self._ad_tok
        lora = rep.apool is not None
        if lora and rep.ad[i] not in self._ads:
            ad_tok += rep.apool.bytes_of(int(rep.ad[i])) / rep.kvtok
        o = np.argsort(-left, kind="stable")
        need = float(np.max(left[o] * np.arange(1, o.size + 1) + np.cumsum(run[o])))
        if need >= rep.pool / rep.kvtok - ad_tok:
            return False
        self._run, self._left, self._ad_tok = run, left, ad_tok
        if lora:
            self._ads.add(rep.ad[i])
        return True

    def take(self, rep, i, nb: float) -> bool:
        if not self._fits(rep, i):
            return False
        if rep.apool is not None:
            rep.ensure_adapters(i, check=False)
        return True

    def after_iteration(self, rep, new: list) -> None:
        self.since_admit = 0 if new else self.since_admit + 1


@register("mixed")
class MixedScheduler(Scheduler):
    """In-flight batching with chunked prefill (TensorRT-LLM; vLLM with chunked prefill)."""
    reserve = True
    graphs = True

    def budget(self, rep) -> int:
        return rep.max_tokens - rep.r_id.size

    def stop_before(self, rep, i, new: list, budget: int, ptoks: int) -> bool:
        return budget <= 0

    def target(self, rep, i) -> int:
        """Prompt tokens request ``i`` must prefill (the prompt; a recompute adds its output)."""
        return int(rep.prompt[i])

    def plan(self, rep, new: list) -> Plan:
        for i in new:
            rep.pf.append([i, 0])
        budget = rep.max_tokens - rep.r_id.size
        lens, prior, ids, done_ids = [], [], [], []
        for p in rep.pf:
            if budget <= 0:
                break
            i, done = p
            c = min(self.target(rep, i) - done, budget)
            lens.append(c)
            ids.append(i)
            prior.append(done + rep.prefix)
            p[1] += c
            budget -= c
            if p[1] >= self.target(rep, i):
                done_ids.append(i)
        rep.pf = [p for p in rep.pf if p[1] < self.target(rep, p[0])]
        return Plan(np.array(lens, dtype=float), np.array(prior, dtype=float), ids, done_ids,
                    decode=True)


@register("v1")
class V1Scheduler(MixedScheduler):
    """vLLM V1's scheduler (vllm/v1/core/sched/scheduler.py): one token budget per step spent
    on the running requests first (a decode token each, then the next chunk of each unfinished
    prompt), then on waiting prompts in FCFS order, chunked to what is left; KV blocks of 16
    allocated as tokens arrive (a new request's whole prompt at admission), the newest running
    request preempted and later recomputed when they run out."""
    reserve = False
    graphs = True

    def budget(self, rep) -> int:
        left = sum(self.target(rep, i) - done for i, done in rep.pf)
        return rep.max_tokens - rep.r_id.size - left

    def target(self, rep, i) -> int:
        return int(rep.prompt[i] + rep.gen[i])

    before_decode = FCFSScheduler.before_decode
    _grow_bytes = FCFSScheduler._grow_bytes

SCHEDULERS = tuple(SCHEDULER_CLASSES)
