"""Discrete-event, iteration-level simulation of an LLM server with many adapters.

Events are iterations of the engine (one forward over the batch), arrivals are consumed between
them. Per iteration the work is O(batch) numpy, never per token per request in Python.

Workload: ``round(rate · duration)`` requests with gamma inter-arrival times with shape
``1/cv²`` and mean ``1/rate`` (cv = 1: Poisson); prompt and output lengths uniform integers in
``[lo, hi]``; the adapter of a request is ``floor(N · X)`` with ``X ~ Power(alpha)`` (pdf
``alpha·x^(alpha−1)``; alpha = 1 is uniform, smaller alpha concentrates on low ids); adapter
``k`` has rank ``ranks[k mod len(ranks)]``. ``generator='slora'`` draws them exactly as S-LoRA's
benchmark does (``benchmarks/trace.py`` of S-LoRA/S-LoRA: legacy ``np.random`` seeded once,
``int(rate · duration)`` requests, upper bounds exclusive). Or a trace CSV with columns
``time,adapter,prompt_len,output_len``.

Schedulers:

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
  (exposed, or overlapped with the previous iteration with ``prefetch``); eager kernels, the
  engine's LoRA kernel (S-LoRA's code: per-token BGMV, MBGMM for large prefills), one eager
  op per request per step and a full-vocabulary sort in sampling.
  With the S-LoRA engine's ``running-batch`` residency, adapters no running request uses are
  freed whenever requests finish, and each load crosses the host link twice
  (:mod:`simcost.serve.engines`).
- ``mixed``: in-flight batching with chunked prefill as TensorRT-LLM (and vLLM with chunked
  prefill): each iteration carries every decoding sequence plus prompt chunks up to
  ``max_num_tokens``; admission reserves prompt + output (GUARANTEED_NO_EVICT); CUDA graphs.

Merged serving (``merged=True``) runs one adapter merged into the base weights: batches hold
that adapter's requests only; switching to another adapter (when the batch drains) costs an
unmerge and a merge (read and write every target weight, plus the ``B·A`` products).
"""
from __future__ import annotations

import csv
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simcost.errors import SimcostError

SCHEDULERS = ("fcfs", "slora", "mixed")


GENERATORS = ("default", "slora")   # how synthetic requests are drawn (Workload.generator)


@dataclass
class Workload:
    rate: float = 10.0
    duration: float = 60.0
    cv: float = 1.0
    input_len: tuple = (8, 512)
    output_len: tuple = (8, 512)
    adapters: int = 1
    ranks: tuple = (8,)
    popularity_alpha: float = 1.0
    trace: str | None = None
    n_requests: int | None = None     # all arriving at t = 0 when rate is inf (offline)
    seed: int = 0
    # "default": numpy Generator(seed), lengths uniform on [lo, hi]; "slora": the draws of
    # S-LoRA's benchmark generator (S-LoRA/S-LoRA benchmarks/trace.py generate_requests, run
    # by benchmarks/run_exp.py with seed 42): legacy np.random seeded once, then
    # power(alpha, n) for the adapter, randint(lo, hi, n) for prompt and output lengths
    # (upper bound exclusive), gamma(1/cv², cv²/rate, n) gaps, n = int(rate · duration), so
    # the simulated requests are the benchmark's own
    generator: str = "default"

    def generate(self):
        if self.trace:
            return _read_trace(self.trace)
        if self.generator == "slora":
            return _slora_generate(self)
        rng = np.random.default_rng(self.seed)
        if self.rate <= 0:
            raise SimcostError("--rate must be > 0")
        lo_i, hi_i = self.input_len
        lo_o, hi_o = self.output_len
        if lo_i < 1 or hi_i < lo_i or lo_o < 1 or hi_o < lo_o:
            raise SimcostError("lengths must be MIN:MAX with 1 <= MIN <= MAX")
        if np.isinf(self.rate):
            n = int(self.n_requests or 1000)
            t = np.zeros(n)
        else:
            if self.cv <= 0:
                raise SimcostError("--cv must be > 0")
            shape = 1.0 / self.cv ** 2
            # round(rate x duration) requests, gamma gaps (mean 1/rate)
            n = max(1, int(round(self.rate * self.duration)))
            t = np.cumsum(rng.gamma(shape, 1.0 / (shape * self.rate), n))
        prompt = rng.integers(lo_i, hi_i + 1, n)
        out = rng.integers(lo_o, hi_o + 1, n)
        if self.popularity_alpha <= 0:
            raise SimcostError("--popularity-alpha must be > 0")
        ad = np.minimum((rng.power(self.popularity_alpha, n) * self.adapters).astype(np.int64),
                        self.adapters - 1)
        return t, ad, prompt.astype(np.int64), out.astype(np.int64)


