"""The plan search (``--parallel auto``) prices plans in the order of a lower bound and stops
early (branch and bound). It must give exactly what pricing every plan gives: the same best
plan, the same top candidates with the same numbers, and the bound must never exceed a plan's
step time."""
import pytest

import simcost.sim.parallel as P
from simcost.api import estimate_train
from simcost.sim.parallel.evaluate import evaluate_plan, step_lower_bound


def exhaustive(ctx, plans, keep=5):
    """Every plan priced, ranked as the search ranks them (the reference)."""
    results = [evaluate_plan(ctx, p) for p in plans]
    fitting = [r for r in results if r.fits]
    if fitting:
        fitting.sort(key=lambda r: (round(r.time_s["step"], 6), r.memory_bytes["peak"]))
        return fitting[0], fitting[:keep]
    results.sort(key=lambda r: r.memory_bytes["peak"])
    return results[0], results[:keep]


def _summary(results):
    return [(r.plan, r.time_s, r.memory_bytes, r.communication, r.fits) for r in results]


CASES = {
    "7b lora 8xh100": dict(model="llama-2-7b", hardware="h100-sxm", devices=8, batch=16,
                           seq=2048, peft="lora"),
    "70b lora 64xa100-40 full ckpt": dict(model="llama-2-70b", hardware="a100-40gb-sxm",
                                          devices=64, batch=64, seq=4096, peft="lora",
                                          grad_checkpointing="full"),
    "70b qlora 16xl40s selective": dict(model="llama-2-70b", hardware="l40s", devices=16,
                                        batch=32, seq=4096, peft="qlora",
                                        grad_checkpointing="selective"),
    "70b full 8xa100-40 (nothing fits)": dict(model="llama-2-70b", hardware="a100-40gb-sxm",
                                              devices=8, batch=8, seq=4096, peft="full"),
    "mixtral lora 16xh100": dict(model="mixtral-8x7b", hardware="h100-sxm", devices=16,
                                 batch=32, seq=2048, peft="lora"),
    "7b fp8 interleaved 16xh100": dict(model="llama-2-7b", hardware="h100-sxm", devices=16,
                                       batch=32, seq=4096, peft="lora", dtype="fp8",
                                       pp_schedule="interleaved", virtual_stages=2),
    "13b offload 4xrtx-4090": dict(model="llama-2-13b", hardware="rtx-4090", devices=4,
                                   batch=8, seq=1024, peft="lora", offload="optimizer"),
    "8b nemo 32xtpu-v5e": dict(model="llama-3.1-8b", hardware="tpu-v5e", devices=32, batch=64,
                               seq=4096, peft="lora"),
    "8b torchtune 8xmi300x": dict(model="llama-3.1-8b", hardware="mi300x", devices=8, batch=16,
                                  seq=8192, peft="dora", stack="torchtune"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_branch_and_bound_equals_pricing_every_plan(case, monkeypatch):
    kw = dict(CASES[case])
    seen = []
    real = P.search

    def checked(ctx, plans, keep=5):
        best, top = real(ctx, plans, keep)
        ref_best, ref_top = exhaustive(ctx, plans, keep)
        for p in plans:                 # the bound never exceeds the priced step
            assert step_lower_bound(ctx, p) <= evaluate_plan(ctx, p).time_s["step"]
        assert _summary([best]) == _summary([ref_best])
        assert _summary(top) == _summary(ref_top)
        seen.append(len(plans))
        return best, top

    monkeypatch.setattr(P, "search", checked)
    model, hw = kw.pop("model"), kw.pop("hardware")
    estimate_train(model, hw, parallel="auto", **kw)
    assert seen and seen[0] > 1


def test_the_search_prices_few_plans_of_a_large_space(monkeypatch):
    """The point of the bound: a 70B search over 1024 devices prices a small part of its
    plans (the exact answer is checked above)."""
    import simcost.sim.parallel.evaluate as E
    priced = []
    real = E.evaluate_plan

    def counting(ctx, plan, mem=None):
        priced.append(plan)
        return real(ctx, plan, mem)

    monkeypatch.setattr(E, "evaluate_plan", counting)
    r = estimate_train("llama-2-70b", "h100-sxm", parallel="auto", devices=1024, batch=1024,
                       seq=4096, peft="lora")
    searched = r.parallel["plans_searched"]
    assert searched > 500
    assert len(priced) < searched / 5
