"""Composite ops whose C++ kernels read concrete sizes, run in their symbolic form while a
step is traced (needs the torch extra).

``F.interpolate`` calls ``torch._C._nn.upsample_*(input, output_size, scale_factors)`` (the
``.vec`` overloads): their C++ bodies compute the output size from ``input.sizes()``, which
makes torch specialise every size of the input (batch included). While a step is recorded,
those calls compute the output size with torch's own symbolic rule
(``torch._decomp.decompositions.upsample_compute_output_size``) and call the op the C++ body
calls, ``aten.upsample_*.default(input, output_size, *scales)``, with the same scales: the
recorded aten calls, and their autograd, are those of the real step.
"""
from __future__ import annotations

from contextlib import contextmanager

NEAREST = ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d")
LINEAR = ("upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d", "upsample_bicubic2d")


@contextmanager
def symbolic_upsampling():
    import torch
    mod = torch._C._nn
    saved = {}
    for name in (*NEAREST, *LINEAR):
        orig = getattr(mod, name, None)
        if orig is not None and hasattr(torch.ops.aten, name):
            saved[name] = orig
            setattr(mod, name, _symbolic_vec(name, orig))
    try:
        yield
    finally:
        for name, orig in saved.items():
            setattr(mod, name, orig)


def _symbolic_vec(name: str, orig):
    import torch
    from torch._decomp.decompositions import upsample_compute_output_size
    op = getattr(torch.ops.aten, name).default
    linear = name in LINEAR

    def call(input, *args, **kwargs):
        n = 3 if linear else 2            # the .vec overload's arguments after the input
        vec = not kwargs and len(args) == n and (args[-1] is None or
                                                 isinstance(args[-1], (list, tuple)))
        if not vec or not any(isinstance(s, torch.SymInt) for s in input.shape):
            return orig(input, *args, **kwargs)
        output_size, scale_factors = args[0], args[-1]
        osize = upsample_compute_output_size(input.size(), output_size, scale_factors)
        scales = list(scale_factors) if scale_factors else [None] * len(osize)
        return op(input, osize, *args[1:-1], *scales)
    return call
