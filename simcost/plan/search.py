"""The training plan search: one *group* per hardware x device count x method x
checkpointing, each searched over its parallel plans and micro-batch x gradient accumulation
by the estimate's own plan search (``--parallel auto``). The search prices its best plan with
the context an explicit plan gets, so a candidate's numbers are exactly what ``simcost
estimate train`` gives for its ``estimate_args``, the chosen plan spelled out (a test checks
it).

Groups are independent and pure (a :class:`Group` in, a :class:`GroupResult` out), so they run
in this process or as Ray tasks (:mod:`simcost.plan.distributed`) with the same results.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from simcost.errors import SimcostError


@dataclass(frozen=True)
class Group:
    """One cell of the search: everything of a :class:`TrainRequest` but the plan."""
    hardware: str
    devices: int
    method: str                     # a PEFT method name; 'dora' is LoRA with use_dora
    checkpointing: str              # none | full | selective
    request: tuple                  # the job's other request fields, as sorted (name, value)
    price: float | None = None      # USD per device-hour instead of the profile's (--price)

    def fields(self) -> dict:
        d = dict(self.request)
        short = dict(d.pop("shorthand", ()))
        peft = self.method
        if peft == "dora":
            peft, short["dora"] = "lora", True
        lora = peft in ("lora", "qlora")
        for k in ("rank", "alpha", "targets"):      # the LoRA family's shorthand only
            if not lora:
                short.pop(k, None)
        from simcost.request.train import PeftShorthand
        d.update(hardware=self.hardware, devices=self.devices, peft=peft, price=self.price,
                 grad_checkpointing=self.checkpointing, shorthand=PeftShorthand.build(**short))
        return d


@dataclass
class GroupResult:
    group: Group
    entry: dict | None = None       # the group's best plan, fitting (None: nothing fits)
    miss: dict | None = None        # the least memory any plan needs, when nothing fits
    skipped: str | None = None      # why the group was not searched (no link, refused, ...)
    plans: int = 0                  # plans the estimate searched
    priced: int = 0                 # of which priced (the rest the search's bound ruled out)

    def as_dict(self) -> dict:
        return asdict(self)


def weights_floor_bytes(weights_bytes: float, runtime_bytes: float, devices: int) -> float:
    """The least a device can hold: its share of the weights when every plan shards them
    fully (tensor, pipeline or ZeRO-3), plus the runtime's context."""
    return weights_bytes / devices + runtime_bytes


def evaluate_group(group: Group) -> GroupResult:
    """Search the group's plans; price the fastest fitting one as an explicit plan."""
    from simcost.api import run_train
    from simcost.request.train import TrainRequest
    fields = group.fields()
    try:
        auto = run_train(TrainRequest.build(**fields, parallel="auto"))
    except SimcostError as e:
        return GroupResult(group, skipped=str(e))
    par = auto.parallel
    if not auto.fits:
        return GroupResult(group, miss={"hardware": group.hardware, "devices": group.devices,
                                        "peft": group.method,
                                        "checkpointing": group.checkpointing,
                                        "plan": par["plan_label"],
                                        "peak_bytes": auto.memory_bytes["peak"],
                                        "capacity_bytes": auto.memory_bytes["capacity"],
                                        "memory_breakdown_bytes": _peak_rows(auto)},
                           plans=par["plans_searched"], priced=par["plans_priced"])
    # the search priced its best plan with the same context an explicit plan gets, so its
    # numbers are those of the explicit request named here (a test checks they are equal)
    return GroupResult(group, entry=entry_of(group, explicit_request(fields, par["plan"]), auto),
                       plans=par["plans_searched"], priced=par["plans_priced"])


def _peak_rows(r) -> dict:
    from simcost.sim.memory import peak_rows
    return peak_rows(r.memory_bytes)[1]


def explicit_request(fields: dict, p: dict):
    """The request with the searched plan spelled out (what ``estimate_args`` names)."""
    from simcost.request.train import TrainRequest
    return TrainRequest.build(**fields, tp=p["tp"], pp=p["pp"], dp=p["dp"], cp=p["cp"],
                              zero=p["zero"], micro_batch=p["micro_batch"],
                              sequence_parallel=None if p["sp"] or p["tp"] == 1 else False)


def entry_of(group: Group, req, r) -> dict:
    """A candidate: the estimate of ``req`` in the planner's terms."""
    from simcost.request.args import train_args
    par = r.parallel
    plan = par["plan"]
    t = r.time_s
    comm = t.get("communication_exposed", 0.0)
    host = t.get("host_overhead", 0.0)
    bubble = t.get("pipeline_bubble", 0.0)
    opt = t["optimizer"]
    job = r.job or {}
    return {
        "hardware": group.hardware, "devices": group.devices, "nodes": par["nodes"],
        "plan": par["plan_label"], "peft": group.method,
        "micro_batch": plan["micro_batch"], "grad_accum": plan["micro_batches"],
        "checkpointing": group.checkpointing, "global_batch": plan["global_batch"],
        "step_s": t["step"], "steps": job.get("steps"), "job_s": job.get("job_s"),
        "job_s_interval": job.get("job_s_interval"), "job_usd": job.get("job_usd"),
        "usd_per_million_tokens": job.get("usd_per_million_tokens"),
        "energy_j": job.get("energy_j"), "tokens_per_s": r.tokens_per_s,
        "samples_per_s": r.samples_per_s, "mfu": r.mfu,
        "peak_bytes": r.memory_bytes["peak"], "capacity_bytes": r.memory_bytes["capacity"],
        "fits": r.fits, "deadline_risk": False,
        "price_usd_per_device_hour": (r.cost_usd or {}).get("price_per_device_hour"),
        "memory_breakdown_bytes": _peak_rows(r),
        "time_breakdown_s": {"compute": t["step"] - comm - host - bubble - opt,
                             "communication": comm, "host": host, "optimizer": opt,
                             "pipeline_bubble": bubble},
        "estimate_args": train_args(req),
        "warnings": list(r.warnings),
    }

