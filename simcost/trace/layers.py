"""Repeated layers: trace one of each kind, count the rest (needs the torch extra).

A *stack* is an outermost ``nn.ModuleList`` whose children all have one class and
submodules of their own (decoder layers, T5 blocks, ViT layers; a list of plain ``Linear`` or
``Conv2d`` modules is usually applied in parallel, one per head or scale, not in sequence).
Two layers of a stack are the same kind when their module trees, parameters (relative
names, shapes, dtypes, ``requires_grad``) and plain attributes (``attention_type``, ``sliding_window``, ...; the layer index excluded) agree, *and* when
the same gradient state enters them (a layer above the lowest trainable one receives an
input that requires grad; the first one above a frozen prologue does not). The first layer
of a stack is always a kind of its own (trainable tensors outside the stacks, a prefix's
keys and values, make every input after it require grad). So Gemma's local
and global layers, DeepSeek's first dense layers, ``layers_to_transform``, per-layer
``rank_pattern`` and the lowest trainable layer all stay distinct, and an 80-layer model is
traced as one layer of each kind.

:func:`reduce_depth` keeps the first layer of each kind in every stack (in order, so the
data and gradient flow between them is the real one) and returns how many layers each kept
layer stands for. :class:`LayerTagger` tells which kept layer an aten call runs for: in
forward, the layer whose ``forward`` is running; in backward, the layer whose forward made
the autograd node being run (a node is tagged when its layer returns, walking back from the
layer's outputs to the nodes made before it).

Layers of one kind are assumed to do the same work, which holds when each kept layer gives its
hidden state back in the shape it got it (decoder and encoder layers). A stack whose layers
change it (token merging: each ViT block merges r of its tokens) has layers of one kind that
see different sizes; :class:`LayerTagger` raises :class:`UnevenLayers` there, and
:func:`simcost.trace.build.trace_task` traces every layer instead.
"""
from __future__ import annotations

_INDEX_ATTRS = {"layer_idx", "layer_id", "idx", "index", "layer_number", "layer_index",
                "block_idx", "i"}
TAG_KEY = "simcost_layer"


def repeated_stacks(model, names: tuple = ()) -> list[tuple[str, object]]:
    """The outermost ModuleLists of two or more layers of one class (only those whose last
    name is in ``names``, when given)."""
    import torch
    out: list[tuple[str, object]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) < 2:
            continue
        if names and name.rpartition(".")[2] not in names:
            continue
        if len({type(c) for c in mod}) != 1 or not any(True for _ in mod[0].parameters()):
            continue
        if not any(True for _ in mod[0].children()):      # leaf modules: not layers
            continue
        if any(name.startswith(p + ".") for p, _ in out):
            continue
        out.append((name, mod))
    return out


def _attrs(mod) -> tuple:
    keep = []
    for k, v in sorted(vars(mod).items()):
        if k.startswith("_") or k in _INDEX_ATTRS or k == "training":
            continue
        if isinstance(v, (int, float, str, bool, type(None))) or \
                isinstance(v, (tuple, list)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            keep.append((k, v if not isinstance(v, list) else tuple(v)))
    return tuple(keep)


def _hooks(mod) -> tuple:
    """The forward hooks on a module, by function (ShadowPEFT wraps its state on entry to the
    first targeted layer and unwraps it on exit from the last: those layers are kinds of their
    own)."""
    hooks = (*mod._forward_pre_hooks.values(), *mod._forward_hooks.values())
    return tuple(getattr(getattr(h, "func", h), "__qualname__", type(h).__name__) for h in hooks)


def signature(layer) -> tuple:
    mods = tuple((n, type(m).__name__, _attrs(m), _hooks(m)) for n, m in layer.named_modules())
    params = tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad)
                   for n, p in layer.named_parameters())
    bufs = tuple((n, tuple(b.shape), str(b.dtype)) for n, b in layer.named_buffers())
    return mods, params, bufs


def reduce_depth(model, names: tuple = ()) -> dict:
    """Keep one layer of each kind per stack (in place); returns {id(kept layer): count}.
    ``names``: see :func:`repeated_stacks`."""
    import torch
    counts: dict[int, int] = {}
    before_trainable = False
    stacks = {name: mod for name, mod in repeated_stacks(model, names)}
    seen_stack_params: set[int] = set()
    for name, mod in model.named_modules():
        if name in stacks:
            keys, kept = {}, []
            for i, layer in enumerate(stacks[name]):
                # the first layer is its own kind: what enters it (a frozen embedding's
                # output) can differ from what enters the next (a prefix's keys and values
                # make every later input require grad)
                key = (signature(layer), before_trainable, i == 0)
                if key not in keys:
                    keys[key] = layer
                    kept.append(layer)
                    counts[id(layer)] = 0
                counts[id(keys[key])] += 1
                before_trainable = before_trainable or any(
                    p.requires_grad for p in layer.parameters())
                seen_stack_params |= {id(p) for p in layer.parameters()}
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, attr, torch.nn.ModuleList(kept))
        elif not any(name.startswith(s + ".") for s in stacks):
            before_trainable = before_trainable or any(
                p.requires_grad for p in mod.parameters(recurse=False)
                if id(p) not in seen_stack_params)
    return counts


