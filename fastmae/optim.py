"""The original recipe's optimizer parameter groups and learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip_list: tuple[str, ...] = ()) -> list[dict]:
    """Weight decay on weights only: no decay for biases and 1-D parameters (norms), as timm's
    ``add_weight_decay`` that the original uses. Frozen parameters (the fixed position
    embeddings) are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warmup for ``warmup_epochs`` then half-cycle cosine to ``min_lr``; ``epoch`` is
    fractional (the original updates per iteration)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