def _slora_generate(wl: "Workload"):
    if wl.rate <= 0 or not np.isfinite(wl.rate) or wl.cv <= 0 or wl.popularity_alpha <= 0:
        raise SimcostError("the S-LoRA generator needs a finite --rate > 0, --cv > 0 and "
                           "--popularity-alpha > 0")
    (lo_i, hi_i), (lo_o, hi_o) = wl.input_len, wl.output_len
    if lo_i < 1 or hi_i < lo_i or lo_o < 1 or hi_o < lo_o:
        raise SimcostError("lengths must be MIN:MAX with 1 <= MIN <= MAX")
    rs = np.random.RandomState(wl.seed)
    n = max(1, int(wl.rate * wl.duration))
    ad = np.minimum((rs.power(wl.popularity_alpha, n) * wl.adapters).astype(np.int64),
                    wl.adapters - 1)
    prompt = rs.randint(lo_i, max(hi_i, lo_i + 1), n).astype(np.int64)
    out = rs.randint(lo_o, max(hi_o, lo_o + 1), n).astype(np.int64)
    shape = 1.0 / wl.cv ** 2
    t = np.cumsum(rs.gamma(shape, wl.cv ** 2 / wl.rate, n))
    return t, ad, prompt, out


def _read_trace(path: str):
    p = Path(path)
    if not p.is_file():
        raise SimcostError(f"no trace file at '{path}'")
    try:
        with p.open() as f:
            rows = list(csv.DictReader(f))
        t = np.array([float(r["time"]) for r in rows])
        ad = np.array([int(r["adapter"]) for r in rows], dtype=np.int64)
        pr = np.array([int(r["prompt_len"]) for r in rows], dtype=np.int64)
        out = np.array([int(r["output_len"]) for r in rows], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as e:
        raise SimcostError(f"trace {path}: need columns time,adapter,prompt_len,output_len ({e})") from None
    if t.size == 0:
        raise SimcostError(f"trace {path} has no requests")
    o = np.argsort(t, kind="stable")
    return t[o], ad[o], pr[o], out[o]


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

    def __post_init__(self):
        if self.host_ops_per_seq is None or self.full_sort_sampling is None:
            from simcost.serve.engines import ENGINES, SCHEDULER_ENGINE
            e = ENGINES.get(SCHEDULER_ENGINE.get(self.scheduler, ""))
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


def simulate(step, mem, wl: Workload, eng: Engine, *, adapter_ranks: np.ndarray | None,
             merged: bool, prefix: int = 0, host_bw: float = 0.0, host_lat: float = 0.0):
    """Run the simulation. ``step`` is a :class:`StepModel`, ``mem`` a :class:`ServeMemory`;
    ``adapter_ranks[k]`` is adapter k's rank, or None for the bare base model."""
    if eng.scheduler not in SCHEDULERS:
        raise SimcostError(f"unknown scheduler '{eng.scheduler}'; valid: {', '.join(SCHEDULERS)}")
    arr, ad, prompt, out = wl.generate()
    n = arr.size
    L = step.spec.layers
    kvtok = mem.kv_per_token
    pool = mem.pool
    if eng.max_total_tokens:
        # the engine was started with a fixed pool of token slots (LightLLM/S-LoRA
        # --max_total_token_num; S-LoRA's adapters take 4r slots of it per rank-r adapter)
        pool = min(pool, eng.max_total_tokens * kvtok)
    if pool <= 0:
        raise SimcostError(f"the weights ({mem.weights / 2**30:.1f} GiB per device) leave no room "
                           f"for a KV cache on this device")
    use_lora = adapter_ranks is not None and not merged
    if adapter_ranks is not None and (ad.max() >= len(adapter_ranks)):
        raise SimcostError("the trace names an adapter id beyond --adapters")
    ab = {r: mem.adapter_bytes.get(int(r), 0.0) for r in set(np.asarray(adapter_ranks if adapter_ranks is not None else [], dtype=int).tolist())}
    abytes = np.array([ab[int(r)] for r in adapter_ranks]) if adapter_ranks is not None else None
    sched = eng.scheduler
    graphs = eng.cuda_graphs if eng.cuda_graphs is not None else sched in ("fcfs", "mixed")
    reserve = sched in ("slora", "mixed")
    max_tokens = eng.max_num_tokens
    if sched == "slora":
        frac = eng.batch_max_tokens_frac or 1 / 6
        max_tokens = max(int(pool // kvtok * frac), int(prompt.max() + out.max()))
    elif sched == "fcfs":
        max_tokens = max(max_tokens, int(prompt.max()) + prefix)
    lin = step.linear_table(max_tokens + eng.max_num_seqs + 8)
    head_tab = step.head_time(np.arange(0, eng.max_num_seqs + 2))
    host_per_kernel = step.tm.dispatch_s + step.tm.launch_s
    base_kernels = L * step.kernels_per_layer + 4
    # merge/unmerge switch cost: read W, write W, and the B·A product, per target per layer
    switch_cost = 0.0
    if merged and adapter_ranks is not None:
        r = float(np.max(adapter_ranks))
        for tgt in step.targets:
            i, o = step.shapes[tgt]
            switch_cost += 2 * (step.tm.gemm_time(step.act_dtype, 1, o, i, r)
                                + step.tm.stream_time(2 * i * o * step.ab / step.tp))
        switch_cost *= L

    ttft = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    first_tok_t = np.full(n, np.nan)
    gen = np.zeros(n, dtype=np.int64)          # tokens generated so far
    t = 0.0
    nxt = 0                                    # next arrival not yet queued
    waiting: deque = deque()
    # decoding set (numpy arrays, rebuilt only on change)
    r_id = np.zeros(0, dtype=np.int64)
    r_ctx = np.zeros(0, dtype=np.int64)
    # prefilling set for the mixed scheduler: [id, tokens done]
    pf: list = []
    used = 0.0                                 # KV bytes reserved or held
    resident: dict = {}                        # adapter -> last use time (LRU)
    res_bytes = 0.0
    res_max = 0
    swaps = 0
    swap_time = 0.0
    pending_load = 0.0
    preempt = 0
    iters = 0
    since_admit = 10 ** 9
    max_batch = 0
    cur_adapter = -1
    last_iter = 0.0
    lora_cache = None                          # (key, time) for the current composition
    served = set()

    def need_bytes(i):
        if reserve:
            return (prompt[i] + out[i] + prefix) * kvtok
        tok = prompt[i] + gen[i] + prefix
        return -(-tok // eng.block) * eng.block * kvtok

    def active_adapters():
        ids = list(r_id) + [p[0] for p in pf]
        return set(ad[ids].tolist()) if ids else set()

    def evict_idle(nbytes, keep):
        """Free ``nbytes`` of the pool by evicting adapters no running request uses (LRU)."""
        nonlocal res_bytes
        busy = active_adapters() | {keep}
        freed = 0.0
        for a in sorted(resident, key=resident.get):
            if freed >= nbytes:
                break
            if a not in busy:
                res_bytes -= abytes[a]
                freed += abytes[a]
                del resident[a]

    pool_tok = pool / kvtok
    adm = {}                                   # the LightLLM admission state (slora)

    def slora_start():
        """(cached tokens, tokens still to come) of each running request, and the slots its
        adapters take, as ReqQueue._init_cache_list builds them."""
        adm["run"] = (prompt[r_id] + gen[r_id] + prefix).astype(float)
        adm["left"] = (out[r_id] - gen[r_id] - 1).astype(float)
        adm["ads"] = set(ad[r_id].tolist()) if use_lora else set()
        adm["ad_tok"] = float(sum(abytes[a] for a in adm["ads"])) / kvtok if use_lora else 0.0

    def slora_fits(i):
        run = np.append(adm["run"], prompt[i] + gen[i] + 1 + prefix)
        left = np.append(adm["left"], out[i] - gen[i] - 1)
        ad_tok = adm["ad_tok"]
        if use_lora and ad[i] not in adm["ads"]:
            ad_tok += abytes[ad[i]] / kvtok
        o = np.argsort(-left, kind="stable")
        need = float(np.max(left[o] * np.arange(1, o.size + 1) + np.cumsum(run[o])))
        if need >= pool_tok - ad_tok:
            return False
        adm["run"], adm["left"], adm["ad_tok"] = run, left, ad_tok
        if use_lora:
            adm["ads"].add(ad[i])
        return True

    def ensure_adapters(batch_ids, check=True):
        """Make the new batch's adapters resident (unified pool, LRU eviction of adapters no
        running request uses); returns False when the pool has no room. ``check=False``: the
        caller's admission test has already counted the adapters' slots (S-LoRA)."""
        nonlocal res_bytes, swaps, swap_time, pending_load, res_max
        needed = set(ad[batch_ids].tolist()) - set(resident)
        if not needed:
            for a in set(ad[batch_ids].tolist()):
                resident[a] = t
            return True
        busy = active_adapters() | set(ad[batch_ids].tolist())
        extra = float(sum(abytes[a] for a in needed))
        if check and used + res_bytes + extra > pool:
            for a in sorted(resident, key=resident.get):
                if a not in busy:
                    res_bytes -= abytes[a]
                    del resident[a]
                    if used + res_bytes + extra <= pool:
                        break
        if check and used + res_bytes + extra > pool:
            return False
        load = 0.0
        for a in needed:
            resident[a] = t
            res_bytes += abytes[a]
            load += eng.adapter_copies * (abytes[a] / host_bw + host_lat * L) if host_bw else 0.0
        for a in set(ad[batch_ids].tolist()):
            resident[a] = t
        swaps += len(needed)
        swap_time += load
        pending_load += load
        res_max = max(res_max, len(resident))
        return True

    while True:
        # queue arrivals up to now
        while nxt < n and arr[nxt] <= t:
            waiting.append(nxt)
            nxt += 1
        busy = r_id.size or pf
        if not busy and not waiting:
            if nxt >= n:
                break
            t = max(t, arr[nxt])
            continue
        # ---- admission --------------------------------------------------------------------
        new = []
        if waiting and (sched != "slora" or not busy or since_admit >= eng.max_wait_tokens):
            if merged and adapter_ranks is not None and not busy and cur_adapter != ad[waiting[0]]:
                if cur_adapter >= 0:
                    pending_load += switch_cost
                cur_adapter = ad[waiting[0]]
            budget = max_tokens - (r_id.size if sched == "mixed" else 0)
            nseq = r_id.size + len(pf)
            if sched == "slora":
                slora_start()
            skipped = []
            while waiting and nseq < eng.max_num_seqs:
                i = waiting[0]
                if merged and adapter_ranks is not None and ad[i] != cur_adapter:
                    skipped.append(waiting.popleft())      # other adapters wait for a switch
                    if len(skipped) > 64:
                        break
                    continue
                ptoks = prompt[i] + gen[i] + (0 if reserve or prefix == 0 else 0)
                if sched != "mixed" and new and ptoks > budget:
                    break
                if sched == "mixed" and budget <= 0:
                    break
                nb = need_bytes(i)
                if sched == "slora":
                    # LightLLM's admission test (S-LoRA/S-LoRA slora/server/router/req_queue.py
                    # ReqQueue._can_add_new_req): not a reservation of prompt + max_new_tokens
                    # per request, but the peak token usage if every admitted request runs to
                    # its max_new_tokens and frees its slots when it finishes: with (cached,
                    # left) pairs sorted by tokens left, max_k Σ_{j<=k} cached_j + (k+1)·left_k,
                    # which must stay below the pool minus 4r slots per distinct rank-r
                    # adapter of the running and new requests
                    if not slora_fits(i):
                        break
                    if use_lora:
                        ensure_adapters(np.array([i]), check=False)
                    waiting.popleft()
                    used += nb
                    new.append(i)
                    nseq += 1
                    budget -= ptoks
                    continue
                lim = pool * (0.99 if not reserve else 1.0)
                if use_lora and used + res_bytes + nb > lim:
                    evict_idle(used + res_bytes + nb - lim, ad[i])
                if used + res_bytes + nb > lim:
                    break
                if use_lora and not ensure_adapters(np.array([i])):
                    break
                waiting.popleft()
                used += nb
                new.append(i)
                nseq += 1
                budget -= ptoks
            for s_ in reversed(skipped):
                waiting.appendleft(s_)
        # ---- build the iteration ----------------------------------------------------------
        pre_lens = None
        pre_prior = 0
        pf_done = []
        if sched == "mixed":
            for i in new:
                pf.append([i, 0])
            budget = max_tokens - r_id.size
            lens, prior = [], []
            pre_ids = []
            for p in pf:
                if budget <= 0:
                    break
                i, done = p
                c = min(prompt[i] - done, budget)
                lens.append(c)
                pre_ids.append(i)
                prior.append(done + prefix)
                p[1] += c
                budget -= c
                if p[1] >= prompt[i]:
                    pf_done.append(i)
            pre_lens = np.array(lens, dtype=float)
            pre_prior = np.array(prior, dtype=float)
            pf = [p for p in pf if p[1] < prompt[p[0]]]
            dec = True
        elif new:
            pre_lens = (prompt[new] + gen[new]).astype(float)   # recompute of preempted output
            pre_prior = prefix
            pf_done = list(new)
            pre_ids = list(new)
            dec = False
        else:
            dec = True
        if dec and sched == "fcfs" and r_id.size:
            # grow by one token per sequence; preempt the newest when blocks run out
            grow = float(np.sum((r_ctx + prefix) % eng.block == 0)) * eng.block * kvtok
            while r_id.size and used + res_bytes + grow > pool:
                j = r_id[-1]
                used -= (-(-(r_ctx[-1] + prefix) // eng.block)) * eng.block * kvtok
                r_id, r_ctx = r_id[:-1], r_ctx[:-1]
                waiting.appendleft(j)
                preempt += 1
                grow = float(np.sum((r_ctx + prefix) % eng.block == 0)) * eng.block * kvtok
            used += grow
        n_dec = int(r_id.size) if dec else 0
        n_pre = 0 if pre_lens is None else pre_lens.size
        T = n_dec + (0 if pre_lens is None else int(pre_lens.sum()))
        if T == 0:
            # nothing can run: memory is held by adapters or the head request cannot fit
            if not busy and waiting and not new:
                raise SimcostError(f"request of {prompt[waiting[0]] + out[waiting[0]]} tokens does "
                                   f"not fit the KV pool ({int(pool // kvtok)} tokens)")
            t = max(t, arr[nxt]) if nxt < n else t + 1e-3
            continue
        dt = float(lin[T])
        if n_pre:
            dt += step.prefill_attn_time(pre_lens, pre_prior)
        if n_dec:
            dt += step.decode_attn_time(float(r_ctx.sum()) + prefix * n_dec)
        dt += float(head_tab[min(n_dec + n_pre, head_tab.size - 1)])
        kernels = base_kernels
        if use_lora:
            ids = np.concatenate([r_id[:n_dec], np.asarray(pre_ids, dtype=np.int64)]) \
                if n_pre else r_id
            pmax = int(pre_lens.max()) if (n_pre and sched == "slora") else 0
            key = (T, ids.size, int(ids.sum()) if ids.size else 0, n_pre, pmax)
            if lora_cache is not None and lora_cache[0] == key:
                lt, lk = lora_cache[1]
            else:
                u, cnt = np.unique(ad[ids], return_counts=True) if ids.size else (np.zeros(0, int), None)
                if n_pre and cnt is not None and sched == "slora":
                    # a prefill batch: each adapter's tokens are its requests' prompt tokens
                    cnt = np.bincount(np.searchsorted(u, ad[ids]), weights=pre_lens,
                                      minlength=u.size)
                    tpa = cnt
                else:
                    tpa = cnt * (T / max(ids.size, 1)) if cnt is not None else None
                lt, lk = step.lora_time(T, adapter_ranks[u], tpa, prefill_max_len=pmax,
                                        n_seqs=n_pre if pmax else 0)
                lora_cache = (key, (lt, lk))
            dt += lt
            kernels += lk
        if eng.full_sort_sampling:
            dt += step.sample_time(n_dec + n_pre)
        if not (graphs and n_pre == 0):
            dt = max(dt, kernels * host_per_kernel)
        # per-sequence eager ops issued after the previous step's next-token .cpu() sync and
        # before this step's first kernel: the GPU waits for them
        dt += (n_dec + n_pre) * eng.host_ops_per_seq * host_per_kernel
        if pending_load:
            exposed = max(0.0, pending_load - last_iter) if eng.prefetch else pending_load
            dt += exposed
            pending_load = 0.0
        t += dt
        last_iter = dt
        iters += 1
        max_batch = max(max_batch, n_dec + n_pre)
        # ---- advance ----------------------------------------------------------------------
        if n_dec:
            r_ctx = r_ctx + 1
            gen[r_id] += 1
        if pf_done:
            pd = np.asarray(pf_done, dtype=np.int64)
            firsts = np.isnan(ttft[pd])
            ttft[pd[firsts]] = t - arr[pd[firsts]]
            first_tok_t[pd[firsts]] = t
            gen[pd] += 1
            served.update(ad[pd].tolist())
            r_id = np.concatenate([r_id, pd])
            r_ctx = np.concatenate([r_ctx, prompt[pd] + gen[pd]])
        if sched == "slora":
            since_admit = 0 if new else since_admit + 1
        if r_id.size:
            fin = gen[r_id] >= out[r_id]
            if fin.any():
                f = r_id[fin]
                finish[f] = t
                if reserve:
                    used -= float(np.sum(prompt[f] + out[f] + prefix)) * kvtok
                else:
                    used -= float(np.sum(-(-(r_ctx[fin] + prefix) // eng.block) * eng.block)) * kvtok
                keep = ~fin
                r_id, r_ctx = r_id[keep], r_ctx[keep]
                if use_lora and eng.adapter_residency == "running-batch":
                    # S-LoRA's router frees every adapter no running request uses
                    act = set(ad[r_id].tolist()) | {ad[p[0]] for p in pf}
                    for a in [a for a in resident if a not in act]:
                        res_bytes -= abytes[a]
                        del resident[a]
        used = max(used, 0.0)

    lat = finish - arr
    o = out.astype(float)
    tpot = np.where(o > 1, (finish - first_tok_t) / np.maximum(o - 1, 1), np.nan)
    return SimResult(ttft=ttft, latency=lat, tpot=tpot, finish=finish, out_tokens=out,
                     makespan=float(np.nanmax(finish)) if n else 0.0, iterations=iters,
                     adapters_resident_max=res_max if use_lora else (1 if adapter_ranks is not None else 0),
                     adapters_served=len(served), swaps=swaps, swap_time=swap_time,
                     preemptions=preempt, max_batch=max_batch,
                     extra={"n_requests": int(n), "prompt_tokens": int(prompt.sum()),
                            "arrival_end": float(arr[-1]) if n else 0.0})