class UnevenLayers(Exception):
    """A kept layer changed the shape of its hidden state while the reduction counts layers of
    one kind as doing the same work (see the module docstring)."""


class LayerTagger:
    """Hooks on the kept layers: ``current`` is the tag (``id`` of the layer) of the forward
    being run; autograd nodes a layer makes get its tag in their metadata. Raises
    :class:`UnevenLayers` when a kept layer returns its first tensor argument (the hidden
    state) in another shape while some kept layer stands for more than one."""

    def __init__(self, counts: dict, model):
        self.counts = counts
        self.reduced = any(c > 1 for c in counts.values())
        self._shape_in: dict = {}
        self.current = None
        self.on_enter = None         # called with a kept layer's inputs when it starts
        self.on_leave = None         # called with a kept layer's outputs when it returns
        self.pending: list = []      # weakrefs to tensors made outside the layers since the last
        self.made: list = []         # weakrefs to tensors the running layer made
        self._handles = []
        for mod in model.modules():
            if id(mod) in counts:
                self._handles.append(mod.register_forward_pre_hook(self._enter, with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._leave, with_kwargs=True))

    def outside(self, tensors) -> None:
        """Tensors made outside the layers (a prefix's key/values, the position tables):
        their nodes are tagged as such when the next layer starts. (An aten call's outputs
        get their ``grad_fn`` after the call returns, so none is filtered out here.)"""
        import weakref
        self.pending.extend(weakref.ref(t) for t in tensors)

    def inside(self, tensors) -> None:
        """Tensors the running layer makes: their nodes are the layer's when it returns, also
        those its outputs do not reach (an auxiliary loss the layer keeps aside)."""
        import weakref
        self.made.extend(weakref.ref(t) for t in tensors)

    def _enter(self, mod, args, kwargs):
        alive = [r() for r in self.pending]
        self.pending.clear()
        _tag_graph(((args, kwargs), [t for t in alive if t is not None]), None)
        self.current = id(mod)
        if self.reduced:
            self._shape_in[id(mod)] = _first_shape((args, kwargs))
        if self.on_enter is not None:
            self.on_enter(id(mod), args, kwargs)

    def _leave(self, mod, args, kwargs, out):
        made = [r() for r in self.made]
        self.made.clear()
        _tag_graph((out, [t for t in made if t is not None]), id(mod))
        self.current = None
        if self.reduced:
            before, after = self._shape_in.pop(id(mod), None), _first_shape(out)
            if before is not None and after is not None and before != after:
                raise UnevenLayers(f"{type(mod).__name__} turns a {before} input into a "
                                   f"{after} output")
        if self.on_leave is not None:
            self.on_leave(id(mod), out)

    def remove(self):
        for h in self._handles:
            h.remove()


def _tag_graph(tree, tag) -> None:
    """Tag every untagged autograd node reachable from the tensors in ``tree``."""
    import torch
    from torch.utils._pytree import tree_leaves
    stack = [t.grad_fn for t in _tensors(tree_leaves(tree)) if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or TAG_KEY in node.metadata:
            continue
        node.metadata[TAG_KEY] = tag
        stack.extend(n for n, _ in node.next_functions)


def _tensors(leaves):
    """The tensors among pytree leaves, and those one attribute deep in other objects (a
    ShadowPEFT carrier holding the hidden and the shadow states)."""
    import torch
    for x in leaves:
        if isinstance(x, torch.Tensor):
            yield x
            continue
        attrs = getattr(x, "__dict__", None) or {
            k: getattr(x, k, None) for k in getattr(type(x), "__slots__", ())}
        yield from (v for v in attrs.values() if isinstance(v, torch.Tensor))


def _first_shape(tree):
    """The shape of the first tensor in ``tree``, as size expressions (comparing them adds no
    guard), or None."""
    import torch
    from torch.utils._pytree import tree_leaves
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            return tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s)
                         for s in t.shape)
    return None


def node_tag():
    """The tag of the autograd node the backward is running now (None: outside the layers)."""
    import torch
    node = torch._C._current_autograd_node()
    return node.metadata.get(TAG_KEY) if node is not None else None
