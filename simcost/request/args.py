"""A training request as the ``simcost estimate train`` arguments that rebuild it.

The planner names each candidate by these arguments (``estimate_args``), so that anyone can
reproduce its numbers with one command; :func:`train_args` is the inverse of the CLI's
request building, and a test checks the round trip.
"""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.request.train import TrainRequest, flag

# the PEFT shorthand the command line has flags for
_CLI_SHORTHAND = {"rank", "r", "alpha", "targets", "dropout", "rslora", "dora",
                  "num_virtual_tokens", "trainable_layers", "adapter_dim", "side_reduction"}
# request fields spelled differently on the command line, or not at all
_SPECIAL = {"model", "hardware", "shorthand", "notes", "grad_checkpointing", "peft",
            "sequence_parallel", "trace_cache", "deepspeed"}


def _value(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v)
    return str(v)


def train_args(req: TrainRequest) -> list[str]:
    """``--model M --hardware H ...``: every field that differs from its default."""
    if not isinstance(req.model, str):
        raise SimcostError("a request built on a ModelSpec object has no command line (give "
                           "the model by name or config path)")
    if req.deepspeed is not None:
        raise SimcostError("a request with a DeepSpeed zero_optimization config has no command "
                           "line (give --zero)")
    out = ["--model", req.model, "--hardware", req.hardware]
    short = req.shorthand.given()
    no_flag = sorted(set(short) - _CLI_SHORTHAND)
    if no_flag:
        raise SimcostError(f"the PEFT option '{no_flag[0]}' has no command-line flag (give an "
                           f"adapter_config.json with --peft-config)")
    if req.parallel == "manual":
        raise SimcostError("parallel='manual' has no command-line flag (give the plan's sizes)")
    method = req.method
    if short.pop("dora", None) and method == "lora":
        method = "dora"
    if req.peft is not None and method != "full" or req.peft == "full":
        out += ["--peft", method]
    if req.checkpointing != "none":
        out += ["--checkpointing", req.checkpointing]
    if req.sequence_parallel is False:
        out.append("--no-sequence-parallel")
    if not req.trace_cache:
        out.append("--no-trace-cache")
    fields = TrainRequest.model_fields
    for name, info in fields.items():
        if name in _SPECIAL:
            continue
        v = getattr(req, name)
        if v == info.default:
            continue
        opt = TrainRequest.option_name(name)
        if isinstance(v, bool):
            out.append(opt)
        else:
            out += [opt, _value(v)]
    for name, v in short.items():
        opt = flag(name)
        if isinstance(v, bool):
            if v:
                out.append(opt)
        else:
            out += [opt, _value(v)]
    return out
