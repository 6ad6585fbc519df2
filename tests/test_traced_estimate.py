"""``estimate train`` through the traced front end: one truth with the hand-built graphs, the
request's sizes, the CLI, the cache, sweeps, and one-line refusals."""
import json

import numpy as np
import pytest

pytest.importorskip("peft")

from simcost.cli import main  # noqa: E402
from simcost.errors import SimcostError  # noqa: E402
from simcost.peft.spec import PeftSpec  # noqa: E402
from simcost.validate import traced  # noqa: E402

pytestmark = pytest.mark.torch

METHODS = {"full": PeftSpec("full"), "lora": PeftSpec("lora", r=8, alpha=16),
           "dora": PeftSpec("lora", r=8, alpha=16, dora=True), "ia3": PeftSpec("ia3"),
           "prefix": PeftSpec("prefix", num_virtual_tokens=5),
           "prompt": PeftSpec("prompt", num_virtual_tokens=5), "ln_tuning": PeftSpec("ln_tuning")}
# zoo models both paths build (Qwen v1 is remote code transformers does not ship)
ZOO = ("llama-3.2-1b", "qwen2.5-0.5b", "gpt2", "llama-2-7b", "mistral-7b", "llama-3.1-8b",
       "qwen2.5-7b", "mixtral-8x7b", "gpt2-xl", "llama-3.2-3b")
CI = {("llama-3.2-1b", "lora"), ("qwen2.5-0.5b", "dora"), ("gpt2", "ia3"),
      ("llama-3.2-1b", "prefix")}


def _one_truth_cases():
    for m in ZOO:
        for meth in METHODS:
            yield pytest.param(m, meth, id=f"{m}-{meth}",
                               marks=() if (m, meth) in CI else (pytest.mark.slow,))


@pytest.mark.parametrize("model,method", list(_one_truth_cases()))
def test_one_truth(model, method):
    """The hand-built graph and the traced one agree exactly: trainable and total parameters,
    matmul FLOPs per phase, the bytes autograd keeps."""
    from simcost import pipeline
    from simcost.models.config import load_model
    from simcost.trace.build import task_for
    from simcost.trace.estimate import compiled_step
    from simcost.trace.price import price
    spec = METHODS[method]
    b, s = 2, 64
    g, a = pipeline.build_graph(load_model(model), b, s, dtype="bf16", attn="sdpa", peft=spec,
                                device_kind="cpu")
    from simcost.trace.estimate import adapter_config
    from simcost.request.train import TrainRequest
    req = TrainRequest.from_call(model, "cpu-generic", batch=b, seq=s, peft=spec)
    task = task_for(model)
    pc = adapter_config(req, task.kind, task.model_type)[0]

    def step(sizes):
        return compiled_step(task, pc, dtype="bf16", autocast=None, attn="sdpa",
                             checkpointing=False, sizes=sizes)
    ct = step({"batch": 3, "seq": 37})       # traced at other sizes
    if ct.specialized:                        # prompt tuning pads the labels: batch fixed
        ct = step({"batch": b, "seq": s})
    p = price(ct, batch=b, seq=s)
    assert ct.params_trainable == sum(p_.numel * c for p_, c in g.params() if p_.trainable)
    assert ct.params_total == sum(p_.numel * c for p_, c in g.params())
    assert p.fwd_matmul_flops == a.total("fwd_matmul_flops")
    assert p.bwd_matmul_flops == a.total("bwd_act_matmul_flops") + \
        a.total("bwd_weight_matmul_flops")
    assert p.saved_bytes == a.activations_bytes


def test_estimate_agrees_with_the_analytic_one():
    """Same model, method and sizes through both front ends: the same parameters, FLOPs and
    peak; the traced estimate says which front end priced it."""
    from simcost.api import estimate_train
    kw = dict(batch=2, seq=256, peft="lora", rank=8)
    a = estimate_train("llama-3.2-1b", "a100-80gb-sxm", frontend="analytic", **kw)
    t = estimate_train("llama-3.2-1b", "a100-80gb-sxm", frontend="traced", **kw)
    assert (a.frontend, t.frontend) == ("analytic", "traced")
    assert t.params == a.params
    assert t.flops["matmul_forward"] == a.flops["matmul_forward"]
    assert t.flops["matmul_backward"] == a.flops["matmul_backward"]
    assert t.memory_bytes["peak"] == pytest.approx(a.memory_bytes["peak"], rel=1e-3)
    assert t.fits == a.fits and t.unpriced_ops is None


