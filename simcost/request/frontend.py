"""Which front end serves a training request: the hand-built graphs (``analytic``: fast, no
torch) or torch's own recording of the step (``traced``: any model transformers or diffusers
builds, your own module, every peft tuner; needs the torch extra).

``--frontend auto`` takes the analytic path where it covers the request (a decoder family of
:data:`simcost.models.config.ARCHITECTURES`, a method it models, text sizes only) and the
traced path otherwise; the result's ``frontend`` says which ran.
"""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.models.config import ARCHITECTURES, ModelSpec, architecture_of, load_config_dict


def resolve_frontend(req) -> tuple[str, str | None]:
    """('analytic' | 'traced', why auto chose traced, or None)."""
    if req.frontend != "auto":
        return req.frontend, None
    why = traced_reason(req)
    return ("traced", why) if why else ("analytic", None)


def traced_reason(req) -> str | None:
    """Why the analytic path does not cover ``req`` (None when it does)."""
    if isinstance(req.model, ModelSpec):
        return None
    from simcost.trace.factory import is_factory_spec
    if is_factory_spec(req.model):
        return "a bring-your-own module"
    name, cfg = load_config_dict(req.model)
    if cfg.get("_class_name"):
        return f"a diffusers {cfg['_class_name']}"
    arch = architecture_of(cfg, name)
    if arch not in ARCHITECTURES:
        return f"architecture {arch or cfg.get('model_type') or '(unnamed)'}"
    if req.target_seq is not None or req.image_size is not None:
        return "--target-seq / --image-size (sizes of encoder-decoder, vision and diffusion models)"
    if req.quantize == "int8" or req.quantize == "nf4" and (
            req.peft_config is not None or req.method not in ("lora", "qlora")):
        return f"a {req.quantize} base under --peft {req.method}"
    if req.peft_config is not None:
        from simcost.peft.config_file import uncovered
        from simcost.peft.spec import read_adapter_config
        why = uncovered(read_adapter_config(req.peft_config)[0])
        if why:
            return why
    return None


def analytic_request(req):
    """The request as the analytic path prices it, or a one-line refusal: text sizes
    (``--seq``, no vision or target sizes), and a quantised base only as QLoRA (LoRA with
    ``--quantize nf4`` is ``--peft qlora``)."""
    if req.quantize == "int8" or req.quantize == "nf4" and req.method not in ("lora", "qlora"):
        raise SimcostError(f"--quantize {req.quantize} with --peft {req.method}: the analytic "
                           f"path models QLoRA (--peft qlora, or lora with --quantize nf4); "
                           f"--frontend traced quantises the base under any method")
    require_text_sizes(req)
    if req.quantize == "nf4":
        return req.model_copy(update={"peft": "qlora", "quantize": "none"})
    return req


def require_text_sizes(req) -> None:
    """The analytic path prices text decoders: ``--seq`` given, no vision or target sizes."""
    if req.seq is None:
        raise SimcostError("--seq is required (tokens per sequence)")
    for name, v in (("--target-seq", req.target_seq), ("--image-size", req.image_size)):
        if v is not None:
            raise SimcostError(f"{name} applies to encoder-decoder, vision and diffusion models "
                               f"(the traced front end); {req.model} is a decoder LM")
