"""The original recipe's optimizer, its parameter groups and learning-rate schedule."""
from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from fastmae.ops.registry import BackendUnavailableError

# name -> apex class; "adamw" is torch's AdamW (fused kernels on CUDA)
OPTIMIZERS = {"adamw": None, "apex_adam": "FusedAdam", "apex_lamb": "FusedLAMB"}


def _apex_optimizer(cls_name: str):
    try:
        return getattr(importlib.import_module("apex.optimizers"), cls_name)
    except Exception as e:  # ImportError, or apex built without its CUDA extensions
        raise ImportError(
            f"apex.optimizers.{cls_name} is not available (build apex from https://github.com/NVIDIA/apex, "
            f"see README; {type(e).__name__}: {e})"
        ) from e


def optimizer_unavailable_reasons(name: str, device_type: str) -> list[str]:
    if name not in OPTIMIZERS:
        return [f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}"]
    if OPTIMIZERS[name] is None:
        return []
    reasons = [] if device_type == "cuda" else ["apex's fused optimizers run on CUDA only"]
    try:
        _apex_optimizer(OPTIMIZERS[name])
    except ImportError as e:
        reasons.append(str(e))
    return reasons


def build_optimizer(name: str, param_groups: list[dict], lr: float, device_type: str) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer ``name`` with the original's betas (0.9, 0.95) and per-group weight decay,
    and a line saying what it is. An optimizer that cannot run raises and says why."""
    reasons = optimizer_unavailable_reasons(name, device_type)
    if reasons:
        raise BackendUnavailableError(f"optimizer {name!r} cannot run on {device_type}: {'; '.join(reasons)}")
    betas = (0.9, 0.95)
    if name == "adamw":
        fused = device_type == "cuda"
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused), \
            f"torch AdamW ({'fused' if fused else 'foreach'})"
    cls = _apex_optimizer(OPTIMIZERS[name])
    # weight decay comes from the parameter groups; FusedAdam in AdamW mode (decoupled decay)
    extra = {"adam_w_mode": True} if name == "apex_adam" else {}
    return cls(param_groups, lr=lr, betas=betas, **extra), f"apex {OPTIMIZERS[name]}"


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
