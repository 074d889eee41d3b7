"""The original recipe's optimizer, its parameter groups and learning-rate schedule."""
from __future__ import annotations

import importlib
import math

import torch
from torch import nn

from fastmae.config import OPTIMIZERS  # name -> apex class; "adamw" is torch's fused AdamW
from fastmae.errors import BackendUnavailableError


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


def build_optimizer(name: str, param_groups: list[dict], lr: float, device: torch.device,
                    betas: tuple[float, float] = (0.9, 0.95), *, capturable: bool = False
                    ) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer ``name`` with per-group weight decay and the original pretraining's betas (its
    fine-tuning uses torch's defaults, (0.9, 0.999)), and a line saying what it is. An optimizer
    that cannot run raises and says why.

    torch's AdamW is the fused one (one multi-tensor kernel per step, on CUDA and on the CPU).
    ``capturable``: for a step captured as a CUDA graph, each group's lr is a device tensor that
    :func:`set_lr` writes in place, and the step count stays on the device."""
    device = torch.device(device)
    reasons = optimizer_unavailable_reasons(name, device.type)
    if reasons:
        raise BackendUnavailableError(f"optimizer {name!r} cannot run on {device.type}: {'; '.join(reasons)}")
    if name == "adamw":
        optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=True, capturable=capturable)
        if capturable:
            for group in optimizer.param_groups:  # one tensor per group: their lr_scale may differ
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
        return optimizer, f"torch AdamW (fused{', capturable, lr on the device' if capturable else ''})"
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
    """``lr`` (times each group's ``lr_scale``) into every group; a device-tensor lr is written in
    place (a captured step reads that tensor)."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """The original's grouping: cls token, position and patch embedding at layer 0, block i at layer
    i + 1, everything after the blocks (norm, head) at ``num_layers``."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list=(), layer_decay: float = 0.75) -> list[dict]:
    """Layer-wise lr decay (the original ``util/lr_decay.py``): layer ``i`` of ``L + 1`` gets
    ``lr_scale = layer_decay ** (L + 1 - i)``; no weight decay on 1-D parameters and on
    ``no_weight_decay_list``. Frozen parameters are left out."""
    num_layers = len(model.blocks) + 1
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in no_weight_decay_list
        layer = layer_id_for_vit(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(key, {"lr_scale": scales[layer], "weight_decay": 0.0 if no_decay else weight_decay,
                                        "params": []})
        group["params"].append(param)
    return list(groups.values())


class LARS(torch.optim.Optimizer):
    """LARS (the original ``util/lars.py``, for linear probing): SGD with momentum whose update of each
    parameter of 2 or more dimensions is scaled by ``trust_coefficient * |p| / |g + wd * p|``;
    1-D parameters (biases, norms) get neither weight decay nor scaling."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, g["trust_coefficient"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
