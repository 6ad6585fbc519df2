"""Diffusers denoisers for the traced front end: one noise-prediction training step (torch
and diffusers imported lazily).

The step is the one diffusers' training scripts run (``examples/text_to_image/
train_text_to_image_lora.py``, ``examples/dreambooth/train_dreambooth_lora_sdxl.py``; DiT's
``train.py``): the denoiser gets the noisy latents, the timesteps and the conditioning, and
the loss is ``F.mse_loss(model_pred.float(), target.float())`` with ``target`` the noise
(epsilon prediction), a tensor of the latents' shape. The VAE and the text encoders are
frozen and run outside the step (their outputs are inputs here).

Per ``_class_name``, the inputs (sizes):
- ``UNet2DConditionModel`` (SD, SDXL): sample (batch, in_channels, latent, latent), timestep
  (batch), encoder_hidden_states (batch, seq, cross_attention_dim); SDXL
  (``addition_embed_type='text_time'``): added_cond_kwargs text_embeds (batch, pooled) and
  time_ids (batch, 6);
- ``DiTTransformer2DModel``: hidden_states (batch, in_channels, latent, latent), timestep and
  class_labels (batch);
- ``PixArtTransformer2DModel``: hidden_states, timestep, encoder_hidden_states (batch, seq,
  caption_channels), added_cond_kwargs resolution (batch, 2) and aspect_ratio (batch, 1) where
  the model uses them;
- ``Transformer2DModel``: renamed by ``norm_type`` as diffusers' ``from_pretrained`` does
  (``ada_norm_zero``: DiT, ``ada_norm_single``: PixArt);
- ``UNet2DModel`` (DDPM, unconditional): sample (batch, in_channels, image, image) in pixel
  space, timestep (batch).

Sizes: ``batch``; ``image``, in pixels (default: the config's ``sample_size`` times the VAE
scale factor, SD 1.5: 64 -> 512, SDXL: 128 -> 1024, DiT-XL/2-256: 32 -> 256); the latent side
is ``image // 8``: the VAE scale factor ``2 ** (len(vae.config.block_out_channels) - 1)`` of
the pipelines (``StableDiffusionPipeline.__init__``) is 8 for the 4-level AutoencoderKL of
SD 1.5, SDXL, DiT (``stabilityai/sd-vae-ft-ema``) and PixArt; UNet2DModel trains in pixel
space (``train_unconditional.py``: factor 1). ``seq`` (text-conditioned models): the text
tokens, default 77 (the CLIP tokenizer's ``model_max_length`` of SD and SDXL; PixArt-alpha's
T5: 120).

What torch keeps symbolic. ``batch`` always. ``image`` in the UNets: diffusers' nearest
upsampling (``F.interpolate(scale_factor=2)``) and strided convolutions give exact
floor-division sizes, and the UNet's branch on ``latent % 2**num_upsamplers`` (it forwards
explicit upsample sizes when the latent is not a multiple) is a guard, so a recording holds
for every image size on the branch it was traced on (the recording's ``check`` refuses the
others). ``Upsample2D`` branches on the batch (``.contiguous()`` from a batch of 64, a no-op
on these tensors) and on the upsampled size (the same above 2**31 elements): torch keeps both
as guards, so a recording made below a batch of 64 holds below 64, one made at 64 or more
from 64 on (the front end records at the request's sizes). The fake convolution's guard on
the batch (its CPU kernel choice) is not kept (:mod:`simcost.trace.composites`). ``image`` is static in the transformers: DiT's and PixArt's patch embedding
recompute their sin-cos position table when the token grid differs from ``sample_size``'s,
and DiT's unpatchify takes ``int(tokens ** 0.5)``; both need a concrete size.
"""
from __future__ import annotations

import json

from simcost.errors import SimcostError
from simcost.trace.task import TracedTask

VAE_SCALE = 8        # 2 ** (len(vae block_out_channels) - 1) of SD / SDXL / DiT / PixArt's VAE
CLIP_SEQ = 77        # CLIPTokenizer.model_max_length (SD 1.5, SDXL)
T5_SEQ = 120         # PixArt-alpha's max_sequence_length
SDXL_TIME_IDS = 6    # original size, crop top-left, target size (the refiner: 5)
SDXL_POOLED = 1280   # text_encoder_2's projection_dim (OpenCLIP bigG), base and refiner
# Transformer2DModel configs name their model by norm_type (diffusers' _CLASS_REMAPPING_DICT)
REMAP = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}
# the repeated layers: the transformer blocks (SDXL's 2 and 10 per attention, DiT's 28). A
# UNet's per-resolution resnets and attentions (2 or 3 each) are traced whole: the skip
# connection each up-block resnet concatenates is made between them, outside the layers, yet
# is one per layer
STACKS = ("transformer_blocks",)
DENOISERS = ("UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel",
             "PixArtTransformer2DModel", "UNet2DModel")


