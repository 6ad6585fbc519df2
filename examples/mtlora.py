"""MTLoRA: low-rank adaptation for multi-task learning (Agiza et al., CVPR 2024,
arXiv:2403.20320).

Bring-your-own-model example for simcost's traced front end::

    simcost estimate train --model examples/mtlora.py:factory --hardware cpu-generic \\
        --batch 2 --frontend traced

The variant implemented follows the paper's reference code (scale-lab/MTLoRA, the 'matrix'
shared mode) on a small frozen Swin-like hierarchical encoder for dense multi-task learning:

- the encoder: a patch embedding, stages of pre-norm transformer blocks, and Swin's patch
  merging (2x2 neighbours concatenated, LayerNorm, linear 4C -> 2C) between stages. Unlike
  Swin, attention is global within a stage (no shifted windows or relative position bias; a
  learned absolute position table instead, Swin's ``ape`` option): windows change the
  attention's cost, not MTLoRA's modules;
- TA-LoRA (task-agnostic): every qkv, proj, fc1 and fc2 linear gets a shared low-rank update,
  ``y = W x + s (B A x)`` (rank r, scale s);
- TS-LoRA (task-specific): in the last block of each stage, proj, fc1 and fc2 also give one
  output per task, ``y_t = W x + s_t (B_t A_t x_t)`` (rank r_t), where ``x_t`` is the task's
  own input when the layer has one (fc1 gets each task's attention output, fc2 each task's
  activation) and the shared input otherwise. The block so yields the shared hidden state,
  which the next stage continues from, and one hidden state per task; the stage's patch
  merging is applied to each;
- per task, the stages' task-specific features go to a task decoder: a 1x1 convolution per
  scale, all scales upsampled to the finest and concatenated, and an HRNet-style head
  (1x1 conv, BatchNorm, ReLU, 1x1 conv to the task's outputs), upsampled to the image
  (nearest, where the reference code upsamples bilinearly: see ``upsample``);
- the loss is the weighted sum of the task losses: semantic segmentation (cross-entropy),
  saliency (binary cross-entropy with logits) and surface normals (L1 of the normalised
  prediction), with the reference code's weights 1, 5 and 10.

Trainable: TA-LoRA, TS-LoRA and the task decoders; the encoder is frozen. The image size is
fixed by the helper (the stages' resolutions and the position table follow from it), so the
factory declares only the batch size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# task -> (output channels, loss weight); the labels' shapes are in ``factory``
TASKS = {"semseg": (5, 1.0), "saliency": (1, 5.0), "normals": (3, 10.0)}


def task_loss(task: str, pred, label):
    if label.is_floating_point():
        label = label.to(pred.dtype)                 # bf16/fp16 steps
    if task == "semseg":
        return F.cross_entropy(pred, label, ignore_index=255)
    if task == "saliency":
        return F.binary_cross_entropy_with_logits(pred, label)
    if task == "normals":
        return F.l1_loss(F.normalize(pred, dim=1), label)
    raise ValueError(f"unknown task {task}")


class MTLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with TA-LoRA, and TS-LoRA for ``tasks`` (none: shared only).
    ``forward(x, x_tasks)`` -> (shared output, {task: output} or None)."""

    def __init__(self, d_in: int, d_out: int, rank: int, tasks=(), task_rank: int = 4,
                 scale: float = 1.0, task_scale: float = 1.0, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=bias)          # the frozen base weight
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        self.tasks = tuple(tasks)
        self.task_A = nn.ModuleDict({t: nn.Linear(d_in, task_rank, bias=False) for t in tasks})
        self.task_B = nn.ModuleDict({t: nn.Linear(task_rank, d_out, bias=False) for t in tasks})
        for b in (self.lora_B, *self.task_B.values()):
            nn.init.zeros_(b.weight)
        self.scale, self.task_scale = scale, task_scale
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, x_tasks=None):
        base = self.linear(x)
        x = self.dropout(x)
        shared = base + self.lora_B(self.lora_A(x)) * self.scale
        if not self.tasks:
            return shared, None
        per_task = {t: base + self.task_B[t](self.task_A[t](x if x_tasks is None
                                                            else x_tasks[t])) * self.task_scale
                    for t in self.tasks}
        return shared, per_task


class Block(nn.Module):
    """A frozen pre-norm transformer block with MTLoRA linears; with ``tasks`` (the last
    block of a stage) it also returns one hidden state per task."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, rank: int, tasks, task_rank: int,
                 scale: float, task_scale: float, dropout: float):
        super().__init__()
        kw = dict(rank=rank, task_rank=task_rank, scale=scale, task_scale=task_scale,
                  dropout=dropout)
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = MTLoRALinear(dim, 3 * dim, **kw)               # shared only
        self.proj = MTLoRALinear(dim, dim, tasks=tasks, **kw)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = MTLoRALinear(dim, mlp_ratio * dim, tasks=tasks, **kw)
        self.fc2 = MTLoRALinear(mlp_ratio * dim, dim, tasks=tasks, **kw)

    def forward(self, x):
        b, n, c = x.shape
        qkv, _ = self.qkv(self.norm1(x))
        q, k, v = qkv.reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        out, out_t = self.proj(attn)
        h = x + out
        mid, mid_t = self.fc1(self.norm2(h), None if out_t is None else
                              {t: self.norm2(x + o) for t, o in out_t.items()})
        mid = F.gelu(mid)
        mid_t = None if mid_t is None else {t: F.gelu(m) for t, m in mid_t.items()}
        y, y_t = self.fc2(mid, mid_t)
        if y_t is None:
            return h + y, None
        return h + y, {t: x + out_t[t] + y_t[t] for t in y_t}


class PatchMerging(nn.Module):
    """Swin's downsampling: 2x2 neighbouring tokens concatenated, LayerNorm, 4C -> 2C."""

    def __init__(self, res: int, dim: int):
        super().__init__()
        self.res = res
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.res, self.res, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class Stage(nn.Module):
    """Blocks (TS-LoRA in the last one) and the patch merging after them (all but the last
    stage): -> (shared hidden state, {task: hidden state})."""

    def __init__(self, dim: int, res: int, depth: int, heads: int, downsample: bool, tasks,
                 **kw):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, tasks=tasks if i == depth - 1 else (),
                                          **kw) for i in range(depth))
        self.downsample = PatchMerging(res, dim) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x, x_tasks = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
            x_tasks = {t: self.downsample(f) for t, f in x_tasks.items()}
        return x, x_tasks


