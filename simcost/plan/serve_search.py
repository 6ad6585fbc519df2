"""The search behind ``simcost plan serve``: the cheapest fleet that meets a serving SLO.

Every number comes from the serving simulator (:func:`simcost.serve.api.simulate_from_request`
on a validated :class:`~simcost.request.serve.ServeSimRequest`); nothing here models time or
memory. The search (the space itself: :mod:`simcost.plan.serve_space`):

1. **Space.** Hardware (default: every bundled GPU profile with a price; profiles without one
   are left out and named) x tensor-parallel degree (divisors of the model's attention heads,
   at most 8; above 1 only on profiles with a device-to-device link) x setting: unmerged with
   the engine's LoRA kernel (or each of ``--lora-kernels``), and merged (one adapter merged
   into the weights at a time, as the simulator models it: a batch holds one adapter's
   requests, switching costs an unmerge and a merge). A (hardware, tp) whose weights, one
   adapter of the largest rank and the KV cache of one longest request do not fit the device
   (:func:`simcost.serve.api.estimate_serve`'s ``fits``) is left out.
2. **Screen.** Each setting is first run offline (every request waiting at t = 0, one
   replica, ``SCREEN_REQUESTS`` requests; merged runs ``SCREEN_REQUESTS_MERGED``, as merged
   serving of many adapters runs about one request at a time): its throughput ``mu`` is the
   replica's capacity. ``ceil(rate / mu)`` replicas is the first guess; a setting whose
   ``ceil(rate / (PRUNE_SAFETY x mu))`` replicas already cost more than the fleets found (or
   exceed ``--max-devices``) is pruned without a full simulation. (The offline throughput
   underestimates the steady-state capacity by ~15 % in the runs we checked, from the batch
   ramping up and draining; the factor 2 leaves room.)
3. **Replicas.** The full workload (``--requests`` over ``requests / rate`` seconds, split
   round-robin over the replicas by the simulator's ``--devices``) is simulated at the guess,
   then one replica fewer (or upward, doubling, to the cap), then bisected: the fewest
   replicas whose run meets the SLO, assuming more replicas never hurt. Meets = TTFT p99 <=
   ``slo_ttft`` and TPOT p99 <= ``slo_tpot`` (those given) and not overloaded
   (:mod:`simcost.serve.overload`). The cap is ``--max-devices / tp`` and, once ``top``
   fleets are known, the replicas that would still be cheaper than the ``top``-th.
4. **Max batch.** The engine's default max batch is searched first. Where the decisive
   failing run (one replica fewer than found, or the cap) failed only its TPOT SLO, halved
   max batches (down to ``MIN_MAX_BATCH``, below the peak batch that run reached) are tried
   at that count: fewer sequences per decode step is what lowers TPOT.
5. Settings are taken cheapest lower bound first, so the bound tightens early; simulations
   are cached. For the best fleet: the highest rate one replica sustains within the SLO
   (bisection on the rate with ``n_requests`` requests per run, at most ``RATE_SIMULATIONS``
   runs, 5 % apart), $ per million tokens at the planned rate, and the adapters one GPU keeps
   resident (:func:`simcost.serve.memory.adapters_that_fit`: the per-device pool less the KV
   cache of the run's peak batch at its mean request length).

Ties in cost keep the first fleet found. ``simulate_args`` of a result is the
``simcost simulate serve`` command line that reproduces its numbers exactly.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import replace

from pydantic import BaseModel

from simcost.errors import SimcostError
from simcost.plan.serve_space import Setting, space
from simcost.request.plan_serve import ServePlanRequest
from simcost.request.serve import ServeSimRequest
from simcost.result import SCHEMA_VERSION

SCREEN_REQUESTS = 200
SCREEN_REQUESTS_MERGED = 40
PRUNE_SAFETY = 2.0
MIN_MAX_BATCH = 16
RATE_SIMULATIONS = 7
RATE_TOLERANCE = 0.05


class Fleet(BaseModel):
    """One setting at the replica count the search settled on (the fewest that meet the SLO,
    or for a miss the most it tried)."""
    hardware: str
    tp: int
    replicas: int
    devices: int
    merged: bool
    lora_kernel: str | None
    max_num_seqs: int
    meets_slo: bool
    overloaded: bool
    overload_reason: str | None = None
    slo_ratio: float             # the largest p99 / SLO (<= 1 meets the latency SLO)
    ttft_s: dict                 # p50, p99
    tpot_s: dict
    usd_per_hour: float
    usd_per_million_tokens: dict  # output, total (prompt + output) at the planned rate
    adapters_resident_simulated: int
    max_batch_simulated: int
    simulate_args: list[str]


class BestFleet(Fleet):
    adapters_resident_per_gpu: int
    max_rate_per_replica: float | None   # req/s; None: no rate meets the SLO on one replica


class ServePlan(BaseModel):
    schema_version: int = SCHEMA_VERSION
    model: str
    adapters: int
    ranks: list[int]
    rate_req_s: float
    slo: dict                      # ttft_s, tpot_s (p99; None: not constrained)
    n_requests: int
    engine: str
    best: BestFleet | None
    candidates: list[Fleet]        # best first: the fleets that meet the SLO, then the misses
    nearest_miss: Fleet | None     # when nothing meets the SLO
    left_out: dict[str, list[str]]
    pruned: int
    simulations: int
    answer: str
    warnings: list[str] = []


# ---- simulations ---------------------------------------------------------------------------
def _cli(kw: dict) -> list[str]:
    """The ``simcost simulate serve`` arguments of a simulation's request keywords."""
    out = []
    for k, v in kw.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, tuple):
            out += [flag, ":".join(map(str, v)) if k.endswith("_len") else ",".join(map(str, v))]
        else:
            out += [flag, repr(v) if isinstance(v, float) else str(v)]
    return out


