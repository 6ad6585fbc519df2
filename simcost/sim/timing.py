"""The time model: per op, per phase, with the few physical effects a roofline misses.

For one op in one phase (forward, or backward):

    t_exec = Σ_gemm 2mnk·batch / (P_dtype · eff(m, n, k))  +  other FLOPs / P_vector
    t      = max(t_exec, bytes / BW_achievable)  (+ launch)

- ``P_dtype``: the dense matrix peak of the dtype times the device's achievable fraction
  (``time_model.matmul_efficiency``: measured maximum-achievable-matmul numbers for GPUs,
  1.0 for a calibrated profile whose peaks are already measured).
- ``eff``: how far a GEMM of this shape falls below that: on a calibrated profile the
  measured throughput table (``simcost calibrate``), interpolated in log m, log n, log k;
  else a fitted saturation ``Π 1/(1+(h/x)^a)``; on a GPU profile tile quantisation
  (m, n padded to the tile) and wave quantisation (tiles spread over the compute units, the
  last wave partly idle), so skinny GEMMs such as LoRA's rank-r products run far below peak;
  a dimension of at most 64 runs on a 64-wide tile (CUTLASS's smallest SM80 tile), and each
  tile pays ``tile_fixed_k`` K-steps beyond its K loop (pipeline fill, epilogue). The tile
  model's constants are the same for every GPU (``gpu_gemm.json``, the two unpublished ones
  fitted on Vidur's cuBLAS rows by ``validation/fit/fit_gemm.py``).
- a GEMM on the tile model overlaps compute and operand streaming imperfectly near the ridge
  point: ``t = (t_exec^p + t_stream^p)^(1/p)`` (``overlap_exponent``), and a split-K GEMM
  streams its fp32 partial products out and back in on top of its operands.
- ``BW_achievable``: datasheet bandwidth times ``time_model.bandwidth_efficiency`` (a
  calibrated profile measures it per buffer size: cache-resident tensors stream faster).
  When there are fewer tiles than compute units, cuBLAS splits K across them (split-K /
  stream-K), so a GEMM with few output tiles and a long K still fills the device.
- host time per kernel: the eager framework (Python modules, the dispatcher, autograd
  recording) spends ``dispatch_s`` of host time per kernel, plus the launch call on a GPU.
  GPU kernels run asynchronously, so an op costs at least that host time (a host-bound eager
  loop) but the host work hides behind longer kernels: ``max(t, kernels·(dispatch + launch))``.
  On a CPU the host *is* the device: ``t + kernels·dispatch``.
- ``time_model.step_overhead_s``: host work per step outside the ops.
- fused attention (``sdpa``) on a profile with ``time_model.attention_efficiency_*``: the
  QKᵀ / PV matmuls run at the measured FlashAttention fraction of the dtype's dense peak,
  forward and backward separately (FA2/FA3 papers), instead of at the dense-GEMM efficiency.
  Those papers count a causal kernel's FLOPs as half the dense ones (the kernel skips the
  masked tiles), so a causal op with s_q == s_k is priced at half its dense matmul FLOPs.
  Profiles without these fields (CPU, calibrated) keep the GEMM pricing unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import json
import math

import numpy as np

from simcost.graph import kinds as K

# plain numbers (np.float64 is a float): the scalar paths of the time model
_NUMBER = (int, float, np.float64)

# (ceil, floor, maximum, minimum) for the tile model on plain numbers and on arrays (ufuncs
# only, so that a traced size replays: simcost.sim.symbolic)
_SCALAR_OPS = (lambda x: float(math.ceil(x)), lambda x: float(math.floor(x)), max, min)
_ARRAY_OPS = (np.ceil, np.floor, np.maximum, np.minimum)


def _ops(*xs):
    """The scalar ops when every value is a plain number, else numpy's."""
    return _SCALAR_OPS if all(type(x) in _NUMBER for x in xs) else _ARRAY_OPS

GPU_GEMM_FILE = Path(__file__).with_name("gpu_gemm.json")


