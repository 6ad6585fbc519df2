"""The training entrances' requests: one estimate, N jobs on one base, a sweep.

``simcost estimate train`` and :func:`simcost.api.estimate_train` both build a
:class:`TrainRequest`; everything downstream reads only validated values. A request refuses
what conflicts (exit 2 at the CLI) and lists, in :attr:`TrainRequest.notes`, the options that
have no effect on it (each printed as one ``simcost: warning:`` line).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from simcost.errors import SimcostError
from simcost.models.config import ModelSpec, check_spec
from simcost.peft.spec import PeftSpec
from simcost.sim.parallel.deepspeed import DeepSpeedZero
from simcost.request.choices import (ATTENTIONS, CHECKPOINTING, DTYPES,  # noqa: F401
                                     FRONTENDS, MIXED_PRECISIONS, OPTIMIZERS, PEFT_METHODS)
from simcost.request.fields import (MAX_BATCH, MAX_RANK, MAX_SEQ, MAX_VIRTUAL_TOKENS, Batch,
                                    Devices, FiniteNonNeg, Fraction, ImageSize, NonNegInt,
                                    PosInt, Request, Seq)

MAX_JOBS = 10_000
MAX_JOB_TOKENS = 10 ** 15          # a whole job's tokens (a quadrillion: far beyond any fine-tune)
MAX_EPOCHS = 10 ** 6
MAX_SWEEP_POINTS = 10 ** 6

# the PEFT shorthand options and the methods they shape (anything else: no effect)
_LORA = ("lora", "dora", "qlora")
SHORTHAND_METHODS = {
    "rank": _LORA, "r": _LORA, "alpha": _LORA, "dropout": _LORA, "rslora": _LORA,
    "dora": _LORA, "bias": _LORA,
    "targets": (*_LORA, "ia3", "ln_tuning"), "layers": (*_LORA, "ia3"),
    "modules_to_save": (*_LORA, "ia3", "prefix", "prompt", "ln_tuning"),
    "feedforward_modules": ("ia3",),
    "num_virtual_tokens": ("prefix", "prompt"),
    "trainable_layers": ("freeze",), "trainable_modules": ("freeze",),
    "adapter_dim": ("adapter",), "side_reduction": ("lst",),
    "adapter_dtype": (*_LORA, "ia3", "lst", "adapter", "prefix", "prompt"),
}
# CLI spellings, for messages
_FLAG = {"rank": "--rank", "r": "--rank", "dropout": "--lora-dropout",
         "side_reduction": "--lst-reduction"}


def flag(name: str) -> str:
    return _FLAG.get(name, "--" + name.replace("_", "-"))


class PeftShorthand(Request):
    """The ``--rank --alpha --targets ...`` flags: typed, before :class:`PeftSpec` is built."""
    rank: StrictInt | None = Field(None, ge=1, le=MAX_RANK)
    r: StrictInt | None = Field(None, ge=1, le=MAX_RANK)
    alpha: FiniteNonNeg | None = None
    targets: str | tuple[str, ...] | list[str] | None = None
    dropout: Fraction | None = None
    rslora: StrictBool | None = None
    dora: StrictBool | None = None
    bias: Literal["none", "all", "lora_only"] | None = None
    layers: tuple[NonNegInt, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    feedforward_modules: str | tuple[str, ...] | None = None
    num_virtual_tokens: StrictInt | None = Field(None, ge=1, le=MAX_VIRTUAL_TOKENS)
    trainable_layers: NonNegInt | None = None
    trainable_modules: tuple[str, ...] | None = None
    adapter_dim: StrictInt | None = Field(None, ge=1, le=MAX_RANK)
    side_reduction: StrictInt | None = Field(None, ge=1, le=MAX_RANK)
    adapter_dtype: Literal["fp32", "bf16", "fp16"] | None = None

    @classmethod
    def option_name(cls, field: str) -> str:
        return flag(field)

    def given(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class TrainRequest(Request):
    """One training-step estimate: model, hardware, workload, method, precision, plan."""
    model: str | ModelSpec
    hardware: str
    batch: Batch
    seq: Seq | None = None             # text tokens (required by text models)
    target_seq: Seq | None = None      # an encoder-decoder's target tokens (default: seq)
    image_size: ImageSize | None = None  # pixels per side (vision, diffusion; default: config's)
    # analytic: the hand-built graphs; traced: torch records the step (any model, any tuner);
    # auto: analytic where it covers the request
    frontend: Literal[FRONTENDS] = "auto"
    trace_cache: StrictBool = True     # reuse a traced step recorded before (disk cache)
    # the frozen base stored quantised (QLoRA's NF4, LLM.int8) under any method
    quantize: Literal["none", "nf4", "int8"] = "none"
    peft: str | PeftSpec | None = None
    peft_config: str | None = None
    dtype: Literal[DTYPES] = "bf16"
    mixed_precision: Literal[MIXED_PRECISIONS] = "none"
    attn: Literal[ATTENTIONS] = "sdpa"
    optimizer: Literal[OPTIMIZERS] = "adamw"
    grad_checkpointing: StrictBool | Literal[CHECKPOINTING] = False
    devices: Devices = 1
    nodes: PosInt | None = None
    tp: PosInt | None = None
    pp: PosInt | None = None
    dp: PosInt | None = None
    cp: PosInt | None = None
    ep: PosInt | None = None
    zero: Annotated[StrictInt, Field(ge=0, le=3)] = 0
    parallel: Literal["auto", "manual"] | None = None
    micro_batch: Batch | None = None
    sequence_parallel: StrictBool | None = None
    tp_overlap: StrictBool = False
    pp_schedule: Literal["1f1b", "interleaved"] = "1f1b"
    virtual_stages: PosInt = 1
    offload: Literal["none", "optimizer", "params"] = "none"
    fp8_attention: StrictBool = False
    # the frozen linear weights stored as fp8 (TransformerEngine Float8Tensor parameters:
    # NeMo/Megatron ``fp8_params``, TE ``fp8_model_init``), not as bf16 cast per GEMM
    fp8_params: StrictBool = False
    # a fused SwiGLU's saved inputs in fp8 (Megatron activation_func_fp8_input_store)
    fp8_activation: StrictBool = False
    max_positions: Seq | None = None
    loss_chunks: PosInt = 1
    optimizer_in_backward: StrictBool = False
    stack: str = "hf"                  # a stack name, alias[:variant] or profile path
    # the CPU training process's malloc (None: the calibration's; simcost.hardware.host_allocator)
    host_allocator: Literal["glibc", "tcmalloc", "jemalloc", "mimalloc"] | None = None
    # the whole job: tokens (split into sequences of seq) or samples, seen epochs times
    tokens: Annotated[StrictInt, Field(ge=1, le=MAX_JOB_TOKENS)] | None = None
    samples: Annotated[StrictInt, Field(ge=1, le=MAX_JOB_TOKENS)] | None = None
    epochs: Annotated[float, Field(gt=0, le=MAX_EPOCHS, allow_inf_nan=False)] = 1.0
    price: FiniteNonNeg | None = None  # USD per device-hour, instead of the profile's
    shorthand: PeftShorthand = PeftShorthand()
    deepspeed: Any = None              # a DeepSpeedZero or a ds_config zero_optimization dict
    notes: tuple[str, ...] = ()        # options with no effect (filled by the validator)

    @field_validator("model", "hardware", "peft_config")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("stack")
    @classmethod
    def _stack(cls, v):
        return check_stack(v)

    @field_validator("peft")
    @classmethod
    def _method(cls, v):
        if isinstance(v, str) and v not in PEFT_METHODS:
            from simcost.errors import closest
            raise ValueError(f"is not a PEFT method{closest(v, PEFT_METHODS)}; valid: "
                             f"{', '.join(PEFT_METHODS)}")
        return v

    @field_validator("model")
    @classmethod
    def _spec(cls, v):
        if isinstance(v, ModelSpec):
            check_spec(v)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        notes = [*_peft_conflicts(self), *_plan_conflicts(self), *_job_conflicts(self)]
        object.__setattr__(self, "notes", tuple(notes))
        return self

    @property
    def method(self) -> str:
        if isinstance(self.peft, PeftSpec):
            return self.peft.method
        return self.peft or "full"

    @property
    def checkpointing(self) -> str:
        c = self.grad_checkpointing
        return c if isinstance(c, str) else ("full" if c else "none")

    def peft_shorthand(self) -> dict:
        """The shorthand flags that shape the request's method (the others only warn)."""
        return {k: v for k, v in self.shorthand.given().items()
                if self.method in SHORTHAND_METHODS.get(k, ())}

    @property
    def distributed(self) -> bool:
        """Priced by the multi-device path (plans, fp8, offload) rather than the one-device one."""
        return (self.devices != 1 or self.parallel is not None or self.dtype == "fp8"
                or self.offload != "none" or self.zero != 0 or self.micro_batch is not None
                or self.fp8_attention or self.deepspeed is not None
                or any(x not in (None, 1) for x in (self.tp, self.pp, self.dp, self.cp, self.ep)))

    @classmethod
    def from_call(cls, model, hardware, **kw) -> "TrainRequest":
        """From :func:`simcost.api.estimate_train`'s keyword arguments (PEFT shorthand mixed in)."""
        fields = set(cls.model_fields) - {"shorthand", "notes"}
        short = {k: kw.pop(k) for k in list(kw) if k not in fields}
        unknown = set(short) - set(PeftShorthand.model_fields)
        if unknown:
            from simcost.errors import unknown as unknown_name
            raise unknown_name("option", sorted(unknown)[0], [*fields, *PeftShorthand.model_fields])
        for k in ("targets", "layers", "modules_to_save", "feedforward_modules",
                  "trainable_modules"):
            if isinstance(short.get(k), list):
                short[k] = tuple(short[k])
        return cls.build(model=model, hardware=hardware,
                         shorthand=PeftShorthand.build(**short), **kw)


