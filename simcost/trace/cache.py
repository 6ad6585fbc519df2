"""The trace cache: a recorded step, compiled (:class:`~simcost.trace.compiled.CompiledTrace`),
kept in memory and on disk, so a repeated request costs a file read, not a trace.

The key is everything that changes what torch records: the model (its canonical config, or
the factory file's content), the adapter config, the weights' dtype and the autocast dtype,
the attention implementation, checkpointing, the sizes traced as concrete values (a size of 1,
a ViT's image size) and the versions of simcost's tracer (its source files), torch,
transformers, peft and diffusers. Sizes traced symbolically are not in the key: the recording
holds for every value its guards allow, and a request its guards refuse is traced again.

Where: ``$SIMCOST_CACHE_DIR``, else ``$XDG_CACHE_HOME/simcost/traces``, else
``~/.cache/simcost/traces``. Entries are pickles written atomically; one that cannot be read
is traced again and rewritten. ``--no-trace-cache`` (``trace_cache=False``) bypasses both
caches. Only point the cache at a directory you trust: a pickle runs code when read.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from functools import lru_cache
from pathlib import Path

FORMAT = 1
_MEMORY: dict = {}
_MEMORY_MAX = 64


def cache_dir() -> Path:
    d = os.environ.get("SIMCOST_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "simcost" / "traces"


@lru_cache(maxsize=1)
def _versions() -> dict:
    """The versions a recording depends on (simcost's tracer by its sources' hash)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"format": FORMAT}
    h = hashlib.sha256()
    for f in sorted((Path(__file__).parent).glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    out["tracer"] = h.hexdigest()[:16]
    for pkg in ("torch", "transformers", "peft", "diffusers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def trace_key(task_key: str, peft_config, **options) -> str:
    blob = json.dumps({"model": task_key, "peft": peft_config, "options": options,
                       "versions": _versions()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def get(key: str):
    ct = _MEMORY.get(key)
    if ct is not None:
        return ct
    path = cache_dir() / f"{key}.pkl"
    try:
        with open(path, "rb") as f:
            ct = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError,
            TypeError, ValueError):
        return None
    _remember(key, ct)
    return ct


def put(key: str, ct) -> None:
    _remember(key, ct)
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{key}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(ct, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, d / f"{key}.pkl")
    except OSError:
        pass          # a read-only or full disk: the in-memory entry still serves


def _remember(key: str, ct) -> None:
    if len(_MEMORY) >= _MEMORY_MAX:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[key] = ct