def _tiny(tmp_path, name):
    cfg = traced.CONFIGS[name][0]
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _run(capsys, *argv):
    rc = main(["estimate", "train", "--hardware", "cpu-generic", "--json", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else None), err


def test_cli_auto_picks_traced_for_an_encoder(tmp_path, capsys):
    rc, d, err = _run(capsys, "--model", _tiny(tmp_path, "bert-cls"), "--batch", "2",
                      "--seq", "16", "--peft", "lora")
    assert rc == 0, err
    assert d["frontend"] == "traced" and d["sizes"] == {"batch": 2, "seq": 16}
    assert "BertForSequenceClassification is beyond the hand-built graphs" in err
    assert d["params"]["trainable"] > 0 and d["tokens_per_s"] > 0
    assert sum(v for k, v in d["memory_bytes"].items() if k in (
        "weights", "master_weights", "optimizer", "temporaries", "runtime_overhead",
        "activations", "loss_transient")) == pytest.approx(d["memory_bytes"]["peak_allocated"]
                                                            + d["memory_bytes"]["runtime_overhead"])


def test_cli_sizes_per_model_kind(tmp_path, capsys):
    vit = _tiny(tmp_path, "vit")
    rc, d, err = _run(capsys, "--model", vit, "--batch", "2")
    assert rc == 0, err
    assert d["sizes"] == {"batch": 2, "image": 32} and d["seq"] is None
    assert "tokens_per_s" not in d and d["samples_per_s"] > 0
    rc, _, err = _run(capsys, "--model", vit, "--batch", "2", "--seq", "8")
    assert rc == 2 and "--seq does not apply" in err and err.count("\n") == 1
    t5 = _tiny(tmp_path, "t5")
    rc, d, err = _run(capsys, "--model", t5, "--batch", "2", "--seq", "9", "--target-seq", "5")
    assert rc == 0 and d["sizes"] == {"batch": 2, "seq": 9, "target_seq": 5}, err
    rc, d, err = _run(capsys, "--model", t5, "--batch", "2", "--seq", "9")
    assert rc == 0 and d["sizes"]["target_seq"] == 9
    rc, _, err = _run(capsys, "--model", _tiny(tmp_path, "bert-cls"), "--batch", "2")
    assert rc == 2 and "needs --seq" in err


@pytest.mark.parametrize("extra,needle", [
    (["--devices", "2"], "no device interconnect"),     # a CPU profile: one device
    (["--devices", "2", "--tp", "2"], "--tp needs the model's module roles"),
    (["--peft", "bitfit"], "not a peft tuner"),
    (["--checkpointing", "selective"], "selective"),
    (["--optimizer", "mezo"], "mezo"),
])
def test_traced_refuses_what_it_does_not_price(tmp_path, capsys, extra, needle):
    rc, _, err = _run(capsys, "--model", _tiny(tmp_path, "bert-cls"), "--batch", "2",
                      "--seq", "8", *extra)
    assert rc == 2 and needle in err and err.count("\n") == 1, err


def test_analytic_refuses_traced_sizes(capsys):
    rc, _, err = _run(capsys, "--model", "llama-3.2-1b", "--batch", "2", "--seq", "8",
                      "--image-size", "32", "--frontend", "analytic")
    assert rc == 2 and "--image-size applies to" in err


def test_factory_errors_are_one_line(tmp_path, capsys):
    f = tmp_path / "m.py"
    f.write_text("def factory():\n    return 3\n")
    rc, _, err = _run(capsys, "--model", f"{tmp_path}/missing.py:factory", "--batch", "2")
    assert rc == 2 and "no file" in err
    rc, _, err = _run(capsys, "--model", f"{f}:factroy", "--batch", "2")
    assert rc == 2 and "did you mean: factory" in err
    rc, _, err = _run(capsys, "--model", f"{f}:factory", "--batch", "2")
    assert rc == 2 and "must return a dict" in err and err.count("\n") == 1


def test_factory_module_is_traced(tmp_path, capsys):
    f = tmp_path / "mlp.py"
    f.write_text('''
import torch
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.head = torch.nn.Linear(16, 4)
    def forward(self, x, y):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return torch.nn.functional.cross_entropy(self.head(x).flatten(0, 1), y.flatten())
def factory():
    return {"module": M(), "inputs": {"x": torch.zeros(2, 5, 16),
                                      "y": torch.zeros(2, 5, dtype=torch.long)},
            "dims": {"batch": [("x", 0), ("y", 0)], "seq": [("x", 1), ("y", 1)]}}
''')
    rc, d, err = _run(capsys, "--model", f"{f}:factory", "--batch", "3", "--seq", "7",
                      "--dtype", "fp32")
    assert rc == 0, err
    # (16*16+16)*3 + 16*4+4: all trainable
    assert d["params"]["trainable"] == d["params"]["total"] == 884
    # forward matmuls: 3 layers of 2*21*16*16 plus the head 2*21*16*4
    assert d["flops"]["matmul_forward"] == 3 * 2 * 21 * 16 * 16 + 2 * 21 * 16 * 4


def test_cache_reuses_a_recording(tmp_path, monkeypatch):
    from simcost.api import estimate_train
    from simcost.trace import build, cache
    monkeypatch.setenv("SIMCOST_CACHE_DIR", str(tmp_path / "cache"))
    model = _tiny(tmp_path, "llama-gqa")
    kw = dict(batch=2, seq=8, peft="lora", frontend="traced", dtype="fp32")
    first = estimate_train(model, "cpu-generic", **kw)
    assert list((tmp_path / "cache").glob("*.pkl"))
    cache._MEMORY.clear()

    def no_trace(*a, **k):
        raise AssertionError("traced again")
    monkeypatch.setattr(build, "trace_task", no_trace)
    again = estimate_train(model, "cpu-generic", **{**kw, "batch": 5})   # a disk hit
    assert again.params == first.params and again.flops["forward"] > first.flops["forward"]
    with pytest.raises(AssertionError, match="traced again"):             # another adapter
        estimate_train(model, "cpu-generic", **{**kw, "rank": 4})
    with pytest.raises(AssertionError, match="traced again"):             # cache refused
        estimate_train(model, "cpu-generic", **{**kw, "trace_cache": False})


def test_sweep_on_a_traced_graph(tmp_path):
    """One recording prices the grid; every point equals the estimate there (batch 1 comes
    from a recording of its own)."""
    from simcost.api import estimate_train, sweep_train
    model = _tiny(tmp_path, "llama-gqa")
    kw = dict(peft="lora", frontend="traced", dtype="fp32")
    s = sweep_train(model, "cpu-generic", batches=[1, 2, 5], seqs=[4, 9], **kw)
    assert s["frontend"] == "traced" and s["step_s"].shape == (3, 2)
    for i, b in enumerate([1, 2, 5]):
        for j, q in enumerate([4, 9]):
            r = estimate_train(model, "cpu-generic", batch=b, seq=q, **kw)
            assert s["step_s"][i, j] == pytest.approx(r.time_s["step"], rel=1e-9)
            assert s["peak_bytes"][i, j] == pytest.approx(r.memory_bytes["peak"], rel=1e-9)
    assert np.all(np.diff(s["peak_bytes"], axis=0) > 0)


def test_size_one_is_its_own_recording(tmp_path):
    from simcost.trace.build import task_for
    from simcost.trace.estimate import compiled_step
    task = task_for(traced.CONFIGS["llama-gqa"][0])
    ct = compiled_step(task, None, dtype="fp32", autocast=None, attn="sdpa",
                       checkpointing=False, sizes={"batch": 1, "seq": 8}, use_cache=False)
    assert ct.specialized["batch"] == 1
    with pytest.raises(SimcostError, match="fixed batch to 1"):
        ct.check({"batch": 2, "seq": 8})


def test_data_parallel_on_a_traced_graph(tmp_path):
    """DDP, ZeRO-1/2/3 over 4 ranks: a rank's work is the single-device step at its batch,
    plus the collectives; each ZeRO stage shards one more kind of state."""
    from simcost.api import estimate_train
    model = _tiny(tmp_path, "bert-cls")
    kw = dict(seq=16, peft="lora", frontend="traced", dtype="fp32")
    one = estimate_train(model, "a100-80gb-sxm", batch=2, **kw)
    z = {s: estimate_train(model, "a100-80gb-sxm", batch=8, devices=4, zero=s, **kw)
         for s in (0, 1, 2, 3)}
    m0 = z[0].memory_bytes
    assert m0["activations"] == one.memory_bytes["activations"]
    assert z[0].time_s["step"] > one.time_s["step"]            # the all-reduce
    assert z[1].memory_bytes["optimizer"] == pytest.approx(m0["optimizer"] / 4)
    assert z[2].memory_bytes["gradients"] == pytest.approx(m0["gradients"] / 4)
    assert z[3].memory_bytes["weights"] < m0["weights"]
    assert z[3].parallel["plan"]["zero"] == 3 and z[3].parallel["communication_s"]["zero3_s"] > 0
    auto = estimate_train(model, "a100-80gb-sxm", batch=8, devices=4, parallel="auto", **kw)
    assert auto.fits and auto.parallel["plans_searched"] == 4 * 2      # zero 0-3 x micro-batch 1, 2
    assert auto.time_s["step"] <= min(r.time_s["step"] for r in z.values())   # the fastest


@pytest.mark.parametrize("extra,needle", [({"tp": 2}, "--tp needs the model's module roles"),
                                          ({"offload": "optimizer"}, "--offload"),
                                          ({"micro_batch": 3}, "does not divide")])
def test_traced_parallel_refusals(tmp_path, extra, needle):
    from simcost.api import estimate_train
    with pytest.raises(SimcostError, match=needle):
        estimate_train(_tiny(tmp_path, "bert-cls"), "a100-80gb-sxm", batch=8, seq=16,
                       devices=2, frontend="traced", **extra)


def test_quantised_base_under_any_tuner():
    """QLoRA through the traced front end equals the hand-built qlora in memory and FLOPs;
    the NF4 base combines with DoRA (refused by the analytic path)."""
    from simcost.api import estimate_train
    kw = dict(batch=2, seq=128, rank=16, targets="all-linear")
    a = estimate_train("llama-3.2-1b", "a100-80gb-sxm", peft="qlora", frontend="analytic", **kw)
    auto = estimate_train("llama-3.2-1b", "a100-80gb-sxm", peft="lora", quantize="nf4", **kw)
    assert auto.frontend == "analytic" and auto.peft["method"] == "qlora"   # LoRA + NF4 = QLoRA
    t = estimate_train("llama-3.2-1b", "a100-80gb-sxm", peft="lora", quantize="nf4",
                       frontend="traced", **kw)
    assert t.peft["quantize"] == "nf4"
    assert t.memory_bytes["weights"] == pytest.approx(a.memory_bytes["weights"])
    assert t.memory_bytes["temporaries"] == pytest.approx(a.memory_bytes["temporaries"])
    assert t.flops["matmul_forward"] == a.flops["matmul_forward"]
    d = estimate_train("llama-3.2-1b", "a100-80gb-sxm", peft="dora", quantize="nf4", **kw)
    plain = estimate_train("llama-3.2-1b", "a100-80gb-sxm", peft="dora", **kw)
    assert d.frontend == "traced"
    assert d.memory_bytes["weights"] < 0.5 * plain.memory_bytes["weights"]   # embeddings stay
    assert d.time_s["step"] > plain.time_s["step"]                  # dequantisation
    with pytest.raises(SimcostError, match="analytic path models QLoRA"):
        estimate_train("llama-3.2-1b", "a100-80gb-sxm", peft="dora", quantize="nf4",
                       frontend="analytic", **kw)


@pytest.mark.parametrize("model,method", [("llama-gqa", "lora"), ("bert-cls", "lora"),
                                          ("vit", "ia3")])
def test_checkpointing_is_traced_exactly(model, method):
    """Full checkpointing is recorded for real (torch.utils.checkpoint per layer, its
    recomputation inside backward): the bytes alive at the end of forward and the peak equal
    a real CPU step's with the same layers checkpointed, at other sizes and depth."""
    from simcost.trace.build import task_for
    from simcost.validate.traced_memory import measure_real_memory, traced_memory
    cfg, hints, dims = traced.CONFIGS[model]
    pc = traced.adapter_configs(model)[method]
    task = task_for(cfg)
    real = measure_real_memory(task, pc, dims, checkpointing=True)
    assert traced_memory(task, pc, hints, dims, checkpointing=True) == real
    assert real["end_forward"] < measure_real_memory(task, pc, dims)["end_forward"]
