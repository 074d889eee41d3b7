"""The pretraining augmentation of decoded images on their device: RandomResizedCrop's box resized
(bicubic), the horizontal flip, ToTensor's scaling and the normalization, for a whole batch.

:func:`resized_crop` runs the fused Triton kernel (``fastmae.kernels.resized_crop``: one launch,
each image read once, the batch written once) or its PyTorch reference, torchvision's
``resized_crop`` on tensors (bicubic, no antialias) image by image. The boxes and flips are drawn
on the host by :func:`~fastmae.data.crops.crop_params`, from the same random stream and in the same
order as the torchvision loader's transforms, so a sample seeded as the torchvision loader seeds it
gets the same box and flip.
"""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from fastmae.errors import UsageError

CROP_BACKENDS = ("triton", "torch")


def resized_crop_reference(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int,
                           mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torchvision's tensor ops image by image: ``resized_crop`` (bicubic, no antialias: rounded
    and clamped to uint8), ``hflip``, ``/ 255``, ``normalize``."""
    out = []
    for img, (top, left, h, w), flip in zip(images, boxes.tolist(), flips.tolist()):
        crop = TF.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BICUBIC, antialias=False)
        if flip:
            crop = TF.hflip(crop)
        out.append(TF.normalize(crop.float() / 255, list(mean), list(std)))
    return torch.stack(out).to(dtype)


def check_crop_inputs(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int) -> None:
    if not images:
        raise UsageError("resized_crop: no images")
    if boxes.shape != (len(images), 4) or flips.shape != (len(images),):
        raise UsageError(f"resized_crop: {len(images)} images need boxes [{len(images)}, 4] and flips "
                         f"[{len(images)}], got {tuple(boxes.shape)} and {tuple(flips.shape)}")
    if size < 1:
        raise UsageError(f"resized_crop: output size {size} must be positive")
    for i, (img, (top, left, h, w)) in enumerate(zip(images, boxes.tolist())):
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise UsageError(f"resized_crop: image {i} must be uint8 [3, H, W], got {img.dtype} {tuple(img.shape)}")
        if not (0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= img.shape[1] and left + w <= img.shape[2]):
            raise UsageError(f"resized_crop: box (top {top}, left {left}, height {h}, width {w}) of image {i} is not "
                             f"inside its {img.shape[1]} x {img.shape[2]} pixels")


def resized_crop(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int, mean, std, *,
                 dtype: torch.dtype = torch.float32, backend: str = "triton") -> torch.Tensor:
    """The batch ``[B, 3, size, size]`` in ``dtype`` of ``images`` (uint8 ``[3, H, W]``, each its
    own size, all on one device), cropped to ``boxes`` ([B, 4]: top, left, height, width),
    resized, flipped where ``flips`` and normalized by ``mean`` and ``std`` (per channel, of
    pixels in [0, 1]). ``backend``: ``triton`` (the fused kernel; the Triton interpreter runs it on
    a CPU) or ``torch`` (the reference). The boxes and flips are read on the host (checked against
    the images' sizes, and sent with the images' addresses in one copy from pinned memory): given
    there, they cost no synchronization with the device."""
    if backend not in CROP_BACKENDS:
        raise UsageError(f"unknown crop backend {backend!r}; choose one of {CROP_BACKENDS}")
    check_crop_inputs(images, boxes, flips, size)
    device = images[0].device
    if any(img.device != device for img in images):
        raise UsageError("resized_crop: the images must all be on one device")
    if backend == "torch":
        return resized_crop_reference(images, boxes, flips, size, mean, std, dtype)
    from fastmae.kernels.resized_crop import resized_crop_batch

    out = torch.empty(len(images), 3, size, size, dtype=dtype, device=device)
    images = [img.contiguous() for img in images]
    return resized_crop_batch(images, boxes, flips, size, tuple(map(float, mean)), tuple(map(float, std)), out)
