"""The crops every loader draws, against the original's own: torchvision's RandomResizedCrop for
pretraining, ``util/crop.RandomResizedCrop`` (one draw clamped to the image) for linear probing,
and evaluation's resize; DALI's pipeline draws from other random streams, so its crops are compared
by their distribution and checked pixel by pixel against the box it reports."""
import importlib.util
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import fastmae.data
from fastmae.data import build_loader, resolve_data_backend, transform
from fastmae.data.crops import ClampedRandomResizedCrop, crop_box, crop_params, eval_resize
from fastmae.data.sources import list_image_folder

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
requires_dali = pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
CPU = torch.device("cpu")
SIZES = [(300, 451), (40, 48), (500, 100), (375, 500)]


def original_linprobe_crop(height, width, scale, ratio):
    """``util/crop.RandomResizedCrop.get_params`` of facebookresearch/mae, as written there."""
    area = height * width
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    w = min(w, width)
    h = min(h, height)
    i = torch.randint(0, height - h + 1, size=(1,)).item()
    j = torch.randint(0, width - w + 1, size=(1,)).item()
    return i, j, h, w


@pytest.mark.parametrize("height,width", SIZES)
def test_the_clamped_crop_draws_as_the_originals_linear_probing_crop(height, width):
    for seed in range(200):
        torch.manual_seed(seed)
        mine = crop_params(height, width, (0.08, 1.0), clamp=True)
        torch.manual_seed(seed)
        assert mine == (*original_linprobe_crop(height, width, (0.08, 1.0), (3 / 4, 4 / 3)), bool(torch.rand(1) < 0.5))


def spans_a_side(boxes, height, width):
    return np.mean([h == height or w == width for _, _, h, w in boxes])


def test_the_clamped_crop_is_not_torchvisions():
    """On a 4:3 image a quarter of the clamped crops span a whole side, against under 1% of
    torchvision's: the two crops' statistics differ, so the right one matters."""
    torch.manual_seed(0)
    clamped = [crop_box(375, 500, (0.08, 1.0), clamp=True) for _ in range(4000)]
    redrawn = [crop_box(375, 500, (0.08, 1.0)) for _ in range(4000)]
    assert 0.2 < spans_a_side(clamped, 375, 500) < 0.32
    assert spans_a_side(redrawn, 375, 500) < 0.02


def test_linear_probing_transform_crops_as_the_original():
    tf = transform("probe", 32)
    assert type(tf.transforms[0]) is ClampedRandomResizedCrop and tf.transforms[0].scale == (0.08, 1.0)
    # pretraining, and fine-tuning without auto-augmentation (timm's crop draws as torchvision's)
    assert type(transform("pretrain", 32).transforms[0]) is transforms.RandomResizedCrop
    assert type(transform("train", 32).transforms[0]) is transforms.RandomResizedCrop
    img = Image.new("RGB", (451, 300))
    torch.manual_seed(3)
    box = tf.transforms[0].get_params(img, tf.transforms[0].scale, tf.transforms[0].ratio)
    torch.manual_seed(3)
    assert box == original_linprobe_crop(300, 451, (0.08, 1.0), (3 / 4, 4 / 3))


@pytest.fixture(scope="module")
def coordinate_folder(tmp_path_factory):
    """Images whose red channel is the column and green the row (mod 256): a crop's corner pixels
    say where it came from."""
    root = tmp_path_factory.mktemp("coords")
    (root / "c").mkdir()
    for i, (h, w) in enumerate([(100, 250), (250, 120), (64, 64), (120, 160)]):
        rgb = np.zeros((h, w, 3), np.uint8)
        rgb[..., 0] = np.arange(w)[None] % 256
        rgb[..., 1] = np.arange(h)[:, None] % 256
        Image.fromarray(rgb).save(root / "c" / f"{i}.png")
    return root


@pytest.mark.parametrize("mode, clamped", [("probe", True), ("train", False)])
def test_nvjpeg_linear_probing_draws_the_originals_crop(coordinate_folder, mode, clamped):
    loader = build_loader(backend="nvjpeg", root=str(coordinate_folder), mode=mode, input_size=16, batch_size=2,
                          device=CPU, num_workers=0)
    for index in range(len(loader.dataset)):
        for seed in range(20):
            torch.manual_seed(seed)
            sample, _ = loader.dataset[index]
            torch.manual_seed(seed)
            if clamped:
                box = original_linprobe_crop(sample.height, sample.width, (0.08, 1.0), (3 / 4, 4 / 3))
            else:
                box = transforms.RandomResizedCrop.get_params(torch.empty(3, sample.height, sample.width), (0.08, 1.0),
                                                              (3 / 4, 4 / 3))
            assert (*sample.box.tolist(), sample.flip) == (*box, bool(torch.rand(1) < 0.5))


