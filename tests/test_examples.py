"""The bring-your-own-model examples (examples/*.py: MixLoRA, MTLoRA, PYRA, PEFT methods peft
does not ship) against the ``file.py:factory`` protocol, torch and their papers: each
factory satisfies the protocol; its step traced once under fake tensors with symbolic sizes
and priced at other sizes equals a real CPU step at those sizes (matmul FLOPs per phase from
FlopCounterMode, the storages autograd keeps at the end of forward, parameters); and its
trainable parameters equal a hand count from the method's formula. The recordings' live-memory
timelines are exact too (the bytes alive at the end of forward, the peak)."""
import importlib.util
import inspect
from pathlib import Path

import pytest

pytest.importorskip("peft")

pytestmark = pytest.mark.torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# name: (trace hints, checked sizes (other than the hints), how many layers each kept layer
# of the repeated stacks stands for)
CASES = {
    "mixlora": ({"batch": 3, "seq": 11}, {"batch": 2, "seq": 7}, [1, 3]),   # 4 decoder layers
    "mtlora": ({"batch": 3}, {"batch": 2}, [1, 1]),      # 2 stages (their blocks: not a stack)
    "pyra": ({"batch": 3}, {"batch": 2}, []),            # ToMe: every block traced
}


def spec(name: str) -> str:
    return f"{EXAMPLES / name}.py:factory"


