"""``estimate train --frontend traced``: a validated :class:`~simcost.request.train.TrainRequest`
priced through torch's own recording of the step (the recording needs the torch extra; a
cached one does not).

The request's sizes become the task's (:class:`~simcost.trace.task.TracedTask`: ``--seq``,
``--target-seq``, ``--image-size``), the method becomes a peft adapter config (``--peft-config``
as written, or the shorthand flags through :func:`simcost.peft.spec.to_peft_dict`, with the
task type of the model's head), and the step is recorded once at the request's sizes, then
priced (:mod:`simcost.trace.numbers`). Options the traced path does not price yet are refused
with the reason, never ignored.
"""
from __future__ import annotations

from simcost.errors import SimcostError
from simcost.hardware import load_profile
from simcost.result import TrainEstimate, make_estimate
from simcost.stack import load_stack

# peft's task_type for each head kind (None: a plain PeftModel, as peft's docs use for ViT)
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "seq-cls": "SEQ_CLS",
              "masked-lm": None, "image-cls": None, "custom": None, "noise-pred": None}
PEFT_SHORTHAND = ("lora", "dora", "ia3", "prefix", "prompt", "ln_tuning")


def refuse_unpriced(req) -> None:
    """Options the traced path does not price: one line each, with what to use instead."""
    checks = [
        (req.optimizer == "mezo", "--optimizer mezo is priced by the analytic path only"),
        (req.checkpointing == "selective", "--checkpointing selective needs the attention "
                                           "core's structure: traced steps take none or full"),
        (req.loss_chunks != 1, "--loss-chunks (torchtune's chunked loss) is priced by the "
                               "analytic path only"),
        (req.optimizer_in_backward, "--optimizer-in-backward is priced by the analytic path "
                                    "only"),
        (req.max_positions is not None, "--max-positions applies to the analytic path"),
    ]
    for bad, why in checks:
        if bad:
            raise SimcostError(f"traced front end: {why}")


def adapter_config(req, kind: str, task_model_type: str | None = None
                   ) -> tuple[dict | None, dict, list[str]]:
    """(peft config dict or None, the result's ``peft`` entry, warnings)."""
    from simcost.request.train import request_peft
    if req.peft_config is not None:
        from simcost.peft.spec import read_adapter_config
        cfg, file = read_adapter_config(req.peft_config)
        if not isinstance(cfg, dict):
            raise SimcostError(f"{file} is not a JSON object")
        ptype = cfg.get("peft_type")
        if not isinstance(ptype, str):
            raise SimcostError(f"{file}: peft_type is missing")
        return cfg, {"method": ptype.lower(), "peft_type": ptype.upper(), "config": file}, []
    method = req.method
    if method == "full":
        return None, {"method": "full"}, []
    if method == "qlora":          # LoRA, with the NF4 base as a rewrite (quantisation())
        req = req.model_copy(update={"peft": "lora"})
        method = "lora"
    if method not in PEFT_SHORTHAND:
        raise SimcostError(f"traced front end: --peft {method} is not a peft tuner; give its "
                           f"adapter_config.json (--peft-config) or use --frontend analytic")
    from simcost.peft.base import LN_DEFAULTS, LORA_DEFAULTS
    from simcost.peft.spec import to_peft_dict
    from simcost.result import peft_dict
    spec = request_peft(req)
    # the hand-built path's default targets where it has them (peft 0.21 has none for
    # Mixtral on transformers 5), so both paths price the same adapter; peft's elsewhere
    defaults = {"lora": LORA_DEFAULTS, "ln_tuning": LN_DEFAULTS}.get(spec.method, {})
    default = defaults.get(task_model_type)
    if spec.method in ("lora", "dora", "ia3") and spec.targets is None and default is None \
            and not _peft_has_defaults(spec.method, task_model_type):
        raise SimcostError(f"peft has no default target modules for model type "
                           f"'{task_model_type}': give --targets (module names, or all-linear)")
    d = to_peft_dict(spec, default)
    d = {k: v for k, v in d.items() if v is not None}
    if default and "target_modules" not in d:          # LN tuning's shorthand leaves it out
        d["target_modules"] = list(default)
    task_type = TASK_TYPES.get(kind)
    if task_type:
        d["task_type"] = task_type
    else:
        d.pop("task_type", None)
    return d, peft_dict(spec), list(spec.warnings)


