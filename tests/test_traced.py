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

# one tuner per architecture besides LoRA, the decoder's token and parameter targeting, and
# two tuners that need the workarounds (C3A: FFTs of symbolic sizes; SHiRA: a mask built on the
# CPU, a sparse delta weight saved for backward)
SUBSET = {("llama-gqa", m) for m in ("lora", "loha", "prefix", "prompt", "lora_fq", "lora_layers",
                                     "lora_params", "trainable_tokens", "c3a", "shira")} | {
    ("bert-cls", "lora"), ("bert-cls", "boft"), ("roberta-mlm", "ia3"), ("t5", "lora"),
    ("t5", "vera"), ("vit", "lora"), ("vit", "oft")}
# the diffusers denoisers' cases are tests/test_traced_diffusion.py's
ALL = list(traced.traced_cases([m for m in traced.CONFIGS if m not in traced.DIFFUSION]))


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


def test_every_peft_tuner_is_traced_or_a_gap():
    """Each tuner peft names (peft.PeftType) is in the matrix or among the gaps, with a reason."""
    import peft
    traced_types = {pc["peft_type"] for _, _, pc in ALL}
    gaps = {k.upper() for k in traced.GAPS}
    missing = {t.value for t in peft.PeftType} - traced_types - gaps
    assert not missing, missing
    assert not gaps & traced_types
    assert all(len(why) > 40 for why in traced.GAPS.values())


@pytest.mark.parametrize("shape,op", [
    ((3, 7, 16), lambda x: __import__("torch").fft.rfft(x, dim=-1)),
    ((3, 7, 16), lambda x: __import__("torch").fft.ifft(x.transpose(0, 2), dim=0)),
    ((3, 7, 16), lambda x: __import__("torch").fft.irfft(__import__("torch").fft.rfft(x), dim=-1)),
    ((3, 8, 16), lambda x: __import__("torch").fft.rfft2(x.transpose(1, 2))),
    ((3, 8, 16), lambda x: __import__("torch").fft.ifft2(x + 0j).real),
], ids=["rfft", "ifft-strided", "irfft", "rfft2", "ifft2"])
def test_fft_fake_kernels_match_the_real_kernels(shape, op):
    """Under symbolic sizes, the FFTs' fake outputs have the real kernels' sizes and strides,
    and no size is specialised (torch's own meta kernels fail or specialise here)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from simcost.trace.record import make_symbols
    from simcost.trace.workarounds import fake_kernels
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    sizes = make_symbols(env, {"b": shape[0], "s": shape[1]})
    with mode, fake_kernels():
        y = op(torch.empty(sizes["b"], sizes["s"], shape[2]))
        fake = ([int(s) if not isinstance(s, torch.SymInt) else s.node.hint for s in y.shape],
                [s.node.hint if isinstance(s, torch.SymInt) else s for s in y.stride()])
    real = op(torch.randn(*shape))
    assert fake == (list(real.shape), list(real.stride()))
    assert not env.replacements


def test_fft_cost_formulas():
    """5·N·log2(N) per complex transform, 2.5·N·log2(N) per real-data one (FFTW's count);
    bytes: input and output once; no matmul FLOPs."""
    from simcost.trace.aten_costs import TMeta, aten_cost
    x = TMeta((4, 6, 16), "c64")
    c, ok = aten_cost("aten._fft_c2c.default", (x, [2], 0, True), {}, (x,))
    assert ok and c.flops == 4 * 6 * 5 * 16 * 4 and c.matmul_flops == 0
    assert c.bytes == 2 * 4 * 6 * 16 * 8
    r = TMeta((4, 6, 16), "fp32")
    half = TMeta((4, 6, 9), "c64")
    c, _ = aten_cost("aten._fft_r2c.default", (r, [2], 0, True), {}, (half,))
    assert c.flops == 4 * 6 * 2.5 * 16 * 4 and c.bytes == r.nbytes + half.nbytes
    c, _ = aten_cost("aten._fft_c2r.default", (half, [2], 0, 16), {}, (r,))
    assert c.flops == 4 * 6 * 2.5 * 16 * 4
    c, _ = aten_cost("aten._fft_c2c.default", (TMeta((8, 8), "c64"), [0, 1], 0, True), {},
                     (TMeta((8, 8), "c64"),))
    assert c.flops == 5 * 64 * 6                      # one 2-D transform of 64 points


def test_workarounds_undo_themselves():
    """Outside a build or a recording, peft's and torch's functions are their own again."""
    import torch
    from peft.tuners.poly.router import PolyRouter
    from peft.tuners.shira.model import ShiraModel
    from torch._subclasses import fake_impls

    from simcost.trace import workarounds
    before = (PolyRouter.forward, ShiraModel._create_and_replace, torch.Tensor.item,
              torch.Tensor.__bool__, list(fake_impls.op_implementations_checks))
    with workarounds.tracing(), workarounds.building():
        assert PolyRouter.forward is not before[0]
        assert len(fake_impls.op_implementations_checks) == len(before[4]) + 1
    after = (PolyRouter.forward, ShiraModel._create_and_replace, torch.Tensor.item,
             torch.Tensor.__bool__, list(fake_impls.op_implementations_checks))
    assert after == before


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
    from simcost.trace.price import Pricer
    tr = _trace(method="prompt", hints={"batch": 3, "seq": 11})
    assert tr.specialized.get("batch") == 3
    pr = Pricer(tr)
    with pytest.raises(SimcostError, match="fixed batch to 3"):
        pr.price(batch=2, seq=tr.specialized.get("seq", 11))
    assert pr.price(batch=3, seq=11).saved_bytes > 0


def test_bad_adapter_config_is_one_line():
    from simcost.trace.build import trace_config
    cfg, h, _ = traced.CONFIGS["llama-gqa"]
    with pytest.raises(SimcostError, match="peft refuses this adapter config") as e:
        trace_config(cfg, {"peft_type": "LORA", "r": 4, "target_modules": ["q_prj"]}, hints=h)
    assert "\n" not in str(e.value)
    assert "did you mean: q_proj" in str(e.value) and "down_proj" in str(e.value)


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
    from simcost.trace.compiled import compile_trace
    with pytest.raises(SimcostError, match="fixed batch to 1"):
        compile_trace(tr).check({"batch": 2, "seq": 8})