@requires_dali
def test_dali_linear_probing_crop_is_the_clamped_crop(coordinate_folder):
    """Each crop DALI decodes is the box it drew (its corner pixels), and the boxes have the
    clamped crop's distribution (area and how often a side is spanned)."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from fastmae.data.dali_loader import _clamped_crop

    files, _, _ = list_image_folder(str(coordinate_folder))
    shapes = [np.asarray(Image.open(f)).shape[:2] for f in files]

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None, seed=5)
    def crops():
        encoded, _ = fn.readers.file(files=files, random_shuffle=False)
        return _clamped_crop(encoded, scale=(0.08, 1.0), decode_device="cpu")

    pipe = crops()
    pipe.build()
    boxes = {i: [] for i in range(len(files))}
    for _ in range(150):
        (out,) = pipe.run()
        for i in range(len(files)):
            crop = np.asarray(out[i])
            h, w = crop.shape[:2]
            left, top = int(crop[0, 0, 0]), int(crop[0, 0, 1])
            height, width = shapes[i]
            assert 0 < h <= height and 0 < w <= width and top + h <= height and left + w <= width
            assert (crop[-1, -1, 0], crop[-1, -1, 1]) == ((left + w - 1) % 256, (top + h - 1) % 256)
            boxes[i].append((top, left, h, w))
    torch.manual_seed(0)
    for i, (height, width) in enumerate(shapes):
        want = [crop_box(height, width, (0.08, 1.0), clamp=True) for _ in range(4000)]
        area = [h * w / (height * width) for _, _, h, w in boxes[i]]
        want_area = [h * w / (height * width) for _, _, h, w in want]
        # 150 draws: standard errors of about 0.02 (area) and 0.04 (spans)
        assert abs(np.mean(area) - np.mean(want_area)) < 0.08
        assert abs(spans_a_side(boxes[i], height, width) - spans_a_side(want, height, width)) < 0.15


@pytest.mark.parametrize("size, resize", [(224, 256), (192, 219), (448, 448), (384, 384)])
def test_evaluation_resizes_as_the_original(size, resize):
    """crop_pct 224/256 up to 224 pixels, else 1 (main_finetune.py's build_transform)."""
    assert eval_resize(size) == resize
    assert transform("eval", size).transforms[0].size == resize


@requires_dali
def test_dali_evaluation_above_224_crops_the_whole_resized_image(coordinate_folder):
    """At 448 the shorter side is resized to 448 and the center crop keeps all of it (at
    256/448 it would keep 7/8): the square image's crop spans its full width and height."""
    loader = build_loader(backend="dali", root=str(coordinate_folder), mode="eval", input_size=448, batch_size=4,
                          device=CPU, num_workers=1)
    images, _ = next(iter(loader))
    square = [i for i, f in enumerate(list_image_folder(str(coordinate_folder))[0]) if f.endswith("2.png")][0]
    mean = torch.tensor(fastmae.data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(fastmae.data.IMAGENET_STD).view(3, 1, 1)
    px = (images[square] * std + mean) * 255
    assert px[0, :, 0].mean() < 2 and px[0, :, -1].mean() > 61  # red: columns 0 ... 63
    assert px[1, 0, :].mean() < 2 and px[1, -1, :].mean() > 61  # green: rows 0 ... 63


def test_fine_tuning_picks_timms_augmentation_automatically(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(fastmae.data, "dali_unavailable_reasons", lambda: [])
    assert resolve_data_backend("auto", cuda, "pretrain") == "dali"
    assert resolve_data_backend("auto", cuda, "train") == "dali"  # fine-tuning with --aa none
    assert resolve_data_backend("auto", cuda, "probe") == "dali"
    assert resolve_data_backend("auto", cuda, "eval") == "dali"
    assert resolve_data_backend("dali", cuda, "train_randaug") == "dali"  # asked for
    monkeypatch.setattr(fastmae.data, "timm_available", lambda: True)
    assert resolve_data_backend("auto", cuda, "train_randaug") == "torchvision"
    monkeypatch.setattr(fastmae.data, "timm_available", lambda: False)
    assert resolve_data_backend("auto", cuda, "train_randaug") == "dali"
