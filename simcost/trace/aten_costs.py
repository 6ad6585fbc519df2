"""Cost formulas per aten op, for the calls a traced step records (no torch here: numpy only).

A formula is a pure function ``f(args, kwargs, outs) -> AtenCost`` of the call's arguments,
with every tensor replaced by a :class:`TMeta` (shape entries ints or numpy arrays, so one
call prices a whole sweep). ``matmul_flops`` is exactly what ``torch.utils.flop_counter``
counts for the op (2 per multiply-add; SDPA causal masking ignored; the SDPA backward
recomputes the scores: 5 GEMMs), with the CPU flash-attention kernels and ``_grouped_mm``
counted as :mod:`simcost.validate.torch_measure` registers them. ``flops`` adds the vector
work of the rest at a documented count per element; ``bytes`` is what the kernel reads plus
what it writes (a gather reads the rows it gathers, not the whole table).

An op with no formula is priced memory-bound (its inputs and outputs once) and reported as
not covered; ops tagged ``pointwise`` by torch are covered by the pointwise rule.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simcost.dtypes import BYTES


@dataclass(frozen=True, slots=True)
class TMeta:
    shape: tuple
    dtype: str

    @property
    def numel(self):
        n = 1
        for s in self.shape:
            n = n * s
        return n

    @property
    def nbytes(self):
        return self.numel * BYTES[self.dtype]


@dataclass(slots=True)
class AtenCost:
    flops: object = 0
    matmul_flops: object = 0
    bytes: object = 0
    kernels: int = 1
    gemms: list = field(default_factory=list)      # (batch, m, n, k)
    special: dict = field(default_factory=dict)    # {"exp": elements, "rng": elements}


Formula = Callable[[tuple, dict, tuple], AtenCost]
_REGISTRY: dict[str, Formula] = {}


def register(*names: str):
    def deco(fn: Formula) -> Formula:
        for n in names:
            if n in _REGISTRY:
                raise ValueError(f"aten op '{n}' already has a formula ({_REGISTRY[n].__name__})")
            _REGISTRY[n] = fn
        return fn
    return deco


def covered_ops() -> list[str]:
    return sorted(_REGISTRY)


def _tensors(x):
    if isinstance(x, TMeta):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


def io_bytes(args, kwargs, outs):
    total = 0
    for t in (*_tensors(args), *_tensors(tuple(kwargs.values())), *outs):
        total = total + t.nbytes
    return total


def aten_cost(name: str, args: tuple, kwargs: dict, outs: tuple,
              tags: frozenset = frozenset()) -> tuple[AtenCost, bool]:
    fn = _REGISTRY.get(name)
    if fn is not None:
        return fn(args, kwargs, outs), True
    if "pointwise" in tags:
        return pointwise(args, kwargs, outs), True
    return AtenCost(bytes=io_bytes(args, kwargs, outs)), False


# -- matmul family (FlopCounterMode's formulas) ---------------------------------------------

def _mm(a, b):
    m, k = a.shape
    n = b.shape[1]
    f = 2 * m * n * k
    return AtenCost(flops=f, matmul_flops=f, gemms=[(1, m, n, k)])


@register("aten.mm.default")
def mm(args, kwargs, outs):
    c = _mm(args[0], args[1])
    c.bytes = args[0].nbytes + args[1].nbytes + outs[0].nbytes
    return c


@register("aten.addmm.default")
def addmm(args, kwargs, outs):
    c = _mm(args[1], args[2])
    c.bytes = args[0].nbytes + args[1].nbytes + args[2].nbytes + outs[0].nbytes
    return c


@register("aten._scaled_mm.default")
def scaled_mm(args, kwargs, outs):
    c = _mm(args[0], args[1])
    c.bytes = args[0].nbytes + args[1].nbytes + outs[0].nbytes
    return c


def _bmm(a, b):
    bt, m, k = a.shape
    n = b.shape[2]
    f = 2 * bt * m * n * k
    return AtenCost(flops=f, matmul_flops=f, gemms=[(bt, m, n, k)])


@register("aten.bmm.default")
def bmm(args, kwargs, outs):
    c = _bmm(args[0], args[1])
    c.bytes = args[0].nbytes + args[1].nbytes + outs[0].nbytes
    return c


@register("aten.baddbmm.default")
def baddbmm(args, kwargs, outs):
    c = _bmm(args[1], args[2])
    c.bytes = args[0].nbytes + args[1].nbytes + args[2].nbytes + outs[0].nbytes
    return c


@register("aten._grouped_mm.default")
def grouped_mm(args, kwargs, outs):
    """See :func:`simcost.validate.torch_measure.grouped_mm_flop`: 2·K per output element,
    except 2d x 2d (offsets split K among the groups): 2·M·K·N."""
    a, b = args[0], args[1]
    if len(a.shape) == 2 and len(b.shape) == 2:
        f = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    else:
        f = 2 * outs[0].numel * a.shape[-1]
    k = a.shape[-1]
    return AtenCost(flops=f, matmul_flops=f, bytes=a.nbytes + b.nbytes + outs[0].nbytes,
                    gemms=[(1, f / (2 * k) if k else 0, 1, k)])


def conv_flop_count(x_shape, w_shape, out_shape, transposed: bool):
    """torch's ``conv_flop_count``: each output (input when transposed) position meets the
    whole filter for every (c_out, c_in) pair of the weight (c_in already divided by groups)."""
    batch = x_shape[0]
    spatial = x_shape[2:] if transposed else out_shape[2:]
    c_out, c_in = w_shape[0], w_shape[1]
    n = 2 * batch * c_out * c_in
    for s in (*spatial, *w_shape[2:]):
        n = n * s
    return n


def _conv_gemm(flops, w_shape):
    k = 1
    for s in w_shape[1:]:
        k = k * s
    return (1, flops / (2 * w_shape[0] * k), w_shape[0], k)


@register("aten.convolution.default", "aten._convolution.default",
          "aten.convolution_overrideable.default", "aten._slow_conv2d_forward.default",
          "aten.cudnn_convolution.default")
def convolution(args, kwargs, outs):
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    f = conv_flop_count(x.shape, w.shape, outs[0].shape, transposed)
    return AtenCost(flops=f, matmul_flops=f, bytes=io_bytes(args, kwargs, outs),
                    gemms=[_conv_gemm(f, w.shape)])


@register("aten.convolution_backward.default")
def convolution_backward(args, kwargs, outs):
    """torch's ``conv_backward_flop``: the input gradient is the transposed convolution of the
    output gradient; the weight gradient a convolution of the input with it (dims 0/1
    swapped). ``outs`` holds the gradients ``output_mask`` asks for, in order."""
    gy, x, w = args[0], args[1], args[2]
    transposed = bool(args[7])
    mask = args[10]

    def t(shape):
        return (shape[1], shape[0], *shape[2:])
    f = 0
    i = 0
    gemms = []
    if mask[0]:
        f1 = conv_flop_count(gy.shape, w.shape, outs[i].shape, not transposed)
        i += 1
        f = f + f1
        gemms.append(_conv_gemm(f1, w.shape))
    if mask[1]:
        gw = outs[i].shape
        f2 = conv_flop_count(t(gy.shape), t(x.shape), t(gw), False) if transposed else \
            conv_flop_count(t(x.shape), t(gy.shape), t(gw), False)
        f = f + f2
        gemms.append(_conv_gemm(f2, w.shape))
    return AtenCost(flops=f, matmul_flops=f, bytes=io_bytes(args, kwargs, outs),
                    kernels=max(1, sum(bool(m) for m in mask)), gemms=gemms)


def _sdpa_shapes(q, k, v):
    b, h, sq, d = q.shape
    sk, dv = k.shape[2], v.shape[3]
    return b * h, sq, sk, d, dv


@register("aten._scaled_dot_product_flash_attention_for_cpu.default",
          "aten._scaled_dot_product_efficient_attention.default",
          "aten._scaled_dot_product_flash_attention.default",
          "aten._scaled_dot_product_cudnn_attention.default")
def sdpa(args, kwargs, outs):
    bh, sq, sk, d, dv = _sdpa_shapes(args[0], args[1], args[2])
    f = 2 * bh * sq * sk * d + 2 * bh * sq * sk * dv
    return AtenCost(flops=f + 5 * bh * sq * sk, matmul_flops=f,
                    bytes=io_bytes(args, kwargs, outs),
                    gemms=[(bh, sq, sk, d), (bh, sq, dv, sk)], special={"exp": bh * sq * sk})


@register("aten._scaled_dot_product_flash_attention_for_cpu_backward.default",
          "aten._scaled_dot_product_efficient_attention_backward.default",
          "aten._scaled_dot_product_flash_attention_backward.default",
          "aten._scaled_dot_product_cudnn_attention_backward.default")
def sdpa_backward(args, kwargs, outs):
    """Scores recomputed, then dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q."""
    bh, sq, sk, d, dv = _sdpa_shapes(args[1], args[2], args[3])
    f = 2 * bh * sq * sk * (3 * d + 2 * dv)
    return AtenCost(flops=f + 5 * bh * sq * sk, matmul_flops=f,
                    bytes=io_bytes(args, kwargs, outs),
                    gemms=[(bh, sq, sk, d), (bh, sq, sk, dv), (bh, sk, dv, sq),
                           (bh, sq, d, sk), (bh, sk, d, sq)], special={"exp": bh * sq * sk})


# -- FFT ---------------------------------------------------------------------------------------

def _fft_points(x, dims):
    n = 1
    for d in dims:
        n = n * x.shape[d]
    return n


def _fft_cost(batch, n, per_point, x, out):
    """``batch`` transforms of ``n`` points, ``per_point`` x log2(n) FLOPs per point; the
    kernel reads its input and writes its output once (an out-of-place transform)."""
    f = batch * per_point * n * np.log2(np.maximum(n, 1))
    return AtenCost(flops=f, bytes=x.nbytes + out.nbytes)


@register("aten._fft_c2c.default")
def fft_c2c(args, kwargs, outs):
    """A complex transform of N points: 5·N·log2(N) FLOPs, the radix-2 Cooley-Tukey count
    FFTW's benchmarks use to state every FFT's speed (fftw.org/speed/method.html), N the
    product of the transformed sizes, times the number of transforms (the other sizes).
    Not matmul work: ``torch.utils.flop_counter`` does not count FFTs."""
    x, dims = args[0], args[1]
    n = _fft_points(x, dims)
    return _fft_cost(x.numel / n if len(dims) else 0, n, 5, x, outs[0])


@register("aten._fft_r2c.default", "aten._fft_c2r.default")
def fft_real(args, kwargs, outs):
    """A real-input (r2c) or real-output (c2r) transform of N real points: 2.5·N·log2(N)
    FLOPs, half the complex count, as FFTW's benchmarks count real-data transforms
    (fftw.org/speed/method.html); N is the real side's transformed size (the input of r2c,
    the output of c2r), whose one-sided complex side holds N/2+1 points on the last dim."""
    x, dims = args[0], args[1]
    real = outs[0] if x.dtype in ("c64", "c128") else x
    n = _fft_points(real, dims)
    return _fft_cost(real.numel / n if len(dims) else 0, n, 2.5, x, outs[0])


# -- vector work -------------------------------------------------------------------------------

# FLOPs per output element beyond the one of a plain pointwise op
_EXTRA_FLOPS = {"aten.gelu.default": 8, "aten.gelu_backward.default": 12,
                "aten.silu.default": 4, "aten.silu_backward.default": 6,
                "aten.tanh.default": 4, "aten.sigmoid.default": 4, "aten.exp.default": 4,
                "aten.erf.default": 4, "aten.rsqrt.default": 1, "aten.pow.Tensor_Scalar": 1}
_TRANSCENDENTAL = {"aten.gelu.default", "aten.gelu_backward.default", "aten.silu.default",
                   "aten.silu_backward.default", "aten.tanh.default", "aten.sigmoid.default",
                   "aten.exp.default", "aten.erf.default", "aten.sin.default", "aten.cos.default",
                   "aten.log.default"}


def pointwise(args, kwargs, outs, name: str = ""):
    n = outs[0].numel if outs else 0
    c = AtenCost(flops=n * (1 + _EXTRA_FLOPS.get(name, 0)), bytes=io_bytes(args, kwargs, outs))
    if name in _TRANSCENDENTAL:
        c.special = {"exp": n}
    return c


def _named_pointwise(name):
    def f(args, kwargs, outs):
        return pointwise(args, kwargs, outs, name)
    f.__name__ = "pointwise_" + name.split(".")[1]
    return f


for _n in (*_EXTRA_FLOPS, *_TRANSCENDENTAL, "aten.threshold_backward.default",
           "aten.tanh_backward.default", "aten.sigmoid_backward.default",
           "aten.masked_fill.Scalar", "aten.masked_fill.Tensor", "aten.where.self",
           "aten.masked_fill_.Scalar", "aten.masked_fill_.Tensor", "aten.floor_divide.default",
           "aten.polar.default",
           "aten.clamp.default", "aten._to_copy.default", "aten.copy_.default",
           "aten.clone.default", "aten.copy.default"):
    if _n not in _REGISTRY:
        register(_n)(_named_pointwise(_n))


@register("aten.zeros.default", "aten.ones.default", "aten.empty.memory_format",
          "aten.full.default", "aten.zeros_like.default", "aten.ones_like.default",
          "aten.empty_like.default", "aten.full_like.default", "aten.fill_.Scalar",
          "aten.fill_.Tensor",
          "aten.zero_.default", "aten.arange.default", "aten.arange.start", "aten.eye.default",
          "aten.eye.m",
          "aten.arange.start_step", "aten.new_zeros.default", "aten.new_ones.default",
          "aten.new_empty.default", "aten.new_full.default", "aten.scalar_tensor.default",
          "aten.empty_strided.default", "aten.new_empty_strided.default")
def factory(args, kwargs, outs):
    """Writes its output only (an allocation without fill writes nothing, priced as one)."""
    return AtenCost(bytes=sum((o.nbytes for o in outs), 0))


@register("aten.rand.default", "aten.randn.default", "aten.randn_like.default",
          "aten.rand_like.default", "aten.bernoulli_.float",
          "aten.native_dropout.default", "aten.uniform_.default", "aten.normal_.default")
def random(args, kwargs, outs):
    n = outs[0].numel
    return AtenCost(flops=n, bytes=io_bytes(args, kwargs, outs), special={"rng": n})


@register("aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim", "aten.mean.default",
          "aten.amax.default", "aten.max.dim", "aten.max.default", "aten.min.default",
          "aten.var_mean.correction", "aten.var.correction", "aten.linalg_vector_norm.default",
          "aten.norm.ScalarOpt_dim", "aten.argmax.default", "aten.any.dim", "aten.all.default",
          "aten.any.default", "aten.histc.default",
          "aten.cumsum.default")
def reduction(args, kwargs, outs):
    """One FLOP per input element (two for var/norm), reads the input once."""
    x = args[0]
    return AtenCost(flops=x.numel, bytes=io_bytes(args, kwargs, outs))


@register("aten._softmax.default", "aten._log_softmax.default", "aten._safe_softmax.default")
def softmax(args, kwargs, outs):
    n = args[0].numel
    return AtenCost(flops=5 * n, bytes=args[0].nbytes + outs[0].nbytes, special={"exp": n})


@register("aten._softmax_backward_data.default")
def softmax_backward(args, kwargs, outs):
    return AtenCost(flops=4 * outs[0].numel, bytes=io_bytes(args, kwargs, outs))


@register("aten._log_softmax_backward_data.default")
def log_softmax_backward(args, kwargs, outs):
    """dx = dy - exp(y)·sum(dy): the exponentials again."""
    n = outs[0].numel
    return AtenCost(flops=4 * n, bytes=io_bytes(args, kwargs, outs), special={"exp": n})


# calls after which the host waits for the device (a value copied to the host): on an
# accelerator the launch queue drains there, so host and device work do not overlap across them
SYNCS = frozenset({"aten._local_scalar_dense.default", "aten._linalg_check_errors.default",
                   "aten.nonzero.default", "aten.unique.default", "aten._unique2.default"})


@register("aten._local_scalar_dense.default")
def scalar_read(args, kwargs, outs):
    """``.item()``: one element copied to the host (on an accelerator, a synchronisation)."""
    return AtenCost(bytes=sum((t.nbytes for t in _tensors(args)), 0))


@register("aten._linalg_check_errors.default")
def check_errors(args, kwargs, outs):
    """``torch.linalg``'s check of the LAPACK ``info`` codes: read on the host (a sync)."""
    return AtenCost(bytes=args[0].nbytes)