class Simulations:
    """The plan's simulations, cached: one request per (setting, replicas, rate)."""

    def __init__(self, req: ServePlanRequest, tick=None):
        self.req = req
        self.cache: dict = {}
        self.count = 0
        self.tick = tick or (lambda text: None)

    def kwargs(self, s: Setting, replicas: int, rate: float | None = None) -> dict:
        q = self.req
        rate = q.rate if rate is None else rate
        lora = q.adapters > 0
        return dict(model=q.model, hardware=s.hardware, tp=s.tp, devices=s.tp * replicas,
                    routing=q.routing if replicas > 1 else None, engine=q.engine,
                    adapters=q.adapters, ranks=q.ranks, merged=s.merged if lora else False,
                    lora_kernel=s.kernel if lora and s.kernel != s.engine_kernel else None,
                    max_num_seqs=s.max_num_seqs, rate=float(rate),
                    duration=float(q.duration_at(rate)), input_len=q.input_len,
                    output_len=q.output_len,
                    popularity_alpha=q.popularity_alpha if q.adapters > 1 else None,
                    seed=q.seed, slo_ttft=q.slo_ttft)

    def run(self, s: Setting, replicas: int, rate: float | None = None):
        key = (s, replicas, rate)
        if key not in self.cache:
            kw = self.kwargs(s, replicas, rate)
            self.cache[key] = self._simulate(kw)
        return self.cache[key]

    def _simulate(self, kw: dict, **extra):
        from simcost.serve.api import simulate_from_request
        self.count += 1
        self.tick(f"{kw['devices']} x {kw['hardware']} (tp {kw['tp']})")
        return simulate_from_request(ServeSimRequest.build(**kw, **extra))

    def screen(self, s: Setting) -> float:
        """Offline throughput (req/s) of one replica: its capacity."""
        key = (s, "screen")
        if key not in self.cache:
            n = min(self.req.n_requests, SCREEN_REQUESTS_MERGED if s.merged and
                    self.req.adapters > 1 else SCREEN_REQUESTS)
            kw = self.kwargs(s, 1)
            kw.update(rate=math.inf, duration=None, slo_ttft=None)
            r = self._simulate(kw, n_requests=n)
            self.cache[key] = r.throughput_req_s
        return self.cache[key]


