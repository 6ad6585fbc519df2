"""Diffusers denoisers through the traced front end (simcost.trace.diffusion): one
noise-prediction training step recorded with symbolic batch, image and text sizes equals a
real CPU step at other sizes, exactly (peft's parameters, FlopCounterMode's matmul FLOPs per
phase, convolutions included, and the storages autograd keeps at the end of forward); the zoo's
SD 1.5 and SDXL UNets and DiT-XL/2 trace on the meta device at their real sizes."""
import pytest

pytest.importorskip("peft")
pytest.importorskip("diffusers")

from simcost.errors import SimcostError  # noqa: E402
from simcost.validate import traced  # noqa: E402

pytestmark = pytest.mark.torch

# CI: the transformers' cases (seconds each) and, below, the SD-style UNet under LoRA with its
# branch guard (~20 s on 2 cores); `pytest -m slow` runs every tuner on each denoiser (the
# UNets' LoHa / LoKr on the resnets' convolutions, the SDXL-style UNet's 3-block stacks)
SUBSET = {("dit", "lora"), ("dit", "loha"), ("pixart", "lokr")}
CASES = list(traced.traced_cases(list(traced.DIFFUSION)))
LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 4,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def _params():
    return [pytest.param(m, meth, pc, id=f"{m}-{meth}",
                         marks=() if (m, meth) in SUBSET else (pytest.mark.slow,))
            for m, meth, pc in CASES]


@pytest.mark.parametrize("model,method,peft_config", _params())
def test_tiny_denoiser_step_is_exact(model, method, peft_config):
    r = traced.run_traced_case(model, method, peft_config)
    assert r.ok, r.mismatches()


def test_subset_is_in_the_matrix():
    assert SUBSET <= {(m, meth) for m, meth, _ in CASES}
    assert ("unet-sd", "lora") in {(m, meth) for m, meth, _ in CASES}


def _trace(model, hints=None, method="lora"):
    from simcost.trace.build import trace_config
    cfg, h, _ = traced.CONFIGS[model]
    return trace_config(cfg, traced.adapter_configs(model)[method], dtype="fp32",
                        hints=hints or h)


def test_dit_is_traced_at_its_image_size_and_one_block_of_three():
    """DiT's position table fixes the image size; its 3 blocks are traced as 2 (the first,
    and one standing for the other two)."""
    from simcost.trace.compiled import compile_trace
    tr = _trace("dit")
    assert tr.specialized.get("image") == 32
    assert sorted(tr.counts.values()) == [1, 2]
    with pytest.raises(SimcostError, match="fixed image to 32"):
        compile_trace(tr).check({"batch": 2, "image": 64})


def test_unet_step_is_exact_on_the_branch_it_was_traced_on():
    """SD-style UNet under LoRA, traced at batch 3, 64 px (latent 8), 11 tokens, equals the
    real step at batch 2, 48 px (latent 6), 7 tokens. The UNet forwards explicit upsample sizes
    when the latent is not a multiple of 2**upsamplers: the recording refuses 40 px (latent 5)."""
    from simcost.trace.price import Pricer
    cfg, _, dims = traced.CONFIGS["unet-sd"]
    tr = _trace("unet-sd")
    pr = Pricer(tr)
    p = pr.price(**dims)
    r = traced.measure_real(cfg, traced.adapter_configs("unet-sd")["lora"], dims)
    assert (tr.params_total, tr.params_trainable) == (r.params_total, r.params_trainable)
    assert (p.fwd_matmul_flops, p.bwd_matmul_flops, p.saved_bytes) == \
        (r.fwd_matmul_flops, r.bwd_matmul_flops, r.saved_bytes)
    with pytest.raises(SimcostError, match="holds only where"):
        pr.price(**{**dims, "image": 40})