def _peft_conflicts(r: TrainRequest) -> list[str]:
    given = r.shorthand.given()
    if r.peft_config is not None and not isinstance(r.peft, PeftSpec) \
            and r.peft not in (None, "full"):
        raise ValueError("give either --peft or --peft-config, not both")
    if (r.peft_config is not None or isinstance(r.peft, PeftSpec)) and given:
        src = "--peft-config" if r.peft_config is not None else "the PeftSpec"
        raise ValueError(f"{flag(next(iter(given)))} conflicts with {src}, which sets the "
                         f"adapter completely")
    method = r.method
    notes = []
    for k in given:
        if method not in SHORTHAND_METHODS.get(k, ()):
            notes.append(f"{flag(k)} has no effect with --peft {method}")
    return notes


def check_stack(v: str) -> str:
    """A stack name, alias[:variant] or profile path that loads (ValueError naming the nearest
    stacks otherwise)."""
    from simcost.errors import closest
    from simcost.stack import load_stack, stack_names
    from simcost.stack.registry import STACK_DIR
    name = v.partition(":")[0]
    if not v.endswith(".json") and "/" not in v and not (STACK_DIR / f"{name}.json").is_file():
        raise ValueError(f"is not a stack{closest(name, stack_names())}; valid: "
                         f"{', '.join(stack_names())}")
    try:
        load_stack(v)
    except SimcostError as e:
        raise ValueError(str(e)) from None
    return v


