"""Record one eager training step with torch's own machinery (needs the torch extra).

The model's parameters are fake tensors (:mod:`torch._subclasses.fake_tensor`) on the CPU
device, so nothing is allocated and no weights are needed; the inputs have *symbolic* sizes
(one sympy symbol per named dimension: ``batch``, ``seq``, ``target_seq``, ``image``), so one
recording holds every aten call's shapes as expressions and serves a whole sweep.

What is recorded, all from torch itself:
- every aten call below autograd (a :class:`~torch.utils._python_dispatch.TorchDispatchMode`),
  with its phase: ``fwd`` (forward with the model's loss) or ``bwd`` (``loss.backward()``);
  view and metadata ops are kept but flagged (they launch no kernel);
- what autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``), de-duplicated
  by storage, counting only what is still alive at the end of forward (a packed record
  survives exactly as long as the graph node holding it), parameters excluded;
- the parameters, trainable or not, as peft set them.

Guards torch adds while tracing (a branch on ``seq > window``) are kept: the recording is valid
only where they hold, and :meth:`Trace.check` says so. A size torch had to specialise (a
kernel that needed a concrete int) makes the recording valid for that size only.
"""
from __future__ import annotations

import gc
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from simcost.errors import SimcostError

TORCH_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                "int64": "int64", "int32": "int32", "bool": "bool", "uint8": "uint8",
                "int8": "int8", "float8_e4m3fn": "fp8", "float8_e5m2": "fp8",
                "complex64": "c64", "complex128": "c128"}


@dataclass(frozen=True, slots=True)
class SymMeta:
    """A tensor argument of a recorded call: sizes as sympy expressions (or ints)."""
    shape: tuple
    dtype: str


@dataclass(slots=True)
class Call:
    name: str                 # str(OpOverload), e.g. 'aten.mm.default'
    phase: str                # 'fwd' | 'bwd' | 'rec' (a checkpointed forward re-run in backward)
    args: tuple               # tensors replaced by SymMeta
    kwargs: dict
    outs: tuple               # SymMeta of the tensor outputs
    tags: frozenset
    is_view: bool
    layer: int | None = None  # the kept layer it runs for (see simcost.trace.layers)
    params: tuple = ()        # names of the parameters among its arguments (views included)


@dataclass
class Trace:
    """One recorded training step, symbolic in ``symbols`` (dimension name -> sympy symbol)."""
    calls: list[Call]
    saved: dict               # storage id -> nbytes expression (alive at the end of forward)
    params_total: int
    params_trainable: int
    symbols: dict
    guards: list = field(default_factory=list)     # sympy booleans over the symbols
    specialized: dict = field(default_factory=dict)  # dimension name -> the value it was fixed to
    counts: dict = field(default_factory=dict)     # kept layer -> how many layers it stands for
    saved_layer: dict = field(default_factory=dict)  # storage id -> the kept layer it counts with
    params: list = field(default_factory=list)     # see param_table
    storage_bytes: list = field(default_factory=list)  # storage id -> nbytes expression
    events: list = field(default_factory=list)     # (+1 | -1, storage id, call index)
    births: dict = field(default_factory=dict)     # storage id -> the call that made it
    fwd_calls: int = 0                             # calls [0, fwd_calls) are the forward
    layer_outputs: frozenset = frozenset()         # hidden states a kept layer returned
    layer_inputs: dict = field(default_factory=dict)  # hidden state -> kept layers it entered

    def weight(self, layer) -> int:
        """How many times the work of ``layer`` (a kept layer, or None) happens in a step."""
        return self.counts.get(layer, 1) if layer is not None else 1


def _expr(x):
    """A size as a plain int or a sympy expression."""
    import torch
    if isinstance(x, torch.SymInt):
        e = x.node.expr
        return int(e) if e.is_number else e
    return int(x)


def sym_meta(t) -> SymMeta:
    dt = TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
    if dt is None:
        raise SimcostError(f"traced tensor of dtype {t.dtype} has no simcost dtype")
    return SymMeta(tuple(_expr(s) for s in t.shape), dt)


def _meta_tree(x):
    import torch
    if isinstance(x, torch.Tensor):
        return sym_meta(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_meta_tree(v) for v in x)
    if isinstance(x, torch.SymInt):
        return _expr(x)
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(x)
    return x