def load(name: str):
    loader = importlib.util.spec_from_file_location(f"simcost_example_{name}",
                                                    EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(mod)
    return mod


def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_TRACES: dict = {}


def traced(name: str):
    """The example's step traced at the hints (once per session)."""
    if name not in _TRACES:
        from simcost.trace.build import task_for, trace_task
        task = task_for(spec(name))
        _TRACES[name] = (task, trace_task(task, None, dtype="fp32", hints=CASES[name][0]))
    return _TRACES[name]


# -- the factory protocol -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_factory_protocol(name):
    import torch

    from simcost.trace.factory import check_result
    mod = load(name)
    with torch.device("meta"):
        out = mod.factory()
    check_result(out, spec(name))
    assert isinstance(out["name"], str)
    assert all(p.is_meta for p in out["module"].parameters())      # built on the given device
    params = inspect.signature(out["module"].forward).parameters
    assert set(out["inputs"]) <= set(params) or any(
        p.kind is p.VAR_KEYWORD for p in params.values())
    from simcost.trace.build import task_for
    assert set(task_for(spec(name)).dims) == set(CASES[name][0])   # batch (and seq)


# -- exactness against a real CPU step --------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_traced_step_is_exact(name):
    hints, dims, counts = CASES[name]
    _, tr = traced(name)
    assert not tr.specialized, tr.specialized                     # symbolic in every size
    assert sorted(tr.counts.values()) == counts
    _assert_exact(name, tr, dims, "fp32")


@pytest.mark.parametrize("name", list(CASES))
def test_traced_memory_is_exact(name):
    """The live-memory timeline of the recording (expanded to the full depth) against every
    storage the real step allocates: the bytes alive at the end of forward, and the peak."""
    from simcost.trace.compiled import compile_trace
    from simcost.trace.numbers import timeline_of
    from simcost.trace.price import byte_values
    from simcost.trace.timeline import evaluate
    from simcost.validate.traced_memory import measure_real_memory
    _, dims, _ = CASES[name]
    task, tr = traced(name)
    ct = compile_trace(tr)
    t = evaluate(timeline_of(ct), byte_values(ct, ct.values(dims), ct.storage_bytes))
    real = measure_real_memory(task, None, dims)
    assert {"end_forward": int(t["end_forward"]),
            "peak": int(max(t["peak_loss"], t["peak_backward"]))} == real


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_traced_step_is_exact_in_bf16(name):
    """The float inputs follow the weights' dtype (the examples cast them, as transformers'
    models do)."""
    from simcost.trace.build import task_for, trace_task
    hints, dims, _ = CASES[name]
    _assert_exact(name, trace_task(task_for(spec(name)), None, dtype="bf16", hints=hints),
                  dims, "bf16")


def _assert_exact(name, tr, dims, dtype):
    from simcost.trace.price import Pricer
    from simcost.validate.traced import measure_task
    p = Pricer(tr).price(**dims)
    assert not p.unpriced, p.unpriced                               # every aten call has a formula
    real = measure_task(spec(name), dims, dtype=dtype)
    got = {"params_total": tr.params_total, "params_trainable": tr.params_trainable,
           "fwd_matmul_flops": int(p.fwd_matmul_flops),
           "bwd_matmul_flops": int(p.bwd_matmul_flops), "saved_bytes": int(p.saved_bytes)}
    want = {"params_total": real.params_total, "params_trainable": real.params_trainable,
            "fwd_matmul_flops": real.fwd_matmul_flops,
            "bwd_matmul_flops": real.bwd_matmul_flops, "saved_bytes": real.saved_bytes}
    assert got == want


# -- trainable parameters from the methods' formulas ------------------------------------------


def mixlora_trainable(hidden, intermediate, layers, heads, kv_heads, experts, expert_rank,
                      attn_rank, **_):
    """Per layer: the router (hidden x E); E experts, each a LoRA of rank r_e on gate, up
    (hidden -> inter) and down (inter -> hidden): E * 3 * r_e * (hidden + inter); LoRA of rank
    r_a on q (hidden -> heads*hd), k, v (hidden -> kv_heads*hd) and o (heads*hd -> hidden)."""
    hd = hidden // heads
    attn = attn_rank * ((hidden + heads * hd) * 2 + (hidden + kv_heads * hd) * 2)
    return layers * (hidden * experts + experts * 3 * expert_rank * (hidden + intermediate)
                     + attn)


def mtlora_trainable(image, patch, dim, depths, mlp_ratio, rank, task_rank, tasks,
                     decoder_channels, **_):
    """TA-LoRA (rank r) on qkv (C -> 3C), proj (C -> C), fc1 (C -> mC), fc2 (mC -> C) of
    every block: r * C * (4 + 2 + 2(1 + m)); TS-LoRA (rank r_t) per task on proj, fc1, fc2 of
    each stage's last block: r_t * C * (2 + 2(1 + m)); per task a decoder: a bias-free 1x1 conv
    per scale (the stage's output dims -> ch), a 1x1 conv W -> W with bias, BatchNorm (2W),
    a 1x1 conv W -> outputs with bias (W = ch x scales)."""
    from_tasks = load("mtlora").TASKS
    m, total, outs = mlp_ratio, 0, []
    c = dim
    for i, depth in enumerate(depths):
        total += depth * rank * c * (4 + 2 + 2 * (1 + m))
        total += len(tasks) * task_rank * c * (2 + 2 * (1 + m))
        c = 2 * c if i < len(depths) - 1 else c
        outs.append(c)
    w = decoder_channels * len(depths)
    for t in tasks:
        n_out = from_tasks[t][0]
        total += sum(d * decoder_channels for d in outs) + w * w + w + 2 * w + w * n_out + n_out
    return total


def pyra_trainable(image, patch, dim, layers, classes, lora_rank, r, **_):
    """Per block: LoRA on the fused qkv, r_lora * (C + 3C); PYRA where the block merges r_i
    tokens: a (r_i x 1), b (1 x C) and a LayerNorm (2C); the head C * classes + classes. ToMe
    merges r_i = min(r, (N_i - 1) // 2) of the block's N_i tokens (N_0 = patches + 1)."""
    tokens, total = (image // patch) ** 2 + 1, dim * classes + classes
    for _ in range(layers):
        ri = min(r, (tokens - 1) // 2)
        total += lora_rank * 4 * dim + (ri + 3 * dim if ri > 0 else 0)
        tokens -= ri
    return total


FORMULAS = {"mixlora": ("mixlora_llama", mixlora_trainable),
            "mtlora": ("mtlora_swin", mtlora_trainable),
            "pyra": ("pyra_vit", pyra_trainable)}
# other sizes, built on the meta device
OTHER = {"mixlora": {"hidden": 48, "intermediate": 80, "layers": 3, "heads": 6, "kv_heads": 3,
                     "experts": 5, "top_k": 3, "expert_rank": 3, "attn_rank": 5},
         "mtlora": {"image": 48, "patch": 4, "dim": 24, "depths": (1, 3, 2), "heads": (2, 2, 4),
                    "mlp_ratio": 2, "rank": 3, "task_rank": 2, "tasks": ("semseg", "normals"),
                    "decoder_channels": 8},
         "pyra": {"image": 40, "patch": 8, "dim": 48, "layers": 5, "heads": 3, "classes": 7,
                  "lora_rank": 3, "r": 6}}


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_parameters_follow_the_formula(name):
    import torch
    helper, formula = FORMULAS[name]
    fn = getattr(load(name), helper)
    _, tr = traced(name)
    assert tr.params_trainable == formula(**defaults(fn))           # the factory's sizes
    with torch.device("meta"):
        model = fn(**OTHER[name])
    assert trainable(model) == formula(**{**defaults(fn), **OTHER[name]})


def test_pyra_merges_at_most_half():
    """ToMe merges at most half of a block's tokens besides the class token: 5 blocks of
    r = 6 on 25 patches + 1 see 26, 20, 14, 8, 5 tokens and merge 6, 6, 6, 3, 2."""
    import torch
    with torch.device("meta"):
        model = load("pyra").pyra_vit(**OTHER["pyra"])
    assert [b.r for b in model.blocks] == [6, 6, 6, 3, 2]
