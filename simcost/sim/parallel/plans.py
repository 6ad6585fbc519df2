"""Parallel plans: how a job splits over dp x tp x pp x cp ranks (and ep inside dp), checked
when given, enumerated for ``--parallel auto``.

Every size is a whole number >= 1: 0 or a negative size is refused here, whoever calls (the
CLI, the API, the validators), never turned into 1 or priced. Enumeration walks only the sizes
that can be valid (tp up to the node size, pp up to the layer count, cp dividing half the
sequence, dp dividing the global batch), so its work is bounded by the model, the node and the
batch, not by the device count; the plan count itself is capped at :data:`MAX_PLANS`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from numbers import Integral

from simcost.errors import SimcostError
from simcost.sim.parallel.deepspeed import DeepSpeedZero

SCHEDULES = ("1f1b", "interleaved")
OFFLOADS = ("none", "optimizer", "params")
ZERO_STAGES = (0, 1, 2, 3)
# --parallel auto evaluates every plan it enumerates (~2 ms each, plus one graph per
# micro-batch size): past this many it refuses and asks for a narrower search
MAX_PLANS = 5000
OPTION = {"tp": "--tp", "pp": "--pp", "dp": "--dp", "cp": "--cp", "ep": "--ep",
          "micro_batch": "--micro-batch", "virtual_stages": "--virtual-stages",
          "devices": "--devices", "global_batch": "--batch"}


@dataclass(frozen=True)
class Plan:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = 0
    micro_batch: int = 1          # samples per micro-batch (per dp rank)
    micro_batches: int = 1        # gradient-accumulation steps (= pipeline micro-batches)
    sp: bool = False              # Megatron sequence parallelism (needs tp > 1)
    tp_overlap: bool = False      # TP communication overlapped with the linears' GEMMs
    schedule: str = "1f1b"        # 1f1b | interleaved
    virtual_stages: int = 1       # interleaved: model chunks per device
    offload: str = "none"         # none | optimizer | params (ZeRO-Offload / ZeRO-Infinity)
    deepspeed: DeepSpeedZero | None = None   # ZeRO via DeepSpeed: its buffers (package doc)
    ep: int = 1                   # expert parallelism (MoE): experts sharded over ep dp ranks

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def seq_parallel(self) -> bool:
        """Sequence parallelism in effect (it needs tp > 1)."""
        return self.sp and self.tp > 1

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["devices"] = self.devices
        d["global_batch"] = self.dp * self.micro_batch * self.micro_batches
        return d

    def label(self) -> str:
        s = f"dp{self.dp} tp{self.tp}{'+sp' if self.sp else ''} pp{self.pp} cp{self.cp} " \
            f"zero{self.zero} mb{self.micro_batch}x{self.micro_batches}"
        if self.schedule == "interleaved":
            s += f" v{self.virtual_stages}"
        if self.offload != "none":
            s += f" offload-{self.offload}"
        if self.deepspeed is not None and self.zero:
            s += " deepspeed"
        if self.ep > 1:
            s += f" ep{self.ep}"
        return s


def check_size(name: str, value) -> int:
    """A plan size (``tp``, ``pp``, ``micro_batch``, ...): a whole number >= 1, or one line."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise SimcostError(f"{OPTION.get(name, name)} must be a whole number >= 1, got {value!r}")
    return int(value)


def _size_or_one(name: str, value) -> int:
    return 1 if value is None else check_size(name, value)


def divisors(n: int, limit: int | None = None) -> list[int]:
    """The divisors of ``n`` >= 1 that are at most ``limit``, ascending, in
    O(min(limit, sqrt n)) trial divisions (never a scan up to ``n``)."""
    n = check_size("n", n)
    return _divisors(n, n if limit is None else min(n, limit))