def _job_conflicts(r: TrainRequest) -> list[str]:
    if r.tokens is not None and r.samples is not None:
        raise ValueError("give either --tokens or --samples, not both")
    if r.tokens is not None and r.seq is None:
        raise ValueError("--tokens needs --seq (the tokens are split into sequences of --seq); "
                         "a model without a token sequence takes --samples")
    if r.epochs != 1 and r.tokens is None and r.samples is None:
        return [f"--epochs {r.epochs:g} has no effect without --tokens or --samples (the job)"]
    return []


def _plan_conflicts(r: TrainRequest) -> list[str]:
    notes = []
    if r.fp8_attention and r.dtype != "fp8":
        raise ValueError("--fp8-attention needs --dtype fp8")
    if r.fp8_params and r.dtype != "fp8":
        raise ValueError("--fp8-params (fp8-stored weights) needs --dtype fp8")
    if r.fp8_activation and r.dtype != "fp8":
        raise ValueError("--fp8-activation (fp8-stored SwiGLU inputs) needs --dtype fp8")
    if r.fp8_activation:
        from simcost.stack import load_stack
        st = load_stack(r.stack)
        if not any(f.startswith("swiglu") for f in st.fusions):
            notes.append(f"--fp8-activation has no effect: stack '{st.name}' runs no fused "
                         f"SwiGLU")
    if r.micro_batch is not None and r.micro_batch > r.batch:
        raise ValueError(f"--micro-batch {r.micro_batch} is larger than --batch {r.batch}")
    if r.seq is not None and r.loss_chunks > r.seq:
        raise ValueError(f"--loss-chunks {r.loss_chunks} is more chunks than the {r.seq} "
                         f"tokens of a sequence")
    if r.optimizer == "mezo" and (r.optimizer_in_backward or r.loss_chunks != 1):
        raise ValueError("--optimizer-in-backward and --loss-chunks shape the backward pass; "
                         "--optimizer mezo has none")
    if r.mixed_precision != "none" and r.mixed_precision == r.dtype:
        notes.append(f"--mixed-precision {r.mixed_precision} has no effect with --dtype "
                     f"{r.dtype} (weights and compute are already {r.dtype})")
    if not r.distributed:
        # on one device no plan is made; the multi-device path names what its chosen plan
        # leaves without effect (simcost.sim.parallel_api)
        unused = [("--tp-overlap", r.tp_overlap),
                  ("--no-sequence-parallel", r.sequence_parallel is False),
                  ("--pp-schedule interleaved", r.pp_schedule == "interleaved"),
                  (f"--virtual-stages {r.virtual_stages}", r.virtual_stages != 1)]
        notes += [f"{name} has no effect on one device (no tensor or pipeline parallelism)"
                  for name, given in unused if given]
    if r.deepspeed is not None and r.zero == 0:
        notes.append("deepspeed (a zero_optimization config) has no effect without --zero")
    if r.deepspeed is not None and not isinstance(r.deepspeed, dict) \
            and not isinstance(r.deepspeed, DeepSpeedZero):
        raise ValueError("deepspeed must be a DeepSpeedZero or a zero_optimization dict")
    if r.zero and r.devices == 1 and r.deepspeed is None:
        notes.append(f"--zero {r.zero} shards over data-parallel ranks; on one device it has "
                     f"no effect")
    if r.optimizer == "mezo" and r.checkpointing != "none":
        notes.append("--checkpointing has no effect with --optimizer mezo (no backward pass)")
    if r.devices > 1 and r.parallel is None and r.deepspeed is None and not r.zero and all(
            x in (None, 1) for x in (r.tp, r.pp, r.dp, r.cp, r.ep)):
        notes.append(f"no plan given for {r.devices} devices: priced as pure data parallelism "
                     f"(dp{r.devices}, ZeRO-0: every device holds the whole model and its "
                     f"optimizer states); --parallel auto searches the plans")
    if r.nodes not in (None, 1) and r.devices == 1:
        raise ValueError(f"--nodes {r.nodes} needs --devices (one device is on one node)")
    return notes


