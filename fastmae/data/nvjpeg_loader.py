"""The nvJPEG loader: JPEG files read by CPU workers, decoded in batches on the GPU (torchvision's
``decode_jpeg(device="cuda")``), augmented on the GPU by one fused kernel. No DALI needed.

Per sample, a worker reads the file's bytes and its header (size, mode, progressive), and draws
the RandomResizedCrop box and the flip from the sample's seed exactly as the torchvision loader's
transform draws them (:func:`~fastmae.data.crops.crop_params`), so both loaders crop the same
boxes and a resumed run draws what the uninterrupted one drew. What nvJPEG may not decode -- a
non-JPEG file (PNG, ...), a CMYK or progressive JPEG, one cut short (no end-of-image marker) -- is
decoded by the worker on the CPU instead, as the torchvision loader decodes (a file no decoder
reads names itself). In the training process, one ``decode_jpeg`` call decodes the batch's JPEGs
on the device, and :func:`~fastmae.data.gpu_augment.resized_crop` crops, resizes (bicubic, without
antialias: the one difference from the torchvision loader, whose PIL resize antialiases),
flips and normalizes the whole batch in one launch.

On a CPU device (tests, a machine without a GPU) the same loader decodes with torchvision's CPU
decoder and crops with the PyTorch reference.
"""
from __future__ import annotations

import io
import logging
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastmae.data.crops import crop_params
from fastmae.data.gpu_augment import resized_crop
from fastmae.data.sources import UnreadableImageError, load_rgb
from fastmae.data.torchvision_loader import TorchvisionLoader

logger = logging.getLogger("fastmae")
# torchvision 0.29 deprecates its image decoders for TorchCodec's, and says so on every call
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated",
                        DeprecationWarning)

END_OF_IMAGE = b"\xff\xd9"


class Sample(NamedTuple):
    """A worker's part of one image: ``payload`` is the JPEG file (``decoded`` False) or the
    image decoded on the CPU (uint8 [3, H, W] flattened); ``box`` int32 (top, left, height, width)."""
    payload: torch.Tensor
    decoded: bool
    height: int
    width: int
    box: torch.Tensor
    flip: bool
    index: int


def nvjpeg_decodable(data: bytes, img: Image.Image) -> bool:
    """A baseline JPEG in colour or grey, whole (ends with its end-of-image marker)."""
    progressive = bool(img.info.get("progressive") or img.info.get("progression"))
    return img.format == "JPEG" and img.mode in ("RGB", "L") and not progressive and data.rstrip(b"\0").endswith(END_OF_IMAGE)


class EncodedImages(Dataset):
    """``(Sample, label)`` of ``files[i]``; the crop drawn from torch's generator (seeded per
    sample by the loader), clamped to the image with ``clamp_crop`` (see :func:`~fastmae.data.crops.crop_box`)."""

    def __init__(self, files: list[str], labels, scale: tuple[float, float] = (0.2, 1.0), clamp_crop: bool = False):
        self.files, self.labels, self.scale, self.clamp_crop = files, labels, scale, clamp_crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                on_device = nvjpeg_decodable(data, img)
        except Exception as e:
            raise UnreadableImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
        if on_device:
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            pixels = np.array(load_rgb(path))  # HWC uint8 (a writable copy); raises naming the file
            payload = torch.from_numpy(pixels).permute(2, 0, 1).reshape(-1).contiguous()
        top, left, h, w, flip = crop_params(height, width, self.scale, clamp=self.clamp_crop)
        return Sample(payload, not on_device, height, width, torch.tensor([top, left, h, w], dtype=torch.int32), flip,
                      index), int(self.labels[index])


def collate(items):
    """A batch as ``(samples, labels, files_skipped)`` (items from ``ReplaceUnreadable`` carry the
    count of files they replaced)."""
    samples = [item[0] for item in items]
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    skipped = sum(item[2] for item in items) if len(items[0]) == 3 else 0
    return samples, labels, skipped


