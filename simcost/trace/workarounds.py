"""Workarounds that let torch's fake tensors record the peft tuners a real step runs (needs
the torch extra).

Each one changes how the *recording* learns a result's metadata or a branch's outcome, never
what the step computes: the recorded aten calls, their shapes and the tensors autograd saves
are those of the real step (``simcost.validate.traced`` checks every tuner against a real CPU
step). They are context managers, active only while a model is built (:func:`building`) or a
step is recorded (:func:`tracing`), and undo themselves on exit.

- :func:`fake_kernels`, for aten ops whose meta kernels fail or guess wrong:
  the FFTs (torch 2.13's ``_exec_fft`` calls ``resize_`` / ``permute`` on its arguments, which
  fails, "tried to directly modify sizes for customized tensor", or specialises every size to
  its hint once a size is symbolic: C3A's FFT of the activations), replaced by the same size
  and stride arithmetic on the sizes, so the outputs have the CPU (MKL) kernel's sizes and
  strides; ``sparse_mask`` (SHiRA's backward: the meta kernel keeps no values); oneDNN's RNN
  layer (P-tuning's LSTM: the meta kernel's workspace, which backward keeps, is empty);
  ``_is_all_true`` (a distribution's argument check) and ``nonzero`` of a mask known to be
  all true.
- :func:`carry_tensor_hooks`: gradient hooks a tuner put on a parameter (OSF's projection of
  its factors' gradients) go with the parameter onto its fake stand-in.
- :func:`known_reads`: a branch on a tensor's value (VB-LoRA's check for infinite logits,
  Poly's check of its task ids, WaveFT's in-range index mask) cannot be taken on a fake tensor;
  where the value the real step reads is known (a freshly built adapter's, the harness's
  inputs'), the read is given that value.
- :func:`shira_masks_on_cpu`: SHiRA turns its 0/1 mask into indices with ``torch.where``
  (``nonzero``), which has no meta kernel (the count is data-dependent). On a meta-device
  build the mask function runs on a CPU stand-in of the layer (same shape, no weights), so
  the indices are real: as many as the real build's, ``r * (in + out)``.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager


@contextmanager
def tracing():
    """Everything :func:`simcost.trace.record.trace_step` needs while recording."""
    from simcost.trace.composites import symbolic_composites
    with ExitStack() as stack:
        stack.enter_context(fake_kernels())
        stack.enter_context(known_reads())
        stack.enter_context(symbolic_composites())
        yield


@contextmanager
def building():
    """Everything a meta-device build needs while peft injects its adapters."""
    with shira_masks_on_cpu():
        yield


def carry_tensor_hooks(src, dst) -> None:
    """Give ``dst`` (a parameter's fake stand-in) the gradient hooks a tuner registered on
    ``src`` (OSF projects its factors' gradients; CPT masks its delta embedding's)."""
    if src._backward_hooks:
        dst._backward_hooks = src._backward_hooks
    if getattr(src, "_post_accumulate_grad_hooks", None):
        dst._post_accumulate_grad_hooks = src._post_accumulate_grad_hooks


# -- FFT -------------------------------------------------------------------------------------

def _sort_dims(strides, dim, exclude_last=False):
    """torch._meta_registrations._sort_dims, on the strides."""
    out = list(dim)
    end = len(out) - int(exclude_last)
    out[:end] = sorted(out[:end], key=lambda i: strides[i], reverse=True)
    return out


def _fft_strides(in_strides, out_sizes, dim) -> list:
    """The output strides ``_exec_fft`` gives (aten/src/ATen/native/mkl/SpectralOps.cpp):
    batch dimensions first in the input's stride order, the output batched contiguous."""
    ndim = len(out_sizes)
    batch_dims = ndim - len(dim)
    left = sorted((d for d in range(ndim) if d not in dim), key=lambda d: in_strides[d],
                  reverse=True)
    perm = left + list(dim)
    batched = [None] + [out_sizes[d] for d in dim]      # batch size: not needed for strides
    inner = [1] * len(batched)
    for i in range(len(batched) - 2, -1, -1):
        inner[i] = inner[i + 1] * batched[i + 1]
    strides = [0] * ndim
    numel = 1
    for i in range(batch_dims - 1, -1, -1):
        strides[perm[i]] = numel * inner[0]
        numel = numel * out_sizes[perm[i]]
    for i in range(batch_dims, ndim):
        strides[perm[i]] = inner[1 + i - batch_dims]
    return strides


def _fft_meta(func, x, args):
    """(sizes, strides, dtype) of an FFT's output, as the CPU kernel makes it."""
    import torch
    sizes, strides = list(x.shape), list(x.stride())
    name = func.overloadpacket.__name__
    if name == "_fft_r2c":
        dim, _, onesided = args
        out = list(sizes)
        if onesided:
            out[dim[-1]] = sizes[dim[-1]] // 2 + 1
        dims = _sort_dims(strides, dim, exclude_last=True)
        return out, _fft_strides(strides, out, dims), x.dtype.to_complex()
    if name == "_fft_c2c":
        dim = args[0]
        return sizes, _fft_strides(strides, sizes, _sort_dims(strides, dim)), x.dtype
    dim, _, lastdim = args                                  # _fft_c2r
    if len(dim) > 1:                                        # the C2C stages first
        strides = _fft_strides(strides, sizes, _sort_dims(strides, dim[:-1]))
        dim = dim[-1:]
    out = list(sizes)
    out[dim[-1]] = lastdim
    return out, _fft_strides(strides, out, dim), x.dtype.to_real()


def _fft_kernel(fake_mode, func, x, *args, **kwargs):
    import torch
    if not torch.backends.mkl.is_available() or x.device.type != "cpu" or \
            (func is torch.ops.aten._fft_c2c.default and not args[0]):
        return NotImplemented                               # torch's own meta kernel
    sizes, strides, dtype = _fft_meta(func, x, (*args, *kwargs.values()))
    with fake_mode:
        return torch.empty_strided(sizes, strides, dtype=dtype, device=x.device)


def _sparse_mask_kernel(fake_mode, func, x, mask):
    """``x.sparse_mask(mask)`` has the mask's indices and one value per index; torch's meta
    kernel returns no values (nnz 0), which SHiRA's backward refuses as its gradient."""
    import torch
    if mask.layout != torch.sparse_coo or x.layout != torch.strided:
        return NotImplemented
    with fake_mode:
        idx = mask._indices()
        vals = x.new_empty((idx.shape[1], *x.shape[mask.sparse_dim():]))
        return torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors(
            mask.sparse_dim(), mask.dense_dim(), list(x.shape), idx, vals, dtype=x.dtype,
            layout=torch.sparse_coo, device=x.device, is_coalesced=mask.is_coalesced())


def _rnn_layer_kernel(fake_mode, func, *args, **kwargs):
    """oneDNN's RNN layer (``torch.nn.LSTM`` / ``GRU`` on the CPU) returns a workspace that
    backward needs, sized by oneDNN's own layout rules; torch's meta kernel makes it empty. With
    concrete sizes (P-tuning's LSTM runs over the virtual tokens, batch 1) the real kernel is
    run on zeros of the same sizes, and its outputs' sizes and strides are the fake ones (its
    backward likewise: torch's meta kernel gives the weight gradients other strides, which
    autograd would then copy)."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not all(isinstance(s, int) for t in tensors for s in (*t.shape, *t.stride())):
        return NotImplemented                               # symbolic: torch's meta kernel
    with _disable_current_modes():
        real = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).zero_()
                if isinstance(a, torch.Tensor) else a for a in args]
        outs = func(*real, **kwargs)
    with fake_mode:
        return tuple(torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device="cpu")
                     if isinstance(o, torch.Tensor) else o for o in outs)


_READS: dict = {}                 # what scalar_reads says the values read are, while inside it


def _nonzero_kernel(fake_mode, func, mask):
    """Inside :func:`scalar_reads` with a true ``flag``, a mask is all true: ``nonzero`` keeps
    every position (WaveFT's in-range spectrum indices: padding only enlarges the matrix)."""
    import torch
    if _READS.get("flag") is not True:
        return NotImplemented
    with fake_mode:
        return torch.empty((mask.numel(), mask.dim()), dtype=torch.long, device=mask.device)


def _all_true_kernel(fake_mode, func, x):
    """``_is_all_true`` / ``_is_any_true`` (a distribution's argument check) give one bool;
    torch's decomposition of them fails on a fake tensor below a dispatch mode."""
    import torch
    with fake_mode:
        return torch.empty((), dtype=torch.bool, device=x.device)


@contextmanager
def fake_kernels():
    """Fake kernels for the aten ops whose meta kernels fail or guess wrong (see the module's
    docstring); each returns ``NotImplemented`` where torch's own kernel is right."""
    import torch
    from torch._subclasses import fake_impls
    aten = torch.ops.aten
    kernels = {aten._fft_r2c.default: _fft_kernel, aten._fft_c2c.default: _fft_kernel,
               aten._fft_c2r.default: _fft_kernel, aten.sparse_mask.default: _sparse_mask_kernel,
               aten.mkldnn_rnn_layer.default: _rnn_layer_kernel,
               aten.mkldnn_rnn_layer_backward.default: _rnn_layer_kernel,
               aten._is_all_true.default: _all_true_kernel,
               aten._is_any_true.default: _all_true_kernel,
               aten.nonzero.default: _nonzero_kernel}
    entry = (lambda func: func in kernels,
             lambda mode, func, *a, **k: kernels[func](mode, func, *a, **k))
    fake_impls.op_implementations_checks.insert(0, entry)
    try:
        yield
    finally:
        fake_impls.op_implementations_checks.remove(entry)


# -- values the real step reads ---------------------------------------------------------------

@contextmanager
def scalar_reads(number, flag: bool):
    """Inside, reading a fake tensor's value (``.item()``, ``bool(t)``), which torch answers
    with a data-dependent symbol, gives that symbol what the real step reads there: ``flag``
    for a bool tensor, ``number`` for any other; a mask's ``nonzero`` keeps every position
    when ``flag`` is true.
    The read is still recorded (``_local_scalar_dense``), and torch checks the branch taken on
    it as a runtime assertion (``ShapeEnv.real_tensor_prop_unbacked_vals``, the mechanism of
    its ``propagate_real_tensors``)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor
    orig_item, orig_bool = torch.Tensor.item, torch.Tensor.__bool__

    def known(r, value):
        if value is not None and isinstance(r, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            env = r.node.shape_env
            for sym in r.node.expr.free_symbols:
                if sym not in env.backed_var_to_val:
                    env.set_real_tensor_prop_unbacked_vals(sym, value)
        return r

    def item(t):
        if not isinstance(t, FakeTensor):
            return orig_item(t)
        return known(orig_item(t), int(flag) if t.dtype == torch.bool else number)

    def to_bool(t):
        return bool(item(t)) if isinstance(t, FakeTensor) else orig_bool(t)

    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = log.level
    log.setLevel(logging.ERROR)            # torch warns of each value it is given
    torch.Tensor.item, torch.Tensor.__bool__ = item, to_bool
    outer = dict(_READS)
    _READS.update(number=number, flag=flag)
    try:
        yield
    finally:
        torch.Tensor.item, torch.Tensor.__bool__ = orig_item, orig_bool
        log.setLevel(level)
        _READS.clear()
        _READS.update(outer)


def _reading(cls, name: str, number, flag: bool):
    """``cls.name`` wrapped so that the values it reads are ``number`` and ``flag`` (see
    :func:`scalar_reads`); returns an undo."""
    orig = getattr(cls, name)

    def wrapped(*args, **kwargs):
        with scalar_reads(number, flag):
            return orig(*args, **kwargs)

    setattr(cls, name, wrapped)
    return lambda: setattr(cls, name, orig)


@contextmanager
def known_reads():
    """The branches peft takes on tensor values, as the real step takes them:

    - VB-LoRA (``Linear._get_lora_matrices``) raises in training when ``logits_A[0, 0]`` is
      infinite (a model resumed from a top-k-only checkpoint); a freshly built adapter's logits
      are finite (``uniform_(-init_logits_std, init_logits_std)``): ``isinf().any()`` is 0.
    - Poly (``PolyRouter.forward``) refuses a task id >= ``n_tasks``; the harness's are 0:
      ``task_ids.max().item()`` is 0; its ``RelaxedBernoulli`` checks its logits (finite),
      each check true.
    - WaveFT (``get_delta_weight``) keeps the spectrum indices inside the padded matrix by a
      mask; padding only enlarges it, so the mask is all true and every index is kept."""
    import importlib
    undo = []
    for mod, cls, name, number, flag in (
            ("peft.tuners.vblora.layer", "Linear", "_get_lora_matrices", None, False),
            ("peft.tuners.poly.router", "PolyRouter", "forward", 0, True),
            ("peft.tuners.waveft.layer", "WaveFTLayer", "get_delta_weight", None, True)):
        try:
            owner = getattr(importlib.import_module(mod), cls)
        except (ImportError, AttributeError):                # pragma: no cover
            continue
        undo.append(_reading(owner, name, number, flag))
    try:
        yield
    finally:
        for u in undo:
            u()


# -- SHiRA -----------------------------------------------------------------------------------

def _cpu_mask_fn(fn):
    def mask_fn(base_layer, r, **kwargs):
        import torch
        w = getattr(base_layer, "weight", None)
        if w is None or w.device.type != "meta" or not isinstance(base_layer, torch.nn.Linear):
            return fn(base_layer, r, **kwargs)
        stand_in = torch.nn.Linear(base_layer.in_features, base_layer.out_features,
                                   bias=False, device="meta")
        stand_in.weight = torch.nn.Parameter(
            torch.zeros((), dtype=w.dtype).expand(w.shape), requires_grad=False)
        return fn(stand_in, r, **kwargs)
    return mask_fn


@contextmanager
def shira_masks_on_cpu():
    try:
        from peft.tuners.shira.model import ShiraModel
    except ImportError:                                     # pragma: no cover
        yield
        return
    orig = ShiraModel._create_and_replace

    def create_and_replace(self, shira_config, *args, **kwargs):
        fn = shira_config.mask_fn
        if fn is not None:
            shira_config.mask_fn = _cpu_mask_fn(fn)
        try:
            return orig(self, shira_config, *args, **kwargs)
        finally:
            shira_config.mask_fn = fn

    ShiraModel._create_and_replace = create_and_replace
    try:
        yield
    finally:
        ShiraModel._create_and_replace = orig
