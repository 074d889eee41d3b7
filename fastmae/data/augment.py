"""Fine-tuning's batch augmentations, applied on the training device after any loader: random
erasing (timm's ``RandomErasing(0.25, mode="pixel")``) and mixup / cutmix with label smoothing (timm's
``Mixup``, batch mode), so that DALI and torchvision batches get the same treatment."""
from __future__ import annotations

import math

import torch
from torchvision.transforms import v2


def random_erasing(x: torch.Tensor, p: float = 0.25, area=(0.02, 1 / 3), log_aspect=(math.log(0.3), math.log(1 / 0.3)),
                   attempts: int = 10) -> torch.Tensor:
    """With probability ``p`` per image, fill one random box (area fraction ``area``, aspect ratio
    log-uniform in ``log_aspect``; the first of ``attempts`` draws that fits) with N(0, 1) noise."""
    n, _, H, W = x.shape
    dev = x.device
    target = torch.empty(n, attempts, device=dev).uniform_(*area) * H * W
    aspect = torch.exp(torch.empty(n, attempts, device=dev).uniform_(*log_aspect))
    h = torch.sqrt(target * aspect).round().long()
    w = torch.sqrt(target / aspect).round().long()
    fits = (h < H) & (w < W) & (h > 0) & (w > 0)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first attempt that fits
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    apply = (torch.rand(n, device=dev) < p) & fits.any(dim=1)
    top = (torch.rand(n, device=dev) * (H - h + 1)).long()
    left = (torch.rand(n, device=dev) * (W - w + 1)).long()
    rows, cols = torch.arange(H, device=dev), torch.arange(W, device=dev)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + h)[:, None])
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + w)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]).unsqueeze(1)
    return torch.where(box, torch.randn_like(x), x)


class MixupCutmix:
    """Soft targets ``[N, classes]`` for a batch: mixup (``mixup_alpha``) or cutmix (``cutmix_alpha``)
    with the rolled batch, one of them chosen per batch with equal odds when both are on, and label
    smoothing ``smoothing`` (timm's ``Mixup``: ``(1 - s) * mixed one-hot + s / classes``)."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, smoothing: float = 0.1):
        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixes) if len(mixes) > 1 else (mixes[0] if mixes else None)
        self.num_classes, self.smoothing = num_classes, smoothing

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None:
            soft = torch.nn.functional.one_hot(y, self.num_classes).float()
        else:
            x, soft = self.mix(x, y)
        return x, soft * (1 - self.smoothing) + self.smoothing / self.num_classes


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