def _peft_has_defaults(method: str, model_type: str | None) -> bool:
    from peft.utils import constants
    table = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING if method == "ia3" \
        else constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    return model_type in table


def quantisation(req) -> str:
    """The base's storage: ``--quantize``, or NF4 for ``--peft qlora``."""
    return "nf4" if req.method == "qlora" and req.quantize == "none" else req.quantize


def compiled_step(task, peft_cfg, *, dtype: str, autocast: str | None, attn: str,
                  checkpointing: bool, sizes: dict, use_cache: bool = True):
    """The task's :class:`CompiledTrace` at ``sizes``, from the cache or traced now."""
    from simcost.trace import cache
    static = {d: sizes[d] for d in task.dims if d in task.static or sizes[d] == 1}
    key = cache.trace_key(task.key, peft_cfg, dtype=dtype, autocast=autocast, attn=attn,
                          checkpointing=checkpointing, static=static)
    ct = cache.get(key) if use_cache else None
    if ct is not None:
        try:
            ct.check(sizes)
            return ct
        except SimcostError:
            pass              # its guards do not hold here: record it again at these sizes
    from simcost.trace.build import trace_task
    from simcost.trace.compiled import compile_trace
    tr = trace_task(task, peft_cfg, dtype=dtype, hints=sizes, checkpointing=checkpointing,
                    autocast=autocast, attn=attn)
    ct = compile_trace(tr)
    if use_cache:
        cache.put(key, ct)
    return ct


def request_step(req, task, peft_cfg, sizes: dict):
    """The recording a request prices at ``sizes`` (its dtypes, attention, checkpointing and
    cache choice)."""
    return compiled_step(task, peft_cfg, dtype=req.dtype,
                         autocast=None if req.mixed_precision == "none" else req.mixed_precision,
                         attn="eager" if req.attn == "eager" else "sdpa",
                         checkpointing=req.checkpointing == "full", sizes=sizes,
                         use_cache=req.trace_cache)


def counts_tokens(task, sizes: dict) -> bool:
    """Whether the model trains on tokens (else on samples: images, noise predictions)."""
    return "seq" in sizes and task.kind not in ("image-cls", "noise-pred")


