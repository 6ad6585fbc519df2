"""Requests of the two serving entrances: ``estimate serve`` (:class:`ServeEstimateRequest`)
and ``simulate serve`` (:class:`ServeSimRequest`), and the trace-file reader.

Both the CLI (:mod:`simcost.serve.cli`) and the API (:mod:`simcost.serve.api`) build them; the
estimate and the simulation read only the validated request. A field left ``None`` was not
given: its default applies (``effective`` values below), and an option given where it has no
effect is named in ``warnings()``.
"""
from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator

from simcost.errors import SimcostError
from simcost.models.config import ModelSpec
from simcost.request.fields import (MAX_REQUESTS, MAX_SEQ, Batch, Devices, FinitePos, Flag,
                                    PosInt, Rank, Request, Seq, describe, parse_duration_s, parse_int_list,
                                    parse_len_range)

MAX_ADAPTERS = 10 ** 12          # ids stay exact in int64 and float64 arithmetic
MAX_SEED = 2 ** 32 - 1           # numpy's legacy RandomState (the S-LoRA generator)

ActDtype = Literal["fp16", "bf16", "fp32"]
WeightDtype = Literal["fp16", "bf16", "fp32", "fp8", "int8", "int4", "nf4"]
KVDtype = Literal["fp16", "bf16", "fp32", "fp8", "int8"]
Peft = Literal["none", "lora", "prefix", "prompt"]
Routing = Literal["round-robin", "adapter-affinity"]
MemFraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Tokens = Annotated[StrictInt, Field(ge=1, le=MAX_SEQ)]
VirtualTokens = Annotated[StrictInt, Field(ge=0, le=MAX_SEQ)]

SIM_DEFAULTS = {"rate": 10.0, "cv": 1.0, "popularity_alpha": 1.0, "duration": 60.0,
                "input_len": (8, 512), "output_len": (8, 512), "seed": 0, "ranks": (8,),
                "routing": "round-robin"}
# no scheduler default: without --engine or --scheduler the engine is vLLM V1
# (simcost.serve.engines.DEFAULT_ENGINE), which brings its own scheduler


def _ranks(v, what="--ranks"):
    return None if v is None else parse_int_list(v, what)


class _Serve(Request):
    model: str | ModelSpec
    hardware: str
    dtype: ActDtype = "fp16"
    weight_dtype: WeightDtype | None = None
    kv_dtype: KVDtype | None = None
    tp: Devices = 1
    devices: Devices | None = None
    targets: str | list[str] | tuple[str, ...] | None = None
    lora_kernel: str | None = None
    num_virtual_tokens: VirtualTokens | None = None
    gpu_memory_utilization: MemFraction = 0.9

    @classmethod
    def build(cls, **kw):
        """Construct; a parser's or a cross-field check's own sentence is the one line."""
        try:
            return cls(**kw)
        except ValidationError as e:
            err = e.errors()[0]
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, SimcostError) or (cause is not None and not err["loc"]):
                raise SimcostError(str(cause)) from None
            raise SimcostError(describe(e)) from None

    @field_validator("ranks", mode="before", check_fields=False)
    @classmethod
    def _parse_ranks(cls, v):
        return _ranks(v)

    @model_validator(mode="after")
    def _devices(self):
        if self.devices is not None and self.devices % self.tp:
            raise ValueError(f"--devices {self.devices} is not a multiple of --tp {self.tp} "
                             "(devices = tp x replicas)")
        return self

    @property
    def n_devices(self) -> int:
        return self.devices if self.devices is not None else self.tp

    @property
    def replicas(self) -> int:
        return self.n_devices // self.tp

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens or 0