def test_checkpointed_step_is_exact():
    """diffusers' own gradient checkpointing (its blocks under torch.utils.checkpoint): the
    recomputed forward is counted in backward as FlopCounterMode counts it."""
    from simcost.trace.build import build_model, enable_checkpointing, task_for, trace_config
    from simcost.trace.price import Pricer
    from simcost.trace.record import _loss_of
    from simcost.validate.torch_measure import _flop_counter, _register_missing_flop_formulas
    cfg, hints, dims = traced.CONFIGS["dit"]
    pc = traced.adapter_configs("dit")["lora"]
    p = Pricer(trace_config(cfg, pc, dtype="fp32", hints=hints, checkpointing=True)).price(**dims)
    _register_missing_flop_formulas()
    task = task_for(cfg)
    model = build_model(task, pc, "fp32", "cpu")
    model.train()
    enable_checkpointing(model)
    inputs = task.inputs(dims, None)
    with _flop_counter() as fc:
        loss = _loss_of(model(**inputs), inputs, task.loss)
        fwd = fc.get_total_flops()
        loss.backward()
        bwd = fc.get_total_flops() - fwd
    assert (p.fwd_matmul_flops, p.bwd_matmul_flops) == (fwd, bwd)
    assert 0 < p.rec_matmul_flops < p.fwd_matmul_flops


def test_unknown_and_unsupported_classes_are_one_line():
    from simcost.trace.build import task_for
    with pytest.raises(SimcostError, match="has no class 'UNet9DConditionModel'") as e:
        task_for({"_class_name": "UNet9DConditionModel", "sample_size": 8})
    assert "\n" not in str(e.value)
    with pytest.raises(SimcostError, match="trains the diffusers denoisers") as e:
        task_for({"_class_name": "AutoencoderKL"})
    assert "\n" not in str(e.value)
    with pytest.raises(SimcostError, match="addition_embed_type='image'") as e:
        task_for({**traced.CONFIGS["unet-sd"][0], "addition_embed_type": "image"})
    assert "\n" not in str(e.value)


def test_sizes_and_defaults():
    """Image in pixels (default: sample_size x the VAE's 8), seq 77 (CLIP's) for the UNets."""
    from simcost.trace.build import task_for
    sd = task_for(traced.CONFIGS["unet-sd"][0])
    assert sd.kind == "noise-pred" and sd.dims == ("batch", "image", "seq")
    assert sd.sizes({"batch": 2}) == {"batch": 2, "image": 64, "seq": 77}
    assert task_for(traced.CONFIGS["pixart"][0]).sizes({"batch": 2})["seq"] == 120   # T5's
    ddpm = task_for(traced.CONFIGS["unet-ddpm"][0])            # pixel space
    assert ddpm.sizes({"batch": 2}) == {"batch": 2, "image": 8}
    dit = task_for(traced.CONFIGS["dit"][0])
    assert dit.dims == ("batch", "image") and dit.static == ("image",)
    with pytest.raises(SimcostError, match="--seq does not apply"):
        dit.sizes({"batch": 2, "seq": 7})