@contextmanager
def fake_tensors_are_not_tracing():
    """Make a fake-tensor step take the causal-mask decisions the real step takes.

    transformers' ``masking_utils.is_tracing(t)`` treats a FakeTensor like a traced value, so
    under fake tensors (a) ``find_packed_sequence_indices`` cannot see that the position ids
    are one plain ``arange`` and reports packed sequences, and (b) ``_ignore_causal_mask_sdpa``
    never skips the mask. SDPA would then get an explicit (B, 1, S, S) mask instead of
    ``is_causal=True`` (and GQA models ``repeat_kv`` instead of ``enable_gqa``), which the real
    step does not do. The harness never packs (its inputs are ``input_ids`` only, the model
    makes ``arange`` positions), so (a) answers "not packed"; within (b) fake tensors are not
    tracing, and where it would have to read a fake value (a padding mask, a nonzero cache
    offset) it keeps the mask, as the real step does for a KV prefix."""
    try:
        from torch._subclasses.fake_tensor import DataDependentOutputException
        from transformers import masking_utils
    except ImportError:      # pragma: no cover
        yield
        return
    orig_ignore = masking_utils._ignore_causal_mask_sdpa
    orig_tracing = masking_utils.is_tracing

    def ignore(*args, **kwargs):
        masking_utils.is_tracing = lambda tensor=None: orig_tracing()
        try:
            return orig_ignore(*args, **kwargs)
        except DataDependentOutputException:
            return False
        finally:
            masking_utils.is_tracing = orig_tracing

    orig_packed = masking_utils.find_packed_sequence_indices
    masking_utils._ignore_causal_mask_sdpa = ignore
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = orig_ignore
        masking_utils.find_packed_sequence_indices = orig_packed


