"""``simcost`` command line: capacity planning without torch.

Every bad input ends in one line on stderr and exit code 2; nothing is written before the
inputs are known to be good.
"""
from __future__ import annotations

import argparse
import json
import sys

from simcost.argtypes import integer, number
from simcost.errors import SimcostError

from simcost.request.choices import (ATTENTIONS, CHECKPOINTING, DTYPES, FRONTENDS,
                                     MIXED_PRECISIONS, OPTIMIZERS, PEFT_METHODS as PEFT_CHOICES)


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its description (unless the text states it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message):  # one line, exit 2 (argparse prints usage + message otherwise)
        import re

        from simcost.errors import closest
        m = re.search(r"invalid choice: '?([^' ]*)'? \(choose from (.*)\)", message)
        if m:                        # name the nearest valid choices first, as elsewhere
            valid = [c.strip(" '") for c in m.group(2).split(",")]
            message = message.replace(m.group(0), f"invalid choice: '{m.group(1)}'"
                                      f"{closest(m.group(1), valid)}; valid: "
                                      f"{', '.join(valid)}")
        where = self.prog.removeprefix("simcost").strip()
        raise SimcostError(f"{where}: {message}" if where else message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="simcost", description="PEFT training and serving cost model.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    est = sub.add_parser("estimate", help="estimate one step")
    est_sub = est.add_subparsers(dest="what", required=True, parser_class=_Parser)
    _add_train(est_sub)
    _add_info(sub)
    _add_calibrate(sub)
    _add_validate(sub)
    from simcost.serve.cli import add_commands as serve_commands
    serve_commands(sub, _Parser)        # `estimate serve` and `simulate serve`
    from simcost.plan.cli import add_commands as plan_commands
    plan_commands(sub, _Parser)         # `plan train` and `plan serve`
    return p


def _add_train(est_sub) -> None:
    t = est_sub.add_parser("train", help="one training step: FLOPs, memory, time, fits",
                           description="Estimate one training step (forward with loss, backward, "
                                       "optimizer step) of MODEL on HARDWARE.")
    t.add_argument("--model", required=True,
                   help="zoo name (simcost models), a config.json (any architecture "
                        "transformers or diffusers builds) or its directory, or "
                        "path/to/file.py:factory (your own torch module; see README)")
    t.add_argument("--hardware", required=True, help="profile name or profile JSON path")
    t.add_argument("--batch", type=integer, default=None,
                   help="samples per optimizer step (the global batch with --devices); "
                        "required unless --find max-batch")
    t.add_argument("--seq", type=integer, default=None,
                   help="tokens per sequence, required by text models (virtual tokens of "
                        "prompt tuning come on top; a diffusion UNet's text tokens)")
    t.add_argument("--target-seq", type=integer, default=None,
                   help="encoder-decoder models (T5, BART, Whisper): target tokens "
                        "(default: --seq)")
    t.add_argument("--image-size", type=integer, default=None,
                   help="vision and diffusion models: pixels per image side (default: the "
                        "config's)")
    t.add_argument("--frontend", default="auto", choices=FRONTENDS,
                   help="analytic: the hand-built decoder graphs (no torch); traced: torch "
                        "records the step (any model, every peft tuner; needs the torch "
                        "extra); auto: analytic where it covers the request")
    t.add_argument("--quantize", default="none", choices=("none", "nf4", "int8"),
                   help="the frozen base stored quantised: nf4 (QLoRA, bitsandbytes 4-bit "
                        "with double quantisation) or int8 (LLM.int8); with LoRA nf4 is "
                        "--peft qlora, with any other tuner the traced front end prices it")
    t.add_argument("--no-trace-cache", action="store_true",
                   help="traced front end: record the step again instead of reusing a cached "
                        "recording")
    t.add_argument("--peft", default=None, choices=PEFT_CHOICES, metavar="NAME",
                   help=f"PEFT method ({', '.join(PEFT_CHOICES)}); default full")
    t.add_argument("--peft-config", default=None, metavar="PATH",
                   help="peft adapter_config.json (or its directory)")
    t.add_argument("--rank", type=integer, default=None, help="LoRA rank r (default 8)")
    t.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    t.add_argument("--targets", default=None,
                   help="comma-separated target modules, or all-linear (default: peft's)")
    t.add_argument("--lora-dropout", type=float, default=None,
                   help="LoRA dropout probability in [0, 1) (default 0)")
    t.add_argument("--rslora", action="store_true", default=None,
                   help="rank-stabilised LoRA scaling alpha/sqrt(r) (no cost change)")
    t.add_argument("--num-virtual-tokens", type=integer, default=None,
                   help="prefix / prompt tuning: virtual tokens (default 20)")
    t.add_argument("--trainable-layers", type=integer, default=None,
                   help="freeze: train only the last K blocks (and the head)")
    t.add_argument("--adapter-dim", type=integer, default=None,
                   help="serial adapter bottleneck (default 64)")
    t.add_argument("--lst-reduction", type=integer, default=None,
                   help="lst: side network width = hidden / this (default 8)")
    t.add_argument("--dtype", default="bf16", choices=DTYPES,
                   help="fp8: TransformerEngine-style fp8 GEMMs on bf16 weights")
    t.add_argument("--mixed-precision", default="none", choices=MIXED_PRECISIONS,
                   help="autocast compute dtype over --dtype weights (fp32 master weights)")
    t.add_argument("--attn", default="sdpa", choices=ATTENTIONS,
                   help="attention implementation (transformers' attn_implementation)")
    t.add_argument("--stack", default="hf", metavar="NAME|PATH",
                   help="software stack that runs the step (simcost stacks): hf, hf-liger, "
                        "unsloth, torchtune, torchtune-compile, nemo, deepspeed, an alias "
                        "(axolotl, llama-factory, axolotl:liger) or a profile JSON (default hf)")
    t.add_argument("--grad-checkpointing", action="store_true",
                   help="full activation checkpointing per decoder layer (= --checkpointing full)")
    t.add_argument("--checkpointing", default=None, choices=CHECKPOINTING,
                   help="selective: recompute only the attention core (Korthikanti et al.)")
    t.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="mezo: zeroth-order MeZO, two forward passes and no backward")
    t.add_argument("--loss-chunks", type=integer, default=1, metavar="N",
                   help="chunked cross-entropy (torchtune CEWithChunkedOutputLoss): logits "
                        "upcast and cross-entropy'd N sequence chunks at a time (default 1)")
    t.add_argument("--optimizer-in-backward", action="store_true",
                   help="optimizer stepped per parameter in backward (torchtune "
                        "optimizer_in_bwd): gradients freed as they are applied; no "
                        "gradient accumulation, and nothing freed under DDP (ZeRO-0/1)")
    t.add_argument("--jobs", type=integer, default=None,
                   help="N PEFT jobs sharing one frozen base (mLoRA BatchLoRA); --batch is "
                        "per job; compares against N separate runs")
    t.add_argument("--max-positions", type=integer, default=None,
                   help="the model's context length, when extended beyond its config "
                        "(RoPE models run longer sequences anyway, with a warning; a learned "
                        "position table such as GPT-2's cannot)")
    t.add_argument("--host-allocator", default=None, choices=("glibc", "tcmalloc", "jemalloc"),
                   help="CPU: the training process's malloc (default: the calibration's, "
                        "named in a warning); glibc and jemalloc fault large blocks in again "
                        "every step")
    _add_distributed(t)
    _add_job(t)
    t.add_argument("--json", action="store_true", help="print one JSON object")
    t.add_argument("--trace-out", default=None, metavar="FILE",
                   help="also write the step as a Chrome/Perfetto trace (JSON; open in "
                        "ui.perfetto.dev or chrome://tracing): per-op spans on compute, "
                        "optimizer and host tracks, per pipeline stage with communication "
                        "tracks on several devices; the critical spans add up to the step")


