"""Pretraining data: one loader interface, several backends.

Every loader yields ``(images float32 [B, 3, S, S], labels int64 [B])`` already on the training
device, has ``len`` (batches left this epoch), ``set_epoch(epoch, start_batch=0)`` and
``files_skipped``. Backends: ``dali`` (GPU decode and crop; DALI's CPU mode without a GPU),
``torchvision`` (PIL decode in DataLoader workers), ``synthetic`` (random batches on the device);
``auto`` is DALI on CUDA when it is installed, else torchvision.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch
from torchvision import datasets, transforms

from fastmae.data.dali_loader import DaliLoader, dali_unavailable_reasons
from fastmae.data.shapes import ShapesDataset
from fastmae.data.sources import (
    UnreadableImageError, image_folder_root, list_image_folder, list_tar_shards, load_rgb,
)
from fastmae.data.synthetic import SyntheticLoader
from fastmae.data.torchvision_loader import TorchvisionLoader

logger = logging.getLogger("fastmae")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_BACKENDS = ("auto", "dali", "torchvision", "synthetic")


def pretrain_transform(input_size: int) -> transforms.Compose:
    """The original's pretraining augmentation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def builtin_shapes_folder(num_images: int, image_size: int) -> str:
    """The built-in shapes dataset written once as an ImageFolder of PNGs (for loaders that read
    files), in ``$FASTMAE_CACHE`` or ``~/.cache/fastmae``."""
    cache = os.environ.get("FASTMAE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastmae"))
    root = os.path.join(cache, f"shapes-{num_images}-{image_size}")
    if not os.path.isdir(root):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache)
        ShapesDataset(num_images, image_size=image_size).write_image_folder(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_data_backend(name: str, device: torch.device) -> str:
    if name not in DATA_BACKENDS:
        raise ValueError(f"unknown data backend {name!r}; choose one of {DATA_BACKENDS}")
    if name == "auto":
        chosen = "dali" if device.type == "cuda" and not dali_unavailable_reasons() else "torchvision"
        logger.info("data backend: %s (automatic)", chosen)
        return chosen
    if name == "dali" and dali_unavailable_reasons():
        from fastmae.ops import BackendUnavailableError

        raise BackendUnavailableError(f"data backend 'dali' was requested but {dali_unavailable_reasons()[0]}")
    return name


def build_pretrain_loader(
    *, backend: str, data_path: str | None, input_size: int, batch_size: int, device: torch.device,
    rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 2, pin_memory: bool = True,
    skip_unreadable: bool = False, builtin_size: int = 5000, synthetic_batches: int = 100,
):
    """The pretraining loader of ``backend`` over ``data_path`` (an ImageFolder root, or a folder of
    tar shards for DALI), or over the built-in shapes dataset when ``data_path`` is None."""
    backend = resolve_data_backend(backend, device)
    common = dict(batch_size=batch_size, device=device, rank=rank, world_size=world_size, seed=seed)
    if backend == "synthetic":
        return SyntheticLoader(batch_size=batch_size, image_size=input_size, device=device, seed=seed + rank,
                               batches_per_epoch=synthetic_batches)
    builtin_image_size = max(40, input_size)
    if backend == "torchvision":
        if data_path is None:
            dataset = ShapesDataset(builtin_size, image_size=builtin_image_size, transform=pretrain_transform(input_size))
        else:
            root = image_folder_root(data_path)
            if list_tar_shards(root):
                raise ValueError(f"{root} holds tar shards, which only the DALI loader reads (--data_backend dali)")
            list_image_folder(root)  # a clear error for an empty or class-less folder
            dataset = datasets.ImageFolder(root, transform=pretrain_transform(input_size), loader=load_rgb)
        return TorchvisionLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                                 skip_unreadable=skip_unreadable, **common)
    # dali
    root = image_folder_root(data_path) if data_path else builtin_shapes_folder(builtin_size, builtin_image_size)
    dali = dict(image_size=input_size, num_threads=max(1, num_workers), skip_unreadable=skip_unreadable,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, **common)
    shards = list_tar_shards(root)
    if shards:
        return DaliLoader(shards=shards, **dali)
    files, labels, _ = list_image_folder(root)
    return DaliLoader(files, labels, **dali)


__all__ = [
    "DATA_BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "DaliLoader", "ShapesDataset", "SyntheticLoader",
    "TorchvisionLoader", "UnreadableImageError", "build_pretrain_loader", "pretrain_transform",
]
