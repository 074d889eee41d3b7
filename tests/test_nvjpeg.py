"""The nvJPEG loader's parts: the fused crop kernel against torchvision's tensor ops (odd sizes, up-
and downscaling, every output dtype, outputs poisoned with NaN; the Triton interpreter on a CPU),
crop boxes and flips drawn as torchvision's transforms draw them, which files the device decodes,
and whole batches equal to the torchvision loader's with the same tensor augmentation.
(The generic loader behaviour -- order, shards, resume, bad files -- is tests/test_data.py's.)"""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets, transforms

from fastmae.data import IMAGENET_MEAN, IMAGENET_STD, TorchvisionLoader, build_loader
from fastmae.data.crops import crop_params
from fastmae.data.gpu_augment import resized_crop, resized_crop_reference
from fastmae.data.nvjpeg_loader import EncodedImages, NvjpegLoader, nvjpeg_decodable
from fastmae.data.sources import list_image_folder, load_rgb
from fastmae.kernels._launch import INTERPRET
from fastmae.testing import FORWARD

CPU = torch.device("cpu")
# one uint8 step after normalization: where PyTorch's and the kernel's float sums straddle a
# rounding tie (fused multiply-adds, summation order), the rounded pixel differs by one
STEP = 1 / (255 * min(IMAGENET_STD))


def random_images(sizes, generator):
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def draw(images, scale=(0.2, 1.0)):
    params = [crop_params(img.shape[1], img.shape[2], scale) for img in images]
    return torch.tensor([p[:4] for p in params], dtype=torch.int32), torch.tensor([p[4] for p in params])


def assert_within_a_rounding_step(actual, expected):
    """Each value within one uint8 step, and at most 1 in 1,000 that far (a few in a small batch: the
    straddled ties are rare but random, and a GPU's fused multiply-adds straddle others)."""
    tol = FORWARD[expected.dtype]
    diff = (actual.double() - expected.double()).abs()
    off = diff > tol["atol"] + tol["rtol"] * expected.double().abs()
    assert int(off.sum()) <= max(4, 1e-3 * off.numel()), f"{int(off.sum())} of {off.numel()} values differ"
    assert diff.max() <= STEP * 1.01 + tol["atol"] + tol["rtol"] * expected.double().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [7, 24])
def test_kernel_matches_torchvisions_tensor_ops(triton_device, dtype, size):
    from fastmae.kernels.resized_crop import resized_crop_batch

    g = torch.Generator().manual_seed(size)
    # odd sizes; crops smaller and larger than the output (up- and downscaling); a 1-pixel-wide image
    images = random_images([(37, 53), (61, 40), (9, 13), (120, 97), (5, 1), (24, 24)], g)
    boxes, flips = draw(images)
    out = torch.full((len(images), 3, size, size), float("nan"), dtype=dtype, device=triton_device)
    resized_crop_batch([img.to(triton_device) for img in images], boxes, flips, size, IMAGENET_MEAN, IMAGENET_STD, out)
    expected = resized_crop_reference(images, boxes, flips, size, IMAGENET_MEAN, IMAGENET_STD, dtype)
    assert torch.isfinite(out).all()
    assert_within_a_rounding_step(out.cpu(), expected)


