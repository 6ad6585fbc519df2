"""Serving invariants (no timing assertions against wall clock)."""
import numpy as np
import pytest

from simcost.errors import SimcostError
from simcost.models.config import load_model
from simcost.serve import estimate_serve, simulate_serve
from simcost.serve.memory import adapter_bytes, kv_bytes_per_token

M, H = "llama-2-7b", "a100-80gb-sxm"


def test_kv_bytes_formula():
    s = load_model("llama-3.1-8b")   # GQA: 8 KV heads of 128
    assert kv_bytes_per_token(s, "fp16") == 2 * s.layers * 8 * 128 * 2
    assert kv_bytes_per_token(s, "fp8", tp=2) == 2 * s.layers * 4 * 128 * 1
    s7 = load_model(M)
    assert kv_bytes_per_token(s7, "fp16") == 2 * 32 * 4096 * 2
    assert adapter_bytes(s7, 8, ["q_proj", "v_proj"]) == 32 * 2 * 8 * (4096 + 4096) * 2


def test_prefix_tokens_add_kv_and_time():
    a = estimate_serve(M, H, phase="decode", batch=8, context=256)
    b = estimate_serve(M, H, phase="decode", batch=8, context=256, peft="prefix", num_virtual_tokens=64)
    assert b.memory_bytes["kv_cache"] > a.memory_bytes["kv_cache"]
    assert b.time_s["attention"] > a.time_s["attention"]


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_merged_equals_base(phase):
    base = estimate_serve(M, H, phase=phase, batch=16, context=512)
    merged = estimate_serve(M, H, phase=phase, batch=16, context=512, peft="lora", rank=64, merged=True)
    assert merged.time_s["total"] == base.time_s["total"]
    assert merged.time_s["lora"] == 0.0


@pytest.mark.parametrize("kernel", ["mbgmv", "sgmv", "loop"])
def test_unmerged_grows_with_rank_and_distinct_adapters(kernel):
    def lt(**kw):
        return estimate_serve(M, H, phase="decode", batch=64, context=512, peft="lora",
                              lora_kernel=kernel, **kw).time_s["lora"]
    assert 0 < lt(rank=8) < lt(rank=16) < lt(rank=64)
    assert lt(distinct_adapters=1) < lt(distinct_adapters=8) < lt(distinct_adapters=64)
    base = estimate_serve(M, H, phase="decode", batch=64, context=512).time_s["total"]
    assert estimate_serve(M, H, phase="decode", batch=64, context=512, peft="lora",
                          lora_kernel=kernel).time_s["total"] >= base


def test_loop_costs_more_than_batched_kernel_with_many_adapters():
    kw = dict(phase="decode", batch=64, context=512, peft="lora", distinct_adapters=32)
    assert (estimate_serve(M, H, lora_kernel="loop", **kw).time_s["lora"]
            > estimate_serve(M, H, lora_kernel="mbgmv", **kw).time_s["lora"])


def test_same_seed_same_result_and_seed_matters():
    kw = dict(adapters=20, ranks=[8, 16], rate=5, duration=20, scheduler="slora")
    a = simulate_serve(M, H, seed=3, **kw).model_dump()
    b = simulate_serve(M, H, seed=3, **kw).model_dump()
    c = simulate_serve(M, H, seed=4, **kw).model_dump()
    assert a == b
    assert a != c


