"""Images/s of each pretraining loader over the same folder of JPEGs (224x224 crops, the original
augmentation), one epoch per round after a warm-up epoch. On a GPU, DALI decodes with nvJPEG; without
DALI installed there, torchvision's GPU JPEG decoder (decode only) is measured instead.

    pytest benchmarks/test_bench_data.py --benchmark-only
"""
from __future__ import annotations

import importlib.util
import os

import pytest
from PIL import Image

from bench_utils import DEVICE, ON_GPU, measure
from fastmae.data import build_pretrain_loader
from fastmae.data.shapes import CLASSES, ShapesDataset

NUM_IMAGES = 512 if ON_GPU else 128
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
WORKERS = min(8, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Shapes drawn at 320x320, saved as quality-90 JPEGs in class folders (ImageNet-like sizes)."""
    root = tmp_path_factory.mktemp("jpegs")
    ds = ShapesDataset(NUM_IMAGES, image_size=320, seed=1)
    for i, (img, y) in enumerate(zip(ds.images, ds.targets)):
        os.makedirs(root / CLASSES[y], exist_ok=True)
        Image.fromarray(img).save(root / CLASSES[y] / f"{i:05d}.jpg", quality=90)
    return root


def epoch_runner(loader):
    def run():
        for images, _ in loader:
            pass
        return images

    return run


@pytest.mark.parametrize("backend", [
    "torchvision",
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
                      preset=f"{NUM_IMAGES}x320px_jpeg", workers=WORKERS)
    benchmark.extra_info.update(images_per_sec=len(loader) * batch / seconds)


@pytest.mark.skipif(not ON_GPU or HAS_DALI, reason="measured in place of DALI on a GPU machine without it")
def test_torchvision_gpu_jpeg_decode(benchmark, jpeg_folder):
    from torchvision.io import decode_jpeg, read_file

    files = sorted(str(p) for p in jpeg_folder.rglob("*.jpg"))
    data = [read_file(f) for f in files]
    seconds = measure(benchmark, lambda: decode_jpeg(data, device="cuda"), rounds=5, op="loader",
                      provider="torchvision_gpu_decode", mode="decode only", preset=f"{NUM_IMAGES}x320px_jpeg")
    benchmark.extra_info.update(images_per_sec=len(files) / seconds)