def estimate_traced(req, why: str | None = None) -> TrainEstimate:
    from simcost.trace.build import task_for
    from simcost.trace.numbers import traced_numbers
    refuse_unpriced(req)
    task = task_for(req.model)
    sizes = task.sizes({"batch": req.batch, "seq": req.seq, "target_seq": req.target_seq,
                        "image": req.image_size})
    warns = list(req.notes)
    if why:
        warns.append(f"priced by the traced front end ({why} is beyond the hand-built graphs)")
    if task.learned_positions and task.max_positions and "seq" in sizes \
            and sizes["seq"] > task.max_positions:
        raise SimcostError(f"sequence length {sizes['seq']} exceeds {task.name}'s "
                           f"{task.max_positions} learned positions")
    device = load_profile(req.hardware).device()
    if req.attn == "flash" and device.kind == "cpu":
        raise SimcostError("--attn flash needs an accelerator; on a CPU torch runs sdpa or "
                           "eager attention")
    stack = load_stack(req.stack)
    if stack.fusions:
        warns.append(f"stack '{stack.name}': its fusions ({', '.join(stack.fusions)}) are not "
                     f"applied to traced graphs (priced as the eager kernels torch recorded)")
    peft_cfg, peft_entry, pwarn = adapter_config(req, task.kind, task.model_type)
    if quantisation(req) != "none":
        peft_entry = {**peft_entry, "quantize": quantisation(req)}
    compute = req.mixed_precision if req.mixed_precision != "none" else req.dtype
    if req.dtype == "fp8":
        raise SimcostError("traced front end: --dtype fp8 is priced by the analytic path only")
    if peft_cfg:
        from simcost.trace.build import ignored_keys
        dropped = ignored_keys(peft_cfg)
        if dropped:
            warns.append(f"adapter config keys this peft version does not know, ignored as "
                         f"peft ignores them: {', '.join(dropped)}")
    if req.distributed:
        from simcost.trace.parallel import refuse_axes
        refuse_axes(req)
    ct = request_step(req, task, peft_cfg, sizes)
    if req.distributed:
        return _data_parallel(req, task, ct, peft_cfg, sizes, device, stack, compute,
                              peft_entry, [*warns, *pwarn])
    tn = traced_numbers(ct, sizes, device, optimizer=req.optimizer, mixed=req.mixed_precision,
                        stack=stack, host_allocator=req.host_allocator, dtype=compute,
                        tokens=tokens_per_step(task, sizes), quantize=quantisation(req))
    n = tn.numbers
    if tn.unpriced:
        warns.append("priced by their bytes alone (no formula): " +
                     ", ".join(f"{k} x{v}" for k, v in sorted(tn.unpriced.items())))
    est = make_estimate(task.name, device, peft_entry, n, batch=req.batch, seq=sizes.get("seq"),
                        dtype=req.dtype, mixed_precision=req.mixed_precision, attn=req.attn,
                        optimizer=req.optimizer, checkpointing=req.grad_checkpointing,
                        warnings=[*warns, *pwarn, *n.warnings], stack=stack,
                        counts_tokens=counts_tokens(task, sizes))
    return est.model_copy(update={"frontend": "traced", "sizes": dict(sizes),
                                  "unpriced_ops": dict(tn.unpriced) or None})


def tokens_per_step(task, sizes: dict):
    """What a step trains on: batch x seq tokens (an encoder-decoder adds its target tokens);
    image and diffusion models count samples (the batch)."""
    b = sizes["batch"]
    if "seq" not in sizes or task.kind in ("image-cls", "noise-pred"):
        return b
    return b * (sizes["seq"] + sizes.get("target_seq", 0))


def sweep_traced(req, why: str | None = None) -> dict:
    """:func:`simcost.api.sweep_train` on a traced step: one recording (traced at the largest
    point, so its guards hold for the smaller ones it covers), priced over the whole grid as
    numpy arrays; points where a size is 1 (which torch specialises) get a recording of their
    own."""
    import numpy as np

    from simcost.result import device_warnings
    from simcost.stack.intervals import estimate_intervals
    from simcost.trace.build import task_for
    from simcost.trace.numbers import traced_numbers
    base = req.base
    refuse_unpriced(base)
    task = task_for(base.model)
    if "seq" not in task.dims:
        raise SimcostError(f"sweep_train sweeps batch x sequence; {task.name} ({task.kind}) "
                           f"has no sequence")
    bb, ss = np.meshgrid(req.batches, req.seqs, indexing="ij")
    flat_b, flat_s = bb.ravel().astype(np.int64), ss.ravel().astype(np.int64)
    device = load_profile(base.hardware).device()
    stack = load_stack(base.stack)
    peft_cfg, _, pwarn = adapter_config(base, task.kind, task.model_type)
    out = {k: np.zeros(flat_b.shape) for k in ("step_s", "tokens_per_s", "peak_bytes")}
    out["fits"] = np.zeros(flat_b.shape, dtype=bool)
    warns = [*base.notes, *pwarn, *device_warnings(device)]
    for unit_b in (False, True):
        for unit_s in (False, True):
            sel = ((flat_b == 1) == unit_b) & ((flat_s == 1) == unit_s)
            if not sel.any():
                continue
            other = task.sizes({"batch": base.batch, "seq": base.seq,
                                "target_seq": base.target_seq, "image": base.image_size})
            hints = {**other, "batch": int(flat_b[sel].max()), "seq": int(flat_s[sel].max())}
            dims = {**other, "batch": flat_b[sel], "seq": flat_s[sel]}
            ct = request_step(base, task, peft_cfg, hints)
            compute = base.mixed_precision if base.mixed_precision != "none" else base.dtype
            n = traced_numbers(ct, dims, device, optimizer=base.optimizer,
                               mixed=base.mixed_precision, stack=stack,
                               host_allocator=base.host_allocator, dtype=compute,
                               tokens=tokens_per_step(task, dims),
                               quantize=quantisation(base)).numbers
            k = int(sel.sum())
            out["step_s"][sel] = np.broadcast_to(n.time_s["step"], k)
            out["tokens_per_s"][sel] = np.broadcast_to(n.tokens_per_s, k)
            out["peak_bytes"][sel] = np.broadcast_to(n.memory_bytes["peak"], k)
            out["fits"][sel] = np.broadcast_to(n.fits, k)
    arrays = {k: v.reshape(bb.shape) for k, v in out.items()}
    if why:
        warns.insert(0, f"priced by the traced front end ({why} is beyond the hand-built "
                        f"graphs)")
    return {"batch": bb, "seq": ss, "warnings": warns, **arrays, "stack": stack.label(),
            "frontend": "traced",
            "intervals": estimate_intervals(stack, device, arrays["step_s"],
                                            arrays["peak_bytes"])}


