"""The space ``simcost plan serve`` searches: hardware x tensor parallelism x server settings
(:class:`Setting`), and the hardware left out, by reason (see :mod:`simcost.plan.serve_search`
for the search itself)."""
from __future__ import annotations

from dataclasses import dataclass

from simcost.errors import SimcostError, unknown
from simcost.request.plan_serve import MAX_TP, ServePlanRequest


@dataclass(frozen=True, order=True)
class Setting:
    """One server configuration: a replica of ``tp`` devices of ``hardware`` and its settings."""
    hardware: str
    tp: int
    merged: bool
    kernel: str | None           # None: the base model, or merged (no LoRA kernel runs)
    max_num_seqs: int
    price_usd_per_hour: float    # per device
    engine_kernel: str | None = None

    @property
    def kind(self) -> tuple[str, int]:
        return self.hardware, self.tp

    def label(self) -> str:
        how = "merged" if self.merged else ("unmerged, " + self.kernel if self.kernel else "base")
        return f"{how}, max batch {self.max_num_seqs}"


def _hardware_names(req: ServePlanRequest) -> list[str]:
    from simcost.hardware import list_profiles, load_profile
    if req.hardware is None:
        return [n for n in list_profiles() if load_profile(n).kind == "gpu"]
    if req.hardware == ("all",):
        return list_profiles()
    for n in req.hardware:
        load_profile(n)               # an unknown name: one line with the nearest names
    return list(dict.fromkeys(req.hardware))


def _tp_degrees(req: ServePlanRequest, heads: int) -> list[int]:
    if req.tp is None:
        return [d for d in range(1, MAX_TP + 1) if heads % d == 0]
    for d in req.tp:
        if heads % d:
            raise SimcostError(f"--tp {d} does not divide the model's {heads} attention heads")
    return sorted(set(req.tp))


def _kernels(req: ServePlanRequest, own: str) -> list[str]:
    from simcost.serve.step import LORA_KERNELS
    if req.lora_kernels is None:
        return [own]
    if req.lora_kernels == ("all",):
        return list(LORA_KERNELS)
    for k in req.lora_kernels:
        if k not in LORA_KERNELS:
            raise unknown("LoRA kernel", k, LORA_KERNELS)
    return list(dict.fromkeys(req.lora_kernels))


def _fits(req: ServePlanRequest, hw: str, tp: int) -> bool:
    """Weights, one adapter of the largest rank and one longest request's KV cache fit."""
    from simcost.serve.api import estimate_serve
    ctx = req.eff("input_len")[1] + req.eff("output_len")[1]
    lora = req.adapters > 0
    e = estimate_serve(req.model, hw, phase="prefill", batch=1, context=ctx, tp=tp,
                       peft="lora" if lora else "none",
                       rank=max(req.eff("ranks")) if lora else None)
    return e.fits


def space(req: ServePlanRequest) -> tuple[list[Setting], dict[str, list[str]], str, str]:
    """The settings to search, the hardware left out (by reason), the engine's and the
    model's names."""
    from simcost.hardware import load_profile
    from simcost.models.config import load_model
    from simcost.serve.engines import DEFAULT_ENGINE, default_limits, get_engine
    spec = load_model(req.model)
    espec = get_engine(req.engine or DEFAULT_ENGINE)
    tps = _tp_degrees(req, spec.heads)
    kernels = _kernels(req, espec.lora_kernel) if req.adapters > 0 else [None]
    left = {"no_price": [], "no_device_link": [], "does_not_fit": []}
    out = []
    for hw in _hardware_names(req):
        prof = load_profile(hw)
        if prof.price_usd_per_hour is None:
            left["no_price"].append(hw)
            continue
        linked = prof.interconnect is not None and \
            prof.interconnect.bandwidth_bytes_per_s is not None
        dev = prof.device()
        seqs, _ = default_limits(espec, dev.memory_bytes, f"{prof.name} {dev.name}")
        tried = fits = False
        for tp in tps:
            if tp > 1 and not linked:
                if hw not in left["no_device_link"]:
                    left["no_device_link"].append(hw)
                continue
            tried = True
            if not _fits(req, hw, tp):
                continue
            fits = True
            base = dict(hardware=hw, tp=tp, max_num_seqs=seqs,
                        price_usd_per_hour=dev.price_usd_per_hour,
                        engine_kernel=espec.lora_kernel if req.adapters > 0 else None)
            out += [Setting(merged=False, kernel=k, **base) for k in kernels]
            if req.adapters > 0:
                out.append(Setting(merged=True, kernel=None, **base))
        if tried and not fits:
            left["does_not_fit"].append(hw)
    return out, {k: v for k, v in left.items() if v}, espec.name, spec.name