class ServeEstimateRequest(_Serve):
    """One prefill or decode iteration of one tensor-parallel group."""
    phase: Literal["prefill", "decode"] = "decode"
    batch: Batch = 1
    context: Seq = 512
    peft: Peft = "none"
    rank: Rank | None = None
    ranks: tuple[Rank, ...] | None = None
    distinct_adapters: PosInt | None = None
    merged: Flag = False
    cuda_graphs: Flag = False

    @model_validator(mode="after")
    def _consistent(self):
        if self.rank is not None and self.ranks is not None:
            raise ValueError("give --rank or --ranks, not both")
        if self.distinct_adapters is not None and self.distinct_adapters > self.batch:
            raise ValueError(f"--distinct-adapters {self.distinct_adapters} exceeds --batch "
                             f"{self.batch}")
        return self

    @property
    def adapter_ranks(self) -> tuple[int, ...]:
        return self.ranks or (self.rank or 8,)

    @property
    def n_adapters(self) -> int:
        return self.distinct_adapters or 1

    def warnings(self) -> list[str]:
        w = []
        lora = self.peft == "lora"
        for name, given in (("--rank", self.rank is not None), ("--ranks", self.ranks is not None),
                            ("--distinct-adapters", self.distinct_adapters is not None),
                            ("--merged", self.merged), ("--targets", self.targets is not None)):
            if given and not lora:
                w.append(f"{name} has no effect with --peft {self.peft}")
        if self.lora_kernel is not None and (not lora or self.merged):
            w.append("--lora-kernel has no effect " + ("with --merged" if lora else
                                                       f"with --peft {self.peft}"))
        if self.num_virtual_tokens is not None and self.peft not in ("prefix", "prompt"):
            w.append(f"--num-virtual-tokens has no effect with --peft {self.peft}")
        if self.replicas > 1:
            w.append(f"--devices {self.n_devices} with --tp {self.tp}: {self.replicas} replicas; "
                     "one iteration is estimated per replica (time, memory and tokens/s of one "
                     "tensor-parallel group)")
        return w


class Traffic(Request):
    """How long the traffic runs and how long its requests are (``--duration``, ``--input-len``,
    ``--output-len``): the fields ``simulate serve`` and ``plan serve`` share."""
    duration: FinitePos | None = None
    input_len: tuple[Tokens, Tokens] | None = None
    output_len: tuple[Tokens, Tokens] | None = None

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, v):
        return None if v is None else parse_duration_s(v, "--duration")

    @field_validator("input_len", "output_len", mode="before")
    @classmethod
    def _lens(cls, v, info):
        return None if v is None else parse_len_range(v, "--" + info.field_name.replace("_", "-"))


class ServeSimRequest(_Serve, Traffic):
    """A traffic simulation over ``devices`` = ``tp`` x replicas."""
    adapters: Annotated[StrictInt, Field(ge=0, le=MAX_ADAPTERS)] = 0
    ranks: tuple[Rank, ...] | None = None
    merged: Flag = False
    rate: Annotated[float, Field(gt=0)] | None = None
    cv: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] | None = None
    popularity_alpha: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None
    trace: str | None = None
    scheduler: str | None = None
    routing: Routing | None = None
    slo_ttft: FinitePos | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    n_requests: Annotated[StrictInt, Field(ge=1, le=MAX_REQUESTS)] | None = None
    peft: Peft | None = None
    max_num_seqs: Annotated[StrictInt, Field(ge=1, le=10 ** 6)] | None = None
    max_num_tokens: Tokens | None = None
    prefetch: Flag = False
    cuda_graphs: Flag | None = None
    engine: str | None = None
    max_total_tokens: Annotated[StrictInt, Field(ge=1, le=10 ** 12)] | None = None
    generator: Literal["default", "slora"] = "default"

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, v):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isnan(v):
            raise ValueError("must be a number > 0 (inf: all requests at t = 0)")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.trace and self.generator != "default":
            raise ValueError("--trace replays a file; --generator draws requests: give one")
        if self.engine is not None and self.scheduler is not None:
            from simcost.serve.engines import get_engine
            own = get_engine(self.engine).scheduler
            if own != self.scheduler:
                raise ValueError(f"--engine {self.engine} batches with its own scheduler "
                                 f"'{own}'; --scheduler {self.scheduler} conflicts: give one")
        if not self.trace:
            self._check_count()
        return self

    def _check_count(self) -> None:
        if math.isinf(self.eff("rate")):
            if self.n_requests is None:
                raise ValueError("--rate inf (every request at t = 0) needs n_requests")
            if self.generator == "slora":
                raise ValueError("the S-LoRA generator needs a finite --rate")
            return
        n = self.eff("rate") * self.eff("duration")
        if not n <= MAX_REQUESTS:
            raise ValueError(f"--rate x --duration asks for {n:.4g} requests; at most "
                             f"{MAX_REQUESTS:.0e} are simulated")

    def eff(self, name: str):
        """The value of ``name``: given, or its default."""
        v = getattr(self, name)
        return SIM_DEFAULTS[name] if v is None else v

    def warnings(self) -> list[str]:
        w = []
        if self.trace:
            for name in ("rate", "cv", "popularity_alpha", "duration", "input_len",
                         "output_len", "seed", "n_requests"):
                if getattr(self, name) is not None:
                    w.append(f"--{name.replace('_', '-')} has no effect with --trace")
        elif self.n_requests is not None and not math.isinf(self.eff("rate")):
            w.append("n_requests has no effect with a finite --rate (rate x duration requests)")
        if self.adapters == 0:
            for name, given in (("--ranks", self.ranks is not None), ("--merged", self.merged),
                                ("--prefetch", self.prefetch),
                                ("--targets", self.targets is not None),
                                ("--lora-kernel", self.lora_kernel is not None)):
                if given:
                    w.append(f"{name} has no effect with --adapters 0 (the base model)")
        if self.adapters > 0 and self.peft not in (None, "lora"):
            msg = f"--adapters {self.adapters} has no effect with peft '{self.peft}' "
            w.append(msg + "(only LoRA adapters are served per request)")
        if self.adapters <= 1 and not self.trace and self.popularity_alpha is not None:
            w.append(f"--popularity-alpha has no effect with --adapters {self.adapters}")
        if self.merged and self.prefetch:
            w.append("--prefetch has no effect with --merged (no adapter is loaded)")
        if self.routing is not None and self.replicas == 1:
            w.append(f"--routing has no effect with one replica (--devices {self.n_devices}, "
                     f"--tp {self.tp})")
        return w


