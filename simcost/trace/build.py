"""Build a task's model on the meta device, apply peft, and trace one training step
(needs the torch extra).

:func:`task_for` turns what ``--model`` names into a :class:`~simcost.trace.task.TracedTask`
(a zoo name, a ``config.json`` of any architecture transformers or diffusers builds, or
``path/to/file.py:factory``); :func:`trace_task` records its step with the adapter config
applied exactly as peft applies it.
"""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.trace.layers import UnevenLayers, reduce_depth
from simcost.trace.record import Trace, count_params, fakeify, trace_step
from simcost.trace.task import TORCH_DTYPE, TracedTask, require_torch


def task_for(model, name: str | None = None) -> TracedTask:
    """The task of ``model``: a :class:`TracedTask`, a config dict, a zoo name, a
    ``config.json`` path (or its directory), or ``file.py:factory``."""
    if isinstance(model, TracedTask):
        return model
    if isinstance(model, dict):
        return config_task(model, name or "model")
    if not isinstance(model, str):
        raise SimcostError(f"model must be a name, a path or a config dict, "
                           f"not {type(model).__name__}")
    from simcost.trace.factory import is_factory_spec
    if is_factory_spec(model):
        from simcost.trace.factory import factory_task
        return factory_task(model)
    from simcost.models.config import load_config_dict
    cfg_name, cfg = load_config_dict(model)
    return config_task(cfg, name or cfg_name)


def config_task(cfg: dict, name: str) -> TracedTask:
    if cfg.get("_class_name"):                   # diffusers writes it into its configs
        from simcost.trace.diffusion import diffusion_task
        return diffusion_task(cfg, name)
    from simcost.trace.hf import hf_task
    return hf_task(cfg, name)


def build_model(task: TracedTask, peft_config: dict | None, dtype: str = "bf16",
                device: str = "meta"):
    """The peft-wrapped model on ``device`` (meta: no memory; cpu: random weights, for
    checking a trace against a real step)."""
    require_torch()
    if dtype not in TORCH_DTYPE:
        raise SimcostError(f"traced dtype '{dtype}'; valid: {', '.join(TORCH_DTYPE)}")
    model = task.build(dtype, device)
    if peft_config:
        model = apply_peft(model, peft_config)
    return model


def apply_peft(model, peft_config: dict, meta: bool = False):
    """Apply an adapter config exactly as peft does (``get_peft_config`` + ``get_peft_model``).
    ``meta``: the model is on the meta device, so peft makes its adapters there without
    initialising them (``low_cpu_mem_usage``: the same parameters, 5x faster on a 7B)."""
    import peft

    from simcost.trace.workarounds import building
    try:
        pcfg = peft_config_of(peft_config)
        with building():
            return peft.get_peft_model(model, pcfg, low_cpu_mem_usage=meta)
    except Exception as e:  # noqa: BLE001 -- peft's refusal, whatever its type
        raise SimcostError(f"peft refuses this adapter config: {type(e).__name__}: "
                           f"{_one_line(e).rstrip('.')}{_target_hint(model, peft_config, e)}") \
            from None


def peft_config_of(peft_config: dict):
    """The peft config object of a config dict, read as peft reads an adapter_config.json
    (``PeftConfig.from_peft_type``: keys this peft version does not know, written by another
    version, are dropped with a warning; :func:`ignored_keys` names them)."""
    import peft
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftConfig.from_peft_type(**dict(peft_config))


def ignored_keys(peft_config: dict | None) -> list[str]:
    """The adapter config's keys peft drops (a config written by another peft version)."""
    import dataclasses

    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    if not peft_config or not isinstance(peft_config.get("peft_type"), str):
        return []
    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_config["peft_type"].upper())
    if cls is None:
        return []
    known = {f.name for f in dataclasses.fields(cls)} | {"peft_type"}
    return sorted(k for k in peft_config if k not in known)


def _target_hint(model, peft_config: dict, e: Exception) -> str:
    """For targets the model lacks: its nearest module names (leaf names of its linear,
    convolution and embedding layers)."""
    import torch
    targets = peft_config.get("target_modules")
    if "not found in the base model" not in str(e) or not isinstance(targets, (list, tuple)):
        return ""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                    if isinstance(m, kinds) or type(m).__name__ == "Conv1D"})
    from simcost.errors import closest
    near = [closest(str(t), names) for t in targets]
    near = [h for h in near if h]
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return (near[0] if near else "") + f"; the model's layers: {shown}"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def peft_type(peft_config: dict | None) -> str | None:
    return (peft_config or {}).get("peft_type")