@dataclass(frozen=True)
class GemmTileParams:
    """The tile model's constants, the same for every GPU profile (``gpu_gemm.json``: each
    value with its source, or fitted by ``validation/fit/fit_gemm.py`` with its rows)."""
    tile_fixed_k: float = 16.0          # K-steps a tile pays beyond its K loop
    overlap_exponent: float | None = None   # compute / streaming p-norm; None: max
    tile_min: float = 64.0              # the narrowest tile a short dimension runs on
    partial_bytes: float = 4.0          # bytes per element of a split-K partial product

    @classmethod
    def load(cls, path: Path = GPU_GEMM_FILE) -> "GemmTileParams":
        data = json.loads(Path(path).read_text())
        return cls(**{f.name: data[f.name]["value"] for f in fields(cls) if f.name in data})


GPU_GEMM = GemmTileParams.load()


# Host time per dispatched kernel of eager PyTorch + transformers (+ peft) training, measured
# with `simcost calibrate`'s framework benchmark (a tiny HF Llama step, so kernels take no
# time): 4.2-7.1 us per kernel on the 2-vCPU dev machine, torch 2.13 (forward 5.4-7.1,
# backward 4.2-4.7). Profiles and calibrated files override it with `time_model.dispatch_s`.
DEFAULT_DISPATCH_S = 5e-6


