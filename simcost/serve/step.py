"""Per-iteration cost of a serving step (prefill, decode, or both mixed) on the time model.

One iteration runs every decoder layer once over the batch's ``T`` new tokens:

- **linear layers** (q/k/v, o, gate/up, down; Megatron-sharded over ``tp``): each GEMM of
  ``T × k → n`` is priced by :meth:`TimeModel.gemm_time` (tile/wave quantisation, split-K,
  measured efficiency) and is never faster than streaming its weight (``k·n`` at the weight
  dtype: fp8, int8, int4/NF4 weights are read quantised; int4/NF4 compute at the activation
  dtype after in-kernel dequantisation, fp8 on the fp8 tensor cores). At decode (``T`` small)
  this is the weight-bandwidth bound that makes decoding memory-bound.
- **attention**: prefill as flash attention, ``QKᵀ`` and ``PV`` GEMMs of ``s × (s+p)`` per
  head, half of it under the causal mask; decode as paged attention, which streams every
  cached token's K and V once (``Σ ctx · 2 · n_kv · d_h · bytes`` per layer, GQA heads read
  once per group) at the achievable bandwidth, times ``1 + decode_attn_overhead`` for the
  engine's paged kernel (:mod:`simcost.serve.engines`). ``p`` is prefix tuning's virtual tokens.
- **unmerged LoRA** (``y += (x·A)·B·s`` on each target): merged adapters cost nothing (the
  base model's cost). Batched heterogeneous-adapter kernels:

  * ``mbgmv`` (S-LoRA, arXiv:2311.03285 §5: MBGMM for prefill, MBGMV for decode, non-padded
    heterogeneous ranks gathered from the unified pool): one shrink and one expand kernel per
    target; they read each *distinct* adapter's A and B once, plus the activations, and do
    ``2·T·r·(in+out)`` FLOPs at the tensor-core efficiency of a rank-r GEMM;
  * ``sgmv`` (Punica, arXiv:2310.18547 §4: SGMV shrink/expand over segments of requests that
    share an adapter): the same traffic, with every adapter padded to the batch's largest rank
    (Punica's kernels take one rank per launch);
  * ``slora-bgmv`` (S-LoRA's code as run: per-token BGMV gathers of each token's adapter
    rows on the CUDA cores for decode and small prefills, Triton MBGMM for large ones; see
    :meth:`StepModel._slora_lora_time`);
  * ``loop`` (huggingface/peft's mixed-batch forward, ``_mixed_batch_forward``): for each
    distinct adapter, index the sub-batch, run ``lora_A`` and ``lora_B`` as separate GEMMs,
    scale and scatter-add back: about 5 eager kernels per adapter per target, each paying the
    host dispatch time, so the cost grows with the number of distinct adapters.

- **tensor parallelism**: two all-reduces of ``T × hidden`` activations per layer (ring:
  ``2(N−1)/N · bytes / link`` plus ``2(N−1)`` link latencies); LoRA adds S-LoRA's small
  all-gather of the rank-r intermediate (∝ r, §6 of 2311.03285).
- **head**: the LM head only for the last position of each sequence (vLLM, LightLLM and
  TensorRT-LLM all gather last tokens before the head).
- **host**: eager engines (S-LoRA/LightLLM, peft) pay ``dispatch_s + launch_s`` per kernel,
  hidden behind GPU work when the GPU is slower (``max``, as :mod:`simcost.sim.timing`);
  CUDA-graph engines (vLLM decode, TensorRT-LLM) pay only GPU time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simcost.errors import SimcostError
from simcost.models.config import ModelSpec
from simcost.serve.memory import KV_BYTES, WEIGHT_BYTES, target_shapes
from simcost.sim.timing import TimeModel

LORA_KERNELS = ("mbgmv", "sgmv", "loop", "slora-bgmv")
# S-LoRA's prefill switches from its BGMV CUDA kernel to the Triton MBGMM kernels
# (lora_get_qkvo_fwd_shrink / _expand) when the longest prompt is >= 200 tokens, the batch's
# largest rank >= 64 and the batch holds >= 2 requests (S-LoRA/S-LoRA
# slora/models/peft/lora_unordered_batch_infer.py _lora_get_qkv / _lora_get_o); those Triton
# programs cover BLOCK_M = 32 tokens of one request and rank blocks of BLOCK_N = 16
# (slora/models/peft/triton_kernel/lora/lora_prefill.py)
SLORA_MBGMM_MIN_LEN, SLORA_MBGMM_MIN_RANK, SLORA_MBGMM_BLOCK_M, SLORA_MBGMM_BLOCK_N = 200, 64, 32, 16
# Bytes moved per logit by LightLLM's sampling (S-LoRA/S-LoRA
# slora/server/router/model_infer/post_process.py sample): with top_k = -1 (= vocab) and
# top_p = 1 every step still runs div_ by the temperature (r/w 4+4), softmax (max and sum
# passes, r/w: 16), a full descending sort of the fp32 probabilities with int64 indices
# (radix sort, 4 passes of 8 bits over 4 B keys + 8 B values, read and written: 96), cumsum
# (8), the top-p mask (probs_sum - probs_sort > p, masked store: 25), the top-k mask (6) and
# multinomial (read and normalise: 12): 175 B per vocabulary entry per sequence
SLORA_SAMPLE_BYTES_PER_LOGIT = 175.0
# kernels of one decoder layer in an optimised serving engine: input norm, qkv GEMM, rotary,
# KV-cache write, attention, o GEMM, fused residual + post-norm, gate/up GEMM, activation,
# down GEMM, residual add
BASE_KERNELS_PER_LAYER = 11
LOOP_KERNELS_PER_ADAPTER_TARGET = 5   # index, lora_A, lora_B, scale, index_add


@dataclass
class StepModel:
    spec: ModelSpec
    tm: TimeModel
    act_dtype: str = "fp16"
    wdtype: str = "fp16"
    kv_dtype: str = "fp16"
    tp: int = 1
    link_bw: float = 0.0
    link_lat: float = 0.0
    cuda_graphs: bool = False
    lora_kernel: str = "mbgmv"
    targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    # the engine's paged decode-attention kernel latency over a contiguous-KV kernel
    # (simcost.serve.engines: vLLM's PagedAttention +20-26 %, arXiv:2309.06180 §7.1)
    decode_attn_overhead: float = 0.0
    _lin_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.lora_kernel not in LORA_KERNELS:
            raise SimcostError(f"unknown LoRA kernel '{self.lora_kernel}'; valid: {', '.join(LORA_KERNELS)}")
        if self.tp < 1:
            raise SimcostError("tensor parallel degree must be >= 1")
        if self.tp > 1 and self.spec.heads % self.tp:
            raise SimcostError(f"--tp {self.tp} does not divide {self.spec.heads} attention heads")
        s, tp = self.spec, self.tp
        h = s.hidden
        n_exp = max(s.experts, 1)
        # (n, k, weight multiplicity) per linear of one layer; MoE: top_k experts' worth of
        # FLOPs, all experts' weights streamed when the batch is large enough to touch them
        self.gemms = [((s.q_dim + 2 * s.kv_dim) // tp, h, 1),
                      (h, s.q_dim // tp, 1),
                      (2 * s.ffn // tp, h, max(s.top_k, 1)),
                      (h, s.ffn // tp, max(s.top_k, 1))]
        self.n_exp = n_exp
        self.wb = WEIGHT_BYTES[self.wdtype]
        self.ab = WEIGHT_BYTES[self.act_dtype]
        self.kvb = KV_BYTES[self.kv_dtype]
        self.cdtype = "fp8" if self.wdtype == "fp8" and "fp8" in self.tm.mm_peak else self.act_dtype
        self.kv_heads = max(1, -(-s.kv_heads // tp))
        self.heads = s.heads // tp
        self.kv_tok_layer = 2.0 * self.kv_heads * s.head_dim * self.kvb
        self.shapes = target_shapes(s)
        self.kernels_per_layer = BASE_KERNELS_PER_LAYER + (2 if tp > 1 else 0)

    # -- pieces ---------------------------------------------------------------------------
    def _gemm(self, T, n, k, wmult=1.0):
        tm = self.tm
        t = tm.gemm_time(self.cdtype, 1, T, n, k) * wmult
        experts_touched = np.minimum(self.n_exp, np.maximum(1.0, T * wmult)) if self.n_exp > 1 else 1.0
        nbytes = k * n * self.wb * experts_touched + T * wmult * (k + n) * self.ab
        nbytes = nbytes + tm.gemm_splitk_bytes(1, T, n, k) * wmult
        return tm.gemm_overlap(t, tm.stream_time(nbytes))

    def linear_time(self, T):
        """Seconds of one layer's linear GEMMs + element-wise work over ``T`` tokens (array ok)."""
        T = np.asarray(T, dtype=float)
        t = 0.0
        for n, k, wm in self.gemms:
            t = t + self._gemm(T, n, k, wm)
        s = self.spec
        # element-wise traffic per token: 2 norms (r+w), rotary on q,k, activation (read 2f,
        # write f), 2 residual adds (r 2h, w h), KV-cache write
        ew = (4 * s.hidden + 2 * (s.q_dim + s.kv_dim) / self.tp + 3 * s.ffn / self.tp
              + 6 * s.hidden) * self.ab + self.kv_tok_layer
        t = t + self.tm.stream_time(T * ew)
        if self.tp > 1:
            t = t + self.allreduce_time(2 * T * s.hidden * self.ab)
        return t

    def allreduce_time(self, nbytes):
        n = self.tp
        if n == 1:
            return 0.0
        if not self.link_bw:
            raise SimcostError("this hardware profile has no interconnect bandwidth; tensor "
                               "parallelism needs one")
        return 2 * (n - 1) / n * nbytes / self.link_bw + 2 * (2 * (n - 1)) * self.link_lat

    def linear_table(self, tmax: int) -> np.ndarray:
        """``table[T]`` = seconds of all layers' linear work over T tokens, T = 0..tmax."""
        key = tmax
        if key not in self._lin_cache:
            T = np.arange(tmax + 1, dtype=float)
            tab = self.spec.layers * self.linear_time(np.maximum(T, 1))
            tab[0] = 0.0
            self._lin_cache = {key: tab}
        return self._lin_cache[key]

    def head_time(self, n_seq):
        s = self.spec
        n_seq = np.maximum(np.asarray(n_seq, dtype=float), 1)
        vocab = s.vocab // self.tp
        t = np.maximum(self.tm.gemm_time(self.act_dtype, 1, n_seq, vocab, s.hidden),
                       self.tm.stream_time(vocab * s.hidden * self.ab + n_seq * vocab * 4))
        return t

    def prefill_attn_time(self, lens, prefix=0):
        """All layers' flash attention over sequences of ``lens`` new tokens after ``prefix``
        already-cached ones (prefix-tuning tokens, or earlier chunks of a chunked prefill)."""
        lens = np.asarray(lens, dtype=float)
        if lens.size == 0:
            return 0.0
        d = self.spec.head_dim
        prefix = np.asarray(prefix, dtype=float)
        kv = lens + prefix
        # QK^T and PV, each (heads) x s x (s+p) x d, causal: half the s x s block computed
        t = 2 * self.tm.gemm_time(self.act_dtype, self.heads, lens, kv, d) * (lens / 2 + prefix) / kv
        return self.spec.layers * float(np.sum(t))

    def decode_attn_time(self, ctx_sum: float):
        """All layers' paged attention reading ``ctx_sum`` cached tokens' K and V."""
        if ctx_sum <= 0:
            return 0.0
        return (self.spec.layers * float(self.tm.stream_time(ctx_sum * self.kv_tok_layer))
                * (1.0 + self.decode_attn_overhead))

    def lora_time(self, T: float, ranks_distinct, tokens_per_adapter=None, prefill_max_len: int = 0,
                  n_seqs: int = 0):
        """All layers' unmerged-LoRA work for ``T`` tokens using the distinct adapters of
        ``ranks_distinct`` (their ranks), ``tokens_per_adapter`` their token counts.
        ``prefill_max_len`` / ``n_seqs``: the longest prompt and the number of prompts of a
        prefill batch (0 for decode), which select S-LoRA's prefill kernel."""
        ranks = np.asarray(ranks_distinct, dtype=float)
        if ranks.size == 0 or T <= 0:
            return 0.0, 0
        tm, ab, L = self.tm, self.ab, self.spec.layers
        if tokens_per_adapter is None:
            tokens_per_adapter = np.full(ranks.size, T / ranks.size)
        tpa = np.asarray(tokens_per_adapter, dtype=float)
        t = 0.0
        kernels = 0
        if self.lora_kernel == "slora-bgmv":
            return self._slora_lora_time(T, ranks, tpa, prefill_max_len, n_seqs)
        if self.lora_kernel == "loop":
            for tgt in self.targets:
                i, o = self.shapes[tgt]
                i_s, o_s = (i, o // self.tp) if tgt != "o_proj" and tgt != "down_proj" else (i // self.tp, o)
                g = (np.maximum(tm.gemm_time(self.act_dtype, 1, tpa, ranks, i_s), tm.stream_time(ranks * i_s * ab))
                     + np.maximum(tm.gemm_time(self.act_dtype, 1, tpa, o_s, ranks), tm.stream_time(ranks * o_s * ab))
                     + 3 * tm.stream_time(tpa * (i_s + 2 * o_s) * ab))
                t += float(np.sum(g))
            kernels = LOOP_KERNELS_PER_ADAPTER_TARGET * len(self.targets) * ranks.size
            return L * t, L * kernels
        r_eff = np.full(ranks.size, ranks.max()) if self.lora_kernel == "sgmv" else ranks
        r_tok = float(np.sum(r_eff * tpa)) / max(T, 1)     # token-weighted rank
        r_sum = float(np.sum(r_eff))
        rmax = float(r_eff.max())
        for tgt in self.targets:
            i, o = self.shapes[tgt]
            i_s, o_s = (i, o // self.tp) if tgt not in ("o_proj", "down_proj") else (i // self.tp, o)
            flops = 2.0 * T * r_tok * (i_s + o_s)
            eff = tm.gemm_efficiency(1, T, rmax, i_s)
            nbytes = r_sum * (i_s + o_s) * ab + T * (i_s + o_s + 2 * rmax) * ab
            # tensor-core path (tiles padded to the rank) or the GEMV path on the vector units
            # (Punica's BGMV / S-LoRA's MBGMV for decode), whichever is faster
            t_c = min(flops / (tm.matmul_peak(self.act_dtype) * eff), flops / tm.vec_peak)
            t += float(np.maximum(t_c, tm.stream_time(nbytes)))
            if self.tp > 1:
                t += float(self.allreduce_time(T * rmax * ab) / 2)
        kernels = 2 * len(self.targets)
        return L * t, L * kernels

    def _slora_lora_time(self, T, ranks, tpa, prefill_max_len, n_seqs):
        """S-LoRA's LoRA kernels as its code runs them (S-LoRA/S-LoRA, not the paper's
        idealised MBGMV): decode, and prefill batches below the MBGMM thresholds, call
        ``dispatch_bgmv`` (slora/csrc/bgmv/bgmv_impl.cuh): the shrink launches one thread block
        per (token, rank row) that loads that row of A and the token's input row (``in``
        elements each) and reduces them with scalar fp32 FMAs; the expand launches blocks of 16
        outputs per token that load the token's rank-r input and r·16 elements of B. Nothing is
        shared between tokens of the same adapter, so each token requests its adapter's
        ``r·(in + out)`` weight elements (the rows are gathered through ``a_loc`` from the
        unified pool), and the FMAs run on the CUDA cores. The Triton MBGMM prefill path loads
        the weights once per 32-token program and the input once per 16-rank block, on the
        tensor cores. The per-token weight rows are priced at the achievable DRAM streaming
        rate (the repeated input rows are taken as cache hits, counted once): with many
        distinct adapters in a batch their rows exceed the L2 and this is what the DRAM moves;
        with a handful of adapters repeated rows may come from L2, whose bandwidth the profile
        does not hold, so there it is an upper bound."""
        tm, ab, L = self.tm, self.ab, self.spec.layers
        rmax = float(ranks.max())
        r_tok = float(np.sum(ranks * tpa)) / max(T, 1)            # token-weighted rank
        mbgmm = (prefill_max_len >= SLORA_MBGMM_MIN_LEN and rmax >= SLORA_MBGMM_MIN_RANK
                 and n_seqs >= 2)
        t = 0.0
        for tgt in self.targets:
            i, o = self.shapes[tgt]
            i_s, o_s = (i, o // self.tp) if tgt not in ("o_proj", "down_proj") else (i // self.tp, o)
            flops = 2.0 * T * r_tok * (i_s + o_s)
            if mbgmm:
                nbytes = (T / SLORA_MBGMM_BLOCK_M * r_tok * (i_s + o_s)
                          + T * i_s * np.ceil(rmax / SLORA_MBGMM_BLOCK_N) + 2 * T * o_s
                          + T * rmax * (1 + o_s / 128)) * ab
                eff = tm.gemm_efficiency(1, T, rmax, i_s)
                t_c = flops / (tm.matmul_peak(self.act_dtype) * eff)
            else:
                nbytes = T * (r_tok * (i_s + o_s) + i_s + r_tok + 2 * o_s) * ab
                t_c = flops / tm.vec_peak
            t += float(max(t_c, tm.stream_time(nbytes)))
            if self.tp > 1:
                t += float(self.allreduce_time(T * rmax * ab) / 2)
        return L * t, L * 2 * len(self.targets)

    def sample_time(self, n_seq: int) -> float:
        """LightLLM's per-step sampling over the full vocabulary (SLORA_SAMPLE_BYTES_PER_LOGIT)."""
        if n_seq <= 0:
            return 0.0
        return float(self.tm.stream_time(n_seq * (self.spec.vocab // self.tp)
                                         * SLORA_SAMPLE_BYTES_PER_LOGIT))

    # -- one iteration --------------------------------------------------------------------
    def iteration(self, prefill_lens=(), decode_ctx_sum: float = 0.0, n_decode: int = 0,
                  lora_ranks=None, lora_tokens=None, prefix: int = 0) -> dict:
        """Seconds of one iteration: prefill of ``prefill_lens`` prompts plus one decode token
        for ``n_decode`` sequences whose cached contexts sum to ``decode_ctx_sum``."""
        pl = np.asarray(prefill_lens, dtype=float)
        T = float(pl.sum()) + n_decode
        n_seq = pl.size + n_decode
        if T <= 0:
            return {"total": 0.0, "linear": 0.0, "attention": 0.0, "lora": 0.0, "head": 0.0,
                    "host": 0.0, "kernels": 0}
        lin = float(self.spec.layers * self.linear_time(T))
        att = self.prefill_attn_time(pl, prefix) + self.decode_attn_time(
            decode_ctx_sum + prefix * n_decode)
        lora, lk = (0.0, 0)
        if lora_ranks is not None and len(lora_ranks):
            lora, lk = self.lora_time(T, lora_ranks, lora_tokens)
        head = float(self.head_time(n_seq))
        kernels = self.spec.layers * self.kernels_per_layer + lk + 4
        gpu = lin + att + lora + head
        host = 0.0 if self.cuda_graphs else kernels * (self.tm.dispatch_s + self.tm.launch_s)
        return {"total": max(gpu, host), "linear": lin, "attention": att, "lora": lora,
                "head": head, "host": host, "kernels": kernels}