def diffusion_task(cfg: dict, name: str = "model") -> TracedTask:
    """The :class:`TracedTask` of a diffusers denoiser config (``_class_name``)."""
    cls_name = _class_of(cfg)
    _check_unet(cfg, cls_name)
    unet = cls_name.startswith("UNet")
    text = cls_name in ("UNet2DConditionModel", "PixArtTransformer2DModel")
    scale = 1 if cls_name == "UNet2DModel" else VAE_SCALE
    dims = ("batch", "image", "seq") if text else ("batch", "image")
    defaults = {}
    side = cfg.get("sample_size")
    if isinstance(side, (list, tuple)):
        side = side[0]
    if isinstance(side, int) and side > 0:
        defaults["image"] = side * scale
    if text:
        defaults["seq"] = T5_SEQ if cls_name == "PixArtTransformer2DModel" else CLIP_SEQ
    return TracedTask(name=name, kind="noise-pred", dims=dims,
                      build=lambda dtype, device: build_diffusers(cfg, cls_name, dtype, device),
                      inputs=lambda sizes, peft_type: diffusion_inputs(cfg, cls_name, sizes),
                      key=json.dumps(cfg, sort_keys=True, default=str),
                      static=() if unet else ("image",), defaults=defaults,
                      loss=noise_mse, stacks=STACKS)


def _class_of(cfg: dict) -> str:
    """The diffusers class that builds ``cfg``, refused in one line when diffusers lacks it or
    it is not a denoiser this module trains."""
    from simcost.trace.task import require_torch
    require_torch("the traced front end")
    try:
        import diffusers
    except ImportError:
        raise SimcostError("diffusers configs need diffusers: pip install diffusers") from None
    cls_name = str(cfg.get("_class_name"))
    if cls_name == "Transformer2DModel":
        cls_name = REMAP.get(cfg.get("norm_type"), cls_name)
    if getattr(diffusers, cls_name, None) is None:
        raise SimcostError(f"diffusers {diffusers.__version__} has no class '{cls_name}' "
                           f"(the config's _class_name)")
    if cls_name not in DENOISERS or cls_name == "Transformer2DModel":
        raise SimcostError(f"'{cls_name}': the traced front end trains the diffusers "
                           f"denoisers UNet2DConditionModel, UNet2DModel, DiTTransformer2DModel "
                           f"and PixArtTransformer2DModel (Transformer2DModel with norm_type "
                           f"ada_norm_zero or ada_norm_single)")
    return cls_name


def _check_unet(cfg: dict, cls_name: str) -> None:
    """Refuse the conditioning this module does not make (Kandinsky's image embeddings, ...)."""
    if cls_name != "UNet2DConditionModel":
        return
    for key, ok in (("addition_embed_type", (None, "text", "text_time")),
                    ("encoder_hid_dim_type", (None, "text_proj")),
                    ("class_embed_type", (None, "timestep"))):
        if cfg.get(key) not in ok:
            raise SimcostError(f"UNet2DConditionModel with {key}='{cfg.get(key)}': the traced "
                               f"front end makes the inputs of {key} "
                               f"{', '.join(str(v) for v in ok)}")
    if isinstance(cfg.get("cross_attention_dim"), (list, tuple)) and \
            len(set(cfg["cross_attention_dim"])) != 1:
        raise SimcostError("UNet2DConditionModel with one cross_attention_dim per block: the "
                           "traced front end makes one encoder_hidden_states")


def build_diffusers(cfg: dict, cls_name: str, dtype: str, device: str):
    """The denoiser on ``device`` (meta: no memory; cpu: random weights), with a pre-hook that
    casts its floating inputs to the weights' dtype (the scripts cast the latents and the
    text embeddings to ``weight_dtype``)."""
    import functools

    import diffusers
    import torch

    from simcost.trace.task import TORCH_DTYPE
    from diffusers.utils import logging as dlog
    cls = getattr(diffusers, cls_name)
    body = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if device != "meta":
        torch.manual_seed(0)
    tdt = getattr(torch, TORCH_DTYPE[dtype])
    # diffusers' advice (keys a legacy config carries, casting with .to()) is not the estimate's
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        with torch.device(device):
            model = cls.from_config(body).to(tdt)
    except Exception as e:  # noqa: BLE001 -- any build error is the config's
        raise SimcostError(f"diffusers cannot build {cls_name} from this config: "
                           f"{type(e).__name__}: {' '.join(str(e).split())}") from None
    finally:
        dlog.set_verbosity(level)
    model.register_forward_pre_hook(functools.partial(_cast_inputs, tdt), with_kwargs=True)
    return model