# ---- trace files ----------------------------------------------------------------------------
TRACE_COLUMNS = ("time", "adapter", "prompt_len", "output_len")
_INT = re.compile(r"^\s*\+?[0-9]+\s*$")


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise SimcostError(f"--trace: no file at '{path}'")
    try:
        return p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SimcostError(f"--trace {path}: not UTF-8 text (byte {e.start})") from None


def _trace_row(path, k, row, adapters, max_positions, extra_tokens):
    where = f"--trace {path} row {k}"
    try:
        t = float(row["time"])
    except ValueError:
        raise SimcostError(f"{where} column time: not a number, got '{row['time']}'") from None
    if not (math.isfinite(t) and t >= 0):
        raise SimcostError(f"{where} column time: must be finite and >= 0, got {row['time']}")
    vals = []
    for col in ("adapter", "prompt_len", "output_len"):
        s = row[col]
        if not _INT.match(s or ""):
            raise SimcostError(f"{where} column {col}: must be an integer >= "
                               f"{0 if col == 'adapter' else 1}, got '{s}'")
        vals.append(int(s))
    a, p, o = vals
    if p < 1 or o < 1:
        col = "prompt_len" if p < 1 else "output_len"
        raise SimcostError(f"{where} column {col}: must be >= 1, got {min(p, o)}")
    if a >= max(adapters, 1):
        raise SimcostError(f"{where} column adapter: id {a} is outside 0..{max(adapters, 1) - 1} "
                           f"(--adapters {adapters})")
    if p + o + extra_tokens > max_positions:
        raise SimcostError(f"{where}: prompt_len + output_len = {p + o + extra_tokens} exceeds "
                           f"the model's {max_positions} positions")
    return t, a, p, o


def read_trace(path: str, *, adapters: int, max_positions: int, extra_tokens: int = 0):
    """(time_s, adapter, prompt_len, output_len) arrays, sorted by time, of a CSV trace checked
    row by row (rows numbered from 1 after the header)."""
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if not cols:
        raise SimcostError(f"--trace {path}: empty file; need columns {','.join(TRACE_COLUMNS)}")
    missing = [c for c in TRACE_COLUMNS if c not in cols]
    if missing:
        raise SimcostError(f"--trace {path}: missing column {missing[0]}; need "
                           f"{','.join(TRACE_COLUMNS)}, got {','.join(cols)}")
    reader.fieldnames = cols
    rows = []
    try:
        for k, row in enumerate(reader, 1):
            if None in row or any(row[c] is None for c in TRACE_COLUMNS):
                raise SimcostError(f"--trace {path} row {k}: expected {len(cols)} fields")
            if k > MAX_REQUESTS:
                raise SimcostError(f"--trace {path}: more than {MAX_REQUESTS:.0e} requests")
            rows.append(_trace_row(path, k, row, adapters, max_positions, extra_tokens))
    except csv.Error as e:
        raise SimcostError(f"--trace {path}: not CSV ({e})") from None
    if not rows:
        raise SimcostError(f"--trace {path} has no requests")
    t, ad, pr, out = (np.array(c) for c in zip(*rows))
    o = np.argsort(t.astype(float), kind="stable")
    return (t.astype(float)[o], ad.astype(np.int64)[o], pr.astype(np.int64)[o],
            out.astype(np.int64)[o])
