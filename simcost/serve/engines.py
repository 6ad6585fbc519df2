"""Serving engines: the physical facts of each engine that a serving simulation depends on.

A serving measurement is a measurement of an *engine* (vLLM, S-LoRA, TensorRT-LLM, a peft
``generate()`` loop) on a device, not of the device alone. Each :class:`EngineSpec` below
records what the engine does per iteration, taken from its paper or its source code, with the
place it was read. Nothing here is fitted to the validation rows: where a quantity the
simulation would need has not been published (e.g. the bandwidth LightLLM's token-granular
attention kernels reach), the field is ``None`` and the simulation leaves the effect out; the
``unpublished`` note of the engine lists those gaps.

Fields and how the simulation uses them:

- ``scheduler``: the batching policy (:mod:`simcost.serve.sim`): ``fcfs`` (vLLM v0),
  ``slora`` (LightLLM's router), ``mixed`` (in-flight batching with chunked prefill).
- ``lora_kernel``: the heterogeneous-adapter kernel (:mod:`simcost.serve.step`).
- ``cuda_graphs``: decode iterations replayed from CUDA graphs (no per-kernel host cost).
- ``kv_page_tokens``: KV-cache allocation granularity in tokens (vLLM block 16; S-LoRA /
  LightLLM one token per slot, its "TokenAttention"); documentation, the simulation allocates
  vLLM's blocks of 16, admits S-LoRA requests by LightLLM's peak-usage test and reserves whole
  requests for the ``mixed`` scheduler.
- ``decode_attn_overhead``: fractional latency a paged decode-attention kernel adds over a
  contiguous-KV kernel streaming the same bytes (block-table look-ups, extra branches);
  multiplies the decode attention time by ``1 + x``. ``None``: not published, not applied.
- ``adapter_residency``: ``lru`` (adapters stay in GPU memory until the pool needs the room:
  vLLM's ``LRUCache`` of ``max_loras``) or ``running-batch`` (S-LoRA's router frees every
  adapter that no running request uses whenever requests finish, so an adapter is loaded
  again by the next batch that needs it).
- ``adapter_copies_per_load``: host-to-device transfers of an adapter's bytes per load.
- ``max_num_seqs`` / ``max_num_tokens`` / ``max_wait_tokens`` / ``batch_max_tokens_frac``:
  the engine's default batch limits.
- ``host_ops_per_seq``: eager host ops per sequence per iteration issued while the GPU waits
  (between the previous step's host sync and the next forward), each at the profile's
  dispatch + launch time.
- ``full_sort_sampling``: the sampler sorts the full vocabulary of every sequence each step
  (:meth:`simcost.serve.step.StepModel.sample_time`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from simcost.errors import SimcostError


@dataclass(frozen=True)
class EngineSpec:
    name: str
    display: str
    scheduler: str
    lora_kernel: str
    cuda_graphs: bool
    kv_page_tokens: int | None
    decode_attn_overhead: float | None
    adapter_residency: str
    adapter_copies_per_load: int
    max_num_seqs: int
    max_num_tokens: int
    max_wait_tokens: int = 10
    batch_max_tokens_frac: float | None = None
    host_ops_per_seq: int = 0
    full_sort_sampling: bool = False
    simulated: bool = True
    sources: dict = field(default_factory=dict)
    unpublished: str = ""


ENGINES: dict[str, EngineSpec] = {
    "vllm": EngineSpec(
        name="vllm", display="vLLM (v0 scheduler, PagedAttention)", scheduler="fcfs",
        lora_kernel="sgmv", cuda_graphs=True, kv_page_tokens=16,
        # vLLM paper (Kwon et al., SOSP 2023, arXiv:2309.06180) §7.1 / Fig. 18a: the
        # PagedAttention kernel's latency is 20-26 % higher than FasterTransformer's
        # contiguous-KV attention kernel, from block-table look-ups and extra branches.
        # The midpoint of the published range.
        decode_attn_overhead=0.23,
        adapter_residency="lru", adapter_copies_per_load=1,
        max_num_seqs=256, max_num_tokens=2048,
        sources={
            "decode_attn_overhead": "Kwon et al. 2023 (arXiv:2309.06180) §7.1, Fig. 18a: "
                                    "PagedAttention kernel 20-26 % slower than FasterTransformer's",
            "kv_page_tokens": "vLLM CacheConfig default block_size = 16 (vllm/config.py); the "
                              "paper's Fig. 18b: 16 balances parallelism and fragmentation",
            "max_num_seqs": "vLLM EngineArgs default max_num_seqs = 256",
            "cuda_graphs": "vLLM EngineArgs enforce_eager defaults to False: decode batches "
                           "are captured as CUDA graphs",
            "lora": "vLLM multi-LoRA uses Punica's SGMV/BGMV kernels (vllm/lora/punica.py) and an "
                    "LRU cache of max_loras GPU adapter slots (vllm/lora/models.py LRUCacheLoRAModelManager)",
        }),
    "slora": EngineSpec(
        name="slora", display="S-LoRA (LightLLM-based, 2023)", scheduler="slora",
        lora_kernel="slora-bgmv", cuda_graphs=False, kv_page_tokens=1,
        decode_attn_overhead=None,
        adapter_residency="running-batch", adapter_copies_per_load=2,
        max_num_seqs=1000, max_num_tokens=2048, max_wait_tokens=10,
        batch_max_tokens_frac=1 / 6, host_ops_per_seq=1, full_sort_sampling=True,
        sources={
            "paper": "Sheng et al., S-LoRA (arXiv:2311.03285): unified paging (§4), MBGMM/MBGMV "
                     "kernels (§5), built on LightLLM",
            "kv_page_tokens": "S-LoRA/S-LoRA slora/common/mem_manager.py: one KV slot per token "
                              "(LightLLM TokenAttention); decode attention gathers K and V token by "
                              "token through b_loc (slora/models/llama/triton_kernel/token_attention_*)",
            "cuda_graphs": "S-LoRA/S-LoRA slora/models/peft/lora_unordered_batch_infer.py: eager "
                           "torch.mm + Triton kernels per layer, no graph capture; host sync each step "
                           "(torch.max(b_seq_len).item(), next-token .cpu())",
            "max_wait_tokens": "S-LoRA/S-LoRA slora/server/router/manager.py: max_wait_tokens = 10 "
                               "decode steps between admissions while a batch runs",
            "batch_max_tokens_frac": "LightLLM api_server: batch_max_tokens defaults to 1/6 of "
                                     "max_total_token_num",
            "max_num_seqs": "S-LoRA input_params running_max_req_size default 1000",
            "admission": "S-LoRA/S-LoRA slora/server/router/req_queue.py ReqQueue._can_add_new_req "
                         "(LightLLM's test): admits while the peak token usage of running + new "
                         "requests, each run to max_new_tokens and freed when done, stays below "
                         "max_total_token_num minus 4r slots per distinct adapter; prefill batches "
                         "add prompts while their sum <= batch_max_tokens",
            "lora_kernel": "S-LoRA/S-LoRA slora/models/peft/lora_unordered_batch_infer.py: decode "
                           "calls dispatch_bgmv (slora/csrc/bgmv/bgmv_impl.cuh: one thread block per "
                           "(token, rank row) of A, per (token, 16 outputs) of B, scalar fp32 FMAs, "
                           "each token gathering its own adapter's rows); prefill uses the Triton "
                           "MBGMM kernels (triton_kernel/lora/lora_prefill.py) only when the longest "
                           "prompt >= 200, the largest rank >= 64 and >= 2 requests, else BGMV",
            "host_ops_per_seq": "S-LoRA/S-LoRA lora_unordered_batch_infer.py LoraUnorderedBatchInfer."
                                "__init__, built for every prefill and decode step by model_rpc.py "
                                "forward: req_bins[i] = idx, one eager CUDA op per request, after "
                                "the previous step's next-token .cpu() sync",
            "full_sort_sampling": "S-LoRA/S-LoRA slora/server/router/model_infer/post_process.py "
                                  "sample: softmax, full descending sort of the probabilities, "
                                  "cumsum, top-p/top-k masks and multinomial over batch x vocab "
                                  "every step (top_k = -1 becomes vocab_size, infer_batch.py)",
            "workload": "S-LoRA/S-LoRA benchmarks/trace.py generate_requests + run_exp.py (seed 42, "
                        "throughput = finished requests / time until the last one finishes, "
                        "first-token latency at the first streamed chunk): Workload(generator="
                        "'slora') draws the same requests",
            "adapter_residency": "S-LoRA/S-LoRA slora/server/router/manager.py _handle_finish_req: "
                                 "offload_adapters(batch.adapter_dirs) after every step that finishes "
                                 "a request; _filter_runing_batch offloads all when the batch drains "
                                 "(slora/server/router/model_infer/infer_adapter.py offload_adapters "
                                 "frees every adapter not in the running batch)",
            "adapter_copies_per_load": "S-LoRA/S-LoRA infer_adapter.py load_lora_A and load_lora_B each "
                                       "call layer.load_to_gpu() then offload_from_gpu(); load_to_gpu "
                                       "copies the layer's pinned w_combined_home (A and B together, "
                                       "lora_layer_weight.py), so every layer's A+B bytes cross the host "
                                       "link twice per load",
        },
        unpublished="The achieved bandwidth of LightLLM's token-granular attention kernels "
                    "(token_att_fwd / token_softmax / token_att_fwd2, one Triton program per "
                    "request and head, num_stages=1), of the BGMV thread blocks, and the "
                    "per-request Python cost of each decode step (router and detokenizer "
                    "bookkeeping, InferBatch filter/merge) are not published; the simulation "
                    "prices the attention and BGMV reads at the streaming rate, the sampler's "
                    "sort by its bytes and one eager op per request at the dispatch time."),
    "trtllm": EngineSpec(
        name="trtllm", display="TensorRT-LLM (PyTorch backend, trtllm-bench)", scheduler="mixed",
        lora_kernel="sgmv", cuda_graphs=True, kv_page_tokens=None,
        decode_attn_overhead=None,
        adapter_residency="lru", adapter_copies_per_load=1,
        max_num_seqs=2048, max_num_tokens=8192,
        sources={
            "scheduler": "TensorRT-LLM docs: in-flight batching with chunked context; capacity "
                         "scheduler GUARANTEED_NO_EVICT by default",
            "max_num_seqs": "TensorRT-LLM BuildConfig defaults max_batch_size = 2048, "
                            "max_num_tokens = 8192",
            "cuda_graphs": "perf-overview.md: trtllm-bench runs the PyTorch backend with CUDA graphs "
                           "for generation batches",
        },
        unpublished="The XQA / FMHA decode kernels' achieved bandwidth relative to streaming and "
                    "the KV block size trtllm-bench used are not stated; not applied."),
    "hf-peft": EngineSpec(
        name="hf-peft", display="Hugging Face PEFT server (one adapter per batch, generate())",
        scheduler="fcfs", lora_kernel="loop", cuda_graphs=False, kv_page_tokens=0,
        decode_attn_overhead=None, adapter_residency="lru", adapter_copies_per_load=1,
        max_num_seqs=1, max_num_tokens=2048, simulated=False,
        sources={"server": "S-LoRA/S-LoRA benchmarks (HF PEFT baseline): requests of one adapter "
                           "served by transformers generate(), adapters swapped with "
                           "set_adapter(); padded static batches"},
        unpublished="Static padded batching with per-request generate() is not simulated."),
}

SCHEDULER_ENGINE = {"fcfs": "vllm", "slora": "slora", "mixed": "trtllm"}


def get_engine(name: str) -> EngineSpec:
    if name not in ENGINES:
        raise SimcostError(f"unknown serving engine '{name}'; valid: {', '.join(ENGINES)}")
    e = ENGINES[name]
    if not e.simulated:
        raise SimcostError(f"engine '{name}' is described but not simulated: {e.unpublished}")
    return e