@dataclass(frozen=True)
class TimeModel:
    kind: str
    mm_peak: dict
    vec_peak: float
    bandwidth: float
    launch_s: float
    dispatch_s: float
    step_overhead_s: float
    half: tuple | None
    sharp: tuple
    units: int | None
    tile: tuple
    special_rates: dict | None = None  # {"exp" | "rng" | "log_softmax_bwd": elements/s}
    gemm_table: dict | None = None     # dtype -> (log2 m, log2 n, log2 k, FLOP/s grid)
    stream_table: tuple | None = None  # (log2 bytes, bytes/s)
    attn_rates: dict | None = None     # (dtype, "fwd" | "bwd") -> causal-counted FLOP/s
    gemm: GemmTileParams = GPU_GEMM    # the tile model's constants (GPU profiles)

    @classmethod
    def from_device(cls, dev, stack=None) -> "TimeModel":
        """The device's time model under a training ``stack`` (:class:`simcost.stack.Stack`;
        None: the device alone, with :data:`DEFAULT_DISPATCH_S`). On an accelerator the
        stack sets the host seconds per kernel (none under CUDA graphs), adds its per-step
        host work and scales the GEMM peak to the rate its kernels sustain; a CPU device keeps
        its profile's dispatch time (there the host is the device)."""
        p = dev.params                 # the profile's time-model values, typed

        def given(v, default):
            return default if v is None else v

        eff = given(p.matmul_efficiency, 1.0)
        on_accel = stack is not None and dev.kind != "cpu"
        sustained = 1.0
        if on_accel and stack.gemm_sustained is not None and not p.gemm_table:
            sustained = stack.gemm_sustained
        mm = {k: v * eff * sustained for k, v in dev.peak_flops_per_s.items()}
        if "fp8" in mm and p.matmul_efficiency_fp8 is not None:
            mm["fp8"] = dev.peak_flops_per_s["fp8"] * p.matmul_efficiency_fp8 * sustained
        half = None
        if p.matmul_half_m is not None:
            half = (p.matmul_half_m, p.matmul_half_n, p.matmul_half_k)
        sharp = (given(p.matmul_sharpness_m, 1.0), given(p.matmul_sharpness_n, 1.0),
                 given(p.matmul_sharpness_k, 1.0))
        units = int(p.compute_units) if p.compute_units is not None else None
        tile = (given(p.tile_m, 128), given(p.tile_n, 128))
        table = None
        if p.gemm_table:
            table = {dt: (np.log2(t["m"]), np.log2(t["n"]), np.log2(t["k"]),
                          np.asarray(t["flops_per_s"], dtype=float))
                     for dt, t in p.gemm_table.items()}
        stream = None
        if p.stream_table:
            st = p.stream_table
            stream = (np.log2(st["bytes"]), np.asarray(st["bytes_per_s"], dtype=float))
        attn = {}
        for dt, pre in (("bf16", "attention_efficiency"), ("fp16", "attention_efficiency"),
                        ("fp8", "attention_efficiency_fp8")):
            for ph in ("fwd", "bwd"):
                e = getattr(p, f"{pre}_{ph}")
                if e and dt in dev.peak_flops_per_s:
                    attn[(dt, ph)] = dev.peak_flops_per_s[dt] * e
        dispatch = given(p.dispatch_s, DEFAULT_DISPATCH_S)
        launch = dev.launch_overhead_s
        step_s = given(p.step_overhead_s, 0.0)
        if on_accel:
            dispatch = 0.0 if stack.cuda_graphs else stack.dispatch_s
            launch = 0.0 if stack.cuda_graphs else launch
            step_s = step_s + stack.step_overhead_s
        return cls(dev.kind, mm, dev.peak_flops_per_s["fp32"],
                   dev.memory_bandwidth_bytes_per_s * given(p.bandwidth_efficiency, 1.0),
                   launch, dispatch, step_s, half, sharp, units, tile,
                   p.special_rates, table, stream, attn or None)

    def key(self) -> tuple:
        """A hashable fingerprint of every value that prices an op (measured tables by their
        contents): two time models with the same key give the same times."""
        return tuple(_frozen(getattr(self, f.name)) for f in fields(self))

    def __post_init__(self):
        # whether GEMMs are priced by the tile model (a GPU profile's compute units, no fitted
        # saturation, no measured GEMM table): asked for every op, so kept (not a field)
        object.__setattr__(self, "tiled", self.units is not None and self.half is None
                           and self.gemm_table is None)

    def matmul_peak(self, dtype: str) -> float:
        p = self.mm_peak
        if dtype in p:
            return p[dtype]
        return p["fp32"]

    def gemm_efficiency(self, batch, m, n, k):
        """Fraction of the dtype's achievable peak a (batch x) m·n·k GEMM reaches (numbers
        or arrays). Plain numbers take the same arithmetic without numpy's per-call cost and
        give the numpy path's value and type (np.float64), so a traced run (simcost.sim.compiled,
        numpy on symbols) and a plain one agree bit for bit and in type."""
        if self.half is not None:
            ops = _ops(batch, m, n, k)
            e = 1.0
            for x, h, a in zip((m, n, k), self.half, self.sharp):
                e = e / (1.0 + (h / ops[2](x, 1)) ** a)
            return np.float64(e) if ops is _SCALAR_OPS else e
        if self.units is not None:
            return self._tile_gemm(batch, m, n, k)[0]
        return 1.0

    def _tile_gemm(self, batch, m, n, k, fixed_k=None):
        """(efficiency, split-K bytes) of a GEMM on the tile model (:meth:`_tile_plan`); the
        efficiency of plain numbers as np.float64, as the numpy path gives it."""
        ops = _ops(batch, m, n, k)
        eff, split = self._tile_plan(batch, m, n, k, ops, fixed_k)
        extra = 2.0 * self.gemm.partial_bytes * batch * m * n * split * (split > 1.0)
        return (np.float64(eff) if ops is _SCALAR_OPS else eff), extra

    def _tile_plan(self, batch, m, n, k, ops, fixed_k=None):
        """(efficiency, split) of a GEMM on the tile model, with ``ops`` = (ceil, floor,
        maximum, minimum) of plain numbers or of numpy: the same arithmetic on both.

        Output tiles of ``tile`` (a dimension no longer than ``gemm.tile_min`` runs on a
        tile that narrow, CUTLASS's smallest SM80 tile), spread over ``units`` in waves;
        with fewer tiles than units K is split (at least 256 per part). Each tile pays
        ``gemm.tile_fixed_k`` K-steps beyond its K loop (pipeline fill, epilogue), or
        ``fixed_k``: 0 for a fused attention kernel, whose output tile (one query block) runs
        the whole key loop and pays its fill and epilogue once, not per QK^T product of head
        dimension K (device_time passes it for an op with ``attention``)."""
        ceil, floor, mx, mn = ops
        g = self.gemm
        narrow_m = self.tile[0] - min(g.tile_min, self.tile[0])    # 0 or what a short m saves
        narrow_n = self.tile[1] - min(g.tile_min, self.tile[1])
        tm = self.tile[0] - narrow_m * (m <= g.tile_min)
        tn = self.tile[1] - narrow_n * (n <= g.tile_min)
        tiles = ceil(m / tm) * ceil(n / tn) * batch
        split = mx(1.0, mn(floor(self.units / tiles), ceil(k / 256)))
        waves = ceil(tiles * split / self.units)
        util = (batch * m * n * split) / (waves * self.units * tm * tn)
        k_part = k / split
        return util * k_part / (k_part + (g.tile_fixed_k if fixed_k is None else fixed_k)), split

    def gemm_splitk_bytes(self, batch, m, n, k):
        """Bytes a split-K GEMM moves beyond its operands: each of its ``split`` partial
        products written as fp32 (``gemm.partial_bytes`` per element) and read back by the
        reduction (0 without a split, or off the tile model)."""
        return self._tile_gemm(batch, m, n, k)[1] if self.tiled else 0.0

    def gemm_time(self, dtype: str, batch, m, n, k):
        flops = 2.0 * batch * m * n * k
        if self.gemm_table is not None:
            t = self.gemm_table.get(dtype) or self.gemm_table.get("fp32")
            if t is not None:
                return flops / _interp3(t, m, n, k)
        return flops / (self.matmul_peak(dtype) * self.gemm_efficiency(batch, m, n, k))

    def stream_time(self, nbytes):
        if self.stream_table is None:
            return nbytes / self.bandwidth
        lb, bw = self.stream_table
        return nbytes / np.interp(np.log2(np.maximum(nbytes, 1)), lb, bw)

    def special_time(self, special: dict):
        """Transcendentals and random numbers at their measured per-element rates (calibrated
        CPU profiles; on GPUs these ride along memory-bound kernels and have no rate)."""
        t = 0.0
        if self.special_rates and special:
            for kind, n in special.items():
                rate = self.special_rates.get(kind)
                if rate:
                    t = t + n / rate
        return t

    def attention_rate(self, dtype: str, phase: str):
        """Measured fused-attention throughput (causal-counted FLOP/s) or None."""
        if not self.attn_rates:
            return None
        return self.attn_rates.get((dtype, phase))

    def device_time(self, dtype: str, gemms, matmul_flops, other_flops, nbytes,
                    special=None, attention=None):
        """Seconds the device spends on one op's kernels of one phase (no host time).
        ``attention``: (phase, causal) for a fused attention op; with a measured attention
        rate for (dtype, phase) its matmuls are priced at that rate."""
        rate = self.attention_rate(dtype, attention[0]) if attention else None
        tiled = self.tiled
        splitk = []
        if rate:
            t_mm = matmul_flops * (0.5 if attention[1] else 1.0) / rate
        elif gemms and tiled:
            # gemm_time and gemm_splitk_bytes of each GEMM from one tile plan
            t_mm = 0.0
            peak = self.matmul_peak(dtype)
            for batch, m, n, k in gemms:
                eff, extra = self._tile_gemm(batch, m, n, k, 0.0 if attention else None)
                t_mm = t_mm + 2.0 * batch * m * n * k / (peak * eff)
                splitk.append(extra)
        elif gemms:
            t_mm = 0.0
            for batch, m, n, k in gemms:
                t_mm = t_mm + self.gemm_time(dtype, batch, m, n, k)
        else:
            t_mm = matmul_flops / self.matmul_peak(dtype)
        t = t_mm + other_flops / self.vec_peak + self.special_time(special)
        if splitk:
            for extra in splitk:
                nbytes = nbytes + extra
            return self.gemm_overlap(t, self.stream_time(nbytes))
        b = self.stream_time(nbytes)
        if _ops(t, b) is _SCALAR_OPS:                  # np.maximum's value and type
            return np.float64(t if t >= b else b)
        return np.maximum(t, b)

    def gemm_overlap(self, t_compute, t_stream):
        """Seconds of a GEMM that computes for ``t_compute`` and streams its operands for
        ``t_stream``: on the tile model near the ridge point the two overlap imperfectly, the
        p-norm ``(tc^p + ts^p)^(1/p)`` with ``gemm.overlap_exponent`` (p -> inf: the
        roofline's max, which every other profile keeps)."""
        p = self.gemm.overlap_exponent if self.tiled else None
        scalar = _ops(t_compute, t_stream) is _SCALAR_OPS
        if p is not None:
            t = (t_compute ** p + t_stream ** p) ** (1.0 / p)
            return np.float64(t) if scalar else t
        if scalar:                  # np.maximum's value and type, without its per-call cost
            return np.float64(t_compute if t_compute >= t_stream else t_stream)
        return np.maximum(t_compute, t_stream)

    def host_time(self, kernels):
        """Host seconds to issue ``kernels`` kernels (the framework's dispatch, plus the launch
        call on an accelerator)."""
        if self.kind == "cpu":
            return kernels * self.dispatch_s
        return kernels * (self.dispatch_s + self.launch_s)

    def combine(self, device_s, host_s):
        """Wall time of work whose device part takes ``device_s`` and whose issue takes
        ``host_s``: on a CPU the host is the device (they add); an accelerator runs kernels
        asynchronously from the launch queue, so host and device overlap and the slower one
        sets the pace."""
        if self.kind == "cpu":
            return device_s + host_s
        return np.maximum(device_s, host_s)

    def phase_time(self, dtype: str, gemms, matmul_flops, other_flops, nbytes, kernels,
                   special=None, attention=None):
        """One op on its own (a kernel timed alone): its device time combined with its
        host time (:meth:`combine`)."""
        return self.combine(self.device_time(dtype, gemms, matmul_flops, other_flops, nbytes,
                                             special, attention),
                            self.host_time(kernels))