class MultiTrainRequest(TrainRequest):
    """``jobs`` PEFT jobs sharing one frozen base on one device (mLoRA BatchLoRA)."""
    jobs: StrictInt = Field(..., ge=1, le=MAX_JOBS)

    @model_validator(mode="after")
    def _one_device(self):
        given = [flag for flag, on in (("--tokens", self.tokens is not None),
                                       ("--samples", self.samples is not None),
                                       ("--epochs", self.epochs != 1),
                                       ("--price", self.price is not None)) if on]
        if given:
            raise ValueError(f"{given[0]} prices one job's whole run; --jobs compares N jobs' "
                             f"steps (run each job without --jobs for its whole run)")
        if self.distributed:
            raise ValueError("--jobs is priced on one device (no --devices, --parallel, --zero, "
                             "--offload, --micro-batch or fp8)")
        if self.loss_chunks != 1 or self.optimizer_in_backward:
            raise ValueError("--jobs is priced with one loss and one optimizer step per job "
                             "(no --loss-chunks or --optimizer-in-backward)")
        return self


def sweep_points(values, what: str, upper: int) -> np.ndarray:
    """A sweep axis: a non-empty 1-D sequence of whole numbers in [1, upper]."""
    if isinstance(values, (str, bytes)):
        raise SimcostError(f"{what} must be a sequence of positive integers, got {values!r}")
    try:
        arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values,
                         dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise SimcostError(f"{what} must be a sequence of positive integers") from None
    if arr.size == 0:
        raise SimcostError(f"{what} is empty")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or np.min(arr) < 1 \
            or np.max(arr) > upper:
        bad = arr[~(np.isfinite(arr) & (arr == np.round(arr)) & (arr >= 1) & (arr <= upper))][0]
        raise SimcostError(f"{what} must hold integers in [1, {upper}], got {bad:g}")
    return arr