def _square_batch(a):
    """(batch, n) of a (..., n, n) matrix argument."""
    n = a.shape[-1]
    b = 1
    for s in a.shape[:-2]:
        b = b * s
    return b, n


@register("aten._linalg_solve_ex.default")
def linalg_solve(args, kwargs, outs):
    """LU factorisation (2/3 n³) and two triangular solves (2 n² per right-hand side) per
    matrix (LAPACK getrf + getrs operation counts); not matmul work for FlopCounterMode."""
    a, b = args[0], args[1]
    batch, n = _square_batch(a)
    k = b.shape[-1] if len(b.shape) == len(a.shape) else 1
    return AtenCost(flops=batch * (2 * n ** 3 / 3 + 2 * n * n * k),
                    bytes=io_bytes(args, kwargs, outs), kernels=2)


@register("aten.linalg_lu_solve.default", "aten.lu_solve.default")
def lu_solve(args, kwargs, outs):
    """Two triangular solves with a given LU: 2 n² per right-hand side (getrs)."""
    lu, b = args[0], args[2]
    batch, n = _square_batch(lu)
    return AtenCost(flops=batch * 2 * n * n * b.shape[-1], bytes=io_bytes(args, kwargs, outs))


@register("aten.block_diag.default")
def block_diag(args, kwargs, outs):
    """Writes the (zeroed) block-diagonal matrix and copies each block in."""
    return AtenCost(bytes=outs[0].nbytes + io_bytes(args, kwargs, ()))


