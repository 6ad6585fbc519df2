"""What a plan evaluation needs that does not depend on the plan, with the per-shape caches."""
from __future__ import annotations

from simcost.sim.memory import ckpt_mode, training_memory
from simcost.sim.parallel.stage import act_split, param_split, stage_work
from simcost.sim.parallel.tensor import fp8_time_model, segment_times
from simcost.sim.timing import TimeModel
from simcost.stack import optimizer_impl


class Context:
    """Everything a plan evaluation needs that does not depend on the plan (graphs cached per
    micro-batch shape, segment times cached per (shape, tp, sp, cp))."""

    def __init__(self, build, device, profile, topo, *, global_batch, seq, dtype, compute_dtype,
                 fp8, fp8_attention, optimizer, mixed, checkpointing, spec, loss_chunks=1,
                 optimizer_in_backward=False, stack=None):
        self.build = build            # (micro_batch, seq_local) -> (g, a)
        self.loss_chunks = loss_chunks                      # simcost.sim.memory's docstring
        self.optimizer_in_backward = optimizer_in_backward
        self.device = device
        self.profile = profile
        self.topo = topo
        self.global_batch = global_batch
        self.seq = seq
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        self.fp8 = fp8
        self.fp8_attention = fp8_attention
        self.optimizer = optimizer
        self.mixed = mixed
        self.checkpointing = {"none": False, "full": "full", "selective": "selective"}[
            ckpt_mode(checkpointing)]
        self.spec = spec
        self.stack = stack            # simcost.stack.Stack or None (the device alone)
        tm = TimeModel.from_device(device, stack)
        self.tm = fp8_time_model(tm, device) if (fp8 or fp8_attention) else tm
        self.tm_key = self.tm.key()   # segment times are shared by contexts of one time model
        self._graphs = {}
        self.plans_priced = 0         # plans :func:`~simcost.sim.parallel.evaluate.search` priced
        self._times = {}
        self._mem = {}

    @property
    def optimizer_impl(self) -> str:
        """'foreach', 'fused' or 'for-loop' (:func:`simcost.stack.optimizer_impl`)."""
        return optimizer_impl(self.stack, self.device.kind)

    @property
    def foreach(self) -> bool:
        """Multi-tensor (foreach) optimizer kernels: torch's default off the CPU."""
        return self.optimizer_impl == "foreach"

    def graph(self, mb, cp):
        key = (mb, cp)
        if key not in self._graphs:
            self._graphs[key] = self.build(mb, self.seq // cp)
        return self._graphs[key]

    def times(self, mb, cp, tp, sp):
        key = (mb, cp, tp, sp)
        if key not in self._times:
            g, a = self.graph(mb, cp)
            self._times[key] = segment_times(self.tm, self.compute_dtype, g, a, tp=tp, sp=sp,
                                             cp=cp, fp8=self.fp8,
                                             fp8_attention=self.fp8_attention,
                                             recompute=self.checkpointing,
                                             tm_key=self.tm_key)
        return self._times[key]

    def stage(self, mb, cp, tp, sp, pp):
        """The slowest pipeline stage's work (:func:`stage_work`) of one micro-batch shape."""
        st = self.times(mb, cp, tp, sp)
        hit = st.stages.get(pp)
        if hit is None:
            g, _ = self.graph(mb, cp)
            hit = st.stages[pp] = stage_work(g, st, pp)
        return hit

    def base_memory(self, mb, cp):
        """(single-device :class:`~simcost.sim.memory.Memory`, :class:`ParamSplit`,
        :class:`ActSplit`) of one micro-batch shape, kept on the graph for every context
        with the same training setup (a plan search over device counts and profiles)."""
        key = (mb, cp)
        hit = self._mem.get(key)
        if hit is None:
            g, a = self.graph(mb, cp)
            shared = g.meta.setdefault("_base_memory", {})
            setup = (self.optimizer, self.mixed, self.checkpointing,
                     self.device.runtime_overhead_bytes, self.optimizer_impl,
                     self.fp8_attention)
            hit = shared.get(setup)
            if hit is None:
                mem = training_memory(g, a, optimizer=self.optimizer, mixed=self.mixed,
                                      checkpointing=self.checkpointing,
                                      runtime_overhead=self.device.runtime_overhead_bytes,
                                      foreach=self.foreach,
                                      fused_optimizer=self.optimizer_impl == "fused")
                hit = shared[setup] = (mem, param_split(g), act_split(g, a, self.checkpointing,
                                                                      self.fp8_attention))
            self._mem[key] = hit
        return hit