def _cast_inputs(dtype, module, args, kwargs):
    import torch

    def cast(x):
        if isinstance(x, dict):
            return {k: cast(v) for k, v in x.items()}
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def diffusion_inputs(cfg: dict, cls_name: str, s: dict) -> dict:
    """The denoiser's inputs from (symbolic) sizes: the noisy latents, the timesteps and the
    conditioning (zeros: only their shapes and dtypes matter)."""
    import torch
    long = torch.long
    b = s["batch"]
    latent = s["image"] if cls_name == "UNet2DModel" else s["image"] // VAE_SCALE
    x = torch.zeros(b, int(cfg.get("in_channels") or 4), latent, latent)
    t = torch.zeros(b, dtype=long)
    if cls_name == "UNet2DModel":
        out = {"sample": x, "timestep": t}
        if cfg.get("num_class_embeds") or cfg.get("class_embed_type"):
            out["class_labels"] = torch.zeros(b, dtype=long)
        return out
    if cls_name == "DiTTransformer2DModel":
        return {"hidden_states": x, "timestep": t, "class_labels": torch.zeros(b, dtype=long)}
    if cls_name == "PixArtTransformer2DModel":
        ctx = torch.zeros(b, s["seq"], int(cfg.get("caption_channels") or 4096))
        cond = {"resolution": None, "aspect_ratio": None}
        extra = cfg.get("use_additional_conditions")
        if extra is None:                        # diffusers' default: PixArt-alpha 1024 px
            extra = cfg.get("sample_size") == 128
        if extra:
            cond = {"resolution": torch.zeros(b, 2), "aspect_ratio": torch.zeros(b, 1)}
        return {"hidden_states": x, "timestep": t, "encoder_hidden_states": ctx,
                "added_cond_kwargs": cond}
    return unet_inputs(cfg, s, x, t)


def unet_inputs(cfg: dict, s: dict, x, t) -> dict:
    import torch
    b = s["batch"]
    cross = cfg.get("cross_attention_dim") or 1280
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if cfg.get("encoder_hid_dim_type") == "text_proj":
        cross = cfg.get("encoder_hid_dim") or cross
    out = {"sample": x, "timestep": t,
           "encoder_hidden_states": torch.zeros(b, s["seq"], int(cross))}
    if cfg.get("addition_embed_type") == "text_time":
        proj = int(cfg.get("projection_class_embeddings_input_dim") or 0)
        step = int(cfg.get("addition_time_embed_dim") or 256)
        n_ids = next((n for n in (SDXL_TIME_IDS, SDXL_TIME_IDS - 1)
                      if proj - n * step == SDXL_POOLED), SDXL_TIME_IDS)
        pooled = proj - n_ids * step
        if pooled <= 0:
            raise SimcostError(f"projection_class_embeddings_input_dim {proj} leaves no pooled "
                               f"text embedding beside {n_ids} time ids of {step}")
        out["added_cond_kwargs"] = {"text_embeds": torch.zeros(b, pooled),
                                    "time_ids": torch.zeros(b, n_ids)}
    if cfg.get("class_embed_type") == "timestep" or cfg.get("num_class_embeds"):
        out["class_labels"] = torch.zeros(b, dtype=torch.long)
    return out


def noise_mse(out, inputs):
    """``F.mse_loss(model_pred.float(), noise.float())``; a learned-sigma model's output has
    twice the latent channels: its first half is the noise prediction (DiT's
    ``training_losses``: ``th.split(model_output, C, dim=1)``)."""
    import torch
    import torch.nn.functional as F
    pred = out[0] if isinstance(out, tuple) else out.sample
    x = inputs.get("sample", inputs.get("hidden_states"))
    if pred.shape[1] != x.shape[1]:
        pred = torch.split(pred, x.shape[1], dim=1)[0]
    noise = torch.randn_like(x)
    return F.mse_loss(pred.float(), noise.float())