def _frozen(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _frozen(x)) for k, x in v.items()))
    if isinstance(v, (tuple, list)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, np.ndarray):
        return (v.dtype.str, v.shape, v.tobytes())
    return v


def _interp3(table, m, n, k):
    """Trilinear interpolation of measured GEMM throughput in log2 sizes (clamped at the
    measured range: beyond it the nearest measured shape's throughput holds)."""
    lm, ln, lk, grid = table
    out = 0.0
    coords = []
    for axis, x in zip((lm, ln, lk), (m, n, k)):
        lx = np.clip(np.log2(np.maximum(x, 1)), axis[0], axis[-1])
        i = np.clip(np.searchsorted(axis, lx, side="right") - 1, 0, len(axis) - 2)
        w = (lx - axis[i]) / (axis[i + 1] - axis[i])
        coords.append((i, w))
    (i, wi), (j, wj), (l, wl) = coords
    for di, fi in ((0, 1 - wi), (1, wi)):
        for dj, fj in ((0, 1 - wj), (1, wj)):
            for dl, fl in ((0, 1 - wl), (1, wl)):
                out = out + fi * fj * fl * np.log(grid[i + di, j + dj, l + dl])
    return np.exp(out)


def attention_kind(rec):
    """(True, causal) for a fused attention op whose queries and keys are the same length
    (a causal kernel then skips half the tiles), None for any other op."""
    op = rec.op
    if op.kind != K.SDPA:
        return None
    causal = bool(op.attrs.get("causal"))
    gf = rec.cost.gemms_fwd
    if causal and gf:
        causal = _square(gf[0][1], gf[0][2])
    return (True, causal)