def test_symbolic_composites_keep_sizes_symbolic():
    """F.interpolate's C++ upsampling reads concrete sizes, and the fake convolution guards the
    batch to choose a CPU kernel: while recording, neither specialises nor guards a size, the
    recorded ops are the real ones, and torch's functions are restored after."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from simcost.trace.composites import symbolic_composites
    from simcost.trace.record import make_symbols
    orig = torch._C._nn.upsample_nearest2d, torch._C._select_conv_backend
    env = ShapeEnv()
    s = make_symbols(env, {"batch": 3, "side": 5})
    with FakeTensorMode(shape_env=env), symbolic_composites():
        x = torch.zeros(s["batch"], 4, s["side"], s["side"], requires_grad=True)
        y = F.interpolate(x, scale_factor=2.0, mode="nearest")
        z = F.interpolate(x, size=(s["side"] * 3, 7), mode="nearest")
        c = F.conv2d(y, torch.zeros(8, 4, 3, 3, requires_grad=True), padding=1)
        (c.sum() + z.sum()).backward()
    assert str(y.shape[0]) == str(s["batch"]) and str(y.shape[2]) == f"2*{s['side']}"
    assert str(z.shape[2]) == f"3*{s['side']}" and z.shape[3] == 7
    assert c.shape[2] == y.shape[2] and c.is_contiguous()
    assert not env.replacements
    assert not [g for g in env.guards if s["batch"].node.expr in g.expr.free_symbols]
    assert (torch._C._nn.upsample_nearest2d, torch._C._select_conv_backend) == orig
    real = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert torch.equal(F.interpolate(real, scale_factor=2.0), real.repeat_interleave(
        2, 2).repeat_interleave(2, 3))


# the zoo's denoisers on the meta device at their real sizes (the UNets: minutes each on 2
# cores, under `pytest -m slow`; DiT-XL/2: seconds, its 28 blocks traced as 2), with their
# published parameter counts. DiT-XL/2's 675,129,632 counts its fixed position table (a
# parameter there, 256 x 1152; a buffer in diffusers), and diffusers gives each of the 28
# blocks its own copy of the timestep and class embedder (convert_dit_to_diffusers.py copies
# the one of the paper's model; 256x1152 + 1152x1152 + 2x1152 + 1001x1152 each)
_DIT_EMB = 256 * 1152 + 1152 * 1152 + 2 * 1152 + 1001 * 1152
ZOO = {"stable-diffusion-1.5-unet": 859_520_964, "sdxl-unet": 2_567_463_684,
       "dit-xl-2-256": 675_129_632 - 256 * 1152 + 27 * _DIT_EMB}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n.startswith("dit") else
                                                (pytest.mark.slow,)) for n in ZOO])
def test_zoo_denoiser_traces_at_real_size(name):
    """LoRA r=4 on to_q, to_k, to_v, to_out.0: the trainable parameters are peft's on a meta
    build, the base model's the published count, and FLOPs and saved bytes are linear in the
    (symbolic) batch."""
    from simcost.trace.build import build_model, task_for, trace_task
    from simcost.trace.price import Pricer
    task = task_for(name)
    tr = trace_task(task, LORA, dtype="bf16", hints=task.sizes({"batch": 2}))
    trainable, total = build_model(task, LORA, "bf16", "meta").get_nb_trainable_parameters()
    assert (tr.params_trainable, tr.params_total) == (trainable, total)
    assert total - trainable == ZOO[name]
    assert "batch" not in tr.specialized
    pr = Pricer(tr)
    p = [pr.price(**task.sizes({"batch": b})) for b in (2, 4, 8)]
    for a, b in ((p[0], p[1]), (p[1], p[2])):
        assert 2 * a.fwd_matmul_flops == b.fwd_matmul_flops > 0
        assert 2 * a.bwd_matmul_flops == b.bwd_matmul_flops > 0
        assert 2 * a.saved_bytes == b.saved_bytes > 0
    assert not p[0].unpriced, p[0].unpriced


def test_cli_estimates_a_diffusers_config(tmp_path, capsys):
    """``estimate train --model dir/config.json`` with a diffusers config: the traced front end
    (auto), the image size in pixels (default sample_size x 8), samples per second, LoRA on
    the attention projections as peft counts it; --seq does not apply to DiT."""
    import json

    from simcost.cli import main
    d = tmp_path / "dit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(traced.CONFIGS["dit"][0]))
    argv = ["estimate", "train", "--hardware", "cpu-generic", "--json", "--model", str(d),
            "--batch", "2", "--peft", "lora", "--rank", "4", "--targets",
            "to_q,to_k,to_v,to_out.0", "--no-trace-cache"]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)
    assert res["frontend"] == "traced" and res["sizes"] == {"batch": 2, "image": 32}
    assert res["samples_per_s"] > 0 and "tokens_per_s" not in res
    lora = traced.adapter_configs("dit")["lora"]
    assert res["params"]["trainable"] == traced.measure_real(
        traced.CONFIGS["dit"][0], lora, {"batch": 2, "image": 32}).params_trainable
    assert main([*argv, "--seq", "7"]) == 2
    assert "--seq does not apply" in capsys.readouterr().err
