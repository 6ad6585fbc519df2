"""PYRA: Parallel Yielding Re-Activation (Xiong et al., ECCV 2024, arXiv:2403.09192).

Bring-your-own-model example for simcost's traced front end::

    simcost estimate train --model examples/pyra.py:factory --hardware cpu-generic \\
        --batch 2 --frontend traced

PYRA adapts a frozen ViT that runs with token merging (ToMe, Bolya et al., arXiv:2210.09461),
so that training and inference both see the shorter token sequences. The variant implemented
follows the paper's reference code (THU-MIG/PYRA, its LoRA configurations):

- a ViT (class token, learned position table, pre-norm blocks) whose blocks merge ``r`` tokens
  each with ToMe's bipartite soft matching, between attention and MLP: the tokens alternate
  into sets A and B, each A token is matched to its most similar B token (cosine similarity
  of the attention keys, averaged over heads), and the r best-matched A tokens are added into
  their B partners (the class token is never merged). Tokens carry a size (how many patches
  they stand for): merging sums ``size * x`` and divides by the summed size;
- PYRA's parallel yielding adaptive weights, for the r tokens about to be merged: from the
  normalised pairs ``P = LayerNorm(src + dst)`` (r x C per image) it yields in parallel a
  channel weight ``w_C = 2 sigmoid(a^T P)`` (1 x C; ``a``: r x 1) and a token weight
  ``w_N = 2 sigmoid(P b) - 1`` (r x 1; ``b``: C x 1, zero at init, so training starts from
  plain ToMe), and re-activates the merged tokens: ``src <- src + (src * w_C) * w_N``;
- LoRA on each block's fused qkv projection (``x A B``, rank r_lora, no scaling, B zero at
  init), as in the reference code's PYRA+LoRA runs.

Trainable: the LoRAs, PYRA's a, b and LayerNorm per merging block, and the classifier head;
the patch embedding, class token, position table and blocks are frozen. Loss: cross-entropy.

The image size is fixed by the helper (the position table has one entry per patch), so the
factory declares only the batch size. The number of merged tokens per block is fixed too, so
every size in the step is static: the matching's sort and gathers are dense torch ops, priced
as such. Each block sees r fewer tokens than the one before, so blocks of one kind do different
work: simcost traces every block of such a stack (see ``simcost.trace.layers``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with LoRA on the fused qkv; returns the keys' mean over
    heads too (ToMe's similarity metric)."""

    def __init__(self, dim: int, heads: int, lora_rank: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.lora_A = nn.Linear(dim, lora_rank, bias=False)
        self.lora_B = nn.Linear(lora_rank, 3 * dim, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x) + self.lora_B(self.lora_A(x))
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out), k.mean(dim=1)


class PYRA(nn.Module):
    """The parallel yielding adaptive weights of one merging block, and the re-activation of
    the r tokens it merges."""

    def __init__(self, r: int, dim: int):
        super().__init__()
        self.a = nn.Parameter(torch.empty(r, 1))        # yields the channel weight (1 x C)
        self.b = nn.Parameter(torch.zeros(1, dim))      # yields the token weight (r x 1)
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.norm = nn.LayerNorm(dim)

    def forward(self, src, dst):
        pairs = self.norm(src + dst)                                    # (B, r, C)
        w_channel = 2 * torch.sigmoid(self.a.t() @ pairs)               # (B, 1, C)
        w_token = 2 * torch.sigmoid(pairs @ self.b.t()) - 1             # (B, r, 1)
        return src + (src * w_channel) * w_token


def bipartite_soft_matching(metric, r: int):
    """ToMe's matching with a protected class token: (unmerged, merged, destination) indices."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -math.inf                      # never merge the class token
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1)[0]         # the class token stays first
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
    return unm_idx, src_idx, dst_idx


def merge(x, idx, pyra: PYRA | None = None):
    """Add the r matched A tokens into their B partners (re-activated first by PYRA)."""
    unm_idx, src_idx, dst_idx = idx
    src, dst = x[:, ::2], x[:, 1::2]
    n, t1, c = src.shape
    r = src_idx.shape[1]
    unm = src.gather(1, unm_idx.expand(n, t1 - r, c))
    src = src.gather(1, src_idx.expand(n, r, c))
    if pyra is not None:
        src = pyra(src, dst.gather(1, dst_idx.expand(n, r, c)))
    dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce="sum")
    return torch.cat([unm, dst], dim=1)


class Block(nn.Module):
    """A frozen pre-norm ViT block that merges ``r`` of its ``tokens`` input tokens after
    attention, with PYRA re-activating them."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, lora_rank: int, tokens: int,
                 r: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, lora_rank)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.r = min(r, (tokens - 1) // 2)               # ToMe merges at most half
        self.pyra = PYRA(self.r, dim) if self.r > 0 else None

    def forward(self, x, size):
        out, metric = self.attn(self.norm1(x))
        x = x + out
        if self.r > 0:
            idx = bipartite_soft_matching(metric, self.r)
            x = merge(x * size, idx, self.pyra)          # size-weighted average of the pair
            size = merge(size, idx)
            x = x / size
        return x + self.mlp(self.norm2(x)), size


class PYRAViT(nn.Module):
    def __init__(self, image: int, patch: int, dim: int, layers: int, heads: int,
                 mlp_ratio: int, classes: int, lora_rank: int, r):
        super().__init__()
        grid = image // patch
        tokens = grid * grid + 1
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        rs = list(r) if isinstance(r, (list, tuple)) else [r] * layers
        blocks = []
        for i in range(layers):
            blocks.append(Block(dim, heads, mlp_ratio, lora_rank, tokens, rs[i]))
            tokens -= blocks[-1].r
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixel_values, labels):
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)   # bf16/fp16 steps
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        size = torch.ones_like(x[..., :1])               # each token stands for one patch
        for block in self.blocks:
            x, size = block(x, size)
        logits = self.head(self.norm(x)[:, 0])
        return F.cross_entropy(logits, labels)


def pyra_vit(image: int = 32, patch: int = 4, dim: int = 64, layers: int = 3, heads: int = 4,
             mlp_ratio: int = 4, classes: int = 10, lora_rank: int = 8, r=8) -> PYRAViT:
    """A frozen ViT of these sizes with ToMe (``r`` tokens merged per block: an int, or one
    per block), PYRA and qkv LoRA trainable, and a trainable classifier head."""
    model = PYRAViT(image, patch, dim, layers, heads, mlp_ratio, classes, lora_rank, r)
    for name, p in model.named_parameters():
        p.requires_grad = any(k in name for k in ("lora_", "pyra", "head"))
    return model


def factory(batch: int = 2, image: int = 32, **sizes):
    model = pyra_vit(image=image, **sizes)
    return {"module": model,
            "inputs": {"pixel_values": torch.zeros(batch, 3, image, image),
                       "labels": torch.zeros(batch, dtype=torch.long)},
            "dims": {"batch": [("pixel_values", 0), ("labels", 0)]},
            "name": "pyra-vit"}
