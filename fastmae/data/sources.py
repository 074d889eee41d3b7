"""What a dataset is made of: image files with labels, read the same way by every loader.

An ImageFolder tree (one folder per class, sorted class names -> labels 0..C-1, torchvision's
rules), or a folder of tar shards (webdataset layout: ``<key>.jpg`` beside ``<key>.cls``).
Readable images of any mode (grayscale, CMYK, palette, RGBA PNG) become RGB; 16-bit images (PNG,
TIFF) are scaled to 8 bits (``round(v / 257)``, as DALI's decoder does), where PIL's own conversion
would clip them to white. A file no decoder can read, or one whose pixels have no defined range (a
float image, integers beyond 16 bits), is an :class:`UnreadableImageError` that names it.
"""
from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fastmae.errors import FastMAEError, MissingPathError


class UnreadableImageError(FastMAEError, OSError):
    """An image file that cannot be decoded; the message starts with its path."""


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as RGB, fully decoded (a truncated file fails here, not later)."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, path)
    except UnreadableImageError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise UnreadableImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def to_rgb(img: Image.Image, path: str) -> Image.Image:
    """``img`` as 8-bit RGB; 16-bit pixels scaled, pixels without a defined range refused."""
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        pixels = np.asarray(img)
        if img.mode == "I" and (pixels.min() < 0 or pixels.max() > 65535):  # 16-bit PNGs load as "I" in older PIL
            raise UnreadableImageError(f"{path}: 32-bit integer pixels (mode I, {pixels.min()}..{pixels.max()}) "
                                       "have no defined range: convert the image to 8 or 16 bits")
        return Image.fromarray((pixels.astype(np.float64) / 257).round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise UnreadableImageError(f"{path}: floating-point pixels (mode F) have no defined range: "
                                   "convert the image to 8 or 16 bits")
    return img.convert("RGB")


def pixel_depth(img: Image.Image) -> str:
    """How the loaders read ``img``'s pixels: ``"16-bit, scaled to 8 bits"``, ``"converted to RGB"``
    or ``""`` (RGB as it is)."""
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        return "16-bit, scaled to 8 bits"
    return "" if img.mode == "RGB" else "converted to RGB"


def image_folder_root(data_path: str) -> str:
    """``data_path/train`` when it exists (the original's layout, e.g. an ImageNet root), else
    ``data_path`` itself."""
    if not os.path.isdir(data_path):
        raise MissingPathError(f"data path {data_path!r} is not a directory")
    train = os.path.join(data_path, "train")
    return train if os.path.isdir(train) else data_path


def list_tar_shards(root: str) -> list[str]:
    """The ``*.tar`` shards directly in ``root`` (sorted), or [] when it is not a shard folder."""
    return sorted(glob.glob(os.path.join(root, "*.tar")))


def list_image_folder(root: str) -> tuple[list[str], np.ndarray, list[str]]:
    """``(files, labels, classes)`` of an ImageFolder tree, in torchvision's order."""
    try:
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise MissingPathError(
            f"no images found under {root!r}: expected one folder per class holding "
            f"{', '.join(IMG_EXTENSIONS[:4])}... files ({e})"
        ) from e
    files = [path for path, _ in samples]
    return files, np.array([label for _, label in samples], dtype=np.int64), classes
