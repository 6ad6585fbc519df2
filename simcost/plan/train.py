"""``simcost plan train``: what to rent, with which method and plan, and what the job costs.

The request (:class:`PlanTrainRequest`) names the job (tokens or samples, epochs, the global
batch per optimizer step) and the space: hardware, up to ``max_devices`` devices (powers of two
and the maximum), the PEFT methods and the checkpointing modes. Every cell of that space is a
:class:`~simcost.plan.search.Group`, searched over its parallel plans and micro-batch x
gradient-accumulation splits by the estimate's own plan search; a group whose weights alone
cannot fit its devices is skipped before any estimate. The fitting candidates are ranked by
cost or time under the deadline and budget; the result also holds the Pareto frontier of job
time against job cost, and, when nothing fits, the nearest miss with what would make it fit.

Plan notation: ``dp2 tp4+sp pp1 cp1 zero1 mb1x8`` is 2 data-parallel replicas, tensor
parallelism 4 with sequence parallelism, no pipeline or context parallelism, ZeRO stage 1, and
micro-batches of 1 sample, 8 of them accumulated per optimizer step (per replica).
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Annotated, Literal

from pydantic import Field, StrictInt, field_validator, model_validator

from simcost.errors import SimcostError
from simcost.request.fields import Batch, FiniteNonNeg, FinitePos, Request, Seq
from simcost.request.train import MAX_EPOCHS, MAX_JOB_TOKENS

DESCRIPTION = (
    "Plan a fine-tuning job: search hardware x device count x parallel plan x micro-batch and "
    "gradient accumulation x checkpointing x PEFT method, keep what fits, and rank by job "
    "cost or time under --deadline and --budget. Plan notation: 'dp2 tp4+sp pp1 cp1 zero1 "
    "mb1x8' = 2 data-parallel replicas, tensor parallelism 4 with sequence parallelism, no "
    "pipeline or context parallelism, ZeRO stage 1, micro-batches of 1 sample with 8 "
    "accumulated per optimizer step.")
METHODS = ("lora", "dora", "qlora", "full", "ia3", "prefix", "prompt", "bitfit", "ln_tuning",
           "adapter", "freeze", "lst")
CHECKPOINTING = ("none", "full", "selective")
MAX_PLAN_DEVICES = 4096


def device_counts(max_devices: int) -> list[int]:
    """1, 2, 4, ... up to ``max_devices``, and ``max_devices`` itself."""
    out, n = [], 1
    while n < max_devices:
        out.append(n)
        n *= 2
    return [*out, max_devices]


class PlanTrainRequest(Request):
    """What to plan: the job, the space searched, the constraints and the objective."""
    model: str
    peft: tuple[str, ...] = ("lora",)
    rank: Annotated[StrictInt, Field(ge=1, le=65536)] | None = None
    targets: str | None = None
    tokens: Annotated[StrictInt, Field(ge=1, le=MAX_JOB_TOKENS)] | None = None
    samples: Annotated[StrictInt, Field(ge=1, le=MAX_JOB_TOKENS)] | None = None
    seq: Seq | None = None
    epochs: Annotated[float, Field(gt=0, le=MAX_EPOCHS, allow_inf_nan=False)] = 1.0
    global_batch: Batch = 16
    hardware: tuple[str, ...] = ()          # () = every bundled profile
    max_devices: Annotated[StrictInt, Field(ge=1, le=MAX_PLAN_DEVICES)] = 8
    checkpointing: tuple[Literal[CHECKPOINTING], ...] = ("none", "full")
    deadline_s: FinitePos | None = None
    budget_usd: FinitePos | None = None
    objective: Literal["cost", "time"] = "cost"
    stack: str = "hf"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    attn: Literal["sdpa", "eager", "flash"] = "sdpa"
    # USD per device-hour instead of the profile's: one number with one --hardware, or by name
    price: FiniteNonNeg | dict[str, FiniteNonNeg] | None = None
    top: Annotated[StrictInt, Field(ge=1, le=1000)] = 5

    @classmethod
    def option_name(cls, field: str) -> str:
        return {"deadline_s": "--deadline", "budget_usd": "--budget"}.get(
            field, super().option_name(field))

    @field_validator("peft")
    @classmethod
    def _methods(cls, v):
        from simcost.errors import closest
        if not v:
            raise ValueError("names no method")
        for m in v:
            if m not in METHODS:
                raise ValueError(f"'{m}' is not a PEFT method{closest(m, METHODS)}; valid: "
                                 f"{', '.join(METHODS)}")
        return tuple(dict.fromkeys(v))

    @field_validator("checkpointing")
    @classmethod
    def _modes(cls, v):
        if not v:
            raise ValueError(f"names no mode; valid: {', '.join(CHECKPOINTING)}")
        return tuple(dict.fromkeys(v))

    @field_validator("hardware")
    @classmethod
    def _hardware(cls, v):
        from simcost.hardware import list_profiles, load_profile
        for h in v:
            if h not in list_profiles():
                try:
                    load_profile(h)       # a profile JSON path; names the nearest profiles
                except SimcostError as e:
                    raise ValueError(str(e)) from None
        return tuple(dict.fromkeys(v))

    @field_validator("stack")
    @classmethod
    def _stack(cls, v):
        from simcost.request.train import check_stack
        return check_stack(v)

    @model_validator(mode="after")
    def _job(self):
        if (self.tokens is None) == (self.samples is None):
            raise ValueError("give the job as either --tokens N (with --seq) or --samples N")
        if self.tokens is not None and self.seq is None:
            raise ValueError("--tokens needs --seq (the tokens are split into sequences of "
                             "--seq)")
        lora = {"lora", "dora", "qlora"}
        if (self.rank is not None or self.targets is not None) and not lora & set(self.peft):
            raise ValueError(f"--rank and --targets shape LoRA, DoRA and QLoRA; --peft "
                             f"{','.join(self.peft)} has none of them")
        if self.price is not None and not isinstance(self.price, dict) \
                and len(self.hardware) != 1:
            raise ValueError("--price N sets the price of one device type: give one "
                             "--hardware, or --price NAME=USD[,NAME=USD...]")
        if isinstance(self.price, dict):
            space = hardware_space(self)
            for name in self.price:
                if name not in space:
                    from simcost.errors import closest
                    raise ValueError(f"--price names '{name}', which is not among the "
                                     f"hardware searched{closest(name, space)}")
        return self

    def price_of(self, hardware: str) -> float | None:
        """The --price of ``hardware`` (None: its profile's)."""
        if isinstance(self.price, dict):
            return self.price.get(hardware)
        return self.price

    def job_fields(self) -> dict:
        """The request fields every group shares."""
        short = {k: v for k, v in (("rank", self.rank), ("targets", self.targets))
                 if v is not None}
        return {"model": self.model, "batch": self.global_batch, "seq": self.seq,
                "tokens": self.tokens, "samples": self.samples, "epochs": self.epochs,
                "stack": self.stack, "dtype": self.dtype, "attn": self.attn,
                "shorthand": tuple(sorted(short.items()))}


def hardware_space(req: PlanTrainRequest) -> list[str]:
    from simcost.hardware import list_profiles
    return list(req.hardware) or list_profiles()


def _floors(req: PlanTrainRequest, hardware: list[str]) -> dict:
    """Each method's whole-model weight bytes (one small estimate on the first device), to
    skip the groups whose weights cannot fit however they are sharded."""
    from simcost.api import run_train
    from simcost.plan.search import Group
    from simcost.request.train import TrainRequest
    out = {}
    for m in req.peft:
        out[m] = 0.0                    # no estimate anywhere: nothing is skipped
        for h in hardware:
            f = Group(h, 1, m, "full", tuple(sorted(req.job_fields().items()))).fields()
            f.update(batch=1, tokens=None, samples=None, epochs=1.0)
            try:
                out[m] = run_train(TrainRequest.build(**f)).memory_bytes["weights"]
                break
            except SimcostError:        # refused on this device (its kind, its dtypes)
                continue
    return out


def unpriced(req: PlanTrainRequest) -> list[str]:
    """The hardware with no price (neither its profile's nor --price)."""
    from simcost.hardware import load_profile
    return [h for h in hardware_space(req)
            if req.price_of(h) is None and load_profile(h).price_usd_per_hour is None]


def groups_of(req: PlanTrainRequest) -> tuple[list, list[dict]]:
    """The groups to search, and those skipped before any estimate (with why). Ranked by
    cost, hardware without a price is not searched (the plan lists it as excluded)."""
    from simcost.hardware import load_profile
    from simcost.plan.search import Group, weights_floor_bytes
    no_price = set(unpriced(req)) if req.objective == "cost" else set()
    hw = [h for h in hardware_space(req) if h not in no_price]
    if not hw:
        return [], []
    floors = _floors(req, hw)
    shared = tuple(sorted(req.job_fields().items()))
    groups, skipped = [], []
    for h in hw:
        prof = load_profile(h)
        cap = prof.memory_bytes.value
        runtime = prof.runtime_overhead_bytes.value
        for n in device_counts(req.max_devices):
            if n > 1 and prof.interconnect is None:
                skipped.append({"hardware": h, "devices": n,
                                "why": "no device-to-device link in its profile"})
                continue
            for m in req.peft:
                floor = weights_floor_bytes(floors[m], runtime, n)
                if floor > cap:
                    skipped.append({"hardware": h, "devices": n, "peft": m, "nodes": None,
                                    "checkpointing": "any", "plan": "any plan",
                                    "peak_bytes": floor, "capacity_bytes": cap,
                                    "memory_breakdown_bytes": {
                                        "weights": floor - runtime,
                                        "runtime_overhead": runtime},
                                    "why": f"weights alone need {floor / 2 ** 30:.1f} GiB per "
                                           f"device of {cap / 2 ** 30:.0f} GiB"})
                    continue
                groups.extend(Group(h, n, m, c, shared, req.price_of(h))
                              for c in req.checkpointing)
    return groups, skipped


def plan_train(req: PlanTrainRequest, *, workers: int | None = None,
               cluster: str | None = None, jobs: int | None = None,
               progress: bool = False) -> dict:
    """The plan (the ``--json`` object): ``best``, ``candidates`` (best first), ``frontier``,
    ``nearest_miss``, ``excluded``, ``assumptions`` and what was searched."""
    from simcost.plan import rank as R
    from simcost.plan.distributed import run_groups, where
    t0 = time.perf_counter()
    groups, skipped = groups_of(req)
    results = run_groups(groups, workers=workers, cluster=cluster, jobs=jobs,
                         progress=progress)
    entries = [r.entry for r in results if r.entry is not None]
    misses = [r.miss for r in results if r.miss is not None]
    refused = list({(r.group.hardware, r.group.devices, r.group.method, r.skipped): {
        "hardware": r.group.hardware, "devices": r.group.devices, "peft": r.group.method,
        "why": r.skipped} for r in results if r.skipped}.values())   # once per cell
    excluded = []
    if req.objective == "cost":
        excluded = [{"hardware": h, "why": "no price (give --price, or a profile with one); "
                                           "--objective time ranks it"}
                    for h in unpriced(req)]
    ok, late = R.rank(entries, objective=req.objective, deadline_s=req.deadline_s,
                      budget_usd=req.budget_usd)
    miss = None
    floors = [x for x in skipped if "peak_bytes" in x]
    if not entries and not misses and not floors and refused:
        # nothing was priced anywhere: the request itself is refused (the same line for
        # every cell), not a capacity question
        raise SimcostError(f"plan train: {refused[0]['why']}")
    if not entries:
        # what came closest: a plan's least peak, or the weights' share alone where no plan
        # was priced because even that is too large
        miss = R.nearest_miss(misses or floors, methods=req.peft,
                              checkpointing=req.checkpointing, max_devices=req.max_devices)
    elif not ok:
        miss = R.constraint_miss(late[0], deadline_s=req.deadline_s, budget_usd=req.budget_usd,
                                 objective=req.objective, max_devices=req.max_devices)
    return {
        "kind": "train", "question": _question(req),
        "best": ok[0] if ok else None, "candidates": ok[:max(req.top, 1) * 4],
        "frontier": R.frontier(ok), "over_constraints": late[:req.top],
        "nearest_miss": miss, "excluded": excluded,
        "skipped": [*skipped, *refused],
        "searched": {"groups": len(groups), "plans": sum(r.plans for r in results),
                     "priced": sum(r.priced for r in results), "fitting": len(entries),
                     "ran_on": where(groups, workers=workers, cluster=cluster, jobs=jobs)},
        "elapsed_s": time.perf_counter() - t0,
        "assumptions": _assumptions(req),
    }


def _question(req: PlanTrainRequest) -> dict:
    return {"model": req.model, "peft": list(req.peft), "tokens": req.tokens,
            "samples": req.samples, "seq": req.seq, "epochs": req.epochs,
            "global_batch": req.global_batch, "hardware": hardware_space(req),
            "max_devices": req.max_devices, "checkpointing": list(req.checkpointing),
            "deadline_s": req.deadline_s, "budget_usd": req.budget_usd, "stack": req.stack,
            "objective": req.objective}


def _assumptions(req: PlanTrainRequest) -> dict:
    from simcost.hardware import load_profile
    from simcost.sim.job import IDLE_POWER_FRACTION
    from simcost.stack import load_stack
    profiles = {}
    for h in hardware_space(req):
        p = load_profile(h)
        price = p.price_usd_per_hour
        given = req.price_of(h)
        profiles[h] = {"display_name": p.display_name,
                       "price_usd_per_hour": given if given is not None
                       else (price.value if price else None),
                       "price_basis": "given" if given is not None else p.price_basis,
                       "price_source": "--price" if given is not None
                       else (price.source if price else None),
                       "price_date": None if given is not None or not price
                       else getattr(price, "date", None),
                       "tdp_w": p.tdp_w.value if p.tdp_w else None,
                       "tdp_source": p.tdp_w.source if p.tdp_w else None}
    st = load_stack(req.stack)
    return {"stack": {"name": st.name, **st.label()}, "profiles": profiles,
            "intervals": "p10-p90 of the job time: the step's interval from the stack's "
                         "out-of-fit validation errors on the hardware class, times the steps",
            "energy": f"a busy device draws its TDP, a waiting one {IDLE_POWER_FRACTION:.0%} "
                      f"of it (simcost.sim.job)",
            "notes": ["every candidate equals `simcost estimate train` with its estimate_args",
                      "a job's last, partial step is priced as a whole one"]}


# ---------------------------------------------------------------- command line

def add_arguments(p) -> None:
    from simcost.argtypes import integer, number
    p.add_argument("--model", required=True, help="zoo name or config.json (as estimate train)")
    p.add_argument("--peft", default="lora", metavar="M[,M...]",
                   help=f"PEFT methods to compare, comma-separated ({', '.join(METHODS)})")
    p.add_argument("--rank", type=integer, default=None,
                   help="LoRA rank of the LoRA family (default 8)")
    p.add_argument("--targets", default=None, help="LoRA target modules, or all-linear")
    p.add_argument("--tokens", type=integer, default=None,
                   help="training tokens per epoch, split into sequences of --seq")
    p.add_argument("--samples", type=integer, default=None,
                   help="training samples per epoch")
    p.add_argument("--seq", type=integer, default=None, help="tokens per sequence")
    p.add_argument("--epochs", type=number, default=1.0, help="passes over the data")
    p.add_argument("--global-batch", type=integer, default=16,
                   help="samples per optimizer step (the recipe's batch size; the planner "
                        "splits it into data-parallel replicas, micro-batches and gradient "
                        "accumulation)")
    p.add_argument("--hardware", default="all", metavar="all|NAME[,NAME...]",
                   help="profiles to consider (simcost hardware list)")
    p.add_argument("--max-devices", type=integer, default=8,
                   help="the most devices of one type (1, 2, 4, ... and this are tried)")
    p.add_argument("--checkpointing", default="none,full", metavar="MODE[,MODE...]",
                   help="activation checkpointing modes to try (none, full, selective)")
    p.add_argument("--deadline", default=None,
                   help="the job must finish within this (seconds, or 90m, 12h, 2d)")
    p.add_argument("--budget", type=number, default=None, metavar="USD",
                   help="the job must cost at most this")
    p.add_argument("--objective", default="cost", choices=("cost", "time"),
                   help="rank by job cost (devices without a price are left out) or job time")
    p.add_argument("--stack", default="hf", metavar="NAME|PATH",
                   help="software stack (simcost stacks)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="weights and compute dtype")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager", "flash"),
                   help="attention implementation")
    p.add_argument("--price", default=None, metavar="USD | NAME=USD[,NAME=USD...]",
                   help="price per device-hour instead of the profile's: one number with one "
                        "--hardware, or by profile name (e.g. rtx-4090=0 for a card you own)")
    p.add_argument("--top", type=integer, default=5, help="candidates printed")
    p.add_argument("--jobs", type=integer, default=None,
                   help="processes on this machine (default: its usable CPUs, for searches of "
                        "24 cells or more; 1: none started); results are the same")
    p.add_argument("--workers", type=integer, default=None,
                   help="run the search on a local Ray with N workers (the ray extra)")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run the search on a running Ray cluster (ray://host:10001 or auto)")
    p.add_argument("--progress", action="store_true",
                   help="a progress bar on stderr even when it is not a terminal")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the candidates as CSV")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="write a self-contained HTML report (the report extra: plotly)")


def request_of(a) -> PlanTrainRequest:
    from simcost.request.fields import parse_duration_s
    hw = () if a.hardware.strip() == "all" else tuple(
        h.strip() for h in a.hardware.split(",") if h.strip())
    if a.hardware.strip() != "all" and not hw:
        raise SimcostError("plan train: --hardware names no profile")
    return PlanTrainRequest.build(
        model=a.model, peft=tuple(m.strip() for m in a.peft.split(",") if m.strip()),
        rank=a.rank, targets=a.targets, tokens=a.tokens, samples=a.samples, seq=a.seq,
        epochs=a.epochs, global_batch=a.global_batch, hardware=hw, max_devices=a.max_devices,
        checkpointing=tuple(c.strip() for c in a.checkpointing.split(",") if c.strip()),
        deadline_s=parse_duration_s(a.deadline, "--deadline") if a.deadline else None,
        budget_usd=a.budget, objective=a.objective, stack=a.stack, dtype=a.dtype, attn=a.attn,
        price=parse_price(a.price), top=a.top)


def parse_price(text: str | None):
    """'2.5' -> 2.5; 'rtx-4090=0,l40s=0.9' -> {'rtx-4090': 0.0, 'l40s': 0.9}."""
    if text is None:
        return None

    def number(v: str, what: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise SimcostError(f"plan train: --price {what} must be a number, got '{v}'") \
                from None
        if not math.isfinite(x) or x < 0:
            raise SimcostError(f"plan train: --price {what} must be a finite number >= 0, "
                               f"got '{v}'")
        return x
    if "=" not in text:
        return number(text.strip(), "USD")
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        if not eq or not name.strip():
            raise SimcostError(f"plan train: --price expects NAME=USD, got '{part}'")
        if name.strip() in out:
            raise SimcostError(f"plan train: --price names {name.strip()} twice")
        out[name.strip()] = number(value.strip(), f"for {name.strip()}")
    return out


def _check_outputs(a) -> None:
    """Refuse unwritable output paths, and --html without plotly, before the search runs."""
    from simcost.paths import check_output_file
    for opt, path in (("--csv", a.csv), ("--html", a.html)):
        if path is not None:
            check_output_file(path, opt)
    if a.html is not None:
        from simcost.plan.html import require_plotly
        require_plotly()


def run_cli(a) -> int:
    from simcost.result import SCHEMA_VERSION
    req = request_of(a)
    _check_outputs(a)
    plan = plan_train(req, workers=a.workers, cluster=a.cluster, jobs=a.jobs,
                      progress=a.progress or sys.stderr.isatty())
    out = {"schema_version": SCHEMA_VERSION, **plan}
    if a.csv:
        write_csv(plan, a.csv)
    if a.html:
        from simcost.plan.html import write_html
        write_html(out, a.html)
    if a.json:
        print(json.dumps(out))
    else:
        from simcost.plan.report import print_plan
        print_plan(plan, top=req.top)
    return 0


CSV_COLUMNS = ("rank", "hardware", "devices", "nodes", "plan", "peft", "micro_batch",
               "grad_accum", "checkpointing", "step_s", "steps", "job_s", "job_s_p10",
               "job_s_p90", "job_usd", "usd_per_million_tokens", "energy_j", "tokens_per_s",
               "mfu", "peak_bytes", "capacity_bytes", "fits", "deadline_risk", "frontier",
               "estimate_args")


def write_csv(plan: dict, path: str) -> None:
    import csv
    front = {id(e) for e in plan["frontier"]}
    try:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for i, e in enumerate(plan["candidates"], 1):
                iv = e["job_s_interval"] or {}
                w.writerow({**{k: e.get(k) for k in CSV_COLUMNS if k in e}, "rank": i,
                            "job_s_p10": iv.get("p10"), "job_s_p90": iv.get("p90"),
                            "frontier": id(e) in front,
                            "estimate_args": " ".join(e["estimate_args"])})
    except OSError as e:
        raise SimcostError(f"plan train: --csv {path}: {e.strerror or e}") from None