def fakeify(model, fake_mode) -> None:
    """Swap a meta-device model's parameters and buffers for fake CPU tensors (in place)."""
    import torch

    from simcost.trace.workarounds import carry_tensor_hooks
    conv = fake_mode.fake_tensor_converter
    cpu = torch.device("cpu")
    done: dict[int, object] = {}          # tied weights stay one parameter
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in done:
                    fake = conv.from_meta_and_device(fake_mode, p.data.to("meta"), cpu)
                    done[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                    carry_tensor_hooks(p, done[id(p)])
                mod._parameters[n] = done[id(p)]
        for n, b in list(mod._buffers.items()):
            if b is not None:
                if id(b) not in done:
                    done[id(b)] = conv.from_meta_and_device(fake_mode, b.to("meta"), cpu)
                mod._buffers[n] = done[id(b)]


def make_symbols(shape_env, hints: dict, static: tuple = ()) -> dict:
    """One backed symbol per named dimension, with its hint (the size the trace follows where
    model code branches); the ``static`` ones stay plain ints."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic
    out = {}
    for name, hint in hints.items():
        if name in static:
            out[name] = int(hint)
            continue
        if int(hint) < 2:
            raise SimcostError(f"trace hint {name}={hint}: sizes 0 and 1 are specialised by "
                               f"torch; trace with {name} >= 2")
        src = ConstantSource(f"simcost_{name}")
        sym = shape_env.create_symbol(int(hint), source=src, dynamic_dim=DimDynamic.DYNAMIC)
        out[name] = shape_env.create_symintnode(sym, hint=int(hint), source=src)
    return out


# ops whose schema says they return a new tensor while eager torch returns one on the input's
# storage (so a fake tensor gets a storage of its own): the recorder keeps them on the input's
EAGER_ALIASES = frozenset({"aten._unsafe_view.default", "aten.alias.default",
                           "aten.lift_fresh.default"})
# losses whose eager kernel reduces into the unreduced (input-sized) buffer and returns the
# 0-dim loss on it: the loss keeps that storage alive (a meta kernel allocates 0-dim storage)
EAGER_UNREDUCED = frozenset({"aten.mse_loss.default", "aten.smooth_l1_loss.default"})


class _Recorder:
    """The dispatch mode and the saved-tensor hooks of one recording, and its storages: an
    id for each (a storage torch frees gets no id again, so ids stay unique), its bytes, the
    kept layer and phase of the call that made it, and the births and deaths of the
    live-memory timeline (:mod:`simcost.trace.timeline`)."""

    def __init__(self, param_storages: dict, fake_mode=None, tagger=None):
        self.fake_mode = fake_mode
        self.tagger = tagger
        self.calls: list[Call] = []
        self.phase = "fwd"
        self.param_storages = param_storages
        self.packed: list = []           # weakrefs to packed records, with storage id and layer
        self.live: dict = {}             # _cdata of a live storage -> its id
        self.sizes: list = []            # storage id -> nbytes (int or sympy expression)
        self.made_in: dict = {}          # storage id -> the kept layer whose forward made it
        self.births: dict = {}           # storage id -> index of the call that made it
        self.events: list = []           # (+1 | -1, storage id, call index), in order
        self.refs: dict = {}             # storage id -> fake storages standing for it
        self.layer_outputs: set = set()  # hidden states a kept layer returned
        self.layer_inputs: dict = {}     # hidden state -> the kept layers it entered
        self.closed = False

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = rec.small_random(func, args, kwargs)
                if out is None:
                    out = func(*args, **kwargs)
                rec.record(func, args, kwargs, out)
                return out
        return Mode()

    def small_random(self, func, args, kwargs):
        """A one-element random tensor made from constant sizes (peft's module dropout,
        ``torch.rand(1) > p``) gets a real value, so code that branches on it runs; every
        other call stays fake."""
        import torch
        from torch.utils._python_dispatch import _disable_current_modes
        if str(func) != "aten.rand.default" or self.fake_mode is None:
            return None
        size = args[0] if args else kwargs.get("size")
        if not all(isinstance(v, int) for v in size) or int(np.prod(size)) > 1:
            return None
        with _disable_current_modes():
            real = torch.rand(size, dtype=kwargs.get("dtype") or torch.float32)
        return self.fake_mode.fake_tensor_converter.from_real_tensor(
            self.fake_mode, real, make_constant=True)

    def storage(self, st, layer=None, born: bool = False, alias_of: int | None = None) -> int:
        """The id of storage ``st``; a new one is a birth when an aten call ``born`` it.
        ``alias_of``: ``st`` is the same storage as that id in eager torch (see
        :data:`EAGER_ALIASES`), so it gets that id and keeps it alive."""
        import torch
        cd = st._cdata
        sid = self.live.get(cd)
        if sid is not None:
            return sid
        if alias_of is not None:
            self.live[cd] = alias_of
            self.refs[alias_of] = self.refs.get(alias_of, 0) + 1
            weakref.finalize(st, self._dead, cd, alias_of, alias_of in self.births)
            return alias_of
        sid = len(self.sizes)
        self.live[cd] = sid
        self.refs[sid] = 1
        nb = st.nbytes()
        self.sizes.append(_expr(nb) if isinstance(nb, torch.SymInt) else int(nb))
        if born:
            self.births[sid] = len(self.calls)
            self.events.append((1, sid, len(self.calls)))
            if self.phase == "fwd":
                self.made_in[sid] = layer
        weakref.finalize(st, self._dead, cd, sid, born)
        return sid

    def _dead(self, cd, sid, born) -> None:
        if self.live.get(cd) == sid:
            del self.live[cd]
        self.refs[sid] -= 1
        if born and not self.closed and self.refs[sid] == 0:
            self.events.append((-1, sid, len(self.calls) - 1))

    def record(self, func, args, kwargs, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves
        name = str(func)
        if name.startswith("prim."):
            return
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        outs = tuple(sym_meta(t) for t in tensors)
        # a forward re-run inside backward (a checkpointed layer: torch.utils.checkpoint
        # recomputes it under enable_grad, where backward itself runs without grad mode)
        phase = "rec" if self.phase == "bwd" and torch.is_grad_enabled() else self.phase
        layer = None
        if self.tagger is not None:
            from simcost.trace.layers import node_tag
            layer = self.tagger.current if phase == "fwd" else node_tag()
            if phase == "fwd":
                (self.tagger.outside if layer is None else self.tagger.inside)(tensors)
        alias = None
        if name in EAGER_ALIASES and args and isinstance(args[0], torch.Tensor):
            src = storages(args[0])[0]
            if src._cdata not in self.param_storages:
                alias = self.storage(src)
        # a view or an in-place result is on an input's storage: no allocation (an input the
        # step did not make, such as the batch's token ids, is no birth either)
        ins = {st._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
               for st in storages(t)}
        for st in (st for t in tensors for st in storages(t)):
            if st._cdata not in self.param_storages:
                self.storage(st, layer, born=not func.is_view and st._cdata not in ins,
                             alias_of=alias)
        params = tuple(sorted({self.param_storages[st._cdata]
                               for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                               for st in storages(t) if st._cdata in self.param_storages}))
        if name in EAGER_UNREDUCED and len(tensors) == 1 and tensors[0].dim() == 0:
            sid = self.live.get(tensors[0].untyped_storage()._cdata)
            if sid is not None:
                self.sizes[sid] = _expr(args[0].numel()) * tensors[0].element_size()
        self.calls.append(Call(name, phase, _meta_tree(tuple(args)),
                               {k: _meta_tree(v) for k, v in kwargs.items()}, outs,
                               frozenset(str(t).removeprefix("Tag.") for t in func.tags),
                               bool(getattr(func, "is_view", False)), layer, params))

    def _hidden(self, tree):
        """The storage id of the first tensor in ``tree`` (a layer's hidden state), or None."""
        import torch
        from torch.utils._pytree import tree_leaves
        t = next((t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)), None)
        if t is None:
            return None
        st = storages(t)[0]
        if st._cdata in self.param_storages:
            return None
        return self.storage(st)

    def layer_entered(self, layer, args, kwargs) -> None:
        """A kept layer's hidden-state input (its first tensor argument)."""
        sid = self._hidden((args, kwargs))
        if sid is not None:
            self.layer_inputs.setdefault(sid, set()).add(layer)

    def layer_returned(self, layer, out) -> None:
        """A kept layer's hidden-state output (its first tensor result)."""
        sid = self._hidden(out)
        if sid is not None:
            self.layer_outputs.add(sid)

    def pack(self, t):
        """Box a tensor autograd saves; each of its storages (a sparse tensor's indices and
        values) is counted alive as long as the box."""
        box = None
        layer = self.tagger.current if self.tagger is not None else None
        for st in storages(t):
            if st._cdata in self.param_storages:
                continue
            sid = self.storage(st)
            box = box or Packed(t)
            self.packed.append((weakref.ref(box), sid, layer))
        return t if box is None else box

    def alive_saved(self) -> dict:
        """Storage id -> the kept layer it counts with, of the saved storages still alive."""
        out: dict = {}
        for ref, sid, layer in self.packed:
            if ref() is not None and sid not in out:
                # a storage made inside the layers counts as often as the layer saving it
                # runs (every instance saves its own, e.g. its predecessor's output); one made
                # outside them (a prefix's key/values, shared by all layers) counts once
                out[sid] = layer if self.made_in.get(sid) is not None else None
        return out


def storages(t) -> list:
    """The storages a tensor keeps alive: its own, or a sparse COO tensor's indices and values
    (SHiRA's delta weight, which autograd saves)."""
    import torch
    if t.layout == torch.sparse_coo:
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            return [t._indices().untyped_storage(), t._values().untyped_storage()]
    return [t.untyped_storage()]


class Packed:
    """A saved tensor as autograd holds it: alive exactly as long as the node saving it."""
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t

    @staticmethod
    def unpack(x):
        return x.t if isinstance(x, Packed) else x


def trace_step(model, make_inputs, hints: dict, shape_env, fake_mode,
               static: tuple = (), counts: dict | None = None,
               params: tuple[int, int] | None = None, loss=None,
               base_names: set | None = None, autocast: str | None = None) -> Trace:
    """Record forward (with loss) and backward of ``model(**make_inputs(sizes))``.

    ``make_inputs(sizes)`` builds the input tensors (under the fake mode) from a dict of
    symbolic sizes; the call returns a scalar loss, an object with ``.loss`` or a dict with
    ``"loss"`` (or ``loss(output, inputs)`` makes it). ``static``: dimensions traced at their
    hint only (a ViT's image size: its position table has one). ``counts``: from
    :func:`simcost.trace.layers.reduce_depth` (the model already reduced); ``params``:
    (total, trainable) of the full model, counted before the reduction; ``base_names``: the
    parameter names of the model before peft (the rest are the method's own); ``autocast``:
    the 16-bit dtype of ``torch.autocast`` (mixed precision), or None."""
    import torch
    sizes = make_symbols(shape_env, hints, static)
    symbols = {k: v.node.expr for k, v in sizes.items() if not isinstance(v, int)}
    # parameter and buffer storages -> a name (the calls name the parameters they read)
    pstor = {t.untyped_storage()._cdata: n for n, t in
             (*model.named_parameters(remove_duplicate=False),
              *model.named_buffers(remove_duplicate=False))}
    tagger = None
    if counts:
        from simcost.trace.layers import LayerTagger
        tagger = LayerTagger(counts, model)
    rec = _Recorder(pstor, fake_mode, tagger)
    if tagger is not None:
        tagger.on_enter, tagger.on_leave = rec.layer_entered, rec.layer_returned
    amp = torch.autocast("cpu", dtype=getattr(torch, autocast)) if autocast else nullcontext()
    # the collections below need only see what the step makes: everything alive before it
    # (torch, transformers, the model) is moved out of the collector's generations
    gc.freeze()
    try:
        return _record(model, make_inputs, sizes, symbols, shape_env, fake_mode, rec, tagger,
                       amp, loss, counts, params, base_names)
    finally:
        gc.unfreeze()


def _record(model, make_inputs, sizes, symbols, shape_env, fake_mode, rec, tagger, amp, loss,
            counts, params, base_names) -> Trace:
    import torch

    from simcost.trace.workarounds import tracing
    with fake_mode, fake_tensors_are_not_tracing(), tracing():
        inputs = make_inputs(sizes)
        with rec.mode(), torch.autograd.graph.saved_tensors_hooks(rec.pack, Packed.unpack):
            with amp:
                out = model(**inputs)
                value = _loss_of(out, inputs, loss)
            del out
            gc.collect()
            saved = rec.alive_saved()
            fwd_calls = len(rec.calls)
            rec.phase = "bwd"
            value.backward()
            del value
        rec.closed = True
    if tagger is not None:
        tagger.remove()
    spec = {k: v for k, v in sizes.items() if isinstance(v, int)}
    for k, s in symbols.items():
        r = shape_env.replacements.get(s)
        if r is not None and r.is_number:
            spec[k] = int(r)
    guards = [g.expr for g in shape_env.guards
              if g.expr.free_symbols and g.expr.free_symbols <= set(symbols.values())]
    total, trainable = params if params is not None else count_params(model)
    sizes_b = [v if isinstance(v, int) else shape_env.replace(v) for v in rec.sizes]
    return Trace(rec.calls, {sid: sizes_b[sid] for sid in saved}, int(total), int(trainable),
                 symbols, guards, spec, dict(counts or {}), saved,
                 param_table(model, counts or {}, base_names), sizes_b, rec.events,
                 rec.births, fwd_calls, frozenset(rec.layer_outputs),
                 {k: frozenset(v) for k, v in rec.layer_inputs.items()})


def _loss_of(out, inputs, loss_fn):
    import torch
    if loss_fn is not None:
        value = loss_fn(out, inputs)
    elif isinstance(out, torch.Tensor):
        value = out
    elif isinstance(out, dict):
        value = out.get("loss")
    else:
        value = getattr(out, "loss", None)
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise SimcostError("the model's call returned no scalar loss (give it labels, or "
                           "return a loss from the factory's module or its 'loss' function)")
    return value


class ParamInfo(NamedTuple):
    """One distinct parameter of a recorded (reduced) model."""
    name: str
    shape: tuple
    dtype: str
    trainable: bool
    added: bool           # made by the PEFT method (not in the model before peft)
    count: int            # the layers it stands for
    layer: object         # the kept layer it belongs to, or None outside the layers
    kind: str             # 'linear' (an nn.Linear's weight), 'head' (the output embedding's),
    #                       'embedding' or 'other'


def param_table(model, counts: dict, base_names: set | None) -> list[ParamInfo]:
    """A :class:`ParamInfo` per distinct parameter of the (reduced) model."""
    import torch
    weight: dict[int, tuple] = {}
    for mod in model.modules():
        c = counts.get(id(mod))
        if c:
            for p in mod.parameters():
                weight[id(p)] = (c, id(mod))
    kind: dict[int, str] = {}
    for mod in model.modules():
        w = mod._parameters.get("weight")        # the module owning it (not a wrapper's alias)
        if w is not None and id(w) not in kind:
            kind[id(w)] = "linear" if isinstance(mod, torch.nn.Linear) else \
                "embedding" if isinstance(mod, torch.nn.Embedding) else "other"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and isinstance(getattr(head, "weight", None), torch.nn.Parameter):
        kind[id(head.weight)] = "head"
    out, seen = [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        dt = TORCH_DTYPES.get(str(p.dtype).removeprefix("torch."), "fp32")
        added = base_names is not None and base_name(name) not in base_names
        out.append(ParamInfo(name, tuple(int(x) for x in p.shape), dt, bool(p.requires_grad),
                             added, *weight.get(id(p), (1, None)), kind.get(id(p), "other")))
    return out


def base_name(name: str) -> str:
    """A peft-wrapped parameter's name in the model before peft."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def count_params(model) -> tuple[int, int]:
    """(total, trainable) parameters, a tied tensor once (as peft counts them)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return int(total), int(trainable)


