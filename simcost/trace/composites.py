"""Where torch reads concrete sizes of a symbolic step without need, and how a recording avoids
it (needs the torch extra). Active only while a step is recorded
(:func:`simcost.trace.workarounds.tracing`).

- ``F.interpolate`` calls ``torch._C._nn.upsample_*(input, output_size, scale_factors)`` (the
  ``.vec`` overloads), whose C++ bodies compute the output size from ``input.sizes()``: torch
  would specialise every size of the input, batch included. Here those calls compute the
  output size with torch's own symbolic rule
  (``torch._decomp.decompositions.upsample_compute_output_size``) and call the op the C++ body
  calls, ``aten.upsample_*.default(input, output_size, *scales)``, with the same scales: the
  recorded aten calls and their autograd are the real step's.
- The fake convolution asks the CPU backend selector (``torch._C._select_conv_backend``, which
  picks oneDNN or the native kernel by the batch, among others) only to give its output the
  backend's memory format, adding a guard on the batch (``batch < 16``). For contiguous input
  and weight every CPU backend's format is contiguous (``_determine_backend_memory_format``:
  channels-last only for a channels-last input or weight), so there the choice is made at the
  size hints, without a guard; any other layout keeps torch's guarded choice.
"""
from __future__ import annotations

from contextlib import contextmanager

NEAREST = ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d")
LINEAR = ("upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d")
CONV = ("_select_conv_backend", "_conv_determine_backend_memory_format")


@contextmanager
def symbolic_composites():
    import torch
    saved = []
    for name in (*NEAREST, *LINEAR):
        orig = getattr(torch._C._nn, name, None)
        if orig is not None and hasattr(torch.ops.aten, name):
            saved.append((torch._C._nn, name, orig))
            setattr(torch._C._nn, name, _symbolic_vec(name, orig))
    for name in CONV:
        orig = getattr(torch._C, name, None)
        if orig is not None:
            saved.append((torch._C, name, orig))
            setattr(torch._C, name, _at_hints(orig))
    try:
        yield
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)


def _symbolic(t) -> bool:
    import torch
    return any(isinstance(s, torch.SymInt) for s in (*t.shape, *t.stride()))


def _symbolic_vec(name: str, orig):
    import torch
    from torch._decomp.decompositions import upsample_compute_output_size
    op = getattr(torch.ops.aten, name).default
    linear = name in LINEAR

    def call(input, *args, **kwargs):
        n = 3 if linear else 2            # the .vec overload's arguments after the input
        vec = not kwargs and len(args) == n and (args[-1] is None or
                                                 isinstance(args[-1], (list, tuple)))
        if not vec or not _symbolic(input):
            return orig(input, *args, **kwargs)
        output_size, scale_factors = args[0], args[-1]
        osize = upsample_compute_output_size(input.size(), output_size, scale_factors)
        scales = list(scale_factors) if scale_factors else [None] * len(osize)
        return op(input, osize, *args[1:-1], *scales)
    return call


def _hint(s) -> int:
    import torch
    if not isinstance(s, torch.SymInt):
        return int(s)
    h = s.node.hint
    return int(h if h is not None else s.node.shape_env.size_hint(s.node.expr))


def _at_hints(orig):
    """``orig(input, weight, ...)`` with a symbolic contiguous input and a contiguous weight
    replaced by fake tensors of their hinted sizes (made under the fake mode the convolution's
    fake kernel runs in)."""
    import torch

    def call(input, weight, *args, **kwargs):
        if not (_symbolic(input) or _symbolic(weight)) or not (_contiguous(input)
                                                               and _contiguous(weight)):
            return orig(input, weight, *args, **kwargs)
        concrete = [torch.empty_strided([_hint(s) for s in t.shape],
                                        [_hint(s) for s in t.stride()],
                                        dtype=t.dtype, device=t.device) for t in (input, weight)]
        return orig(*concrete, *args, **kwargs)
    return call


def _contiguous(t) -> bool:
    """The strides are the contiguous ones of the sizes, as expressions (no guard asked)."""
    import sympy
    import torch

    def expr(x):
        return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))
    expected = sympy.Integer(1)
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        n = expr(size)
        if n != 1 and sympy.expand(expr(stride) - expected) != 0:
            return False
        expected = expected * n
    return True