def test_whole_image_boxes_and_every_flip(triton_device):
    g = torch.Generator().manual_seed(3)
    images = random_images([(16, 16), (33, 17)], g)
    images.insert(1, images[0].clone())
    boxes = torch.tensor([[0, 0, 16, 16], [0, 0, 16, 16], [3, 2, 30, 15]], dtype=torch.int32)
    flips = torch.tensor([False, True, True])
    got = resized_crop([img.to(triton_device) for img in images], boxes, flips, 16, IMAGENET_MEAN, IMAGENET_STD).cpu()
    assert_within_a_rounding_step(got, resized_crop_reference(images, boxes, flips, 16, IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(got[1], got[0].flip(-1))  # same image, same box: the flip alone


def test_boxes_and_flips_stay_on_the_host(monkeypatch):
    """The kernel's launch table is filled on the host from the boxes and flips: sent to the images'
    device first, they would come back with a copy that waits for the device's queue."""
    import fastmae.kernels.resized_crop as kernel

    seen = {}
    monkeypatch.setattr(kernel, "resized_crop_batch", lambda images, boxes, flips, *args: seen.update(boxes=boxes, flips=flips))
    images = [torch.empty(3, 16, 16, dtype=torch.uint8, device="meta")]  # a device other than the host's
    resized_crop(images, torch.tensor([[0, 0, 16, 16]]), torch.tensor([True]), 8, IMAGENET_MEAN, IMAGENET_STD)
    assert seen["boxes"].device == seen["flips"].device == CPU


@pytest.mark.parametrize("bad,message", [
    (dict(boxes=torch.tensor([[0, 0, 17, 16]])), "not inside its 16 x 16 pixels"),
    (dict(boxes=torch.tensor([[0, 0, 0, 16]])), "not inside"),
    (dict(images=[torch.zeros(16, 16, 3, dtype=torch.uint8)]), "must be uint8 [3, H, W]"),
    (dict(images=[torch.zeros(3, 16, 16)]), "must be uint8 [3, H, W]"),
    (dict(flips=torch.tensor([True, False])), "need boxes [1, 4] and flips [1]"),
    (dict(backend="cuda"), "unknown crop backend"),
])
def test_bad_inputs_are_refused_by_name(bad, message):
    args = dict(images=[torch.zeros(3, 16, 16, dtype=torch.uint8)], boxes=torch.tensor([[0, 0, 16, 16]]),
                flips=torch.tensor([False]), backend="triton") | bad
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resized_crop(args["images"], args["boxes"], args["flips"], 8, IMAGENET_MEAN, IMAGENET_STD,
                     backend=args["backend"])


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 1.0)])
@pytest.mark.parametrize("height,width", [(300, 451), (40, 48), (500, 100)])
def test_crop_params_are_torchvisions_draws(scale, height, width):
    crop = transforms.RandomResizedCrop(32, scale=scale)
    for seed in range(100):
        torch.manual_seed(seed)
        mine = crop_params(height, width, scale)
        torch.manual_seed(seed)
        box = crop.get_params(torch.empty(3, height, width), crop.scale, crop.ratio)
        assert mine == (*box, bool(torch.rand(1) < 0.5))


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """JPEGs of every kind nvJPEG meets: baseline colour and grey (decoded on the device),
    progressive, CMYK, cut short but readable, and a PNG (decoded by the worker on the CPU)."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
    for i in range(10):
        h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        smooth = np.kron(rng.random((h // 6 + 1, w // 6 + 1, 3)), np.ones((6, 6, 1)))[:h, :w]
        Image.fromarray((smooth * 255).astype(np.uint8)).save(root / "ab"[i % 2] / f"rgb{i}.jpg", quality=90)
    arr = (rng.random((41, 57, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr[..., 0]).save(root / "a" / "gray.jpg")
    Image.fromarray(arr).save(root / "a" / "progressive.jpg", progressive=True)
    Image.fromarray(arr).convert("CMYK").save(root / "b" / "cmyk.jpg")
    Image.fromarray(arr).save(root / "b" / "plain.png")
    return root


def test_the_device_decodes_baseline_jpegs_and_the_cpu_the_rest(jpeg_folder):
    on_device = {}
    for path in sorted(jpeg_folder.rglob("*.*")):
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            on_device[path.name] = nvjpeg_decodable(data, img)
    assert on_device.pop("gray.jpg") and all(on_device.pop(f"rgb{i}.jpg") for i in range(10))
    assert on_device == {"progressive.jpg": False, "cmyk.jpg": False, "plain.png": False}
    data = (jpeg_folder / "a" / "rgb0.jpg").read_bytes()[:-200]
    with Image.open(io.BytesIO(data)) as img:
        assert not nvjpeg_decodable(data, img)  # cut short: no end-of-image marker


@pytest.mark.parametrize("crop_backend", [
    pytest.param("triton", marks=pytest.mark.skipif(not INTERPRET, reason="Triton on a CPU device: the interpreter")),
    "torch",
])
def test_batches_equal_the_torchvision_loaders_with_the_same_tensor_augmentation(jpeg_folder, crop_backend):
    """Same samples, boxes and flips (the per-sample seeds), the same pixels (both decoders are
    libjpeg's on a CPU; the PIL loader's resize would antialias: here its tensor counterpart)."""
    reference, loader = reference_and_nvjpeg_loaders(jpeg_folder, CPU, crop_backend)
    for epoch in (0, 1):
        for loader_ in (reference, loader):
            loader_.set_epoch(epoch)
        batches = list(zip(reference, loader))
        assert len(batches) == 4  # 14 images: the last batch padded
        for (want, want_labels), (got, got_labels) in batches:
            assert torch.equal(got_labels, want_labels)
            assert_within_a_rounding_step(got, want)


@pytest.mark.cuda
def test_on_the_gpu_nvjpeg_decodes_what_libjpeg_decodes(jpeg_folder):
    """The device's decode (nvJPEG's IDCT, not libjpeg's: pixels may differ by a level or two) and
    the crop kernel on it, against the same batches on the CPU."""
    reference, loader = reference_and_nvjpeg_loaders(jpeg_folder, torch.device("cuda"), "triton")
    for (want, want_labels), (got, got_labels) in zip(reference, loader):
        assert got.is_cuda and torch.equal(got_labels.cpu(), want_labels)
        levels = (got.cpu() - want).abs() * 255 * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        assert levels.mean() < 1.0 and levels.max() < 12


def reference_and_nvjpeg_loaders(jpeg_folder, device, crop_backend):
    tensor_augmentation = transforms.Compose([
        transforms.PILToTensor(),
        transforms.RandomResizedCrop(20, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC,
                                     antialias=False),
        transforms.RandomHorizontalFlip(),
        transforms.ConvertImageDtype(torch.float32),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    common = dict(batch_size=4, num_workers=0, seed=3, drop_last=False)
    reference = TorchvisionLoader(datasets.ImageFolder(str(jpeg_folder), transform=tensor_augmentation,
                                                       loader=load_rgb), device=CPU, **common)
    files, labels, _ = list_image_folder(str(jpeg_folder))
    loader = NvjpegLoader(files, labels, image_size=20, scale=(0.2, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          device=device, crop_backend=crop_backend, **common)
    return reference, loader


def test_a_sample_is_drawn_from_its_seed_alone(jpeg_folder):
    files, labels, _ = list_image_folder(str(jpeg_folder))
    dataset = EncodedImages(files, labels)
    torch.manual_seed(5)
    first = dataset[3]
    torch.manual_seed(5)
    again = dataset[3]
    assert torch.equal(first[0].box, again[0].box) and first[0].flip == again[0].flip


def test_evaluation_takes_the_torchvision_loader_and_randaugment_is_refused(jpeg_folder):
    common = dict(backend="nvjpeg", root=str(jpeg_folder), input_size=16, batch_size=2, device=CPU, num_workers=0)
    assert type(build_loader(mode="eval", **common)) is TorchvisionLoader  # linear probing's validation set
    assert type(build_loader(mode="train", **common)) is NvjpegLoader
    with pytest.raises(ValueError, match="not 'train_randaug'.*use --data_backend torchvision or dali"):
        build_loader(mode="train_randaug", **common)


def test_the_crop_kernel_follows_the_kernel_backend(jpeg_folder, monkeypatch):
    """The crop kernel comes from the entry point's kernel backend (--kernels, FASTMAE_KERNELS or
    automatic, through the registry), not from the data layer reading the environment itself."""
    from fastmae.data.nvjpeg_loader import crop_backend_for

    assert [crop_backend_for(k) for k in ("triton", "native", "torch")] == ["triton", "torch", "torch"]
    monkeypatch.setenv("FASTMAE_KERNELS", "torch")  # ignored here: the caller decides
    kwargs = dict(backend="nvjpeg", root=str(jpeg_folder), mode="pretrain", input_size=16, batch_size=4,
                  device=CPU, num_workers=0)
    assert build_loader(**kwargs, crop_backend="triton").crop_backend == "triton"
    assert build_loader(**kwargs).crop_backend == "torch"  # the default on a CPU
