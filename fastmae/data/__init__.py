"""Pretraining data: one loader interface, several backends.

Every loader is an :class:`~fastmae.data.protocol.EpochLoader`: ``(images float32 [B, 3, S, S],
labels int64 [B])`` already on the training device, ``steps_per_epoch``, ``num_samples``,
``set_epoch(epoch, start_batch=0)``, ``files_skipped``. Backends: ``dali`` (GPU decode and crop; DALI's CPU mode without a GPU),
``nvjpeg`` (JPEG bytes read by DataLoader workers, decoded by nvJPEG and cropped by one fused
kernel on the GPU), ``torchvision`` (PIL decode in DataLoader workers), ``synthetic`` (random
batches on the device);
``auto`` is DALI on CUDA when it is installed, else torchvision (and torchvision for fine-tuning's
auto-augmentation with timm installed: timm's, as the original).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch
from torchvision import datasets, transforms

from fastmae.config import DATA_BACKENDS, FINETUNE_AA
from fastmae.data.augment import needs_timm, timm_available, timm_compatible
from fastmae.data.crops import CLAMPED_CROP_MODES, CROP_SCALES, ClampedRandomResizedCrop, eval_resize
from fastmae.data.dali_loader import DaliLoader, dali_unavailable_reasons
from fastmae.data.nvjpeg_loader import NvjpegLoader
from fastmae.data.shapes import SHAPES_VERSION, ShapesDataset
from fastmae.data.sources import (
    UnreadableImageError, image_folder_root, list_image_folder, list_tar_shards, load_rgb,
)
from fastmae.data.synthetic import SyntheticLoader
from fastmae.data.torchvision_loader import TorchvisionLoader
from fastmae.errors import BackendUnavailableError, MissingPathError, UsageError

logger = logging.getLogger("fastmae")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(input_size: int) -> transforms.Compose:
    """The original's pretraining augmentation."""
    return transform("pretrain", input_size)