@register("aten._sparse_coo_tensor_with_dims_and_tensors.default")
def sparse_wrap(args, kwargs, outs):
    """A sparse tensor made from given indices and values: metadata only."""
    return AtenCost(kernels=0)


@register("aten.sparse_mask.default")
def sparse_mask(args, kwargs, outs):
    """Gathers the dense input at the mask's indices: reads them, writes the values."""
    return AtenCost(bytes=2 * sum((o.nbytes for o in outs), 0))


@register("aten._unsafe_view.default", "aten.alias.default", "aten.lift_fresh.default")
def no_kernel(args, kwargs, outs):
    """Metadata only (a view torch does not tag as one)."""
    return AtenCost(kernels=0)


@register("aten.native_layer_norm.default", "aten.native_group_norm.default",
          "aten._native_batch_norm_legit.default",
          "aten._native_batch_norm_legit_no_training.default",
          "aten.native_batch_norm.default", "aten._fused_rms_norm.default")
def norm(args, kwargs, outs):
    """Mean, variance, normalise, affine: ~5 FLOPs per element, one read, one write (plus the
    per-row statistics)."""
    n = args[0].numel
    return AtenCost(flops=5 * n, bytes=io_bytes(args, kwargs, outs))


@register("aten.native_layer_norm_backward.default", "aten.native_group_norm_backward.default",
          "aten.native_batch_norm_backward.default", "aten._fused_rms_norm_backward.default")