@pytest.mark.parametrize("scheduler", ["v1", "fcfs", "slora", "mixed"])   # v1: the default's
def test_nothing_admitted_beyond_memory(scheduler, monkeypatch):
    """A device with room for only a few sequences: the batch never holds more KV than the pool."""
    import simcost.serve.sim as simmod
    seen = {}
    orig = simmod.simulate

    def spy(step, mem, wl, eng, **kw):
        from dataclasses import replace
        small = replace(mem, pool=mem.kv_per_token * 3000)   # 3000 tokens of KV
        res = orig(step, small, wl, eng, **kw)
        seen["res"] = res
        seen["cap"] = small.kv_tokens
        return res
    monkeypatch.setattr(simmod, "simulate", spy)
    import simcost.serve.api as api
    monkeypatch.setattr(api, "simulate", spy)
    r = simulate_serve(M, H, rate=50, duration=5, input_len="400:500", output_len="100:200",
                       scheduler=scheduler, seed=1)
    # reserving schedulers hold prompt + output (>= 500 tokens) per request: at most 6 fit;
    # vLLM-style paging (v0 and V1) holds only what is cached (>= 400 prompt tokens): at most 7
    assert r.max_batch <= (7 if scheduler in ("fcfs", "v1") else 6)
    assert r.n_requests == 250 and np.isfinite(r.latency_s["mean"])


def test_more_adapters_more_swaps_and_latency_trend():
    kw = dict(ranks=[64, 32, 16, 8], rate=10, duration=30, scheduler="slora", seed=0)
    few = simulate_serve(M, H, adapters=5, **kw)
    many = simulate_serve(M, H, adapters=2000, **kw)
    assert many.swaps > few.swaps
    assert many.latency_s["mean"] >= few.latency_s["mean"]