def transform(mode: str, input_size: int, *, aa: str = FINETUNE_AA, color_jitter: float | None = None):
    """The original's transforms. ``pretrain``: RandomResizedCrop(scale=(0.2, 1)) + flip; ``probe``
    (linear probing): the original's own RandomResizedCrop (scale (0.08, 1), one draw clamped to the
    image, see :mod:`fastmae.data.crops`) + flip; ``train`` (fine-tuning without auto-augmentation):
    RandomResizedCrop(scale=(0.08, 1)) + flip; ``train_randaug`` (fine-tuning): timm's
    ``create_transform`` with the original's arguments (RandomResizedCrop, flip, the ``aa``
    auto-augmentation, ``color_jitter`` where timm applies it) when timm is installed, as the
    original; without timm, torchvision's RandAugment (2 ops at magnitude 9, filled with the mean
    colour: ``rand-m9-mstd0.5-inc1`` without its magnitude noise and increasing-severity ops);
    ``eval``: resize to ``input_size * 256 / 224`` (``input_size`` itself above 224), center crop. All
    bicubic, then ImageNet normalization. Fine-tuning's random erasing and mixup act on batches, on
    the device (:mod:`fastmae.data.augment`)."""
    bicubic = transforms.InterpolationMode.BICUBIC
    if mode == "train_randaug" and timm_available():
        from timm.data import create_transform

        timm_compatible()
        # random erasing is applied to the batch on the device, with timm's RandomErasing
        return create_transform(input_size, is_training=True, color_jitter=color_jitter,
                                auto_augment=None if aa == "none" else aa, interpolation="bicubic", re_prob=0.0,
                                mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if mode == "eval":
        steps = [transforms.Resize(eval_resize(input_size), interpolation=bicubic), transforms.CenterCrop(input_size)]
    else:
        scale = CROP_SCALES[mode] if mode in CROP_SCALES else CROP_SCALES["train"]
        crop = ClampedRandomResizedCrop if mode in CLAMPED_CROP_MODES else transforms.RandomResizedCrop
        steps = [crop(input_size, scale=scale, interpolation=bicubic), transforms.RandomHorizontalFlip()]
        if mode == "train_randaug":
            needs_timm(aa not in (FINETUNE_AA, "none") and f"--aa {aa}", color_jitter is not None and "--color_jitter")
            if aa != "none":
                steps.append(transforms.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11,
                                                    interpolation=bicubic, fill=[124, 116, 104]))
        elif mode not in CROP_SCALES:
            raise UsageError(f"unknown transform mode {mode!r}")
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def builtin_shapes_folder(num_images: int, image_size: int, seed: int = 0) -> str:
    """The built-in shapes dataset written once as an ImageFolder of PNGs (for loaders that read
    files), in ``$FASTMAE_CACHE`` or ``~/.cache/fastmae``."""
    cache = os.environ.get("FASTMAE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastmae"))
    root = os.path.join(cache, f"shapes-v{SHAPES_VERSION}-{num_images}-{image_size}-{seed}")
    if not os.path.isdir(root):
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache)
        ShapesDataset(num_images, image_size=image_size, seed=seed).write_image_folder(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def resolve_data_backend(name: str, device: torch.device, mode: str = "pretrain") -> str:
    if name not in DATA_BACKENDS:
        raise UsageError(f"unknown data backend {name!r}; choose one of {DATA_BACKENDS}")
    if name == "auto":
        if mode == "train_randaug" and timm_available():
            # the original's fine-tuning augmentation is timm's (PIL), which DALI's RandAugment only approximates
            logger.info("data backend: torchvision (automatic: timm's fine-tuning augmentation, as the original; "
                        "--data_backend dali for DALI's RandAugment)")
            return "torchvision"
        chosen = "dali" if device.type == "cuda" and not dali_unavailable_reasons() else "torchvision"
        logger.info("data backend: %s (automatic)", chosen)
        return chosen
    if name == "dali" and dali_unavailable_reasons():
        raise BackendUnavailableError(f"data backend 'dali' was requested but {dali_unavailable_reasons()[0]}")
    return name


def build_loader(
    *, backend: str, root: str | None, mode: str, input_size: int, batch_size: int, device: torch.device,
    rank: int = 0, world_size: int = 1, seed: int = 0, num_workers: int = 2, pin_memory: bool = True,
    skip_unreadable: bool = False, builtin: tuple[int, int] = (5000, 0), synthetic_batches: int = 100,
    num_classes: int = 1000, pad_last_batch: bool = False, aa: str = FINETUNE_AA, color_jitter: float | None = None,
    crop_backend: str | None = None,
):
    """A loader of ``backend`` over the ImageFolder tree (or DALI tar shards) at ``root``, or over
    the built-in shapes dataset ``builtin = (num_images, seed)`` when ``root`` is None, with the
    ``mode`` augmentation (see :func:`transform`); ``eval`` reads in order and pads its last batch
    (``evaluate`` leaves the padding out). Training modes drop each rank's incomplete last batch, as
    the original, unless ``pad_last_batch``. ``aa``, ``color_jitter``: fine-tuning's augmentation
    (``train_randaug``). ``num_classes``: the synthetic source's labels. ``crop_backend``: the nvjpeg
    loader's crop kernel (``triton`` or ``torch``; default: triton on CUDA)."""
    backend = resolve_data_backend(backend, device, mode)
    if backend == "nvjpeg" and mode == "eval":
        # evaluation's resize + center crop is not its kernel's: the torchvision loader's, as the original
        logger.info("evaluation data: torchvision loader (the nvjpeg loader does the random-crop augmentations)")
        backend = "torchvision"
    if backend == "dali" and mode == "train_randaug" and (aa not in (FINETUNE_AA, "none") or color_jitter is not None):
        raise UsageError(f"the DALI loader's fine-tuning augmentation is its RandAugment ({FINETUNE_AA}, without "
                         "magnitude noise): --aa and --color_jitter take the torchvision loader")
    loader = _build_loader(backend, root, mode, input_size, batch_size, device, rank, world_size, seed, num_workers,
                           pin_memory, skip_unreadable, builtin, synthetic_batches, num_classes,
                           drop_last=mode != "eval" and not pad_last_batch, crop_backend=crop_backend,
                           transform_of=lambda m: transform(m, input_size, aa=aa, color_jitter=color_jitter))
    if loader.steps_per_epoch == 0:
        raise UsageError(f"{loader.num_samples} images make no whole batch of {batch_size} on each of {world_size} "
                         f"rank(s): lower --batch_size, or pass --pad_last_batch to repeat images into one")
    return loader


def _build_loader(backend, root, mode, input_size, batch_size, device, rank, world_size, seed, num_workers,
                  pin_memory, skip_unreadable, builtin, synthetic_batches, num_classes, drop_last, transform_of,
                  crop_backend):
    common = dict(batch_size=batch_size, device=device, rank=rank, world_size=world_size, seed=seed)
    if backend == "synthetic":
        return SyntheticLoader(batch_size=batch_size, image_size=input_size, device=device, seed=seed + rank,
                               batches_per_epoch=synthetic_batches, num_classes=num_classes)
    builtin_image_size = max(40, input_size)
    if backend == "torchvision":
        if root is None:
            dataset = ShapesDataset(builtin[0], image_size=builtin_image_size, seed=builtin[1],
                                    transform=transform_of(mode))
        else:
            if list_tar_shards(root):
                raise UsageError(f"{root} holds tar shards, which only the DALI loader reads (--data_backend dali)")
            list_image_folder(root)  # a clear error for an empty or class-less folder
            dataset = datasets.ImageFolder(root, transform=transform_of(mode), loader=load_rgb)
        return TorchvisionLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, shuffle=mode != "eval",
                                 drop_last=drop_last,
                                 skip_unreadable=skip_unreadable, **common)
    if backend == "nvjpeg":
        if mode not in CROP_SCALES:
            raise UsageError(f"the nvjpeg loader does the pretraining and linear-probing augmentation (RandomResizedCrop "
                             f"and flip), not {mode!r} (fine-tuning's RandAugment): use --data_backend torchvision "
                             "or dali")
        if root is None:
            root = builtin_shapes_folder(builtin[0], builtin_image_size, builtin[1])
        elif list_tar_shards(root):
            raise UsageError(f"{root} holds tar shards, which only the DALI loader reads (--data_backend dali)")
        files, labels, _ = list_image_folder(root)
        return NvjpegLoader(files, labels, image_size=input_size, scale=CROP_SCALES[mode],
                            clamp_crop=mode in CLAMPED_CROP_MODES, mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
                            skip_unreadable=skip_unreadable, crop_backend=crop_backend, **common)
    # dali
    if root is None:
        root = builtin_shapes_folder(builtin[0], builtin_image_size, builtin[1])
    dali = dict(image_size=input_size, num_threads=max(1, num_workers), skip_unreadable=skip_unreadable,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, mode=mode, drop_last=drop_last, **common)
    shards = list_tar_shards(root)
    if shards:
        return DaliLoader(shards=shards, **dali)
    files, labels, _ = list_image_folder(root)
    return DaliLoader(files, labels, **dali)