def _square(s_q, s_k) -> bool:
    try:
        return bool(s_q == s_k)
    except ValueError:       # vectorised sweep
        return bool(np.all(s_q == s_k))


def recomputed(rec, checkpointing) -> bool:
    """Whether backward re-runs this op's forward: every op of a decoder block under full
    checkpointing, only the attention core under selective checkpointing."""
    if not checkpointing or not rec.rg_out:
        return False
    if checkpointing == "selective":
        return bool(rec.op.attrs.get("attn_core"))
    return rec.op.module.startswith(("model.layers", "transformer.h"))


def phase_times(tm: TimeModel, dtype: str, analysis, *, recompute_blocks: bool = False,
                per_op: list | None = None):
    """(forward, backward) seconds. Within one segment (one decoder block, the embedding,
    the head) the host issues the kernels into the launch queue while the device runs the
    earlier ones, so each segment of each phase costs ``combine(Σ device, Σ host)`` (the
    queue holds far more than one block's kernels; HF training has no host sync inside a
    phase; a traced step's syncs cut it, :func:`_sync_chunks`). ``per_op`` collects (record,
    fwd, bwd, recompute): one instance's share of its segment's forward and backward time (the
    recomputation of its forward in backward apart), in proportion to the side that sets the
    pace; times ``record.count`` they add up to the two phases."""
    segs: dict[int, list] = {}
    for r in analysis.records:
        c = r.cost
        att = attention_kind(r)
        df = hf = db = hb = 0.0
        if _nonzero(c.fwd_kernels):     # (a fused loss's kernel count may vary over a sweep)
            df = tm.device_time(dtype, c.gemms_fwd, c.fwd_matmul_flops,
                                c.fwd_flops - c.fwd_matmul_flops, c.fwd_bytes, c.special_fwd,
                                attention=att and ("fwd", att[1]))
            hf = tm.host_time(c.fwd_kernels)
        if _nonzero(c.bwd_kernels):
            mm = c.bwd_act_matmul_flops + c.bwd_weight_matmul_flops
            other = c.bwd_act_flops + c.bwd_weight_flops - mm
            db = tm.device_time(dtype, c.gemms_bwd, mm, other, c.bwd_bytes, c.special_bwd,
                                attention=att and ("bwd", att[1]))
            hb = tm.host_time(c.bwd_kernels)
        segs.setdefault(r.segment, []).append((r, df, hf, db, hb, recomputed(r, recompute_blocks)))
    fwd = bwd = 0.0
    for seg_ops in segs.values():
        for ops in _sync_chunks(seg_ops):
            sdf = sum(o[1] * o[0].count for o in ops)
            shf = sum(o[2] * o[0].count for o in ops)
            sdb = sum((o[3] + (o[1] if o[5] else 0.0)) * o[0].count for o in ops)
            shb = sum((o[4] + (o[2] if o[5] else 0.0)) * o[0].count for o in ops)
            tf, tb = tm.combine(sdf, shf), tm.combine(sdb, shb)
            fwd = fwd + tf
            bwd = bwd + tb
            if per_op is not None:
                for r, df, hf, db, hb, rec in ops:
                    per_op.append((r, _share(tm, tf, df, hf, sdf, shf),
                                   _share(tm, tb, db, hb, sdb, shb),
                                   _share(tm, tb, df, hf, sdb, shb) if rec else 0.0))
    return fwd, bwd