class NvjpegLoader(TorchvisionLoader):
    """Batches ``(images [B, 3, S, S] float32, labels [B])`` on ``device`` from image files: the
    torchvision loader's order, seeds, workers and resume, with the decoding and augmentation
    moved to the device (see the module's docstring).

    Args:
        files, labels: the dataset (an ImageFolder's listing).
        image_size: S.
        scale: RandomResizedCrop's area range ((0.2, 1) pretraining, (0.08, 1) linear probing).
        clamp_crop: one draw clamped to the image (linear probing: the original's ``util/crop``).
        mean, std: the normalization.
        crop_backend: ``triton`` (the fused kernel) or ``torch`` (the reference); default: triton
            on CUDA, the reference on a CPU (the entry points pass their kernel backend's choice).
        other arguments: :class:`~fastmae.data.torchvision_loader.TorchvisionLoader`'s.
    """

    def __init__(self, files: list[str], labels, *, image_size: int, scale: tuple[float, float], mean, std,
                 device: torch.device, clamp_crop: bool = False, crop_backend: str | None = None, **kwargs):
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.files = files
        self.crop_backend = crop_backend or default_crop_backend(device)
        # nvJPEG writes its outputs from a stream of its own that waits for nothing on the caller's:
        # memory freed by the step still queued on the training stream must not be handed to it
        self.decode_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        super().__init__(EncodedImages(files, labels, scale, clamp_crop), device=device, collate_fn=collate, **kwargs)

    def _batches(self):
        for samples, labels, skipped in self._loader:
            self.files_skipped += int(skipped)
            images = self._decode(samples)
            boxes = torch.stack([s.box for s in samples])  # read on the host by resized_crop
            flips = torch.tensor([s.flip for s in samples], dtype=torch.int32)
            yield (resized_crop(images, boxes, flips, self.image_size, self.mean, self.std, backend=self.crop_backend),
                   labels.to(self.device, non_blocking=True))

    def _decode_jpegs(self, payloads):
        """``decode_jpeg`` on the device: on the decode stream, whose memory pool only decodes use
        (each output marked in use by the training stream until it is done with it)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.decode_stream is None:
            return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=self.device)
        with torch.cuda.stream(self.decode_stream):
            decoded = decode_jpeg(payloads, mode=ImageReadMode.RGB, device=self.device)
        training = torch.cuda.current_stream(self.device)
        training.wait_stream(self.decode_stream)
        for img in decoded if isinstance(decoded, list) else [decoded]:
            img.record_stream(training)
        return decoded

    def _decode(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Each sample as uint8 [3, H, W] on the device: the JPEGs in one ``decode_jpeg`` call."""
        images: list[torch.Tensor | None] = [None] * len(samples)
        jpegs = [i for i, s in enumerate(samples) if not s.decoded]
        if jpegs:
            try:
                decoded = self._decode_jpegs([samples[i].payload for i in jpegs])
            except RuntimeError:  # one of them: find it, decode the others
                decoded = [self._decode_one(samples[i]) for i in jpegs]
            for i, img in zip(jpegs, decoded):
                images[i] = img
        for i, s in enumerate(samples):
            if s.decoded:
                images[i] = s.payload.view(3, s.height, s.width).to(self.device, non_blocking=True)
            if tuple(images[i].shape) != (3, s.height, s.width):
                raise UnreadableImageError(f"{self.files[s.index]}: decoded as {tuple(images[i].shape)}, its header "
                                           f"says 3 x {s.height} x {s.width}")
        return images

    def _decode_one(self, sample: Sample) -> torch.Tensor:
        try:
            return self._decode_jpegs(sample.payload)
        except RuntimeError as e:
            path = self.files[sample.index]
            logger.warning("%s: the device's JPEG decoder failed (%s); decoding on the CPU", path, e)
            pixels = np.array(load_rgb(path))  # raises naming the file when no decoder reads it
            return torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(self.device)


def default_crop_backend(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch"


def crop_backend_for(kernels: str) -> str:
    """The crop kernel that goes with a resolved kernel backend: Triton's with ``triton``, else the
    reference (the native backend has no crop kernel)."""
    return "triton" if kernels == "triton" else "torch"