def _add_job(t) -> None:
    j = t.add_argument_group("the whole job (time, cost and energy next to the step)")
    j.add_argument("--tokens", type=integer, default=None,
                   help="training tokens per epoch, split into sequences of --seq")
    j.add_argument("--samples", type=integer, default=None,
                   help="training samples (sequences, images) per epoch")
    j.add_argument("--epochs", type=number, default=1.0,
                   help="passes over --tokens or --samples")
    j.add_argument("--price", type=number, default=None, metavar="USD_PER_DEVICE_HOUR",
                   help="price per device-hour instead of the profile's")
    j.add_argument("--find", default=None, choices=("max-batch", "max-seq"),
                   help="the largest --batch (or --seq) that fits, by bisection on the same "
                        "fits test; the estimate is then at that size")


def _add_distributed(t) -> None:
    d = t.add_argument_group(
        "distributed (--batch is then the global batch per step)",
        "A plan prints as dpD tpT[+sp] ppP cpC zeroZ mbMxA: D data-parallel replicas, tensor "
        "parallelism T (+sp: with sequence parallelism), P pipeline stages, context "
        "parallelism C, ZeRO stage Z, micro-batches of M samples with A of them accumulated "
        "per optimizer step (M x A x D = --batch). 'simcost plan train' searches whole jobs.")
    d.add_argument("--devices", type=integer, default=1, help="total devices (default 1)")
    d.add_argument("--nodes", type=integer, default=None,
                   help="nodes (default: devices / 8, at least 1)")
    d.add_argument("--tp", type=integer, default=None, help="tensor-parallel size")
    d.add_argument("--pp", type=integer, default=None, help="pipeline-parallel stages")
    d.add_argument("--dp", type=integer, default=None, help="data-parallel replicas")
    d.add_argument("--cp", type=integer, default=None, help="context-parallel size")
    d.add_argument("--ep", type=integer, default=None,
                   help="expert-parallel size (MoE models): experts sharded over ep dp ranks")
    d.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                   help="ZeRO stage (3 = FSDP full sharding)")
    d.add_argument("--parallel", default=None, choices=("auto",),
                   help="auto: search the valid plans, keep those that fit, pick the fastest")
    d.add_argument("--micro-batch", type=integer, default=None,
                   help="samples per micro-batch (default: all of a replica's, or 1 with pp)")
    d.add_argument("--no-sequence-parallel", action="store_true",
                   help="tensor parallelism without sequence parallelism")
    d.add_argument("--tp-overlap", action="store_true",
                   help="overlap TP communication with the linears' GEMMs (userbuffers)")
    d.add_argument("--pp-schedule", default="1f1b", choices=("1f1b", "interleaved"),
                   help="pipeline schedule (interleaved: --virtual-stages chunks per device)")
    d.add_argument("--virtual-stages", type=integer, default=1,
                   help="interleaved schedule: model chunks per device")
    d.add_argument("--offload", default="none", choices=("none", "optimizer", "params"),
                   help="ZeRO-Offload of optimizer states (and parameters) to the host")
    d.add_argument("--fp8-attention", action="store_true",
                   help="with --dtype fp8: fused attention in fp8 too")
    d.add_argument("--fp8-params", action="store_true",
                   help="with --dtype fp8: frozen linear weights stored in fp8 (NeMo "
                        "fp8_params, TE fp8_model_init)")
    d.add_argument("--fp8-activation", action="store_true",
                   help="with --dtype fp8: a fused SwiGLU keeps its inputs in fp8 (Megatron "
                        "activation_func_fp8_input_store, NeMo FP8_ACTIVATION)")


