"""The warm path (structures re-used, step numbers from a compiled trace: simcost.sim.compiled)
gives every number of the plain pipeline, bit for bit, at configurations it never saw."""
from __future__ import annotations

import json

import numpy as np
import pytest

import simcost.api as api
from simcost.sim.symbolic import Untraceable, trace

# (model, hardware, options); every one is priced at POINTS after a first call elsewhere
CONFIGS = [
    ("llama-2-7b", "a100-80gb-sxm", dict(peft="lora", rank=16)),
    ("llama-2-7b", "a100-80gb-sxm", dict(peft="lora", rank=16, grad_checkpointing="full")),
    ("llama-2-7b", "h100-sxm", dict(peft="lora", rank=8, grad_checkpointing="selective")),
    ("llama-2-7b", "h100-sxm", dict(peft="qlora", rank=16)),
    ("llama-2-7b", "a100-80gb-sxm", dict(peft="dora", rank=16, grad_checkpointing=True)),
    ("llama-2-7b", "a100-80gb-sxm", dict(peft="full", dtype="fp32", mixed_precision="bf16")),
    ("llama-2-7b", "h100-sxm", dict(peft="prefix", num_virtual_tokens=20)),
    ("llama-2-7b", "a100-80gb-sxm", dict(peft="lora", attn="eager")),
    ("llama-2-7b", "a100-80gb-sxm", dict(peft="lora", attn="flash", stack="unsloth")),
    ("llama-2-7b", "a100-80gb-sxm", dict(peft="lora", loss_chunks=8,
                                         optimizer_in_backward=True, stack="torchtune")),
    ("llama-2-7b", "a100-80gb-sxm", dict(peft="lora", optimizer="mezo")),
    ("mixtral-8x7b", "h100-sxm", dict(peft="lora", rank=16)),
    ("qwen2.5-0.5b", "rtx-4090", dict(peft="full", optimizer="sgd",
                                      grad_checkpointing="selective")),
    ("gpt2", "cpu-generic", dict(peft="lora", dtype="fp32")),
    ("gpt2", "cpu-generic", dict(peft="full", dtype="fp32", grad_checkpointing="full")),
    ("qwen2.5-0.5b", "cpu-generic", dict(peft="prefix", num_virtual_tokens=8, dtype="fp32")),
    ("llama-3.2-1b", "apple-m2-ultra", dict(peft="ia3", grad_checkpointing="full")),
]
POINTS = [(1, 128), (1, 1000), (2, 128), (3, 257), (8, 1000), (5, 31), (1, 17), (16, 512)]


def _dump(r) -> str:
    return json.dumps(r.model_dump_public(), sort_keys=True, default=repr)


def _plain(monkeypatch, model, hw, b, s, kw) -> str:
    with monkeypatch.context() as m:
        m.setattr(api, "CACHE_STRUCTURES", False)
        return _dump(api.estimate_train(model, hw, batch=b, seq=s, **kw))


@pytest.mark.parametrize("model,hw,kw", CONFIGS, ids=lambda x: str(x)[:40])
def test_warm_estimates_equal_the_plain_pipeline(monkeypatch, model, hw, kw):
    api.clear_caches()
    for b0 in (1, 4):                       # trace each structure away from the points below
        api.estimate_train(model, hw, batch=b0, seq=77, **kw)
    for b, s in POINTS:
        warm = _dump(api.estimate_train(model, hw, batch=b, seq=s, **kw))
        assert warm == _plain(monkeypatch, model, hw, b, s, kw), (b, s)


# structures whose pipeline a trace cannot follow (priced by the plain pipeline every call)
NOT_COMPILED = {"loss_chunks"}     # the chunk sizes come from np.asarray(tokens)


@pytest.mark.parametrize("model,hw,kw", [c for c in CONFIGS if not NOT_COMPILED & set(c[2])],
                         ids=lambda x: str(x)[:40])
def test_structures_are_compiled(model, hw, kw):
    """The warm path really is the compiled one (else the test above would compare the plain
    pipeline with itself)."""
    api.clear_caches()
    api.estimate_train(model, hw, batch=4, seq=77, **kw)
    api.estimate_train(model, hw, batch=5, seq=99, **kw)
    (st,) = api._STRUCTURES.values()
    assert st.numbers.traceable and st.numbers.programs


def test_a_branch_taken_otherwise_traces_again():
    """A guarded branch that goes the other way returns None; the numbers come from a second
    program, and both replay the plain function exactly."""
    def f(b, s):
        x = b * s / 3
        return [x * 2 if x > 100 else np.maximum(x, 7.5) + 1, s - b]

    for args in ((100, 11), (2, 3)):
        _, values, prog = trace(f, args, lambda r: r)
        assert values == f(*args) == list(prog(*args))
        other = (2, 3) if args == (100, 11) else (100, 11)
        assert prog(*other) is None
    _, _, prog = trace(f, (100, 11), lambda r: r)
    for b, s in ((70, 300), (9, 12345), (100, 4)):
        got = prog(b, s)
        assert got is not None and list(got) == f(b, s)
        assert [type(v) for v in got] == [type(v) for v in f(b, s)]


@pytest.mark.parametrize("bad", [float, int, str, lambda v: {v: 1}, np.asarray,
                                 lambda v: np.where(v > 1, v, 1)])
def test_what_a_replay_cannot_repeat_is_refused(bad):
    with pytest.raises(Untraceable):
        trace(lambda b, s: [bad(b * s)], (3, 4), lambda r: r)
