"""Where every loader's crops come from, as the original draws them.

Pretraining (mode ``pretrain``) crops as torchvision's ``RandomResizedCrop`` (``main_pretrain.py``):
up to ten draws of an area and an aspect ratio until the box fits in the image, else a central crop.
Linear probing (``probe``) crops as the original's own ``util/crop.RandomResizedCrop``
(``main_linprobe.py``, after BYOL's TF code): one draw, its width and height clamped to the image,
so more crops span a whole side (a quarter of them on a 4:3 image, against under 1% with
torchvision's redraws). Fine-tuning (``train``, ``train_randaug``) crops as timm's
``create_transform`` does (torchvision's way). Evaluation resizes to
``input_size / crop_pct`` and crops the center, ``crop_pct`` 224/256 up to 224 pixels, else 1
(``util/datasets.build_transform``).

The draws use torch's global generator, which the loaders seed per sample, in the order the
original's transforms draw: the box, then the flip.
"""
from __future__ import annotations

import math

import torch
from torchvision import transforms
from torchvision.transforms import functional as TF

CROP_SCALES = {"pretrain": (0.2, 1.0), "train": (0.08, 1.0), "probe": (0.08, 1.0)}  # RandomResizedCrop's area range
CLAMPED_CROP_MODES = ("probe",)  # linear probing: util/crop.RandomResizedCrop's one clamped draw
ASPECT_RATIOS = (3 / 4, 4 / 3)


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float] = ASPECT_RATIOS, *,
             clamp: bool = False) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` as torchvision's ``RandomResizedCrop.get_params`` draws it, or with
    ``clamp`` as the original's ``util/crop.RandomResizedCrop.get_params``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(1 if clamp else 10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if clamp:
            w, h = min(w, width), min(h, height)
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    # torchvision's fallback to a central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_params(height: int, width: int, scale: tuple[float, float] = CROP_SCALES["pretrain"],
                ratio: tuple[float, float] = ASPECT_RATIOS, *, clamp: bool = False) -> tuple[int, int, int, int, bool]:
    """``(top, left, h, w, flip)``: :func:`crop_box`, then the flip as ``RandomHorizontalFlip`` draws it."""
    box = crop_box(height, width, scale, ratio, clamp=clamp)
    return (*box, bool(torch.rand(1) < 0.5))


class ClampedRandomResizedCrop(transforms.RandomResizedCrop):
    """The original's ``util/crop.RandomResizedCrop``: one draw, clamped to the image."""

    @staticmethod
    def get_params(img, scale, ratio):
        _, height, width = TF.get_dimensions(img)
        return crop_box(height, width, scale, ratio, clamp=True)


def eval_resize(input_size: int) -> int:
    """The shorter side evaluation resizes to before its center crop of ``input_size``."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return int(input_size / crop_pct)
