"""Bring your own model: ``--model path/to/file.py:factory`` (needs the torch extra).

``factory()`` is called with the default torch device set to the one simcost builds on (the
meta device when estimating, the CPU when a validation runs the step for real), and returns
a dict:

- ``"module"``: the ``torch.nn.Module`` to train. ``module(**inputs)`` returns the scalar
  loss, an object with ``.loss``, or a dict with ``"loss"`` (or see ``"loss"`` below);
- ``"inputs"``: example inputs, a dict of tensors at any concrete sizes (only their shapes and
  dtypes are used: simcost makes inputs at the sizes it prices, floating ones in the dtype
  of the weights (``--dtype``), the others in their own);
- ``"dims"``: which input axes carry which named size, e.g.
  ``{"batch": [("input_ids", 0), ("labels", 0)], "seq": [("input_ids", 1), ("labels", 1)]}``.
  ``batch`` is required; ``seq`` (``--seq``), ``target_seq`` (``--target-seq``) and ``image``
  (``--image-size``) are the sizes the CLI sets; any other name is fixed at its example size;
- optional ``"loss"``: ``loss(output, inputs)`` -> scalar, when the module returns no loss;
- optional ``"name"``: the model's name in results.

The adapter config (``--peft-config``) is applied with peft's ``get_peft_model``, so its
``target_modules`` name the module's own submodules. The cache key is the file's content and
the factory's name: a factory that reads other files should be re-traced with
``--no-trace-cache`` when they change.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from simcost.errors import SimcostError
from simcost.trace.task import FLAGS, TracedTask, weights_dtype_inputs

CLI_DIMS = tuple(FLAGS)


def is_factory_spec(model: str) -> bool:
    path, sep, attr = model.rpartition(":")
    return bool(sep) and path.endswith(".py") and attr.isidentifier()


def load_factory(spec: str):
    """The factory function named by ``file.py:name``, and the file's content hash."""
    import importlib.util
    path_s, _, attr = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise SimcostError(f"no file '{path_s}' (for --model {spec})")
    src = path.read_bytes()
    digest = hashlib.sha256(src + b"\0" + attr.encode()).hexdigest()
    mod_name = f"simcost_factory_{digest[:16]}"
    loader = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 -- the user's file, whatever it raises
        raise SimcostError(f"{path_s} failed to import: {type(e).__name__}: "
                           f"{' '.join(str(e).split())}") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        from simcost.errors import closest
        names = [n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == mod_name]
        raise SimcostError(f"{path_s} has no function '{attr}'{closest(attr, names)}")
    return fn, digest


def call_factory(fn, spec: str, device: str) -> dict:
    import torch
    try:
        with torch.device(device):
            out = fn()
    except Exception as e:  # noqa: BLE001
        raise SimcostError(f"{spec} raised {type(e).__name__}: {' '.join(str(e).split())}") \
            from None
    return check_result(out, spec)


def check_result(out, spec: str) -> dict:
    import torch
    if not isinstance(out, dict):
        raise SimcostError(f"{spec} must return a dict with 'module', 'inputs' and 'dims', "
                           f"not {type(out).__name__}")
    missing = [k for k in ("module", "inputs", "dims") if k not in out]
    if missing:
        raise SimcostError(f"{spec} returned no '{missing[0]}' (it must return 'module', "
                           f"'inputs' and 'dims')")
    if not isinstance(out["module"], torch.nn.Module):
        raise SimcostError(f"{spec}: 'module' must be a torch.nn.Module")
    inputs, dims = out["inputs"], out["dims"]
    if not isinstance(inputs, dict) or not inputs:
        raise SimcostError(f"{spec}: 'inputs' must be a non-empty dict of example inputs")
    if not isinstance(dims, dict) or "batch" not in dims:
        raise SimcostError(f"{spec}: 'dims' must map size names to (input, axis) pairs and "
                           f"name 'batch'")
    for name, where in dims.items():
        for pair in where:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise SimcostError(f"{spec}: dims['{name}'] must list (input, axis) pairs")
            inp, axis = pair
            t = inputs.get(inp)
            if not isinstance(t, torch.Tensor):
                raise SimcostError(f"{spec}: dims['{name}'] names input '{inp}', which is not "
                                   f"a tensor of 'inputs'")
            if not isinstance(axis, int) or not -t.dim() <= axis < t.dim():
                raise SimcostError(f"{spec}: dims['{name}'] axis {axis} is not an axis of "
                                   f"'{inp}' (shape {tuple(t.shape)})")
    if out.get("loss") is not None and not callable(out["loss"]):
        raise SimcostError(f"{spec}: 'loss' must be a function (output, inputs) -> loss")
    return out


def factory_task(spec: str) -> TracedTask:
    from simcost.trace.task import require_torch
    require_torch("--model file.py:factory")
    fn, digest = load_factory(spec)
    probe = call_factory(fn, spec, "meta")
    dims = tuple(probe["dims"])
    example = {d: _example_size(probe, d) for d in dims}
    named = tuple(d for d in dims if d in CLI_DIMS)
    fixed = {d: example[d] for d in dims if d not in CLI_DIMS}
    shapes = {k: (tuple(t.shape), t.dtype) for k, t in probe["inputs"].items()
              if _is_tensor(t)}
    plain = {k: v for k, v in probe["inputs"].items() if not _is_tensor(v)}
    axes = {d: [(inp, ax % len(shapes[inp][0])) for inp, ax in probe["dims"][d]] for d in dims}

    built = {"dtype": None}       # the dtype of the last build: float inputs follow it

    def build(dtype, device):
        import torch
        from simcost.trace.task import TORCH_DTYPE
        out = call_factory(fn, spec, device)
        built["dtype"] = dtype
        return out["module"].to(getattr(torch, TORCH_DTYPE[dtype]))

    def inputs(sizes, peft_type):
        import torch
        made = {}
        for k, (shape, dt) in shapes.items():
            dims_k = list(shape)
            for d, where in axes.items():
                for inp, ax in where:
                    if inp == k:
                        dims_k[ax] = sizes.get(d, fixed.get(d))
            made[k] = torch.zeros(*dims_k, dtype=dt)
        return weights_dtype_inputs({**made, **plain}, built["dtype"])

    user_loss = probe.get("loss")
    return TracedTask(name=str(probe.get("name") or spec), kind="custom", dims=named + tuple(fixed),
                      build=build, inputs=inputs, key=f"factory:{digest}",
                      static=tuple(fixed), defaults={**fixed, **{d: example[d] for d in named
                                                               if d not in ("batch", "seq")}},
                      loss=user_loss)


def _is_tensor(x) -> bool:
    import torch
    return isinstance(x, torch.Tensor)


def _example_size(probe: dict, dim: str) -> int:
    sizes = {int(probe["inputs"][inp].shape[ax]) for inp, ax in probe["dims"][dim]}
    if len(sizes) != 1:
        raise SimcostError(f"dims['{dim}'] names axes of different sizes in the example "
                           f"inputs: {sorted(sizes)}")
    return sizes.pop()
