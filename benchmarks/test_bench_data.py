"""Images/s of each pretraining loader over the same folder of JPEGs (ImageNet-like: 400-500 px,
varied sizes; 224x224 crops, the original augmentation), one epoch per round after a warm-up epoch,
and per CPU core (the loader's workers). On a GPU, DALI and the nvjpeg loader decode with nvJPEG;
the nvjpeg loader's device part (one batched decode + the fused crop kernel) is also measured
alone. Without a GPU, the nvjpeg loader decodes on the CPU and crops with the PyTorch reference.

    pytest benchmarks/test_bench_data.py --benchmark-only
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from bench_utils import DEVICE, ON_GPU, measure
from fastmae.data import build_pretrain_loader
from fastmae.data.shapes import CLASSES, ShapesDataset

NUM_IMAGES = 2048 if ON_GPU else 128
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
WORKERS = min(8, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """ImageNet-like JPEGs: shapes drawn at 64 px, resized to 400-500 px on each side (varied aspect
    ratios), with pixel noise for an ImageNet-like entropy (~70 KB per file at quality 90), in class
    folders. (Drawing at 512 px directly would take minutes for 2,048 images.)"""
    root = tmp_path_factory.mktemp("jpegs")
    ds = ShapesDataset(NUM_IMAGES, image_size=64, seed=1)
    rng = np.random.default_rng(0)
    for i, (img, y) in enumerate(zip(ds.images, ds.targets)):
        os.makedirs(root / CLASSES[y], exist_ok=True)
        width, height = rng.integers(400, 501, size=2).tolist()
        pixels = np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC), dtype=np.float32)
        noisy = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / CLASSES[y] / f"{i:05d}.jpg", quality=90)
    return root


def epoch_runner(loader):
    def run():
        for images, _ in loader:
            pass
        return images

    return run


@pytest.mark.parametrize("backend", [
    "torchvision",
    "nvjpeg",
    pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")),
    "synthetic",
])
def test_loader_throughput(benchmark, backend, jpeg_folder):
    batch = 64 if ON_GPU else 32
    loader = build_pretrain_loader(backend=backend, data_path=str(jpeg_folder), input_size=224, batch_size=batch,
                                   device=DEVICE, num_workers=WORKERS, synthetic_batches=NUM_IMAGES // batch)
    run = epoch_runner(loader)
    run()  # warm-up: workers, pipeline build
    seconds = measure(benchmark, run, rounds=3 if ON_GPU else 2, op="loader", provider=backend, mode="epoch",
                      preset=f"{NUM_IMAGES}x400-500px_jpeg", workers=WORKERS)
    images_per_sec = loader.steps_per_epoch * batch / seconds
    benchmark.extra_info.update(images_per_sec=images_per_sec,
                                images_per_sec_per_core=None if backend == "synthetic" else images_per_sec / WORKERS)


@pytest.mark.skipif(not ON_GPU, reason="the device part of the nvjpeg loader: on a GPU")
def test_nvjpeg_device_decode_and_crop(benchmark, jpeg_folder):
    """One batch through what the nvjpeg loader does on the device: decode_jpeg on the batch, the
    crop boxes as its workers draw them, the fused crop kernel."""
    import torch
    from torchvision.io import decode_jpeg, read_file

    from fastmae.data import IMAGENET_MEAN, IMAGENET_STD
    from fastmae.data.crops import crop_params
    from fastmae.data.gpu_augment import resized_crop

    files = sorted(str(p) for p in jpeg_folder.rglob("*.jpg"))[:256]
    data = [read_file(f) for f in files]
    decoded = decode_jpeg(data, device="cuda")
    params = [crop_params(img.shape[1], img.shape[2]) for img in decoded]
    boxes = torch.tensor([p[:4] for p in params], dtype=torch.int32)  # on the host, as the loader gives them
    flips = torch.tensor([p[4] for p in params], dtype=torch.int32)

    def run():
        images = decode_jpeg(data, device="cuda")
        return resized_crop(images, boxes, flips, 224, IMAGENET_MEAN, IMAGENET_STD)

    seconds = measure(benchmark, run, rounds=5, op="loader", provider="nvjpeg_device", mode="decode+crop",
                      preset=f"{len(files)}x400-500px_jpeg")
    benchmark.extra_info.update(images_per_sec=len(files) / seconds)


@pytest.mark.skipif(not ON_GPU, reason="decode only, on a GPU")
def test_torchvision_gpu_jpeg_decode(benchmark, jpeg_folder):
    from torchvision.io import decode_jpeg, read_file

    files = sorted(str(p) for p in jpeg_folder.rglob("*.jpg"))
    data = [read_file(f) for f in files]
    seconds = measure(benchmark, lambda: decode_jpeg(data, device="cuda"), rounds=5, op="loader",
                      provider="torchvision_gpu_decode", mode="decode only", preset=f"{NUM_IMAGES}x400-500px_jpeg")
    benchmark.extra_info.update(images_per_sec=len(files) / seconds)
