"""How a row becomes a simcost estimate (:class:`Mapping`) or a per-op GEMM time
(:class:`GemmMapping`), and the registry of one mapper per source."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from simcost.errors import SimcostError
from simcost.peft.spec import PeftSpec
from simcost.validate.published.rows import Unsupported, hardware_name, model_name


@dataclass
class Mapping:
    """How one row becomes a simcost estimate."""
    model: str
    hardware: str
    batch: int
    seq: int
    peft: PeftSpec
    grad_accum: int = 1
    dtype: str = "bf16"
    mixed_precision: str = "none"
    attn: str = "flash"
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    memory_scope: str = "device"     # device: nvidia-smi (reserved + context); reserved:
    #                                  max_memory_reserved; torch_allocator: max_memory_allocated
    stack: str = "hf"                # the software stack the source ran (simcost stacks)
    max_positions: int | None = None  # override the zoo's position limit (evidence in notes)
    caveats: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    distributed: dict | None = None  # multi-device: estimate_train's plan arguments; batch global
    memory_devices: int = 1          # a memory metric summed over this many devices
    loss_chunks: int = 1             # torchtune CEWithChunkedOutputLoss: N output chunks
    optimizer_in_backward: bool = False  # torchtune optimizer_in_bwd

    def estimate_kwargs(self) -> dict:
        kw = dict(batch=self.batch, seq=self.seq, peft=self.peft, dtype=self.dtype,
                  mixed_precision=self.mixed_precision, attn=self.attn,
                  optimizer=self.optimizer, grad_checkpointing=self.grad_checkpointing,
                  stack=self.stack)
        if self.distributed:
            kw.update(self.distributed)
        if self.loss_chunks != 1:
            kw["loss_chunks"] = self.loss_chunks
        if self.optimizer_in_backward:
            kw["optimizer_in_backward"] = True
        return kw

    def describe(self) -> dict:
        p = self.peft
        peft = {"method": p.method}
        if p.method in ("lora", "qlora"):
            peft.update(r=p.r, alpha=p.alpha, dropout=p.dropout,
                        targets=p.targets if isinstance(p.targets, str) or p.targets is None
                        else list(p.targets), adapter_dtype=p.adapter_dtype)
        if p.modules_to_save:
            peft["modules_to_save"] = list(p.modules_to_save)
        return {"model": self.model, "hardware": self.hardware, "batch": self.batch,
                "seq": self.seq, "grad_accum": self.grad_accum, "peft": peft,
                "dtype": self.dtype, "mixed_precision": self.mixed_precision, "attn": self.attn,
                "optimizer": self.optimizer, "grad_checkpointing": self.grad_checkpointing,
                "memory_scope": self.memory_scope, "stack": self.stack,
                **({"loss_chunks": self.loss_chunks} if self.loss_chunks != 1 else {}),
                **({"optimizer_in_backward": True} if self.optimizer_in_backward else {}),
                **({"distributed": {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v)
                                    for k, v in self.distributed.items()}}
                   if self.distributed else {})}


@dataclass
class GemmMapping:
    """One measured forward GEMM (m x k) @ (k x n)."""
    hardware: str
    dtype: str
    m: int
    n: int
    k: int
    caveats: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"hardware": self.hardware, "dtype": self.dtype, "m": self.m, "n": self.n,
                "k": self.k}



# ---------------------------------------------------------------------------------------------
# one mapper per source, registered by its module (sources.py imports them all)

Mapper = Callable[[dict], "Mapping | GemmMapping"]
MAPPERS: dict[str, Mapper] = {}


def register_mapper(source: str) -> Callable[[Mapper], Mapper]:
    """Decorator registering a source's mapper; a second mapper for one source raises."""
    def deco(fn: Mapper) -> Mapper:
        if source in MAPPERS:
            raise SimcostError(f"a mapper for source '{source}' is already registered "
                               f"({MAPPERS[source].__module__}.{MAPPERS[source].__name__})")
        MAPPERS[source] = fn
        return fn
    return deco


def row_hardware(row: dict, mp_notes: list) -> str:
    """The profile the row's hardware names (its assumption, if any, added to ``mp_notes``)."""
    hw, note = hardware_name(row["hardware"])
    if hw is None:
        raise Unsupported(f"hardware '{row['hardware']}' is not stated or has no profile")
    if note:
        mp_notes.append(note)
    return hw


def row_model(row: dict) -> str:
    """The zoo model the row's model names."""
    m = model_name(row["model"])
    if m is None:
        raise Unsupported(f"model '{row['model']}' is not in simcost's zoo")
    return m