def build_pretrain_loader(*, data_path: str | None, builtin_size: int = 5000, **kwargs):
    """The pretraining loader over ``data_path`` (an ImageFolder root: ``DIR/train`` if it exists,
    or a folder of tar shards for DALI), or over the built-in shapes dataset when it is None."""
    root = image_folder_root(data_path) if data_path else None
    return build_loader(root=root, mode="pretrain", builtin=(builtin_size, 0), **kwargs)


def build_classification_loaders(*, data_path: str | None, train_mode: str, builtin_size: int = 5000, **kwargs):
    """``(train loader, validation loader, class names)`` over ``DIR/train`` and ``DIR/val`` (image
    folders, or tar shards read by DALI: then ``num_classes`` names the classes), or over the
    built-in shapes dataset (training images, and a held-out set drawn with another seed)."""
    if data_path is None:
        train_root = val_root = None
        classes = list(ShapesDataset.classes)
    else:
        train_root, val_root = (os.path.join(data_path, split) for split in ("train", "val"))
        for root in (train_root, val_root):
            if not os.path.isdir(root):
                raise MissingPathError(f"{root} is not a directory: evaluation needs DIR/train and DIR/val image "
                                        "folders (or tar shards, with DALI)")
        if list_tar_shards(train_root):  # labels in .cls files, no class list
            if not kwargs.get("num_classes"):
                raise UsageError(f"{train_root} holds tar shards, whose labels name no classes: pass --nb_classes")
            classes = [str(c) for c in range(kwargs["num_classes"])]
        else:
            _, _, classes = list_image_folder(train_root)
    kwargs.setdefault("num_classes", len(classes))
    train = build_loader(root=train_root, mode=train_mode, builtin=(builtin_size, 0), **kwargs)
    val = build_loader(root=val_root, mode="eval", builtin=(builtin_size // 5, 1), **kwargs)
    return train, val, classes


__all__ = [
    "DATA_BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "DaliLoader", "ShapesDataset", "SyntheticLoader",
    "TorchvisionLoader", "UnreadableImageError", "build_classification_loaders", "build_loader",
    "build_pretrain_loader", "NvjpegLoader", "pretrain_transform", "transform",
]