def _add_info(sub) -> None:
    hw = sub.add_parser("hardware", help="hardware profiles")
    hw_sub = hw.add_subparsers(dest="what", required=True, parser_class=_Parser)
    hw_list = hw_sub.add_parser("list", help="list bundled profiles (with price per device-hour)")
    hw_list.add_argument("--json", action="store_true", help="print one JSON object")
    show = hw_sub.add_parser("show", help="show one profile with sources")
    show.add_argument("name", help="profile name (simcost hardware list) or profile JSON path")
    show.add_argument("--json", action="store_true", help="print the profile as JSON")

    stacks = sub.add_parser("stacks", help="training stacks (--stack) and their sources")
    stacks.add_argument("name", nargs="?", default=None,
                        help="show one stack (name, alias[:variant] or profile path)")
    stacks.add_argument("--json", action="store_true", help="print one JSON object")

    models = sub.add_parser("models", help="bundled model configs")
    models.add_argument("--json", action="store_true", help="print one JSON object")


def _add_calibrate(sub) -> None:
    cal = sub.add_parser("calibrate", help="microbenchmark this machine and write a profile "
                                           "(needs torch)")
    from simcost.hardware.calibrate import add_arguments
    add_arguments(cal)


def _add_validate(sub) -> None:
    from simcost.validate.published.outdir import OUT_DIR_HELP
    val = sub.add_parser("validate", help="check simcost against torch runs (torch extra) and "
                                         "published measurements")
    val_sub = val.add_subparsers(dest="what", required=True, parser_class=_Parser)
    ex = val_sub.add_parser("exact", help="FLOPs, trainable params and saved activations vs torch")
    ex.add_argument("--suite", default="tiny", choices=("tiny", "zoo", "traced", "all"),
                    help="tiny: small random configs (real runs); zoo: real sizes on fake "
                         "tensors; traced: the traced front end on encoders, T5, ViT and "
                         "peft's tuners against real runs")
    ex.add_argument("--out", default=None, help="write the results as JSON to this path")
    pub = val_sub.add_parser("published", help="published measurements (validation/published) "
                                               "vs the estimate; no torch needed")
    pub.add_argument("--source", default=None, help="only rows whose id starts with this prefix")
    pub.add_argument("--csv", default=None, help="another CSV with the same columns")
    pub.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    stp = val_sub.add_parser("steps", help="measured torch training steps vs the estimate")
    stp.add_argument("--hardware", default=None,
                     help="calibrated profile (default: run `simcost calibrate` first)")
    stp.add_argument("--threads", type=integer, default=None,
                     help="torch threads (default: torch's)")
    stp.add_argument("--repeats", type=integer, default=5,
                     help="timed steps per case (the median is reported)")
    stp.add_argument("--limit", type=integer, default=None, help="run only the first N cases")
    stp.add_argument("--out-dir", default=None, help=OUT_DIR_HELP)
    stp.add_argument("--allocator", default="tcmalloc", choices=("tcmalloc", "system"),
                     help="measure with tcmalloc preloaded when it is installed (default; "
                          "glibc's page faults make CPU steps noisy) or the system allocator")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        if not argv:                 # bare `simcost`: the help, as users expect
            parser.print_help()
            return 0
        args = parser.parse_args(argv)
        return _dispatch(args)
    except SimcostError as e:
        print(f"simcost: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args) -> int:
    if args.command == "simulate" or (args.command == "estimate" and args.what == "serve"):
        from simcost.serve.cli import dispatch as serve_dispatch
        return serve_dispatch(args)
    if args.command == "plan":
        from simcost.plan.cli import dispatch as plan_dispatch
        return plan_dispatch(args)
    if args.command == "estimate":
        return _estimate_train(args)
    if args.command == "hardware":
        return _hardware(args)
    if args.command == "models":
        return _models(args)
    if args.command == "stacks":
        return _stacks(args)
    if args.command == "calibrate":
        from simcost.hardware.calibrate import run_cli as calibrate
        return calibrate(args)
    if args.command == "validate":
        if args.what == "published":
            from simcost.validate.published import run_cli as published
            return published(args)
        if args.what == "steps":
            from simcost.validate.steps import run_cli as steps
            return steps(args)
        from simcost.validate.exact import run_cli
        return run_cli(args)
    raise SimcostError(f"unknown command '{args.command}'")


def _train_request(a, cls=None, **extra):
    """The CLI's arguments as the same request the API builds (one validation for both)."""
    from simcost.request.train import PeftShorthand, TrainRequest
    if a.checkpointing not in (None, "full") and a.grad_checkpointing:
        raise SimcostError(f"--grad-checkpointing contradicts --checkpointing {a.checkpointing}")
    peft, dora = a.peft, None
    if peft == "dora":              # DoRA is peft's LoRA with use_dora
        peft, dora = "lora", True
    short = PeftShorthand.build(rank=a.rank, alpha=a.alpha, targets=a.targets,
                                dropout=a.lora_dropout, rslora=a.rslora, dora=dora,
                                num_virtual_tokens=a.num_virtual_tokens,
                                trainable_layers=a.trainable_layers, adapter_dim=a.adapter_dim,
                                side_reduction=a.lst_reduction)
    return (cls or TrainRequest).build(
        model=a.model, hardware=a.hardware, batch=a.batch, seq=a.seq, peft=peft,
        peft_config=a.peft_config, dtype=a.dtype, mixed_precision=a.mixed_precision,
        attn=a.attn, optimizer=a.optimizer,
        grad_checkpointing=a.checkpointing or ("full" if a.grad_checkpointing else "none"),
        devices=a.devices, nodes=a.nodes, tp=a.tp, pp=a.pp, dp=a.dp, cp=a.cp, ep=a.ep,
        zero=a.zero, parallel=a.parallel, micro_batch=a.micro_batch,
        sequence_parallel=False if a.no_sequence_parallel else None, tp_overlap=a.tp_overlap,
        pp_schedule=a.pp_schedule, virtual_stages=a.virtual_stages, offload=a.offload,
        fp8_attention=a.fp8_attention, fp8_params=a.fp8_params,
        fp8_activation=a.fp8_activation, max_positions=a.max_positions,
        loss_chunks=a.loss_chunks, optimizer_in_backward=a.optimizer_in_backward,
        stack=a.stack, host_allocator=a.host_allocator, shorthand=short,
        target_seq=a.target_seq, image_size=a.image_size, frontend=a.frontend,
        trace_cache=not a.no_trace_cache, quantize=a.quantize, tokens=a.tokens,
        samples=a.samples, epochs=a.epochs, price=a.price, **extra)


def _estimate_train(a) -> int:
    from simcost.api import run_train

    if a.jobs is not None and a.find is not None:
        raise SimcostError("estimate train: --find prices one job (no --jobs)")
    if a.jobs is not None:
        if a.trace_out:
            raise SimcostError("--trace-out traces one training step; --jobs (N jobs sharing "
                               "one step) has no trace")
        return _estimate_multi(a)
    if a.find is not None:
        return _estimate_find(a)
    if a.batch is None:
        raise SimcostError("estimate train: --batch is required (or --find max-batch)")
    req = _train_request(a)
    path = _trace_path(a, req)
    r = run_train(req)
    if not r.fits:
        from simcost.plan.fit import savers
        r = r.model_copy(update={"advice": savers(req, r)})
    _write_trace(path, req)
    _print_estimate(a, r)
    return 0


def _trace_path(a, req):
    """--trace-out's path, checked (with the front end) before anything runs; None without."""
    if not a.trace_out:
        return None
    from simcost import perfetto
    path = perfetto.check_trace_out(a.trace_out)
    perfetto.check_frontend(req)
    return path


def _write_trace(path, req) -> None:
    """The step of ``req`` recorded op by op (the estimate is the same; a test checks it)."""
    if path is None:
        return
    from simcost import perfetto
    from simcost.api import run_train
    from simcost.sim.breakdown import recording
    with recording() as rec:
        r = run_train(req)
    perfetto.write_trace(path, perfetto.train_trace(r, rec))


def _print_estimate(a, r) -> None:
    _warn(r.warnings)
    if a.json:
        print(json.dumps(r.model_dump_public()))
        return
    from simcost.report import print_advice, print_find, print_train
    print_train(r)
    if r.parallel is not None:
        _print_parallel(r)
    if r.find:
        print_find(r.find, r.memory_bytes["capacity"])
    if r.advice:
        print_advice(r)


def _estimate_find(a) -> int:
    from simcost.plan.fit import FIND, find_max, savers
    field = FIND[a.find]
    if getattr(a, field) is not None:
        raise SimcostError(f"estimate train: --find {a.find} searches --{field}; leave "
                           f"--{field} out")
    if field == "batch" and (a.parallel == "auto" or a.micro_batch is not None):
        raise SimcostError("estimate train: --find max-batch with --parallel auto or "
                           "--micro-batch: gradient accumulation makes any batch fit; give the "
                           "plan's sizes (--tp/--pp/--dp/--cp) without --micro-batch, so a "
                           "replica's batch is one micro-batch")
    if field == "seq" and a.seq is None and a.batch is not None and a.image_size is not None:
        raise SimcostError("estimate train: --find max-seq needs a model with a token sequence; "
                           "--image-size gives a vision model")
    if field == "batch":
        a.batch = 1
    elif a.seq is None and a.batch is not None:
        a.seq = 1
    if a.batch is None:
        raise SimcostError("estimate train: --batch is required (or --find max-batch)")
    req = _train_request(a)
    path = _trace_path(a, req)
    r, entry = find_max(req, a.find)
    if r is None:                       # even the smallest size does not fit
        from simcost.api import run_train
        first = run_train(req)          # at size 1, which find_max probed first
        r = first.model_copy(update={"find": entry, "advice": savers(req, first)})
    else:
        r = r.model_copy(update={"find": entry})
        req = _train_request(argparse.Namespace(**{**vars(a), field: entry["value"]}))
    _write_trace(path, req)
    _print_estimate(a, r)
    return 0


def _warn(warnings) -> None:
    for w in warnings:
        print(f"simcost: warning: {w}", file=sys.stderr)


def _estimate_multi(a) -> int:
    from simcost.api import run_multi_train
    from simcost.request.train import MultiTrainRequest

    if a.peft is None:
        a.peft = "lora"
    r = run_multi_train(_train_request(a, MultiTrainRequest, jobs=a.jobs))
    _warn(r.shared.warnings)
    if a.json:
        print(json.dumps(r.model_dump_public()))
        return 0
    c = r.comparison
    gib = 2 ** 30
    sh, se = r.shared, r.separate
    print(f"{r.jobs} {sh.peft['method']} jobs on one {sh.model} base, {sh.hardware}, "
          f"batch {sh.batch} x seq {sh.seq} per job")
    print(f"  shared (base GEMMs batched): step {sh.time_s['step']:.3f} s, "
          f"{sh.tokens_per_s:,.0f} tokens/s, peak {sh.memory_bytes['peak'] / gib:.1f} GiB"
          f"{'' if sh.fits else '  (does not fit)'}")
    print(f"  separate runs: step {se.time_s['step']:.3f} s each, {r.jobs} in sequence "
          f"{c['separate_sequential_step_s']:.3f} s; peak {se.memory_bytes['peak'] / gib:.1f} GiB "
          f"each, {c['separate_concurrent_peak_bytes'] / gib:.1f} GiB held at once")
    print(f"  speed-up x{c['speedup']:.2f}; memory saved "
          f"{c['memory_saved_bytes'] / gib:.1f} GiB (one base of "
          f"{c['base_weight_bytes_shared'] / gib:.1f} GiB instead of {r.jobs})")
    return 0


def _print_parallel(r) -> None:
    par = r.parallel
    t = r.time_s
    gib = 2 ** 30
    torus = par["topology"].get("ici_torus")
    where = (f"one {torus['dims']}-D ICI torus" if torus else f"{par['nodes']} node(s)")
    print(f"plan: {par['plan_label']}  ({par['devices']} devices, {where}, "
          f"{par['plans_searched']} plan(s) searched, {par['plans_priced']} priced)")
    print(f"  per device: peak {r.memory_bytes['peak'] / gib:.1f} GiB of "
          f"{r.memory_bytes['capacity'] / gib:.0f} GiB; step {t['step']:.3f} s "
          f"(bubble {t['pipeline_bubble']:.3f} s, communication {t['communication']:.3f} s: "
          f"exposed {t['communication_exposed']:.3f} s, hidden {t['communication_hidden']:.3f} s)")
    for k, v in par["communication"].items():
        if k != "bytes" and v["total_s"] > 0:
            print(f"  {k:<17} total {v['total_s']:.4f} s  exposed {v['exposed_s']:.4f} s")
    if par["candidates"]:
        print("best plans:")
        for c in par["candidates"]:
            print(f"  {c['plan']:<40} step {c['step_s']:.3f} s  peak "
                  f"{c['peak_bytes'] / gib:.1f} GiB{'' if c['fits'] else '  (does not fit)'}")


def _hardware(a) -> int:
    from simcost.hardware import list_profiles, load_profile

    if a.what == "list":
        from simcost.report import hardware_list_json, print_hardware_list
        profiles = [load_profile(n) for n in list_profiles()]
        if a.json:
            print(json.dumps({"profiles": hardware_list_json(profiles)}, indent=2))
        else:
            print_hardware_list(profiles)
        return 0
    prof = load_profile(a.name)
    if a.json:
        print(prof.model_dump_json(indent=2))
    else:
        from simcost.report import print_hardware
        print_hardware(prof)
    return 0


def _stacks(a) -> int:
    from simcost.report import print_stack, print_stack_list
    from simcost.stack import load_stack, stack_names
    from simcost.stack.registry import profile_of

    if a.name is None:
        profs = [profile_of(n) for n in stack_names()]
        if a.json:
            from simcost.result import SCHEMA_VERSION
            print(json.dumps({"schema_version": SCHEMA_VERSION,
                              "stacks": [p.model_dump() for p in profs]}))
        else:
            print_stack_list(profs)
        return 0
    st = load_stack(a.name)
    prof = profile_of(st.name)
    if a.json:
        print(json.dumps({**prof.model_dump(), **({"via": st.via} if st.via else {})}))
    else:
        print_stack(prof, st.via)
    return 0


def _models(a) -> int:
    from simcost.models.config import load_model, zoo_entry, zoo_names

    rows = []
    for name in zoo_names():
        entry = zoo_entry(name)
        spec = load_model(name) if entry["frontend"] == "analytic" else None
        rows.append((entry, spec))
    if a.json:
        from simcost.result import SCHEMA_VERSION
        print(json.dumps({"schema_version": SCHEMA_VERSION, "models": [
            {"name": e["name"], "architecture": s.architecture if s else
             (e["class_name"] or e["model_type"]), "library": e["library"],
             "frontend": e["frontend"], "layers": s.layers if s else None,
             "hidden": s.hidden if s else None} for e, s in rows]}))
    else:
        from simcost.report import print_models
        print_models(rows)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