def test_json_keys_and_trace(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("time,adapter,prompt_len,output_len\n0.0,0,32,8\n0.1,1,64,4\n0.5,0,16,16\n")
    r = simulate_serve(M, H, adapters=2, trace=str(p), slo_ttft=1.0).model_dump()
    for k in ("throughput_req_s", "throughput_tok_s", "ttft_s", "tpot_s", "latency_s",
              "adapters_resident"):
        assert k in r
    for k in ("ttft_s", "tpot_s", "latency_s"):
        assert set(r[k]) >= {"mean", "p50", "p90", "p99"}
    assert r["n_requests"] == 3 and r["slo_attainment"] == 1.0


def test_tensor_parallel_splits_memory_and_time():
    a = estimate_serve("llama-2-13b", H, phase="decode", batch=32, context=1024)
    b = estimate_serve("llama-2-13b", H, phase="decode", batch=32, context=1024, tp=2, devices=2)
    assert b.memory_bytes["weights"] < a.memory_bytes["weights"]
    assert b.time_s["linear"] < a.time_s["linear"]


def test_quantised_weights_stream_fewer_bytes():
    a = estimate_serve(M, H, phase="decode", batch=1, context=128)
    b = estimate_serve(M, H, phase="decode", batch=1, context=128, weight_dtype="int4")
    assert b.memory_bytes["weights"] < 0.4 * a.memory_bytes["weights"]
    assert b.time_s["linear"] < a.time_s["linear"]


@pytest.mark.parametrize("kw", [dict(ranks="x"), dict(scheduler="lifo"), dict(rate=-1),
                                dict(input_len="9:5"), dict(tp=3, devices=2)])
def test_bad_input_one_error(kw):
    with pytest.raises(SimcostError):
        simulate_serve(M, H, duration=5, **kw)


def test_cli_module_wires(capsys):
    """`simcost simulate serve` and `simcost estimate serve` through the real entry point."""
    import json
    from simcost.cli import main
    assert main("simulate serve --model llama-2-7b --hardware a100-80gb-sxm --adapters 10 "
                "--ranks 8,16 --rate 2 --duration 10 --scheduler slora --json".split()) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["throughput_req_s"] > 0
    assert main("estimate serve --model llama-2-7b --hardware a100-80gb-sxm --batch 4 "
                "--context 128 --json".split()) == 0
    assert json.loads(capsys.readouterr().out)["time_s"]["total"] > 0
    assert main("simulate serve --model llama-2-7x --hardware a100-80gb-sxm --rate 1 "
                "--duration 1".split()) == 2


def test_engine_registry_and_facts():
    from simcost.serve.engines import ENGINES, get_engine
    assert {"vllm", "slora", "trtllm", "hf-peft"} <= set(ENGINES)
    for e in ENGINES.values():
        assert e.sources, e.name            # every engine cites where its facts come from
    assert get_engine("slora").adapter_residency == "running-batch"
    with pytest.raises(SimcostError):
        get_engine("hf-peft")               # described, not simulated
    with pytest.raises(SimcostError):
        get_engine("nope")


def test_paged_attention_overhead_only_in_decode_attention():
    from simcost.serve.api import _setup
    _, _, _, plain, *_ = _setup("llama-2-7b", "a100-80gb-sxm", "fp16", None, None, 1, None,
                                "sgmv", None, True, 0.0)
    _, _, _, paged, *_ = _setup("llama-2-7b", "a100-80gb-sxm", "fp16", None, None, 1, None,
                                "sgmv", None, True, 0.23)
    assert paged.decode_attn_time(1e5) == pytest.approx(1.23 * plain.decode_attn_time(1e5))
    assert paged.linear_time(64) == pytest.approx(plain.linear_time(64))


def test_slora_engine_frees_idle_adapters_and_pool_cap():
    from simcost.serve import sim as simmod
    from simcost.serve.api import _setup
    from simcost.serve.memory import serve_memory
    kw = dict(adapters=200, ranks=[8], rate=5, duration=20, input_len="8:128",
              output_len="8:128", seed=1)
    sl = simulate_serve(M, H, engine="slora", **kw)
    small = simulate_serve(M, H, engine="slora", max_total_tokens=3000, **kw)
    assert sl.engine == "slora" and small.max_batch <= sl.max_batch   # a smaller pool admits no more
    # running-batch residency (S-LoRA) reloads adapters an LRU cache would keep
    spec, prof, dev, step, tg, hbw, hl = _setup(M, H, "fp16", None, None, 1, None, "mbgmv", None, False)
    mem = serve_memory(spec, dev, wdtype="fp16", act_dtype="fp16", kv_dtype="fp16", tp=1,
                       ranks=[8], targets=tg, max_tokens=2048, max_seqs=256)
    wl = simmod.Workload(rate=5, duration=20, input_len=(8, 128), output_len=(8, 128),
                         adapters=200, ranks=(8,), seed=1)
    ar = np.full(200, 8.0)
    res = {pol: simmod.simulate(step, mem, wl, simmod.Engine(scheduler="slora", max_num_seqs=1000,
                                                              adapter_residency=pol),
                                adapter_ranks=ar, merged=False, host_bw=hbw, host_lat=hl)
           for pol in ("lru", "running-batch")}
    assert res["running-batch"].swaps > res["lru"].swaps


def test_slora_generator_draws_the_benchmark_requests():
    """Workload(generator="slora") makes S-LoRA benchmarks/trace.py's draws: one legacy
    RandomState(seed), power -> randint (exclusive) -> randint -> gamma, int(rate x duration)."""
    from simcost.serve.sim import Workload
    wl = Workload(rate=10, duration=120, cv=1, input_len=(8, 512), output_len=(8, 512),
                  adapters=100, ranks=(8,), popularity_alpha=1, seed=42, generator="slora")
    t, ad, pr, out = wl.generate()
    rs = np.random.RandomState(42)
    exp_ad = (rs.power(1, 1200) * 100).astype(int)
    exp_pr = rs.randint(8, 512, 1200)
    exp_out = rs.randint(8, 512, 1200)
    exp_t = np.cumsum(rs.gamma(1.0, 1.0 / 10, 1200))
    assert t.size == 1200 and pr.max() <= 511 and out.max() <= 511
    assert np.array_equal(ad, exp_ad) and np.array_equal(pr, exp_pr) and np.array_equal(out, exp_out)
    assert np.allclose(t, exp_t)


def test_slora_admits_by_peak_usage_not_reservation(tmp_path):
    """LightLLM's test (req_queue.py _can_add_new_req) counts the peak of the admitted requests'
    future usage, freeing each at its end: one long request plus short ones fit where a
    prompt + max_new_tokens reservation per request would not."""
    p = tmp_path / "t.csv"
    rows = ["time,adapter,prompt_len,output_len", "0.0,0,10,1000"]
    rows += ["0.0,0,10,200" for _ in range(30)]
    p.write_text("\n".join(rows) + "\n")
    r = simulate_serve(M, H, adapters=0, trace=str(p), engine="slora", max_total_tokens=3000)
    # first batch by peak: max(11 + 999, n·(11 + 199)) < 3000 -> 14 (more join as the running
    # ones shrink); reserving 1010 + 210·k <= 3000 tokens would hold at most 10 at any time
    assert r.max_batch >= 14


def test_slora_bgmv_is_per_token_and_switches_kernel_for_long_prefills():
    from simcost.serve.api import _setup
    _, _, _, bg, *_ = _setup(M, H, "fp16", None, None, 1, None, "slora-bgmv", None, False)
    _, _, _, mb, *_ = _setup(M, H, "fp16", None, None, 1, None, "mbgmv", None, False)
    one = np.array([64.0])
    # one adapter: the idealised MBGMV reads it once, S-LoRA's BGMV once per token
    assert bg.lora_time(256, one)[0] > 4 * mb.lora_time(256, one)[0]
    assert bg.lora_time(256, one)[0] > 1.8 * bg.lora_time(128, one)[0]
    # a long prefill with rank 64 and >= 2 prompts takes the Triton MBGMM path (per-32-token
    # weight loads on the tensor cores): cheaper than the per-token BGMV path
    t_mbgmm = bg.lora_time(4096, one, prefill_max_len=512, n_seqs=8)[0]
    t_bgmv = bg.lora_time(4096, one, prefill_max_len=512, n_seqs=1)[0]
    assert t_mbgmm < t_bgmv


def test_slora_engine_host_and_sampling_facts_slow_it_down():
    from simcost.serve.engines import get_engine
    e = get_engine("slora")
    assert e.lora_kernel == "slora-bgmv" and e.host_ops_per_seq == 1 and e.full_sort_sampling
    # sources are keyed by the profile's field path (stack_profiles/serving/slora.json)
    for k in ("scheduler", "lora_kernel", "host.ops_per_seq", "full_sort_sampling"):
        assert "S-LoRA/S-LoRA" in e.sources[k]
    from simcost.serve.sim import Engine
    assert Engine(scheduler="slora").host_ops_per_seq == 1     # facts follow the scheduler
    assert Engine(scheduler="fcfs").host_ops_per_seq == 0
    from simcost.serve.api import _setup
    from simcost.serve.memory import serve_memory
    from simcost.serve.sim import Workload, simulate
    spec, _, dev, st, tg, hbw, hlat = _setup(M, H, "fp16", None, None, 1, None, "slora-bgmv",
                                             None, False)
    assert st.sample_time(200) > 0
    mem = serve_memory(spec, dev, wdtype=st.wdtype, act_dtype="fp16", kv_dtype=st.kv_dtype, tp=1,
                       ranks=[8], targets=tg, max_tokens=2048, max_seqs=256)
    wl = Workload(rate=8, duration=20, cv=1, input_len=(8, 512), output_len=(8, 512),
                  adapters=20, ranks=(8,), popularity_alpha=1, seed=42, generator="slora")

    def latency(**facts):
        eng = Engine(scheduler="slora", max_num_seqs=1000, max_num_tokens=2048,
                     batch_max_tokens_frac=1 / 6, max_total_tokens=125000, **facts)
        res = simulate(st, mem, wl, eng, adapter_ranks=np.full(20, 8.0), merged=False,
                       host_bw=hbw, host_lat=hlat)
        return float(np.mean(res.latency))
    assert latency() > latency(host_ops_per_seq=0, full_sort_sampling=False)


def test_trace_and_generator_are_exclusive(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text("time,adapter,prompt_len,output_len\n0,0,8,8\n")
    with pytest.raises(SimcostError, match="give one"):
        simulate_serve(M, H, adapters=1, trace=str(t), generator="slora")
