"""A small DSL that appends ops to a segment of a :class:`ModelGraph`."""
from __future__ import annotations

from simcost.graph.ir import ModelGraph, Op, Param, Segment


class SegmentBuilder:
    def __init__(self, g: ModelGraph, seg: Segment, prefix: str = ""):
        self.g = g
        self.seg = seg
        self.prefix = prefix        # HF module prefix, e.g. 'model.layers.{i}.'

    def op(self, kind: str, name: str, inputs, shape, dtype: str, *, params=(), attrs=None,
           module: str = "", view: bool = False, is_global: bool = False) -> int:
        """Append an op with one output; ``view=True`` makes the output share input 0's storage."""
        out = self.g.new_tensor(shape, dtype, view_of=inputs[0] if view else None,
                                is_global=is_global)
        self.seg.ops.append(Op(name, kind, tuple(inputs), (out,), tuple(params), dict(attrs or {}),
                               self.prefix + module))
        return out

    def param(self, module: str, pname: str, shape, dtype: str, role: str = "weight") -> Param:
        return Param(f"{self.prefix}{module}.{pname}", tuple(int(s) for s in shape), dtype,
                     False, role)

    def linear(self, name: str, module: str, x: int, d_in: int, d_out: int, bias: bool,
               dtype: str) -> int:
        params = [self.param(module, "weight", (d_out, d_in), dtype)]
        if bias:
            params.append(self.param(module, "bias", (d_out,), dtype, "bias"))
        shape = self.g.tensors[x].shape[:-1] + (d_out,)
        return self.op("linear", name, [x], shape, dtype, params=params, module=module)

    def norm(self, kind: str, name: str, module: str, x: int, d: int, dtype: str,
             bias: bool = False) -> int:
        params = [self.param(module, "weight", (d,), dtype, "norm")]
        if bias:
            params.append(self.param(module, "bias", (d,), dtype, "norm"))
        return self.op(kind, name, [x], self.g.tensors[x].shape, dtype, params=params, module=module)

    def like(self, kind: str, name: str, inputs, dtype: str | None = None, **kw) -> int:
        t = self.g.tensors[inputs[0]]
        return self.op(kind, name, inputs, t.shape, dtype or t.dtype, **kw)

    def dropout(self, name: str, x: int, p: float) -> int:
        """Training-mode dropout; p == 0 returns its input (torch returns it unchanged)."""
        if p <= 0:
            return x
        return self.like("dropout", name, [x], attrs={"p": p})