# ---- judging one run -----------------------------------------------------------------------
def slo_ratio(req: ServePlanRequest, sim) -> float:
    """The largest p99 / SLO of the constrained latencies (<= 1: within the SLO)."""
    worst = 0.0
    for slo, d in ((req.slo_ttft, sim.ttft_s), (req.slo_tpot, sim.tpot_s)):
        if slo is not None and d["p99"] is not None:
            worst = max(worst, d["p99"] / slo)
    return worst


def meets(req: ServePlanRequest, sim) -> bool:
    return not sim.overloaded and slo_ratio(req, sim) <= 1.0


def _tpot_only_miss(req: ServePlanRequest, sim) -> bool:
    ttft_ok = req.slo_ttft is None or (sim.ttft_s["p99"] or 0.0) <= req.slo_ttft
    return (not sim.overloaded and ttft_ok and req.slo_tpot is not None
            and (sim.tpot_s["p99"] or 0.0) > req.slo_tpot)


def usd_per_million_tokens(usd_per_hour: float, rate: float, sim) -> dict:
    """$ per 10^6 output and total (prompt + output) tokens served at ``rate`` req/s."""
    n = max(sim.n_requests, 1)
    out_per_s = rate * sim.output_tokens / n
    tot_per_s = rate * (sim.output_tokens + sim.prompt_tokens) / n
    per_s = usd_per_hour / 3600.0
    return {"output": per_s / out_per_s * 1e6 if out_per_s > 0 else None,
            "total": per_s / tot_per_s * 1e6 if tot_per_s > 0 else None}


def _p(d: dict) -> dict:
    return {"p50": d["p50"], "p99": d["p99"]}


def fleet(sims: Simulations, s: Setting, replicas: int) -> Fleet:
    req, sim = sims.req, sims.run(s, replicas)
    usd_h = s.price_usd_per_hour * s.tp * replicas
    return Fleet(hardware=s.hardware, tp=s.tp, replicas=replicas, devices=s.tp * replicas,
                 merged=s.merged, lora_kernel=s.kernel, max_num_seqs=s.max_num_seqs,
                 meets_slo=meets(req, sim), overloaded=sim.overloaded,
                 overload_reason=sim.overload_reason, slo_ratio=slo_ratio(req, sim),
                 ttft_s=_p(sim.ttft_s), tpot_s=_p(sim.tpot_s), usd_per_hour=usd_h,
                 usd_per_million_tokens=usd_per_million_tokens(usd_h, req.rate, sim),
                 adapters_resident_simulated=sim.adapters_resident,
                 max_batch_simulated=sim.max_batch,
                 simulate_args=_cli(sims.kwargs(s, replicas)))