def norm_backward(args, kwargs, outs):
    n = args[0].numel
    return AtenCost(flops=8 * n, bytes=io_bytes(args, kwargs, outs), kernels=max(1, len(outs)))


@register("aten.embedding.default", "aten.index_select.default", "aten.gather.default",
          "aten.index.Tensor", "aten._unsafe_index.Tensor")
def gather(args, kwargs, outs):
    """Reads the gathered elements and the indices, writes the output."""
    idx = sum((t.nbytes for t in _tensors(args[1:])), 0)
    return AtenCost(bytes=2 * outs[0].nbytes + idx)


@register("aten.embedding_dense_backward.default", "aten.index_add.default",
          "aten.scatter_add.default", "aten.scatter.src", "aten.scatter.value",
          "aten.index_put.default", "aten.index_put_.default", "aten._index_put_impl_.default",
          "aten.scatter_add_.default", "aten.index_add_.default", "aten.index_copy.default",
          "aten.index_copy_.default", "aten.scatter_reduce.two")
def scatter(args, kwargs, outs):
    """Writes (zeroes) the destination and adds the scattered rows into it."""
    src = sum((t.nbytes for t in _tensors(args[1:])), 0)
    return AtenCost(flops=sum((t.numel for t in _tensors(args[1:])), 0),
                    bytes=outs[0].nbytes + 2 * src)


