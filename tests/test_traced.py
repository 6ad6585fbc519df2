"""The traced front end against torch, exactly: a step recorded once under fake tensors with
symbolic sizes, priced at other sizes, equals a real CPU step at those sizes (peft's
trainable and total parameters, FlopCounterMode's matmul FLOPs per phase, the storages
autograd keeps alive at the end of forward). The CI runs a subset of the tuner x architecture
matrix; ``pytest -m slow`` runs all of it."""
import numpy as np
import pytest

pytest.importorskip("peft")

from simcost.errors import SimcostError  # noqa: E402
from simcost.validate import traced  # noqa: E402

pytestmark = pytest.mark.torch

# one tuner per architecture besides LoRA, and the decoder's token and parameter targeting
SUBSET = {("llama-gqa", m) for m in ("lora", "loha", "prefix", "prompt", "lora_fq", "lora_layers",
                                     "lora_params", "trainable_tokens")} | {
    ("bert-cls", "lora"), ("bert-cls", "boft"), ("roberta-mlm", "ia3"), ("t5", "lora"),
    ("t5", "vera"), ("vit", "lora"), ("vit", "oft")}
ALL = list(traced.traced_cases())


def _params(cases, subset):
    out = []
    for m, meth, pc in cases:
        marks = () if (m, meth) in subset else (pytest.mark.slow,)
        out.append(pytest.param(m, meth, pc, id=f"{m}-{meth}", marks=marks))
    return out


@pytest.mark.parametrize("model,method,peft_config", _params(ALL, SUBSET))
def test_traced_step_is_exact(model, method, peft_config):
    r = traced.run_traced_case(model, method, peft_config)
    assert r.ok, r.mismatches()


def test_subset_is_in_the_matrix():
    names = {(m, meth) for m, meth, _ in ALL}
    assert SUBSET <= names


def _trace(model="llama-gqa", method="lora", hints=None):
    from simcost.trace.build import trace_config
    cfg, h, _ = traced.CONFIGS[model]
    return trace_config(cfg, traced.adapter_configs(model)[method], dtype="fp32",
                        hints=hints or h)


def test_one_trace_prices_a_sweep():
    from simcost.trace.price import Pricer
    pr = Pricer(_trace())
    b = np.array([2, 4, 8])
    s = np.array([7, 64, 300])
    vec = pr.price(batch=b, seq=s)
    for i in range(3):
        one = pr.price(batch=int(b[i]), seq=int(s[i]))
        assert vec.fwd_matmul_flops[i] == one.fwd_matmul_flops
        assert vec.bwd_matmul_flops[i] == one.bwd_matmul_flops
        assert vec.saved_bytes[i] == one.saved_bytes
    assert not vec.unpriced, vec.unpriced


def test_one_layer_of_each_kind_is_traced():
    """5 decoder layers, LoRA in all: the first layer (a frozen embedding below it) and one
    standing for the other four; with layers_to_transform [2, 3] and a rank pattern on layer
    3: layer 0, layer 1 (frozen, no gradient enters), 2, 3 (their own ranks and gradient
    states) and 4 (frozen, a gradient enters)."""
    assert sorted(_trace().counts.values()) == [1, 4]
    assert sorted(_trace(method="lora_layers").counts.values()) == [1, 1, 1, 1, 1]
    assert sorted(_trace("t5").counts.values()) == [1, 1, 2, 2]      # encoder and decoder


def test_weight_gradient_split():
    """LoRA on q/v: the weight-gradient GEMMs are those of the adapters (plus none of the
    frozen base), so they are a small part of the backward."""
    from simcost.trace.price import Pricer
    p = Pricer(_trace()).price(batch=2, seq=7)
    assert 0 < p.bwd_weight_matmul_flops < p.bwd_act_matmul_flops


def test_specialised_size_is_refused():
    """peft's prompt tuning pads the labels, which needs a concrete batch: the recording holds
    only for the batch it was traced at, and says so instead of extrapolating."""
    tr = _trace(method="prompt", hints={"batch": 3, "seq": 11})
    assert tr.specialized.get("batch") == 3
    with pytest.raises(SimcostError, match="fixed batch to 3"):
        tr.saved_bytes(batch=2, seq=tr.specialized.get("seq", 11))
    assert tr.saved_bytes(batch=3, seq=11) > 0


def test_bad_adapter_config_is_one_line():
    from simcost.trace.build import trace_config
    cfg, h, _ = traced.CONFIGS["llama-gqa"]
    with pytest.raises(SimcostError, match="peft refuses this adapter config") as e:
        trace_config(cfg, {"peft_type": "LORA", "r": 4, "target_modules": ["nope"]}, hints=h)
    assert "\n" not in str(e.value)


def test_unknown_task_and_missing_size():
    from simcost.trace.build import trace_config
    cfg, h, _ = traced.CONFIGS["llama-gqa"]
    with pytest.raises(SimcostError, match="builds the heads"):
        trace_config({**cfg, "architectures": ["LlamaModel"]}, None, hints=h)
    with pytest.raises(SimcostError, match="missing: seq"):
        trace_config(cfg, None, hints={"batch": 2})

    # torch specialises a size of 1: the recording is made at that size and holds for it only
    tr = trace_config(cfg, None, hints={"batch": 1, "seq": 8})
    assert tr.specialized.get("batch") == 1
    with pytest.raises(SimcostError, match="fixed batch to 1"):
        tr.check(batch=2, seq=8)