def _data_parallel(req, task, ct0, peft_cfg, sizes, device, stack, compute, peft_entry, warns):
    """``--devices N`` (``--zero``, ``--micro-batch``, ``--parallel auto``) on a traced graph:
    :mod:`simcost.trace.parallel`; every plan's micro-batch priced from its recording."""
    from simcost.hardware import load_profile
    from simcost.sim.timing import TimeModel
    from simcost.stack import optimizer_impl
    from simcost.trace import parallel as TP
    from simcost.trace.numbers import traced_numbers
    profile = load_profile(req.hardware)
    topo = TP.topology(profile, req.devices, req.nodes)
    tm = TimeModel.from_device(device, stack)
    impl = optimizer_impl(stack, device.kind)
    results, numbers = [], {}
    for plan in TP.plans(req):
        mb = plan.micro_batch
        if mb not in numbers:
            dims = {**sizes, "batch": mb}
            ct = ct0 if mb == sizes["batch"] else request_step(req, task, peft_cfg, dims)
            numbers[mb] = (ct, traced_numbers(ct, dims, device, optimizer=req.optimizer,
                                              mixed=req.mixed_precision, stack=stack,
                                              dtype=compute, tokens=tokens_per_step(task, dims),
                                              quantize=quantisation(req)).numbers)
        ct, n = numbers[mb]
        results.append(TP.evaluate(plan, n, ct, topo=topo, device=device, tm=tm, stack=stack,
                                   optimizer=req.optimizer, mixed=req.mixed_precision,
                                   impl=impl))
    fitting = [r for r in results if r.fits]
    best = min(fitting or results, key=lambda r: (r.step_s if fitting else r.memory_bytes["peak"]))
    n1 = numbers[best.plan.micro_batch][1]
    tokens = tokens_per_step(task, sizes)
    scale = sizes["batch"] / best.plan.micro_batch
    flops = {k: float(v) * (scale if k != "optimizer" else 1) for k, v in n1.flops.items()}
    par = {"plan": best.plan.as_dict(), "plan_label": best.plan.label(), "devices": req.devices,
           "nodes": topo.nodes, "plans_searched": len(results), "plans_priced": len(results),
           "communication_s": best.communication_s,
           "note": "data parallelism over traced graphs (simcost.trace.parallel)"}
    est = make_estimate(task.name, device, peft_entry, n1, batch=req.batch,
                        seq=sizes.get("seq"), dtype=req.dtype,
                        mixed_precision=req.mixed_precision, attn=req.attn,
                        optimizer=req.optimizer, checkpointing=req.grad_checkpointing,
                        flops=flops, memory_bytes=best.memory_bytes, time_s=best.time_s,
                        tokens_per_s=tokens / best.step_s, fits=best.fits, parallel=par,
                        warnings=[*warns, *n1.warnings], stack=stack,
                        counts_tokens=counts_tokens(task, sizes))
    return est.model_copy(update={"frontend": "traced", "sizes": dict(sizes)})