@register("aten.nll_loss_forward.default", "aten.nll_loss2d_forward.default")
def nll_loss(args, kwargs, outs):
    x, target = args[0], args[1]
    return AtenCost(flops=target.numel, bytes=target.nbytes * 2 + outs[0].nbytes)


@register("aten.binary_cross_entropy_with_logits.default")
def bce_with_logits(args, kwargs, outs):
    """max(x, 0) - x·y + log(1 + exp(-|x|)) per element, then the reduction (autograd's
    backward is pointwise calls of its own)."""
    n = args[0].numel
    return AtenCost(flops=8 * n, bytes=io_bytes(args, kwargs, outs), special={"exp": n})


@register("aten.nll_loss_backward.default", "aten.nll_loss2d_backward.default")
def nll_loss_backward(args, kwargs, outs):
    return AtenCost(flops=args[2].numel, bytes=outs[0].nbytes + args[2].nbytes)


@register("aten.mse_loss.default", "aten.mse_loss_backward.default", "aten.cat.default",
          "aten.stack.default", "aten.constant_pad_nd.default", "aten.slice_backward.default",
          "aten.select_backward.default", "aten.upsample_nearest2d.default",
          "aten.upsample_nearest2d_backward.default", "aten.upsample_bilinear2d.default",
          "aten.upsample_bilinear2d_backward.default", "aten.repeat.default",
          "aten.roll.default", "aten.flip.default", "aten.tril.default", "aten.triu.default",
          "aten.sort.default", "aten.topk.default", "aten.expand_copy.default")
def data_movement(args, kwargs, outs):
    """Copies and rearrangements: one FLOP per output element at most, read + write."""
    n = outs[0].numel if outs else 0
    return AtenCost(flops=n, bytes=io_bytes(args, kwargs, outs))