# ---- the search ----------------------------------------------------------------------------
class Search:
    """Settings cheapest lower bound first; per setting the fewest replicas meeting the SLO."""

    def __init__(self, req: ServePlanRequest, sims: Simulations, settings: list[Setting]):
        self.req, self.sims, self.settings = req, sims, settings
        self.best_kind: dict = {}         # (hardware, tp) -> cheapest cost meeting the SLO
        self.results: list[tuple[Fleet, Setting]] = []
        self.capacity_misses: list[tuple[Setting, float, int]] = []  # (setting, mu, replicas)
        self.errors: list[str] = []
        self.pruned = 0

    def bound(self) -> float:
        """The cost a new fleet must beat to enter the ``top`` (inf while fewer are known)."""
        costs = sorted(self.best_kind.values())
        return costs[self.req.top - 1] if len(costs) >= self.req.top else math.inf

    def cap(self, s: Setting) -> int:
        per = s.price_usd_per_hour * s.tp
        cap = self.req.max_devices // s.tp
        limit = min(self.bound(), self.best_kind.get(s.kind, math.inf))
        if limit < math.inf and per > 0:
            cap = min(cap, math.ceil(limit / per - 1e-9) - 1)
        return cap

    def fewest(self, mu: float) -> int:
        """Replicas no fewer than which can serve the rate, by the offline capacity ``mu``
        (with the ``PRUNE_SAFETY`` margin)."""
        if not mu > 0:
            return self.req.max_devices + 1
        return max(1, math.ceil(self.req.rate / (PRUNE_SAFETY * mu)))

    def run(self, done=None) -> None:
        done = done or (lambda: None)
        heap = [(s.price_usd_per_hour * s.tp, i, s, None) for i, s in enumerate(self.settings)]
        heapq.heapify(heap)
        while heap:
            lb, i, s, mu = heapq.heappop(heap)
            if lb >= self.bound():          # every setting left costs at least as much
                for _ in range(1 + len(heap)):
                    self.pruned += 1
                    done()
                break
            if mu is None:
                try:
                    mu = self.sims.screen(s)
                except SimcostError as e:
                    self.errors.append(f"{s.hardware} tp {s.tp} ({s.label()}): {e}")
                    done()
                    continue
                heapq.heappush(heap, (s.price_usd_per_hour * s.tp * self.fewest(mu), i, s, mu))
                continue
            r_lb = self.fewest(mu)
            if r_lb * s.tp > self.req.max_devices:
                self.capacity_misses.append((s, mu, r_lb))
            if self.cap(s) < r_lb:
                self.pruned += 1
            else:
                self.evaluate(s, max(1, math.ceil(self.req.rate / mu)))
            done()

    def evaluate(self, s: Setting, r_est: int) -> None:
        cap = self.cap(s)
        try:
            r = self.replicas(s, r_est, cap)
            if r is None:
                self.record(s, cap)
                self.rescue(s, cap)
            else:
                self.record(s, r)
                if r > 1:
                    self.rescue(s, r - 1)
        except SimcostError as e:
            self.errors.append(f"{s.hardware} tp {s.tp} ({s.label()}): {e}")

    def ok(self, s: Setting, r: int) -> bool:
        return meets(self.req, self.sims.run(s, r))

    def replicas(self, s: Setting, r_est: int, cap: int) -> int | None:
        """The fewest replicas in 1..cap whose run meets the SLO (None: not even cap)."""
        if cap < 1:
            return None
        r = min(max(r_est, 1), cap)
        if self.ok(s, r):
            if r == 1 or not self.ok(s, r - 1):
                return r
            lo, hi = 0, r - 1             # 0: a count known to miss, by convention
        else:
            lo, step, hi = r, 1, None
            while hi is None:
                nxt = min(lo + step, cap)
                if nxt == lo:
                    return None
                if self.ok(s, nxt):
                    hi = nxt
                else:
                    lo, step = nxt, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.ok(s, mid):
                hi = mid
            else:
                lo = mid
        return hi

    def rescue(self, s: Setting, r: int) -> None:
        """Smaller max batches at ``r`` replicas where that run missed only its TPOT SLO."""
        if r < 1:
            return
        sim = self.sims.run(s, r)
        if not _tpot_only_miss(self.req, sim):
            return
        b = s.max_num_seqs // 2
        while b >= MIN_MAX_BATCH:
            if b < sim.max_batch:
                s2 = replace(s, max_num_seqs=b)
                if self.ok(s2, r):
                    self.record(s2, self.replicas(s2, r, r))
                    return
            b //= 2

    def record(self, s: Setting, r: int) -> None:
        f = fleet(self.sims, s, r)
        self.results.append((f, s))
        if f.meets_slo and f.usd_per_hour < self.best_kind.get(s.kind, math.inf):
            self.best_kind[s.kind] = f.usd_per_hour


def max_rate_per_replica(sims: Simulations, s: Setting, share: float) -> float | None:
    """The highest rate (req/s) one replica of ``s`` serves within the SLO. Bracketed by its
    share of the planned rate and 1.25x its offline capacity (above the sustained capacity,
    which the offline run underestimates by ~15 %), widened by 1.5x while the upper end still
    meets the SLO, then bisected to ``RATE_TOLERANCE``: at most ``RATE_SIMULATIONS`` runs.
    The highest rate seen to meet the SLO is returned (None: not even the share does)."""
    good, bad, x = 0.0, None, share
    probes = [share, max(1.25 * sims.screen(s), 1.5 * share)]
    for _ in range(RATE_SIMULATIONS):
        x = probes.pop(0) if probes else (x * 1.5 if bad is None else (good + bad) / 2)
        if meets(sims.req, sims.run(s, 1, rate=x)):
            good = max(good, x)
        else:
            bad = x if bad is None else min(bad, x)
            if good == 0.0 and not probes:
                probes = [x / 2]
        if bad is not None and good > 0 and bad - good <= RATE_TOLERANCE * bad:
            break
    return good or None


