"""Fine-tuning's batch augmentations, applied on the training device after any loader, so that DALI
and torchvision batches get the same treatment: random erasing and mixup / cutmix with label
smoothing. With timm installed they are timm's own ``RandomErasing`` and ``Mixup`` with the
original's flags (as the original's ``main_finetune.py``); without it, torchvision's MixUp / CutMix
and a random erasing of the original's defaults (pixel mode, one box), and the flags that only timm
implements are refused by name."""
from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch
from torchvision.transforms import v2

from fastmae.errors import UsageError


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def timm_compatible() -> None:
    """timm's RandAugment posterizes to 0 bits at its top magnitudes (``PosterizeIncreasing`` with
    magnitude noise reaches it), which current Pillow refuses ("bits must be between or equal to 1
    and 8") where the Pillow of the original's time returned a black image: restore that."""
    from PIL import Image
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **_):
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return auto_augment.ImageOps.posterize(img, bits_to_keep)

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


def needs_timm(*flags: str | None | bool) -> None:
    """Raise when a recipe flag that only timm implements was given without timm installed."""
    given = [f for f in flags if f]
    if given and not timm_available():
        raise UsageError(f"{', '.join(given)} needs timm, as the original's fine-tuning: pip install timm "
                         "(or pip install -e '.[timm]')")


def build_random_erasing(p: float, mode: str, count: int, device: torch.device) -> Callable | None:
    """Per-image random erasing of a normalized batch (in place): timm's ``RandomErasing(p, mode,
    max_count=count)`` when timm is installed, else :func:`random_erasing` (pixel mode, one box)."""
    if p <= 0:
        return None
    if timm_available():
        from timm.data.random_erasing import RandomErasing

        return RandomErasing(p, mode=mode, max_count=count, device=str(device))
    needs_timm(mode != "pixel" and f"--remode {mode}", count != 1 and f"--recount {count}")
    return lambda x: random_erasing(x, p)


def build_mixup(num_classes: int, mixup: float, cutmix: float, smoothing: float, *, cutmix_minmax=None,
                prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch") -> Callable | None:
    """``mix(images, labels) -> (images, soft targets)``, or None when neither mixup nor cutmix is
    on: timm's ``Mixup`` with the original's arguments when timm is installed, else
    :class:`MixupCutmix` (batch mode, probability 1, an even choice between the two)."""
    if not (mixup > 0 or cutmix > 0 or cutmix_minmax is not None):
        return None
    if timm_available():
        from timm.data import Mixup

        return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=prob,
                     switch_prob=switch_prob, mode=mode, label_smoothing=smoothing, num_classes=num_classes)
    needs_timm(cutmix_minmax is not None and "--cutmix_minmax", prob != 1.0 and f"--mixup_prob {prob}",
               switch_prob != 0.5 and f"--mixup_switch_prob {switch_prob}", mode != "batch" and f"--mixup_mode {mode}")
    return MixupCutmix(num_classes, mixup, cutmix, smoothing)


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