def _sync_chunks(ops: list) -> list:
    """A segment's ops cut after every op that makes the host wait for the device
    (``attrs['sync']``: a value read on the host, such as ``.item()``): the launch queue is
    empty there, so host and device overlap within each piece but not across pieces. A
    hand-built graph has none: one piece."""
    chunks, cur = [], []
    for o in ops:
        cur.append(o)
        if o[0].op.attrs.get("sync"):
            chunks.append(cur)
            cur = []
    if cur or not chunks:
        chunks.append(cur)
    return chunks


def _nonzero(x) -> bool:
    return bool(x.any()) if isinstance(x, np.ndarray) else bool(x)


def _share(tm: TimeModel, total, dev, host, dev_sum, host_sum):
    """One op's part of its segment's phase time ``total`` (one instance)."""
    if tm.kind == "cpu":
        return dev + host
    host_bound = np.asarray(host_sum > dev_sum)
    num = np.where(host_bound, host, dev)
    den = np.where(host_bound, host_sum, dev_sum)
    return np.where(den > 0, total * num / np.where(den > 0, den, 1.0), 0.0)


def mezo_perturb_time(tm: TimeModel, trainable_numel, n_tensors: int, elem_bytes: float):
    """MeZO's parameter passes per step (Malladi et al. 2023, Algorithm 1): θ+εz, θ-2εz,
    θ+εz (restore) and θ-η·g·z, each regenerating z from the step's seed: per pass and
    tensor a ``normal_`` (write z) and an ``add_`` (read z, read and write θ)."""
    if trainable_numel == 0:
        return 0.0
    passes = 4
    nbytes = passes * 4 * elem_bytes * trainable_numel
    flops = passes * 4 * trainable_numel         # RNG (Box-Muller) + the axpy
    kernels = passes * 2 * n_tensors
    t = max(flops / tm.vec_peak, nbytes / tm.bandwidth)
    if tm.kind == "cpu":
        return float(t + kernels * tm.dispatch_s)
    return float(max(t, kernels * (tm.dispatch_s + tm.launch_s)))