def upsample(x, size: int):
    """Nearest upsampling to size x size: ``F.interpolate(x, (size, size))``, calling the op
    it runs directly (that call's C++ wrapper reads the batch size as a plain int under fake
    tensors, which would fix simcost's trace to one batch size). The reference head upsamples
    bilinearly; torch 2.13 has no fake kernel for bilinear's backward at a symbolic batch size.
    Either way the upsampling does no matmul and saves nothing for backward."""
    return torch.ops.aten.upsample_nearest2d.default(x, [size, size])


class TaskDecoder(nn.Module):
    """One task's head on its multi-scale features (HRNet-style, the reference code's
    default): 1x1 conv per scale, upsample to the finest scale, concatenate, 1x1 conv + BN +
    ReLU, 1x1 conv to the outputs, upsample to the image."""

    def __init__(self, dims, resolutions, channels: int, outputs: int, image: int):
        super().__init__()
        self.resolutions, self.image = list(resolutions), image
        self.reduce = nn.ModuleList(nn.Conv2d(d, channels, 1, bias=False) for d in dims)
        width = channels * len(dims)
        self.head = nn.Sequential(nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, outputs, 1))

    def forward(self, feats):
        top = self.resolutions[0]
        maps = []
        for f, res, conv in zip(feats, self.resolutions, self.reduce):
            m = conv(f.transpose(1, 2).reshape(f.shape[0], -1, res, res))
            if res != top:
                m = upsample(m, top)
            maps.append(m)
        out = self.head(torch.cat(maps, dim=1))
        return upsample(out, self.image)


class MTLoRAModel(nn.Module):
    def __init__(self, image: int, patch: int, dim: int, depths, heads, mlp_ratio: int,
                 rank: int, task_rank: int, scale: float, task_scale: float, dropout: float,
                 tasks, decoder_channels: int):
        super().__init__()
        res = image // patch
        self.tasks = tuple(tasks)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.patch_norm = nn.LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, res * res, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        stages, dims, resolutions = [], [], []
        for i, (depth, h) in enumerate(zip(depths, heads)):
            last = i == len(depths) - 1
            stages.append(Stage(dim, res, depth, h, not last, self.tasks, mlp_ratio=mlp_ratio,
                                rank=rank, task_rank=task_rank, scale=scale,
                                task_scale=task_scale, dropout=dropout))
            if not last:
                dim, res = 2 * dim, res // 2
            dims.append(dim)
            resolutions.append(res)
        self.stages = nn.ModuleList(stages)
        self.decoders = nn.ModuleDict({t: TaskDecoder(dims, resolutions, decoder_channels,
                                                      TASKS[t][0], image) for t in self.tasks})

    def forward(self, pixel_values, **labels):
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)   # bf16/fp16 steps
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = self.patch_norm(x) + self.pos_embed
        feats = {t: [] for t in self.tasks}
        for stage in self.stages:
            x, x_tasks = stage(x)
            for t in self.tasks:
                feats[t].append(x_tasks[t])
        loss = 0
        for t in self.tasks:
            loss = loss + TASKS[t][1] * task_loss(t, self.decoders[t](feats[t]), labels[t])
        return loss


def mtlora_swin(image: int = 32, patch: int = 4, dim: int = 32, depths=(2, 2),
                heads=(2, 4), mlp_ratio: int = 4, rank: int = 8, task_rank: int = 4,
                scale: float = 4.0, task_scale: float = 4.0, dropout: float = 0.05,
                tasks=tuple(TASKS), decoder_channels: int = 16) -> MTLoRAModel:
    """A frozen Swin-like encoder of these sizes with TA-/TS-LoRA, and trainable task decoders
    (``tasks`` from :data:`TASKS`)."""
    model = MTLoRAModel(image, patch, dim, depths, heads, mlp_ratio, rank, task_rank, scale,
                        task_scale, dropout, tasks, decoder_channels)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("decoders.") or any(
            k in name for k in ("lora_", "task_A", "task_B"))
    return model


def factory(batch: int = 2, image: int = 32, **sizes):
    model = mtlora_swin(image=image, **sizes)
    labels = {"semseg": torch.zeros(batch, image, image, dtype=torch.long),
              "saliency": torch.zeros(batch, 1, image, image),
              "normals": torch.zeros(batch, 3, image, image)}
    labels = {t: labels[t] for t in model.tasks}
    inputs = {"pixel_values": torch.zeros(batch, 3, image, image), **labels}
    return {"module": model, "inputs": inputs,
            "dims": {"batch": [(k, 0) for k in inputs]},
            "name": "mtlora-swin"}
