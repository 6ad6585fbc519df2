"""Exact measurements of one HF training step in torch (needs the `torch` extra).

What is measured (the definitions of the foundation issue):
- trainable / total parameters after peft,
- matmul FLOPs of forward and backward with ``torch.utils.flop_counter.FlopCounterMode``
  (CPU SDPA kernels and ``_grouped_mm`` get the formulas torch 2.13 lacks),
- bytes autograd saves for backward during forward (saved-tensor hooks; each storage once,
  parameters and buffers excluded; only storages still alive at the end of forward).

Large models run on fake tensors: the model is built on the meta device, wrapped by peft there,
then materialised as fake CPU tensors, so a 7B step costs seconds and no memory.
"""
from __future__ import annotations

import gc
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from simcost.trace.record import fake_tensors_are_not_tracing  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_registered = False


def _register_missing_flop_formulas() -> None:
    """Register FLOP formulas torch 2.13's FlopCounterMode lacks (it counts 0 for these ops).

    - ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``): what
      ``F.scaled_dot_product_attention`` runs on CPU; torch's ``sdpa_flop_count`` /
      ``sdpa_backward_flop_count`` (backward = 2.5x forward).
    - ``aten._grouped_mm``: transformers 5's default MoE experts (``experts_implementation=
      "grouped_mm"``, ``torch.nn.functional.grouped_mm``) run every expert's GEMM as one grouped
      call; its backward is ``_grouped_mm`` calls too, so this one formula covers both.
    """
    global _registered
    if _registered:
        return
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd_op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd_op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd_op is not None and fwd_op not in fc.flop_registry:
        @fc.register_flop_formula(fwd_op)
        def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(q, k, v)

    if bwd_op is not None and bwd_op not in fc.flop_registry:
        @fc.register_flop_formula(bwd_op)
        def _sdpa_cpu_bwd(g, q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(g, q, k, v)

    gmm = getattr(aten, "_grouped_mm", None)
    if gmm is not None and gmm not in fc.flop_registry:
        @fc.register_flop_formula(gmm)
        def _grouped_mm_flop(a, b, *args, out_shape=None, **kwargs):
            return grouped_mm_flop(a, b, out_shape)

    _registered = True


def grouped_mm_flop(a_shape, b_shape, out_shape) -> int:
    """FLOPs of ``aten._grouped_mm(a, b, offs)`` (2 per multiply-add), from shapes only.

    The four layouts (``offs`` partitions the dimension that is not batched):
    - 2d x 3d, (M, K) @ (G, K, N) -> (M, N): each row of ``a`` meets one group's matrix
      (MoE forward, and the input gradient): 2·M·K·N;
    - 3d x 2d, (G, M, K) @ (K, N) -> (M, N) over column groups: 2·M·K·N;
    - 3d x 3d, batched: 2·G·M·K·N;
    - 2d x 2d, (M, K) @ (K, N) -> (G, M, N), offs splitting K (the weight gradient): the groups
      share out K, so 2·M·K·N in all.
    Every form is 2·K per output element except 2d x 2d (K is split among the G outputs).
    Assumes ``offs[-1]`` covers the whole grouped dimension (transformers' offsets do, outside
    expert parallelism), as a fake tensor cannot tell.
    """
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    n = 1
    for s in out_shape:
        n *= s
    return 2 * n * a_shape[-1]


_register_cpu_sdpa_formulas = _register_missing_flop_formulas   # old name


@dataclass
class SavedTensor:
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    grad_fn: str


@dataclass
class StepMeasurement:
    params_total: int
    params_trainable: int
    flops_matmul_forward: int
    flops_matmul_backward: int
    activations_bytes: int
    flops_by_op: dict[str, int] = field(default_factory=dict)
    saved: list[SavedTensor] = field(default_factory=list)


def build_hf_config(config: dict[str, Any], attn: str = "eager"):
    """A transformers config from a config.json dict (architecture facts only)."""
    from transformers import AutoConfig

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path", "auto_map"):
        cfg.pop(k, None)
    hf = AutoConfig.for_model(model_type, **cfg)
    hf._attn_implementation = attn
    return hf


def build_peft_model(config: dict[str, Any], peft_config: dict[str, Any] | None, dtype: str,
                     attn: str, meta: bool):
    """Random-weight HF causal LM (optionally on meta), wrapped by peft from an adapter_config dict."""
    from transformers import AutoModelForCausalLM

    hf_cfg = build_hf_config(config, attn)
    torch_dtype = _DTYPES[dtype]
    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype)
    model.train()
    if peft_config is not None:
        model = apply_peft(model, peft_config)
    return model