def trace_task(task: TracedTask, peft_config: dict | None = None, *, dtype: str = "bf16",
               hints: dict, reduce: bool = True, checkpointing: bool = False,
               autocast: str | None = None, attn: str = "sdpa") -> Trace:
    """Trace one training step of the task's model with the adapter config applied.
    ``hints``: the sizes the trace follows where model code branches (the request's own).
    ``reduce``: trace one layer of each kind and count the rest
    (:mod:`simcost.trace.layers`); False traces every layer. ``checkpointing``: each layer of
    the repeated stacks runs under ``torch.utils.checkpoint`` (non-reentrant), as
    transformers' ``gradient_checkpointing_enable`` runs its decoder layers. ``autocast``:
    'bf16' or 'fp16' runs the step under ``torch.autocast`` (mixed precision over ``dtype``
    weights). ``attn``: 'sdpa' (the default of the builds) or 'eager' (transformers'
    ``set_attn_implementation``). A stack whose layers change the shape of their hidden
    state (token merging) is traced at full depth (:class:`~simcost.trace.layers.UnevenLayers`)."""
    require_torch()
    import warnings

    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # the libraries' deprecation and advice messages are about their own use, not the
            # estimate; what changes a recording (peft's refusals) raises
            warnings.simplefilter("ignore")
            return _trace_task(task, peft_config, dtype=dtype, hints=hints, reduce=reduce,
                               checkpointing=checkpointing, autocast=autocast, attn=attn)
    finally:
        hf_logging.set_verbosity(verbosity)


def _trace_task(task, peft_config, *, dtype, hints, reduce, checkpointing, autocast, attn):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    missing = [d for d in task.dims if d not in hints]
    if missing:
        raise SimcostError(f"{task.name} ({task.kind}) needs the sizes "
                           f"{', '.join(task.dims)}; missing: {', '.join(missing)}")
    if dtype not in TORCH_DTYPE:
        raise SimcostError(f"traced dtype '{dtype}'; valid: {', '.join(TORCH_DTYPE)}")
    model, base_names = _peft_model(task, peft_config, dtype, attn)
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    params = count_params(model)
    counts = reduce_depth(model, task.stacks) if reduce else None
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)   # peft's prompt ids
    fakeify(model, mode)
    ptype = peft_type(peft_config)
    # a size of 1 is specialised by torch: such a recording holds for that size only
    static = (*task.static, *(d for d in task.dims if hints[d] == 1 and d not in task.static))
    try:
        return trace_step(model, lambda sizes: task.inputs(sizes, ptype),
                          {d: hints[d] for d in task.dims}, env, mode, static=static,
                          counts=counts, params=params, loss=task.loss, base_names=base_names,
                          autocast=TORCH_DTYPE[autocast] if autocast else None)
    except UnevenLayers:
        return trace_task(task, peft_config, dtype=dtype, hints=hints, reduce=False,
                          checkpointing=checkpointing, autocast=autocast, attn=attn)


def _peft_model(task: TracedTask, peft_config, dtype: str, attn: str):
    """(the peft-wrapped model on the meta device, the base model's parameter names). peft
    makes uninitialised adapters where the tuner's init allows; a tuner whose init reads the
    weights (SHiRA's mask) is built again with peft's full init."""
    def base():
        m = task.build(dtype, "meta")
        if attn != "sdpa":
            if not hasattr(m, "set_attn_implementation"):
                raise SimcostError(f"--attn {attn}: {task.name} has no attention "
                                   f"implementation to choose")
            m.set_attn_implementation(attn)
        return m, {n for n, _ in m.named_parameters(remove_duplicate=False)}

    model, names = base()
    if not peft_config:
        return model, names
    try:
        return apply_peft(model, peft_config, meta=True), names
    except SimcostError:
        model, names = base()
        return apply_peft(model, peft_config), names


def enable_checkpointing(model) -> None:
    """Activation checkpointing per layer: the model's own switch where it has one
    (transformers' ``activation_checkpointing_enable``, non-reentrant, with the input
    embeddings' output made to require grad as it does; diffusers'
    ``enable_gradient_checkpointing``), else every layer of the repeated stacks runs under
    ``torch.utils.checkpoint`` (non-reentrant)."""
    import functools

    import torch.utils.checkpoint as ckpt

    from simcost.trace.layers import repeated_stacks
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "supports_gradient_checkpointing", False) or \
            getattr(base, "_supports_gradient_checkpointing", False):
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable()
            return
        if hasattr(base, "enable_gradient_checkpointing"):
            base.enable_gradient_checkpointing()
            return
    stacks = repeated_stacks(model)
    if not stacks:
        raise SimcostError("--checkpointing full: this model has no repeated layers to "
                           "checkpoint")
    for _, stack in stacks:
        for layer in stack:
            layer.forward = functools.partial(ckpt.checkpoint, layer.forward,
                                              use_reentrant=False)


def trace_config(cfg: dict, peft_config: dict | None = None, **kw) -> Trace:
    """:func:`trace_task` of a config dict's task."""
    return trace_task(config_task(cfg, "model"), peft_config, **kw)
