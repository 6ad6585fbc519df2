"""MixLoRA: LoRA experts in the FFN of a frozen decoder (Li et al., 2024, arXiv:2404.15159).

Bring-your-own-model example for simcost's traced front end::

    simcost estimate train --model examples/mixlora.py:factory --hardware cpu-generic \\
        --batch 2 --seq 16 --frontend traced

The variant implemented is the paper's (its reference code is TUDB-Labs/MixLoRA), on a small
frozen ``transformers`` LlamaForCausalLM:

- every decoder layer's SwiGLU FFN, ``down(silu(gate(x)) * up(x))``, becomes E experts that
  share the frozen gate/up/down weights; expert e adds its own LoRA (rank r_e) to each of the
  three: ``gate_e(x) = W_gate x + s B_gate_e A_gate_e x`` (likewise up and down), and
  ``expert_e(x) = down_e(silu(gate_e(x)) * up_e(x))``;
- a top-k router: ``p = softmax(W_r x)`` (``W_r``: hidden x E, no bias); the k most probable
  experts of each token get the weights ``p`` renormalised over those k (which is the softmax
  over the top-k logits), the others 0: ``FFN(x) = sum_e g_e(x) expert_e(x)``;
- the frozen ``W_gate x`` and ``W_up x`` are computed once per token and shared by the experts
  (the paper's computation-sharing optimisation); the LoRA deltas are per expert;
- LoRA (rank r, ``alpha / r`` scaling) on the attention projections q, k, v, o;
- the auxiliary load-balance loss of Switch Transformers in its top-k (Mixtral) form, per MoE
  layer: ``L_aux = E * sum_e f_e * P_e``, with ``f_e`` the fraction of (token, slot) routings
  sent to expert e and ``P_e`` the mean router probability of e. The training loss is the LM
  loss + ``aux_coef`` x the sum over layers (``aux_coef`` 0.001, the reference code's default;
  the reference code applies the formula once to all layers' router logits concatenated).

Trainable: the routers, the expert LoRAs and the attention LoRAs; the Llama model is frozen.

Dense formulation. Which tokens an expert receives depends on the router's values, so the
reference code's per-expert gather (``torch.where`` on the expert mask) has a data-dependent
size, which a trace under fake tensors cannot follow. Here every expert runs on every token and
its output is weighted by the sparse gate ``g_e`` (exactly 0 off the top-k), which computes the
same result. simcost therefore prices the dense work: the expert part of the FFN (the LoRA
deltas, the activation and the frozen down projection) costs E/k times what the sparse
implementation spends, and keeps E/k times its activations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoRA(nn.Module):
    """The low-rank update ``B(A(dropout(x))) * alpha / r`` (A: Kaiming-uniform, B: zeros)."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a LoRA update (the attention projections)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.lora = LoRA(base.in_features, base.out_features, rank, alpha, dropout)

    def forward(self, x):
        return self.base(x) + self.lora(x)


class LoRAExpert(nn.Module):
    """One expert: its LoRA on each of the shared FFN's gate, up and down projections."""

    def __init__(self, hidden: int, inter: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.gate = LoRA(hidden, inter, rank, alpha, dropout)
        self.up = LoRA(hidden, inter, rank, alpha, dropout)
        self.down = LoRA(inter, hidden, rank, alpha, dropout)


class MixLoRAFFN(nn.Module):
    """A frozen Llama MLP turned into E LoRA experts with a top-k router (dense, see above).
    ``aux_loss`` holds this layer's load-balance loss after each forward."""

    def __init__(self, mlp: nn.Module, experts: int, top_k: int, rank: int, alpha: float,
                 dropout: float, router_init: float = 0.02):
        super().__init__()
        hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.mlp = mlp                                   # frozen gate_proj, up_proj, down_proj
        self.router = nn.Linear(hidden, experts, bias=False)
        nn.init.normal_(self.router.weight, std=router_init)
        self.experts = nn.ModuleList(LoRAExpert(hidden, inter, rank, alpha, dropout)
                                     for _ in range(experts))
        self.num_experts = experts
        self.top_k = top_k
        self.aux_loss = None

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])                     # (tokens, hidden)
        probs = self.router(x).softmax(dim=-1)                       # (tokens, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)              # softmax over the top-k
        gates = torch.zeros_like(probs).scatter(1, top_i, top_p)     # 0 off the top-k
        self.aux_loss = load_balance_loss(probs, top_i, self.num_experts)

        gate0, up0 = self.mlp.gate_proj(x), self.mlp.up_proj(x)     # shared by all experts
        out = 0
        for e, expert in enumerate(self.experts):                    # dense: every token
            h = self.mlp.act_fn(gate0 + expert.gate(x)) * (up0 + expert.up(x))
            y = self.mlp.down_proj(h) + expert.down(h)
            out = out + gates[:, e:e + 1] * y
        return out.reshape(shape)


def load_balance_loss(probs, top_i, experts: int):
    """``E * sum_e f_e P_e``: f_e the share of the (token, slot) routings that pick expert e
    (so sum_e f_e = k), P_e the mean router probability of e."""
    f = F.one_hot(top_i, experts).to(probs.dtype).sum(dim=1).mean(dim=0)   # (E,)
    return experts * (f * probs.mean(dim=0)).sum()


class MixLoRAForCausalLM(nn.Module):
    """``forward(input_ids, labels)`` -> LM loss + aux_coef x (sum of the layers' aux losses)."""

    def __init__(self, lm: nn.Module, aux_coef: float):
        super().__init__()
        self.lm = lm
        self.aux_coef = aux_coef

    def forward(self, input_ids, labels):
        logits = self.lm(input_ids=input_ids).logits
        # next-token loss (the shift done by slicing: transformers' loss pads the labels, which
        # fixes the sizes under a symbolic trace)
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        moes = [m for m in self.lm.modules() if isinstance(m, MixLoRAFFN)]
        aux = torch.stack([m.aux_loss for m in moes]).sum()
        for m in moes:
            m.aux_loss = None                                        # keep no graph alive
        return lm_loss + self.aux_coef * aux


def mixlora_llama(hidden: int = 64, intermediate: int = 128, layers: int = 4, heads: int = 4,
                  kv_heads: int = 2, vocab: int = 128, max_positions: int = 256,
                  experts: int = 4, top_k: int = 2, expert_rank: int = 8, expert_alpha: float = 16,
                  attn_rank: int = 8, attn_alpha: float = 16, dropout: float = 0.05,
                  aux_coef: float = 0.001) -> MixLoRAForCausalLM:
    """A frozen LlamaForCausalLM of these sizes with MixLoRA in every layer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_positions)
    lm = LlamaForCausalLM(cfg)
    lm.requires_grad_(False)                                         # the base stays frozen
    for layer in lm.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(attn, name, LoRALinear(getattr(attn, name), attn_rank, attn_alpha, dropout))
        layer.mlp = MixLoRAFFN(layer.mlp, experts, top_k, expert_rank, expert_alpha, dropout)
    return MixLoRAForCausalLM(lm, aux_coef)


def factory(batch: int = 2, seq: int = 16, **sizes):
    model = mixlora_llama(**sizes)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    return {"module": model,
            "inputs": {"input_ids": ids, "labels": ids.clone()},
            "dims": {"batch": [("input_ids", 0), ("labels", 0)],
                     "seq": [("input_ids", 1), ("labels", 1)]},
            "name": "mixlora-llama"}