def _divisors(n: int, top: int) -> list[int]:
    root = math.isqrt(n)
    if top <= root:
        return [d for d in range(1, top + 1) if n % d == 0]
    small = [d for d in range(1, root + 1) if n % d == 0]
    large = [n // d for d in reversed(small) if n // d != d and n // d <= top]
    return small + large


def make_plan(devices, global_batch, *, tp=None, pp=None, dp=None, cp=None, zero=0,
              micro_batch=None, sp=None, tp_overlap=False, schedule="1f1b", virtual_stages=1,
              offload="none", spec=None, seq=None, deepspeed=None, ep=None) -> Plan:
    devices = check_size("devices", devices)
    global_batch = check_size("global_batch", global_batch)
    tp, pp, cp = _size_or_one("tp", tp), _size_or_one("pp", pp), _size_or_one("cp", cp)
    if dp is None:
        if devices % (tp * pp * cp):
            raise SimcostError(f"--devices {devices} is not divisible by tp*pp*cp = {tp * pp * cp}")
        dp = devices // (tp * pp * cp)
    dp = check_size("dp", dp)
    if dp * tp * pp * cp != devices:
        raise SimcostError(f"dp*tp*pp*cp = {dp * tp * pp * cp} != --devices {devices}")
    if global_batch % dp:
        raise SimcostError(f"global batch {global_batch} is not divisible by dp = {dp}")
    per = global_batch // dp
    micro_batch = (1 if pp > 1 else per) if micro_batch is None else \
        check_size("micro_batch", micro_batch)
    if per % micro_batch:
        raise SimcostError(f"per-replica batch {per} is not divisible by micro-batch {micro_batch}")
    virtual_stages = check_size("virtual_stages", virtual_stages)
    _check_choices(zero, schedule, offload)
    ep = _size_or_one("ep", ep)
    _check_model_fit(spec, seq, tp, pp, cp, dp, ep)
    return Plan(dp=dp, tp=tp, pp=pp, cp=cp, zero=zero, micro_batch=micro_batch,
                micro_batches=per // micro_batch, sp=bool(sp if sp is not None else tp > 1),
                tp_overlap=tp_overlap, schedule=schedule,
                virtual_stages=virtual_stages if schedule == "interleaved" else 1, offload=offload,
                deepspeed=deepspeed, ep=ep)


def _check_choices(zero, schedule, offload) -> None:
    if zero not in ZERO_STAGES:
        raise SimcostError(f"--zero must be 0, 1, 2 or 3, got {zero}")
    if schedule not in SCHEDULES:
        raise SimcostError(f"unknown pipeline schedule '{schedule}'; valid: {', '.join(SCHEDULES)}")
    if offload not in OFFLOADS:
        raise SimcostError(f"unknown offload '{offload}'; valid: {', '.join(OFFLOADS)}")


def _check_model_fit(spec, seq, tp, pp, cp, dp, ep) -> None:
    """The sizes against the model: heads for tp, layers for pp, experts and dp for ep, the
    sequence for cp."""
    if spec is not None:
        if spec.heads % tp or spec.kv_heads % tp and tp % spec.kv_heads:
            raise SimcostError(f"tp = {tp} does not divide {spec.name}'s {spec.heads} heads")
        if pp > spec.layers:
            raise SimcostError(f"pp = {pp} exceeds {spec.name}'s {spec.layers} layers")
    if ep > 1:
        if spec is not None:
            check_ep(spec, ep)
        if dp % ep:
            raise SimcostError(f"--ep {ep} does not divide the data-parallel size dp = {dp}")
    if seq is not None and seq % cp:
        raise SimcostError(f"sequence {seq} is not divisible by cp = {cp}")


def check_ep(spec, ep) -> None:
    """Expert parallelism needs a mixture-of-experts model whose expert count ep divides."""
    if ep is None or ep == 1:
        return
    check_size("ep", ep)
    if not getattr(spec, "experts", 0):
        raise SimcostError(f"--ep {ep} needs a mixture-of-experts model; {spec.name} has no experts")
    if spec.experts % ep:
        raise SimcostError(f"--ep {ep} does not divide {spec.name}'s {spec.experts} experts")


def axis_sizes(devices, global_batch, spec, seq, gpus_per_node):
    """(tp, pp, cp, dp) with tp·pp·cp·dp = devices, ascending in (tp, pp, cp): tp within a node
    and dividing the heads, pp <= layers, cp dividing the sequence into 2cp chunks (for
    load-balanced causal attention), dp dividing the global batch."""
    for tp in divisors(devices, gpus_per_node):
        if spec.heads % tp or (spec.kv_heads % tp and tp % spec.kv_heads):
            continue
        for pp in divisors(devices // tp, spec.layers):
            rest = devices // (tp * pp)
            cps = divisors(math.gcd(rest, seq // 2)) if seq >= 2 and seq % 2 == 0 else [1]
            for cp in cps:
                dp = rest // cp
                if global_batch % dp == 0:
                    yield tp, pp, cp, dp


def enumerate_plans(devices, global_batch, spec, seq, gpus_per_node, *, zeros=(0, 1, 2, 3),
                    tp_overlap=False, fixed: dict | None = None,
                    max_plans: int = MAX_PLANS, sp=None, schedule="1f1b", virtual_stages=1,
                    offload="none", deepspeed=None) -> list[Plan]:
    """Valid plans (see :func:`axis_sizes`), every micro-batch size and ZeRO stage; for
    mixture-of-experts models also ep dividing both dp and the expert count. ``fixed`` pins
    sizes (None: free). More than ``max_plans`` plans are refused with one line.

    The options the search does not vary apply to every plan: sequence parallelism (None: on
    wherever tp > 1), the pipeline schedule (where pp > 1), offload, DeepSpeed."""
    devices = check_size("devices", devices)
    global_batch = check_size("global_batch", global_batch)
    fixed = {k: check_size(k, v) for k, v in (fixed or {}).items() if v is not None}
    virtual_stages = check_size("virtual_stages", virtual_stages)
    for z in zeros:
        _check_choices(z, schedule, offload)
    experts = getattr(spec, "experts", 0) or 0
    plans = []
    for tp, pp, cp, dp in axis_sizes(devices, global_batch, spec, seq, gpus_per_node):
        cand = dict(tp=tp, pp=pp, cp=cp, dp=dp)
        if any(cand[k] != v for k, v in fixed.items() if k in cand):
            continue
        per = global_batch // dp
        eps = [e for e in _divisors(dp, dp) if e == 1 or (experts and experts % e == 0)]
        if "ep" in fixed:
            eps = [e for e in eps if e == fixed["ep"]]
        interleaved = schedule == "interleaved" and pp > 1
        opts = dict(sp=tp > 1 if sp is None else bool(sp), tp_overlap=tp_overlap,
                    schedule="interleaved" if interleaved else "1f1b",
                    virtual_stages=virtual_stages if interleaved else 1, offload=offload,
                    deepspeed=deepspeed)
        for mb in _divisors(per, per):
            if "micro_batch" in fixed and mb != fixed["micro_batch"]:
                continue
            for z in (zeros if dp > 1 else (0,)):
                for ep in eps:
                    plans.append(Plan(dp=dp, tp=tp, pp=pp, cp=cp, zero=z, micro_batch=mb,
                                      micro_batches=per // mb, ep=ep, **opts))
            if len(plans) > max_plans:
                raise SimcostError(
                    f"--parallel auto would search more than {max_plans} plans for {devices} "
                    f"devices and global batch {global_batch}; fix some of --tp, --pp, --cp, "
                    f"--micro-batch or --zero to narrow it")
    return plans
