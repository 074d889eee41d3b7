"""Datasets and transforms for pretraining."""
from __future__ import annotations

import os

from torchvision import datasets, transforms

from fastmae.data.shapes import ShapesDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(input_size: int) -> transforms.Compose:
    """The original's pretraining augmentation."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                input_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ]
    )


def image_folder_root(data_path: str) -> str:
    """``data_path/train`` when it exists (the original's layout, e.g. an ImageNet root), else
    ``data_path`` itself, which must hold one folder per class."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data_path {data_path!r} is not a directory")
    train = os.path.join(data_path, "train")
    return train if os.path.isdir(train) else data_path


def build_pretrain_dataset(data_path: str | None, input_size: int, *, builtin_size: int = 5000):
    """An ImageFolder over ``data_path``, or the built-in shapes dataset when it is None."""
    transform = pretrain_transform(input_size)
    if data_path is None:
        return ShapesDataset(builtin_size, image_size=max(40, input_size), transform=transform)
    root = image_folder_root(data_path)
    try:
        return datasets.ImageFolder(root, transform=transform)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no images found under {root!r} (expected one folder per class): {e}") from e


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ShapesDataset", "build_pretrain_dataset", "pretrain_transform"]
