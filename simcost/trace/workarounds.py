"""Workarounds that let torch's fake tensors record peft tuners the real step runs (needs the
torch extra).

Each one changes how the *recording* learns a result's metadata or a branch's outcome, never
what the step computes: the recorded aten calls, their shapes and the tensors autograd saves
are those of the real step (``simcost.validate.traced`` checks each tuner against a real CPU
step). They are context managers, active only while a model is built (:func:`building`) or a
step is recorded (:func:`tracing`), and undo themselves on exit.

- :func:`fake_kernels`: torch 2.13's meta kernels of ``aten._fft_r2c`` / ``_fft_c2c`` /
  ``_fft_c2r`` (``torch._meta_registrations._exec_fft``) call ``Tensor.resize_`` and
  ``Tensor.permute`` on their arguments, which fails ("tried to directly modify sizes for
  customized tensor") or specialises every size to its hint once a size is symbolic (C3A's
  FFT of the activations). They are replaced by the same size and stride arithmetic done on
  the sizes themselves, so the output's sizes and strides are the ones the CPU (MKL) kernel
  returns.
- :func:`vblora_finite_logits`: VB-LoRA's ``_get_lora_matrices`` raises in training when
  ``logits_A[0, 0]`` is infinite (a model resumed from a top-k-only checkpoint), a branch on
  a tensor's value a fake tensor cannot take. A freshly built adapter's logits are finite
  (peft draws them from ``uniform_(-init_logits_std, init_logits_std)``), so the real step
  never raises; the recording takes the same branch by running that one method with the
  layer's ``training`` flag off (the method reads the flag for this check only, peft 0.21).
- :func:`shira_masks_on_cpu`: SHiRA turns its 0/1 mask into indices with ``torch.where``
  (``nonzero``), which has no meta kernel (the count is data-dependent). On a meta-device
  build the mask function runs on a CPU stand-in of the layer (same shape, no weights), so
  the indices are real: as many as the real build's, ``r * (in + out)``.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager


@contextmanager
def tracing():
    """Everything :func:`simcost.trace.record.trace_step` needs while recording."""
    with ExitStack() as stack:
        stack.enter_context(fake_kernels())
        stack.enter_context(vblora_finite_logits())
        yield


@contextmanager
def building():
    """Everything a meta-device build needs while peft injects its adapters."""
    with shira_masks_on_cpu():
        yield


def carry_tensor_hooks(src, dst) -> None:
    """Give ``dst`` (a parameter's fake stand-in) the gradient hooks a tuner registered on
    ``src``: OSF projects its factors' gradients, CPT masks its delta embedding's."""
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


@contextmanager
def fake_kernels():
    """Fake kernels for the aten ops whose meta kernels fail or guess under symbolic sizes:
    the FFTs (see the module's docstring), ``sparse_mask`` and oneDNN's RNN layer."""
    import torch
    from torch._subclasses import fake_impls
    aten = torch.ops.aten
    kernels = {aten._fft_r2c.default: _fft_kernel, aten._fft_c2c.default: _fft_kernel,
               aten._fft_c2r.default: _fft_kernel, aten.sparse_mask.default: _sparse_mask_kernel,
               aten.mkldnn_rnn_layer.default: _rnn_layer_kernel,
               aten.mkldnn_rnn_layer_backward.default: _rnn_layer_kernel}
    entry = (lambda func: func in kernels, lambda mode, func, *a, **k: kernels[func](mode, func, *a, **k))
    fake_impls.op_implementations_checks.insert(0, entry)
    try:
        yield
    finally:
        fake_impls.op_implementations_checks.remove(entry)


# -- VB-LoRA ---------------------------------------------------------------------------------

@contextmanager
def vblora_finite_logits():
    try:
        from peft.tuners.vblora.layer import Linear as VBLoRALinear
    except ImportError:                                     # pragma: no cover
        yield
        return
    orig = VBLoRALinear._get_lora_matrices

    def get_lora_matrices(self, adapter, cast_to_fp32=False):
        training = self.training
        self.training = False
        try:
            return orig(self, adapter, cast_to_fp32)
        finally:
            self.training = training

    VBLoRALinear._get_lora_matrices = get_lora_matrices
    try:
        yield
    finally:
        VBLoRALinear._get_lora_matrices = orig


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