def apply_peft(model, peft_config: dict[str, Any]):
    """Wrap ``model`` with peft, or apply simcost's non-peft methods (full, freeze, bitfit, ln)."""
    kind = peft_config.get("peft_type")
    if kind is None:
        # simcost-native selections: full, bitfit, ln_tuning via names
        names = peft_config.get("trainable_names")
        for n, p in model.named_parameters():
            p.requires_grad_(names is None or any(s in n for s in names))
        return model
    import peft

    cfg = peft.PeftConfig.from_peft_type(**peft_config) if hasattr(peft.PeftConfig, "from_peft_type") \
        else peft.get_peft_config(peft_config)
    return peft.get_peft_model(model, cfg)   # peft's defaults: fp32 adapters on a 16-bit base


def measure_step(config: dict[str, Any], peft_config: dict[str, Any] | None, *, batch: int,
                 seq: int, dtype: str = "fp32", attn: str = "eager", fake: bool = False,
                 keep_saved: bool = False) -> StepMeasurement:
    """Measure one training step (forward with loss, backward) of the model.

    ``fake=True`` builds on meta and runs on fake CPU tensors (exact for FLOPs and saved bytes,
    no compute). The optimizer does no matmul, so it does not change the matmul FLOPs.
    """
    _register_missing_flop_formulas()
    model = build_peft_model(config, peft_config, dtype, attn, meta=fake)
    params_total = sum(p.numel() for p in model.parameters())
    params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode, fake_tensors_are_not_tracing():
            model = model.to_empty(device="cpu")
            return _run(model, config, batch, seq, params_total, params_trainable, keep_saved)
    return _run(model, config, batch, seq, params_total, params_trainable, keep_saved)


class _GlobalOnlyTracker:
    """Stands in for ``FlopCounterMode``'s ``ModuleTracker`` (we read only the "Global" counts).

    ModuleTracker's forward hooks put a ``register_multi_grad_hook`` on every module output
    that requires grad; those hooks hold the outputs' ``grad_fn`` nodes, so a graph that forward
    builds and drops stays alive with its saved tensors. DoRA's ``get_lora_weight`` is such a
    graph: ``lora_B(lora_A(eye))`` runs with grad and only its detached value is used, so in a
    plain training step its (d_in x d_in) identity and (d_in x r) intermediate are freed as the
    layer returns, but under a stock FlopCounterMode they stay reachable (one of them even
    past ``gc.collect()``), and the saved-tensor hooks would count memory a real step never
    holds."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def _flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that counts globally and installs no module hooks."""
    fc = FlopCounterMode(display=False)
    fc.mod_tracker = _GlobalOnlyTracker()
    return fc


def _vocab(config: dict[str, Any]) -> int:
    return int(config["vocab_size"])


def _run(model, config, batch, seq, params_total, params_trainable, keep_saved) -> StepMeasurement:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab(config), (batch, seq), generator=g)
    ids = ids.to("cpu")
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    param_storages |= {b.untyped_storage()._cdata for b in model.buffers()}
    refs: list[tuple[weakref.ref, str]] = []

    def pack(t):
        d = t.detach()
        if d.untyped_storage()._cdata not in param_storages:
            refs.append((weakref.ref(d), ""))
        return d

    with _flop_counter() as fc:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        flops_fwd = fc.get_total_flops()
        # only what the loss's graph still reaches counts: anything else forward built and
        # dropped (DoRA's detached weight norm, with its identity matrix) is garbage; collect
        # any cycle so the weakrefs below see only live storages
        gc.collect()
        live: dict[int, tuple[int, Any]] = {}
        for r, _ in refs:
            t = r()
            if t is not None:
                st = t.untyped_storage()
                live.setdefault(st._cdata, (st.nbytes(), t))
        saved_bytes = sum(nb for nb, _ in live.values())
        saved = []
        if keep_saved:
            saved = [SavedTensor(tuple(t.shape), str(t.dtype).replace("torch.", ""), nb, "")
                     for nb, t in live.values()]
        del live
        refs.clear()
        if out.loss.requires_grad:
            out.loss.backward()
        flops_total = fc.get_total_flops()
        by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return StepMeasurement(params_total, params_trainable, int(flops_fwd),
                           int(flops_total - flops_fwd), int(saved_bytes), by_op, saved)


def fault_bytes_per_step(config: dict[str, Any], peft_config, batch: int, seq: int,
                         steps: int = 3) -> float:
    """Minor page faults x 4 KiB per training step (forward, backward, AdamW, zero_grad) of
    a fresh fp32 random-weight model, after two warm-up steps: the fresh memory the host
    allocator hands out each step (what :mod:`simcost.sim.page_faults` prices)."""
    import resource
    model = build_peft_model(config, peft_config, "fp32", "sdpa", meta=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, int(config["vocab_size"]), (batch, seq),
                        generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) * 4096 / steps