def adapters_resident_per_gpu(req: ServePlanRequest, sim) -> int:
    """Adapters one device keeps beside the weights and the KV cache of the run's peak batch."""
    from simcost.serve.memory import adapters_that_fit
    if req.adapters == 0:
        return 0
    m = sim.memory_bytes
    mean_tokens = (sim.prompt_tokens + sim.output_tokens) / max(sim.n_requests, 1)
    reserve = sim.max_batch * mean_tokens * m["kv_per_token"]
    return adapters_that_fit(m["pool"], reserve, m["adapter_bytes"], req.eff("ranks"),
                             limit=req.adapters)


# ---- the plan ------------------------------------------------------------------------------
def plan_serve(model: str, *, rate: float, adapters: int = 0, ranks=None,
               slo_ttft: float | None = None, slo_tpot: float | None = None, hardware=None,
               tp=None, lora_kernels=None, engine: str | None = None,
               routing: str | None = None, input_len=None, output_len=None,
               popularity_alpha: float | None = None, requests: int | None = None,
               duration=None, seed: int | None = None, max_devices: int = 16,
               top: int = 3) -> ServePlan:
    """The cheapest fleet serving ``rate`` req/s of ``model`` with ``adapters`` LoRA adapters
    within the SLO (p99 TTFT <= ``slo_ttft`` s, p99 TPOT <= ``slo_tpot`` s). Lengths,
    popularity and seed as ``simulate_serve``; ``requests`` (default 1000) or ``duration``
    sizes each simulation; ``hardware`` a list, or ``['all']``."""
    req = ServePlanRequest.build(
        model=model, rate=rate, adapters=adapters, ranks=ranks, slo_ttft=slo_ttft,
        slo_tpot=slo_tpot, hardware=hardware, tp=tp, lora_kernels=lora_kernels, engine=engine,
        routing=routing, input_len=input_len, output_len=output_len,
        popularity_alpha=popularity_alpha, requests=requests, duration=duration, seed=seed,
        max_devices=max_devices, top=top)
    return plan_serve_from_request(req)


def plan_serve_from_request(req: ServePlanRequest, tick=None, progress=None) -> ServePlan:
    """``tick(text)`` is called before each simulation; ``progress(total)`` returns a
    ``done()`` callback called once per setting searched or pruned."""
    settings, left, engine, model = space(req)
    if not settings:
        raise SimcostError("no hardware to search: " + "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in left.items()))
    sims = Simulations(req, tick)
    search = Search(req, sims, settings)
    search.run(progress(len(settings)) if progress else None)
    ok = sorted((fs for fs in search.results if fs[0].meets_slo),
                key=lambda fs: (fs[0].usd_per_hour, fs[0].slo_ratio))
    miss = sorted((fs for fs in search.results if not fs[0].meets_slo),
                  key=lambda fs: (fs[0].overloaded, fs[0].slo_ratio))
    best = None
    if ok:
        f, s = ok[0]
        sim = sims.run(s, f.replicas)
        best = BestFleet(**f.model_dump(),
                         adapters_resident_per_gpu=adapters_resident_per_gpu(req, sim),
                         max_rate_per_replica=max_rate_per_replica(sims, s,
                                                                   req.rate / f.replicas))
    plan = ServePlan(
        model=model, adapters=req.adapters, ranks=list(req.eff("ranks")),
        rate_req_s=req.rate, slo={"ttft_s": req.slo_ttft, "tpot_s": req.slo_tpot},
        n_requests=req.n_requests, engine=engine, best=best,
        candidates=[f for f, _ in ok + miss], nearest_miss=miss[0][0] if miss and not ok
        else None, left_out=left, pruned=search.pruned, simulations=sims.count, answer="",
        warnings=search.errors)
    from simcost.plan.serve_answer import answer
    plan.answer = answer(req, plan, search.capacity_misses)
    return plan