def optimizer_time(tm: TimeModel, optimizer: str, trainable_numel, n_tensors: int, mixed: str,
                   foreach: bool, elem_bytes: float = 4.0, fused: bool = False):
    """Element-wise update over the trainable parameters (memory bound).

    torch's default AdamW (the for-loop implementation on CPU, foreach on GPUs) makes about
    eight passes per parameter: ``param.mul_`` (weight decay, read+write), ``exp_avg.lerp_``
    (3 tensors), ``exp_avg_sq.mul_`` and ``.addcmul_`` (2 + 3), ``sqrt`` and ``/`` into fresh
    temporaries (2 + 2), ``.add_(eps)`` (2) and ``param.addcdiv_`` (4): ~20 element accesses
    per parameter, against 7 for a fused kernel. About 12 kernels per tensor (for-loop) or
    per group of tensors (foreach). SGD: ``param.add_(grad, alpha=-lr)``; 8-bit AdamW: one
    fused bitsandbytes kernel per tensor (8-bit states). ``fused`` (``AdamW(fused=True)``,
    TransformerEngine/Apex FusedAdam): one multi-tensor kernel per group of tensors reading
    param, grad, exp_avg, exp_avg_sq and writing three of them back (7 accesses)."""
    if trainable_numel == 0:
        return 0.0
    per = {"adamw": (7 if fused else 20) * elem_bytes, "sgd": 3 * elem_bytes,
           "adamw8bit": 3 * elem_bytes + 2 * 2}[optimizer]
    if mixed != "none":
        per += 4 + 2      # read the fp32 master, write the 16-bit copy
    flops = {"adamw": 14, "sgd": 2, "adamw8bit": 20}[optimizer] * trainable_numel
    nbytes = per * trainable_numel
    per_tensor = {"adamw": 1 if fused else 12, "sgd": 1, "adamw8bit": 1}[optimizer]
    kernels = per_tensor * (max(1, n_tensors // 256) if foreach or fused else n_tensors)
    t = max(flops / tm.vec_peak, nbytes / tm.bandwidth)
    measured = (tm.special_rates or {}).get("adamw_params")
    if optimizer == "adamw" and measured and mixed == "none":
        # a calibrated profile timed torch's own AdamW step on this device (fp32)
        t = trainable_numel * (elem_bytes / 4.0) / measured
    if tm.kind == "cpu":
        return float(t + kernels * tm.dispatch_s)
    return float(max(t, kernels * (tm.dispatch_s + tm.launch_s)))
