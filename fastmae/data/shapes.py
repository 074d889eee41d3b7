"""The built-in default dataset: procedurally drawn shapes, no download.

Each image is a smooth, muted two-colour gradient background with one shape drawn over it; the
shape is the class label, and so, roughly, is the shape's hue (each class has its own band of the
colour wheel), which keeps the task learnable by a small ViT in a few CPU epochs. The images have
real spatial structure (edges, flat regions, textures) so that an MAE learns something and its loss
visibly falls, and labels, so that fine-tuning and linear probing have a task. The same seed gives
the same images.
"""
from __future__ import annotations

import colorsys
import os

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fastmae.errors import UsageError

SHAPES_VERSION = 2  # bumped whenever the drawing changes: cached folders of older images are not reused
CLASSES = (
    "checkerboard",
    "circle",
    "cross",
    "diamond",
    "ellipse",
    "horizontal_stripes",
    "ring",
    "square",
    "triangle",
    "vertical_stripes",
)


def _shape_mask(label: str, u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage in {0, 1} of shape ``label`` in rotated coordinates ``u, v`` centred on it."""
    d = np.hypot(u, v)
    square = np.maximum(np.abs(u), np.abs(v)) < r * 0.85
    if label == "circle":
        return d < r
    if label == "ring":
        return (d < r) & (d > r * 0.55)
    if label == "square":
        return square
    if label == "diamond":
        return np.abs(u) + np.abs(v) < r
    if label == "ellipse":
        return (u / r) ** 2 + (v / (0.5 * r)) ** 2 < 1
    if label == "cross":
        arm = r / 3
        return ((np.abs(u) < arm) & (np.abs(v) < r)) | ((np.abs(v) < arm) & (np.abs(u) < r))
    if label == "triangle":
        # equilateral, pointing up in (u, v), inscribed in the circle of radius r
        return (v > -r / 2) & (np.sqrt(3) * u + v < r) & (-np.sqrt(3) * u + v < r)
    period = r * rng.uniform(0.35, 0.6)
    if label == "horizontal_stripes":
        return square & (np.floor(v / period) % 2 == 0)
    if label == "vertical_stripes":
        return square & (np.floor(u / period) % 2 == 0)
    if label == "checkerboard":
        return square & ((np.floor(u / period) + np.floor(v / period)) % 2 == 0)
    raise UsageError(f"unknown shape class {label!r}")


def render_shape(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size x size`` RGB uint8 image of class ``label``."""
    hi = 2 * size  # draw at twice the size and average 2x2 blocks: anti-aliased edges
    yy, xx = np.mgrid[0:hi, 0:hi].astype(np.float64) / hi

    c0, c1 = rng.uniform(0.2, 0.8, size=(2, 1)) + rng.uniform(-0.15, 0.15, size=(2, 3))
    theta = rng.uniform(0, 2 * np.pi)
    t = (xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta) + 0.5
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]

    cx, cy = rng.uniform(0.35, 0.65, size=2)
    r = rng.uniform(0.22, 0.36)
    phi = rng.uniform(0, 2 * np.pi) if CLASSES[label] not in ("horizontal_stripes", "vertical_stripes") else 0.0
    u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
    v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
    cover = _shape_mask(CLASSES[label], u, v, r, rng)[..., None]
    hue = (label + rng.uniform(-0.35, 0.35)) / len(CLASSES)
    fg = np.array(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)))
    img = np.where(cover, fg, img)

    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    img += rng.normal(0, 0.02, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


class ShapesDataset(Dataset):
    """``num_images`` procedurally drawn RGB images of ``image_size`` pixels with labels in
    ``range(len(CLASSES))``; items are ``(transform(PIL image), label)`` like torchvision's
    ImageFolder, so the original's transforms apply unchanged.

    Args:
        num_images: dataset length (classes balanced, in a shuffled order).
        image_size: side of the stored images (crops are taken from them).
        seed: the images are a function of the seed alone.
        transform: applied to each PIL image.
    """

    classes = CLASSES

    def __init__(self, num_images: int = 5000, image_size: int = 40, seed: int = 0, transform=None):
        rng = np.random.default_rng(seed)
        self.targets = rng.permutation(np.arange(num_images) % len(CLASSES)).tolist()
        self.images = np.stack([render_shape(y, image_size, rng) for y in self.targets])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]

    def write_image_folder(self, root: str | os.PathLike) -> None:
        """Save as an ImageFolder tree ``root/<class>/<index>.png``."""
        for c in CLASSES:
            os.makedirs(os.path.join(root, c), exist_ok=True)
        for i, (img, y) in enumerate(zip(self.images, self.targets)):
            Image.fromarray(img).save(os.path.join(root, CLASSES[y], f"{i:06d}.png"))