class SweepRequest(Request):
    """A vectorised what-if over every (batch, seq) pair, on one device."""
    base: TrainRequest
    batches: Any
    seqs: Any

    @model_validator(mode="after")
    def _axes(self):
        b = sweep_points(self.batches, "batches", MAX_BATCH)
        s = sweep_points(self.seqs, "seqs", MAX_SEQ)
        if b.size * s.size > MAX_SWEEP_POINTS:
            raise ValueError(f"{b.size} x {s.size} = {b.size * s.size:,} points is more than "
                             f"{MAX_SWEEP_POINTS:,} in one sweep")
        if self.base.distributed:
            raise ValueError("sweep_train prices one device (no plan, fp8 or offload options)")
        object.__setattr__(self, "batches", b)
        object.__setattr__(self, "seqs", s)
        return self


def resolve_peft(peft: str | PeftSpec | None = None, peft_config: str | None = None,
                 **shorthand: Any) -> PeftSpec:
    """The :class:`PeftSpec` a request names: from ``--peft-config``, a given spec, or the
    method name and its shorthand flags (``rank`` is peft's ``r``; ``alpha`` defaults to 2r)."""
    from simcost.peft.spec import from_adapter_config, validate
    if peft_config is not None:
        if peft not in (None, "full") and not isinstance(peft, PeftSpec):
            raise SimcostError("give either --peft or --peft-config, not both")
        return from_adapter_config(peft_config)
    if isinstance(peft, PeftSpec):
        return peft
    kw = {k: v for k, v in shorthand.items() if v is not None}
    if "targets" in kw and isinstance(kw["targets"], str) and kw["targets"] != "all-linear":
        kw["targets"] = tuple(t.strip() for t in kw["targets"].split(",") if t.strip())
        if not kw["targets"]:
            raise SimcostError("--targets names no module")
    if "rank" in kw:
        kw["r"] = kw.pop("rank")
        kw.setdefault("alpha", 2 * kw["r"])
    spec = PeftSpec(method=peft or "full", **kw)
    validate(spec)
    return spec


def request_peft(req: TrainRequest) -> PeftSpec:
    """The request's adapter, with the shorthand flags that shape its method."""
    return resolve_peft(req.peft, req.peft_config, **req.peft_shorthand())


def check_seq(spec: ModelSpec, seq, extra: int) -> list[str]:
    """Validate the sequence length against the model; returns warnings for the estimate.

    A model with a learned position table (GPT-2) cannot run beyond it: an error. Rotary
    models (Llama, Mistral, Qwen, ...) compute positions for any length, and transformers runs
    them beyond ``max_position_embeddings`` without complaint (MLPerf's llama2_70b_lora trains
    Llama-2-70B, 4096 trained positions, at 8192): the cost is modelled, with a warning that
    the length is beyond the trained context."""
    if np.min(np.asarray(seq)) < 1:
        raise SimcostError("sequence length must be >= 1")
    s = int(np.max(np.asarray(seq)) + extra)
    if s <= spec.max_positions:
        return []
    if spec.learned_positions:
        raise SimcostError(f"sequence length {s} exceeds {spec.name}'s "
                           f"{spec.max_positions} learned positions")
    return [f"sequence length {s} is beyond {spec.name}'s {spec.max_positions} trained positions "
            f"(RoPE runs it; the cost is modelled, quality is not; --max-positions N states "
            f"an extended context)"]
