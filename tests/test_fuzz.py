"""The fuzz suite: generated inputs, good and hostile, through the CLI (``main([...])``) and the
API. ``pytest -m fuzz`` runs it at full size (>= 10,000 inputs, see conftest.py); the default
run takes a few hundred.

Properties: bad input ends in exit 2 with one ``simcost: error:`` line; a good one in exit 0
with every number finite and non-negative, ``fits`` agreeing with peak and capacity, and the
memory rows adding up to the peak; the same input gives the same output; FLOPs and memory grow
with batch, sequence and rank; a sweep point equals the estimate."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, strategies as st

from simcost.cli import main
from simcost.sim.memory import peak_rows

pytestmark = pytest.mark.fuzz

MODELS = ["gpt2", "llama-3.2-1b", "qwen2.5-0.5b", "qwen-1.8b", "mixtral-8x7b", "llama-2-7b"]
HARDWARE = ["a100-80gb-sxm", "h100-sxm", "rtx-4090", "cpu-generic", "rpi5", "tpu-v5e", "t4",
            "mi300x", "l40s"]
JUNK = ["", "-1", "0", "nan", "inf", "-inf", "1e3", "2.5", "abc", "0x10", "99999999999999999999",
        "-0", " 4", "None", "true"]


def ints(lo=-4, hi=64):
    good = st.integers(lo, hi).map(str)
    return st.one_of(good, good, good, st.sampled_from(JUNK))


def floats():
    good = st.floats(-2, 200, allow_nan=False).map(lambda x: f"{x:g}")
    return st.one_of(good, good, st.sampled_from(JUNK))


CHOICES = {
    "--peft": ["full", "freeze", "lora", "dora", "qlora", "ia3", "bitfit", "ln_tuning", "prefix",
               "prompt", "adapter", "lst", "lorra", ""],
    "--dtype": ["fp32", "bf16", "fp16", "fp8", "int4"],
    "--mixed-precision": ["none", "bf16", "fp16", "fp32"],
    "--attn": ["eager", "sdpa", "flash", "xformers"],
    "--checkpointing": ["none", "full", "selective", "some"],
    "--optimizer": ["adamw", "sgd", "adamw8bit", "mezo", "lion"],
    "--zero": ["0", "1", "2", "3", "4", "-1"],
    "--parallel": ["auto", "manual"],
    "--pp-schedule": ["1f1b", "interleaved", "zb"],
    "--offload": ["none", "optimizer", "params", "disk"],
    "--targets": ["q_proj,v_proj", "all-linear", "c_attn", "w_gate", ",", "q_proj"],
}
INT_OPTS = ["--rank", "--num-virtual-tokens", "--trainable-layers", "--adapter-dim",
            "--lst-reduction", "--loss-chunks", "--jobs", "--max-positions", "--devices",
            "--nodes", "--tp", "--pp", "--dp", "--cp", "--ep", "--micro-batch",
            "--virtual-stages"]
FLOAT_OPTS = ["--alpha", "--lora-dropout"]
FLAGS = ["--rslora", "--grad-checkpointing", "--optimizer-in-backward", "--no-sequence-parallel",
         "--tp-overlap", "--fp8-attention"]


@st.composite
def train_argv(draw):
    argv = ["estimate", "train",
            "--model", draw(st.sampled_from(MODELS + ["llama-2-7x", "/nonexistent/config.json"])),
            "--hardware", draw(st.sampled_from(HARDWARE + ["a100", "x.json"])),
            "--batch", draw(st.one_of(st.integers(1, 16).map(str), st.integers(1, 64).map(str),
                                      ints())),
            "--seq", draw(st.one_of(st.sampled_from(["128", "512", "1024", "2048"]),
                                    st.integers(1, 4096).map(str), ints(-2, 9000)))]
    for opt in draw(st.lists(st.sampled_from(sorted(CHOICES)), max_size=3, unique=True)):
        argv += [opt, draw(st.sampled_from(CHOICES[opt]))]
    for opt in draw(st.lists(st.sampled_from(INT_OPTS), max_size=3, unique=True)):
        argv += [opt, draw(st.one_of(st.sampled_from(["1", "2", "4", "8"]),
                                     st.sampled_from(["1", "2", "4", "8"]), ints()))]
    for opt in draw(st.lists(st.sampled_from(FLOAT_OPTS), max_size=1)):
        argv += [opt, draw(floats())]
    argv += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    return argv + ["--json"]


VALID_CHOICES = {k: [v for v in vals if v not in ("lorra", "", "int4", "fp32", "xformers", "some",
                                                 "lion", "4", "-1", "manual", "zb", "disk",
                                                 "w_gate", ",")] or vals
                 for k, vals in CHOICES.items()}
VALID_CHOICES["--mixed-precision"] = ["none", "bf16", "fp16"]
VALID_CHOICES["--dtype"] = ["fp32", "bf16", "fp16", "fp8"]


@st.composite
def valid_train_argv(draw):
    """Well-formed values only: what is left to refuse is a real conflict of options."""
    argv = ["estimate", "train", "--model", draw(st.sampled_from(MODELS)),
            "--hardware", draw(st.sampled_from(HARDWARE)),
            "--batch", str(draw(st.integers(1, 32))),
            "--seq", str(draw(st.sampled_from([16, 128, 512, 1000, 2048])))]
    for opt in draw(st.lists(st.sampled_from(sorted(VALID_CHOICES)), max_size=4, unique=True)):
        argv += [opt, draw(st.sampled_from(VALID_CHOICES[opt]))]
    for opt in draw(st.lists(st.sampled_from(INT_OPTS), max_size=3, unique=True)):
        argv += [opt, str(draw(st.sampled_from([1, 2, 4, 8])))]
    argv += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    return argv + ["--json"]


def _numbers(obj, path=""):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def check_outcome(rc, out, err):
    """The CLI contract every input must meet."""
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        assert out == "" and err.count("\n") == 1 and err.startswith("simcost: error: "), err
        return None
    for line in err.splitlines():
        assert line.startswith("simcost: warning: "), line
    d = json.loads(out)
    from simcost.result import SCHEMA_VERSION
    assert d["schema_version"] == SCHEMA_VERSION
    for path, v in _numbers(d):
        assert math.isfinite(v) and v >= 0, (path, v)
    return d


def check_train_result(d):
    ests = [d["shared"], d["separate"]] if "shared" in d else [d]
    for e in ests:
        m = e["memory_bytes"]
        assert e["fits"] == (m["peak"] <= m["capacity"])
        phase, rows = peak_rows(m)
        assert sum(rows.values()) == pytest.approx(m["peak"], rel=1e-9), (phase, rows, m)
        assert e["time_s"]["step"] > 0 and e["tokens_per_s"] > 0


def run(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@given(argv=train_argv())
def test_estimate_train_any_input(argv, capsys):
    rc, out, err = run(argv, capsys)
    d = check_outcome(rc, out, err)
    if d is not None:
        check_train_result(d)


@given(argv=valid_train_argv())
def test_estimate_train_well_formed_input(argv, capsys):
    rc, out, err = run(argv, capsys)
    d = check_outcome(rc, out, err)
    if d is not None:
        check_train_result(d)


@given(argv=train_argv())
def test_estimate_train_is_deterministic(argv, capsys):
    first = run(argv, capsys)
    assert run(argv, capsys) == first


@given(model=st.sampled_from(MODELS[:4]), hw=st.sampled_from(["a100-80gb-sxm", "cpu-generic"]),
       batch=st.integers(1, 8), seq=st.integers(16, 1000), rank=st.integers(1, 64),
       attn=st.sampled_from(["eager", "sdpa"]), ckpt=st.sampled_from(["none", "full", "selective"]),
       peft=st.sampled_from(["lora", "full", "ia3", "prefix"]))
def test_flops_and_memory_monotone(model, hw, batch, seq, rank, attn, ckpt, peft):
    from simcost.api import estimate_train
    kw = dict(attn=attn, grad_checkpointing=ckpt, peft=peft)
    if peft == "lora":
        kw["rank"] = rank
    base = estimate_train(model, hw, batch=batch, seq=seq, **kw)
    grown = [estimate_train(model, hw, batch=batch + 1, seq=seq, **kw),
             estimate_train(model, hw, batch=batch, seq=seq + 16, **kw)]
    if peft == "lora":
        grown.append(estimate_train(model, hw, batch=batch, seq=seq, **{**kw, "rank": rank + 1}))
    for g in grown:
        assert g.flops["forward"] >= base.flops["forward"]
        assert g.flops["backward"] >= base.flops["backward"]
        assert g.memory_bytes["peak"] >= base.memory_bytes["peak"]
        assert g.memory_bytes["activations"] >= base.memory_bytes["activations"]


@given(model=st.sampled_from(MODELS[:4]), batches=st.lists(st.integers(1, 6), min_size=1,
                                                           max_size=3, unique=True),
       seqs=st.lists(st.integers(8, 700), min_size=1, max_size=3, unique=True),
       attn=st.sampled_from(["eager", "sdpa", "flash"]),
       ckpt=st.sampled_from(["none", "full", "selective"]),
       peft=st.sampled_from(["lora", "full", "prompt", "ia3"]))
def test_sweep_equals_estimate(model, batches, seqs, attn, ckpt, peft):
    from simcost.api import estimate_train, sweep_train
    kw = dict(attn=attn, grad_checkpointing=ckpt, peft=peft)
    s = sweep_train(model, "a100-80gb-sxm", batches=batches, seqs=seqs, **kw)
    for i, b in enumerate(batches):
        for j, q in enumerate(seqs):
            e = estimate_train(model, "a100-80gb-sxm", batch=b, seq=q, **kw)
            assert s["step_s"][i, j] == pytest.approx(e.time_s["step"], rel=1e-12)
            assert s["peak_bytes"][i, j] == pytest.approx(e.memory_bytes["peak"], rel=1e-12)
            assert bool(s["fits"][i, j]) == e.fits


@given(model=st.sampled_from(MODELS[:4]), attn=st.sampled_from(["eager", "sdpa", "flash"]),
       batch=st.integers(1, 4), seq=st.integers(8, 1000),
       dtype=st.sampled_from(["fp32", "bf16"]), peft=st.sampled_from(["lora", "full", "prompt"]),
       hw=st.sampled_from(["a100-80gb-sxm", "cpu-generic"]))
def test_selective_checkpointing_never_keeps_more(model, attn, batch, seq, dtype, peft, hw):
    from simcost.api import estimate_train
    assume(not (attn == "flash" and hw == "cpu-generic"))   # refused: no flash kernels on CPU
    kw = dict(batch=batch, seq=seq, attn=attn, dtype=dtype, peft=peft)
    none = estimate_train(model, hw, **kw).memory_bytes["activations"]
    sel = estimate_train(model, hw, grad_checkpointing="selective", **kw).memory_bytes
    assert sel["activations"] <= none


API_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 64),
                       st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from(["", "lora", "auto", "bf16", "x", "q_proj,v_proj"]),
                       st.lists(st.integers(-1, 4), max_size=2))
API_KEYS = ["peft", "rank", "alpha", "targets", "dropout", "dtype", "mixed_precision", "attn",
            "optimizer", "grad_checkpointing", "devices", "tp", "pp", "dp", "cp", "zero",
            "parallel", "micro_batch", "virtual_stages", "loss_chunks", "max_positions",
            "num_virtual_tokens", "trainable_layers", "bias", "layers", "no_such_option",
            "deepspeed", "offload", "ep"]


@given(batch=API_VALUES, seq=API_VALUES,
       options=st.dictionaries(st.sampled_from(API_KEYS), API_VALUES, max_size=3))
def test_api_any_input(batch, seq, options):
    """The API takes the same request: a bad value is a SimcostError, never another exception."""
    from simcost.api import estimate_train
    from simcost.errors import SimcostError
    try:
        r = estimate_train("llama-3.2-1b", "a100-80gb-sxm", batch=batch, seq=seq, **options)
    except SimcostError as e:
        assert "\n" not in str(e) and str(e)
        return
    d = r.model_dump_public()
    for path, v in _numbers(d):
        assert math.isfinite(v) and v >= 0, (path, v)


SERVE_MODELS = ["llama-2-7b", "gpt2", "qwen2.5-0.5b", "mixtral-8x7b", "llama-3.2-1b"]
SERVE_HW = ["a100-80gb-sxm", "a10g", "h100-sxm", "rtx-4090", "l40s", "t4", "cpu-generic"]


def _opt(draw, opts: dict, max_size: int) -> list:
    out = []
    for k in draw(st.lists(st.sampled_from(sorted(opts)), max_size=max_size, unique=True)):
        v = draw(opts[k])
        out += [k] if v is None else [k, v]
    return out


def _small_int(values=("1", "2", "4", "8")):
    return st.one_of(st.sampled_from(values), st.sampled_from(values), ints())


SERVE_COMMON = {
    "--dtype": st.sampled_from(["fp16", "bf16", "fp32", "fp8"]),
    "--weight-dtype": st.sampled_from(["fp16", "int8", "int4", "nf4", "fp8", "int2"]),
    "--kv-dtype": st.sampled_from(["fp16", "fp8", "int8", "int4"]),
    "--tp": _small_int(), "--devices": _small_int(),
    "--targets": st.sampled_from(["q_proj,v_proj", "all-linear", "c_attn", "w_gate", ","]),
}


@st.composite
def estimate_serve_argv(draw):
    argv = ["estimate", "serve", "--model", draw(st.sampled_from(SERVE_MODELS)),
            "--hardware", draw(st.sampled_from(SERVE_HW)),
            "--batch", draw(_small_int(("1", "8", "32", "256"))),
            "--context", draw(_small_int(("1", "128", "512", "4096", "100000")))]
    argv += _opt(draw, {**SERVE_COMMON,
                        "--phase": st.sampled_from(["prefill", "decode", "both"]),
                        "--peft": st.sampled_from(["none", "lora", "prefix", "prompt", "ia3"]),
                        "--rank": _small_int(("8", "16", "64")),
                        "--ranks": st.sampled_from(["8,16", "8,-1", "a,b", "", "64", "8,,16"]),
                        "--distinct-adapters": _small_int(("1", "4", "32")),
                        "--merged": st.none(), "--cuda-graphs": st.none(),
                        "--lora-kernel": st.sampled_from(["mbgmv", "sgmv", "loop", "punica"]),
                        "--num-virtual-tokens": _small_int(("0", "10", "20"))}, 4)
    return argv + ["--json"]


@st.composite
def simulate_serve_argv(draw):
    argv = ["simulate", "serve", "--model", draw(st.sampled_from(SERVE_MODELS)),
            "--hardware", draw(st.sampled_from(SERVE_HW)),
            "--duration", draw(st.sampled_from(["2s", "5", "0.5m", "nan", "inf", "-1", "10x",
                                                 "1h"]))]
    argv += _opt(draw, {**SERVE_COMMON,
                        "--adapters": _small_int(("0", "1", "10", "1000000000000")),
                        "--ranks": st.sampled_from(["8", "8,16", "8,-1", "a,b", "", "0"]),
                        "--merged": st.none(), "--prefetch": st.none(),
                        "--rate": st.sampled_from(["1", "10", "0", "-3", "nan", "inf", "1e12",
                                                   "0.5"]),
                        "--cv": st.sampled_from(["0", "1", "4", "nan", "inf", "-1", "1000"]),
                        "--popularity-alpha": st.sampled_from(["1", "0.5", "0", "nan", "-1"]),
                        "--input-len": st.sampled_from(["512", "8:512", "0", "9:3", "a:b", "1:2:3",
                                                        "100000"]),
                        "--output-len": st.sampled_from(["64", "8:128", "0", "-5"]),
                        "--seed": st.sampled_from(["0", "42", "-1", "4294967296", "x"]),
                        "--scheduler": st.sampled_from(["fcfs", "slora", "mixed", "lifo"]),
                        "--engine": st.sampled_from(["vllm", "slora", "trtllm", "tgi"]),
                        "--routing": st.sampled_from(["round-robin", "adapter-affinity", "random"]),
                        "--generator": st.sampled_from(["default", "slora", "zipf"]),
                        "--slo-ttft": st.sampled_from(["0.5", "0", "-1", "nan"]),
                        "--max-total-tokens": _small_int(("1000", "100000", "0"))}, 5)
    return argv + ["--json"]


def check_serve_result(d):
    """An iteration estimate: ``fits`` exactly when the KV pool holds the batch's KV cache and
    adapters. A simulation: every request finished, in a positive makespan."""
    m = d["memory_bytes"]
    assert (m["pool"] == 0) or m["pool_shortfall"] == 0
    if "fits" in d:
        assert d["fits"] == (m["pool"] > 0 and m["kv_cache"] + m["adapters"] <= m["pool"])
    else:
        assert d["n_requests"] >= 1 and d["makespan_s"] > 0 and d["throughput_req_s"] > 0


@given(argv=st.one_of(estimate_serve_argv(), simulate_serve_argv()))
def test_serve_any_input(argv, capsys):
    rc, out, err = run(argv, capsys)
    d = check_outcome(rc, out, err)
    if d is not None:
        check_serve_result(d)
