"""The data loaders (DALI in its CPU mode, torchvision, synthetic) and what they do with bad data."""
import importlib.util
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fastmae.data import (
    IMAGENET_MEAN, IMAGENET_STD, UnreadableImageError, build_pretrain_loader, pretrain_transform,
)
from fastmae.data.check import main as check_main
from fastmae.data.order import batches_per_epoch, epoch_order
from fastmae.data.sources import list_image_folder, load_rgb
from fastmae.pretrain import cli

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
LOADERS = ["torchvision", "nvjpeg", pytest.param("dali", marks=pytest.mark.skipif(not HAS_DALI, reason="DALI not installed"))]
CPU = torch.device("cpu")
LEVEL = 8  # colour step between files: survives resizing a flat image


def file_colour(i: int) -> tuple[int, int, int]:
    return (i % 32) * LEVEL, (i // 32) * LEVEL, 128


def decode_file_index(images: torch.Tensor) -> list[int]:
    """The file index of each image of flat colour ``file_colour(i)``, from the normalized output."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3), torch.tensor(IMAGENET_STD).view(1, 3)
    rgb = (images.float().mean(dim=(2, 3)).cpu() * std + mean) * 255
    r, g = (rgb[:, 0] / LEVEL).round().long(), (rgb[:, 1] / LEVEL).round().long()
    return (g * 32 + r).tolist()


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory):
    """43 flat-colour PNGs (a prime: no batch size divides it) in 3 class folders; file i is
    ``class_{i % 3}/{i:03d}.png``."""
    root = tmp_path_factory.mktemp("flat")
    for i in range(43):
        folder = root / f"class_{i % 3}"
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (48, 40), file_colour(i)).save(folder / f"{i:03d}.png")
    return root


def loader(backend, root, **kw):
    kw = {"input_size": 16, "batch_size": 4, "device": CPU, "num_workers": 0, **kw}
    return build_pretrain_loader(backend=backend, data_path=str(root), **kw)


def read_epoch(loader_, epoch=0):
    loader_.set_epoch(epoch)
    images, labels = zip(*list(loader_))
    return torch.cat(images), torch.cat(labels)


# -- sampling ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,world,batch", [(43, 1, 4), (43, 2, 4), (43, 3, 5), (10, 3, 3), (1433, 1, 64)])
def test_epoch_order_without_the_last_batch_is_the_originals(n, world, batch):
    """DistributedSampler's share per rank (padded by wrapping to a multiple of the ranks), then
    DataLoader(drop_last=True): 1,433 images at batch 64 make 22 steps, as the original's."""
    for epoch in range(2):
        shards = [epoch_order(n, epoch=epoch, seed=7, rank=r, world_size=world, batch_size=batch, drop_last=True)
                  for r in range(world)]
        steps = -(-n // world) // batch
        assert [len(s) for s in shards] == [steps * batch] * world
        assert batches_per_epoch(n, world_size=world, batch_size=batch, drop_last=True) == steps
        padded = epoch_order(n, epoch=epoch, seed=7, rank=0, world_size=world, batch_size=batch)
        assert np.array_equal(shards[0], padded[: len(shards[0])])  # the same order, cut short
    assert batches_per_epoch(1433, world_size=1, batch_size=64, drop_last=True) == 22


@pytest.mark.parametrize("n,world,batch", [(43, 1, 4), (43, 2, 4), (43, 3, 5), (10, 3, 4)])
def test_epoch_order_covers_every_sample_once_across_ranks(n, world, batch):
    for epoch in range(3):
        shards = [epoch_order(n, epoch=epoch, seed=7, rank=r, world_size=world, batch_size=batch) for r in range(world)]
        assert {len(s) for s in shards} == {batches_per_epoch(n, world_size=world, batch_size=batch) * batch}
        assert set(np.concatenate(shards)) == set(range(n))
        assert sum(len(s) for s in shards) - n < world + world * (batch - 1)  # the rest is padding
    a = epoch_order(n, epoch=0, seed=7, world_size=1)
    assert not np.array_equal(a, epoch_order(n, epoch=1, seed=7, world_size=1))
    assert np.array_equal(a, epoch_order(n, epoch=0, seed=7, world_size=1))


# -- both file loaders ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", LOADERS)
@pytest.mark.parametrize("pad", [False, True], ids=["drop-last", "pad-last"])
def test_batches_labels_and_values(backend, flat_folder, pad):
    images, labels = read_epoch(loader(backend, flat_folder, pad_last_batch=pad))
    # 43 files in batches of 4: the original drops the incomplete last batch; padding repeats a file
    assert images.shape == (44 if pad else 40, 3, 16, 16)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert images.min() >= lo.min() - 0.05 and images.max() <= hi.max() + 0.05
    files = decode_file_index(images)
    assert set(files) == set(range(43)) if pad else len(set(files)) == 40
    assert labels.tolist() == [i % 3 for i in files]  # sorted class folders -> labels


@pytest.mark.parametrize("backend", LOADERS)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("pad", [False, True], ids=["drop-last", "pad-last"])
def test_shards_are_disjoint_and_complete_every_epoch(backend, flat_folder, world, pad):
    for epoch in range(2):
        seen = []
        for rank in range(world):
            shard = loader(backend, flat_folder, rank=rank, world_size=world, seed=3, pad_last_batch=pad)
            images, _ = read_epoch(shard, epoch)
            assert len(images) == len(shard) * 4
            seen.append(decode_file_index(images))
        assert len({len(s) for s in seen}) == 1  # every rank takes the same number of steps
        if pad:
            assert set().union(*seen) == set(range(43))
        # in the order epoch_order gives over the sorted file list, for every loader
        files, _, _ = list_image_folder(str(flat_folder))
        number = [int(os.path.basename(f)[:3]) for f in files]
        assert seen == [[number[j] for j in epoch_order(43, epoch=epoch, seed=3, rank=r, world_size=world, batch_size=4,
                                                        drop_last=not pad)]
                        for r in range(world)]


@pytest.mark.parametrize("backend", LOADERS)
def test_deterministic_with_a_seed(backend, flat_folder):
    a = read_epoch(loader(backend, flat_folder, seed=5, input_size=24))
    b = read_epoch(loader(backend, flat_folder, seed=5, input_size=24))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = read_epoch(loader(backend, flat_folder, seed=6, input_size=24))
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("backend", LOADERS)
def test_resume_from_a_batch(backend, flat_folder):
    full = loader(backend, flat_folder, seed=2)
    images, _ = read_epoch(full, 1)
    part = loader(backend, flat_folder, seed=2)
    part.set_epoch(1, start_batch=3)
    assert len(part) == len(full) - 3
    rest = torch.cat([b[0] for b in part])
    assert decode_file_index(rest) == decode_file_index(images[12:])


# -- augmentation statistics against torchvision's RandomResizedCrop --------------------------------

@pytest.fixture(scope="module")
def coordinate_image(tmp_path_factory):
    """One 256x256 image whose red channel is the column and green the row: a crop's pixel values
    say where it came from and whether it was flipped."""
    root = tmp_path_factory.mktemp("coords")
    (root / "c").mkdir()
    x = np.arange(256, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (256, 1)), np.tile(x[:, None], (1, 256)), np.full((256, 256), 128, np.uint8)], -1)
    for i in range(64):
        Image.fromarray(rgb).save(root / "c" / f"{i:02d}.png")
    return root


def crop_statistics(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    px = (images * std + mean) * 255
    r, g = px[:, 0], px[:, 1]
    width = (r[:, :, -1] - r[:, :, 0]).mean(1).abs() / 255
    height = (g[:, -1, :] - g[:, 0, :]).mean(1) / 255
    flipped = (r[:, :, -1] < r[:, :, 0]).float().mean(1) > 0.5
    return (width * height).numpy(), flipped.numpy()


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_dali_crops_and_flips_like_torchvision(coordinate_image):
    stats = {}
    for backend in ("dali", "torchvision"):
        areas, flips = [], []
        for epoch in range(6):
            images, _ = read_epoch(loader(backend, coordinate_image, input_size=32, batch_size=16, seed=epoch))
            a, f = crop_statistics(images)
            areas.append(a)
            flips.append(f)
        stats[backend] = np.concatenate(areas), np.concatenate(flips)
    (dali_area, dali_flip), (tv_area, tv_flip) = stats["dali"], stats["torchvision"]
    # area scale ~ U(0.2, 1): mean 0.6, sd 0.23; 384 samples each: a standard error of 0.012
    assert abs(dali_area.mean() - tv_area.mean()) < 0.06
    assert 0.15 < dali_area.min() and dali_area.max() < 1.05
    assert abs(dali_area.std() - tv_area.std()) < 0.06
    assert abs(dali_flip.mean() - 0.5) < 0.1 and abs(tv_flip.mean() - 0.5) < 0.1


# -- bad data ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Readable images of every awkward kind, plus a truncated JPEG and a text file named .jpg."""
    root = tmp_path_factory.mktemp("mixed")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    arr = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(a / "rgb.jpg")
    Image.fromarray(arr[..., 0]).save(a / "gray.jpg")
    Image.fromarray(arr).convert("CMYK").save(a / "cmyk.jpg")
    Image.fromarray(arr).save(b / "plain.png")
    Image.fromarray(arr).convert("RGBA").save(b / "alpha.png")
    Image.fromarray(arr).convert("P").save(b / "palette.png")
    return root


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory, mixed_folder):
    root = tmp_path_factory.mktemp("broken")
    os.system(f"cp -r {mixed_folder}/a {mixed_folder}/b {root}/")
    data = (mixed_folder / "a" / "rgb.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "b" / "text.jpg").write_text("not an image")
    return root


@pytest.mark.parametrize("backend", LOADERS)
def test_every_readable_kind_becomes_rgb(backend, mixed_folder):
    images, labels = read_epoch(loader(backend, mixed_folder, batch_size=2))
    assert images.shape == (6, 3, 16, 16) and torch.isfinite(images).all()
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("backend", LOADERS)
def test_unreadable_file_stops_with_its_path(backend, broken_folder):
    with pytest.raises(UnreadableImageError, match=r"broken\d*/b/(text|truncated)\.jpg"):
        read_epoch(loader(backend, broken_folder, batch_size=2))


def test_an_unreadable_file_in_a_worker_is_one_line(broken_folder, tmp_path, caplog):
    """A DataLoader worker's error arrives wrapped in the worker's traceback: the run's error is one
    line naming the file; --debug adds the traceback."""
    flags = ["--data_path", str(broken_folder), "--output_dir", str(tmp_path), "--batch_size", "2", "--num_workers", "1",
             "--data_backend", "torchvision", "--epochs", "1"]
    assert cli(flags) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and ".jpg: unreadable image" in errors[0]
    assert "Traceback" not in errors[0] and "--debug or FASTMAE_DEBUG=1: the traceback" in errors[0]
    caplog.clear()
    assert cli(flags + ["--debug"]) == 1
    assert "Traceback" in caplog.text


@pytest.mark.parametrize("backend", LOADERS)
def test_unreadable_files_are_skipped_and_counted_when_asked(backend, broken_folder, caplog):
    lo = loader(backend, broken_folder, batch_size=2, skip_unreadable=True)
    images, _ = read_epoch(lo)
    assert images.shape == (8, 3, 16, 16) and torch.isfinite(images).all()
    # each file once per epoch; text.jpg's replacement passes over truncated.jpg, next to it: 2 + 1
    assert lo.files_skipped == 3
    assert "text.jpg" in caplog.text and "truncated.jpg" in caplog.text
    lo.set_epoch(1)
    read_epoch(lo)
    assert lo.files_skipped == 3  # counted per epoch


@pytest.mark.parametrize("backend", LOADERS)
def test_missing_or_empty_folder(backend, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        loader(backend, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        loader(backend, tmp_path / "empty")


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory):
    """A flat 16-bit grayscale PNG (40000 of 65535: 156 of 255), a float TIFF and a 32-bit integer TIFF."""
    root = tmp_path_factory.mktemp("deep")
    (root / "a").mkdir()
    Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)).save(root / "a" / "sixteen.png")
    Image.fromarray(np.random.rand(40, 48).astype(np.float32)).save(root / "a" / "float.tiff")
    Image.fromarray(np.full((40, 48), 1 << 20, dtype=np.int32)).save(root / "a" / "int32.tiff")
    return root


@pytest.mark.parametrize("backend", LOADERS)
def test_sixteen_bit_images_are_scaled_not_clipped(backend, deep_folder, tmp_path):
    root = tmp_path / "only16"
    (root / "a").mkdir(parents=True)
    (root / "a" / "sixteen.png").write_bytes((deep_folder / "a" / "sixteen.png").read_bytes())
    images, _ = read_epoch(loader(backend, root, batch_size=1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3), torch.tensor(IMAGENET_STD).view(1, 3)
    rgb = (images.float().mean(dim=(2, 3)) * std + mean) * 255
    torch.testing.assert_close(rgb, torch.full_like(rgb, 156.0), atol=1.0, rtol=0)  # round(40000 / 257)


def test_images_without_a_pixel_range_are_refused_by_name(deep_folder, capsys):
    for name, message in (("float.tiff", "floating-point"), ("int32.tiff", "32-bit integer")):
        with pytest.raises(UnreadableImageError, match=message):
            load_rgb(str(deep_folder / "a" / name))
    assert check_main([str(deep_folder), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "PNG I;16  (16-bit, scaled to 8 bits when loaded)" in out
    assert "float.tiff" in out and "int32.tiff" in out and "2 unreadable files" in out


def test_check_lists_unreadable_files(broken_folder, mixed_folder, capsys):
    assert check_main([str(broken_folder), "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "6 readable images" in out and "2 unreadable files" in out
    assert "text.jpg" in out and "truncated.jpg" in out and "CMYK" in out
    assert check_main([str(mixed_folder), "--workers", "2"]) == 0


# -- tar shards (DALI) ---------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def write_flat_shards(root) -> None:
    """21 flat-colour images (file_colour(k), label k % 5) in 3 tar shards."""
    k = 0
    for s in range(3):
        with tarfile.open(root / f"shard-{s}.tar", "w") as tf:
            for _ in range(7):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), file_colour(k)).save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(k % 5).encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                k += 1


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_dali_reads_tar_shards(tmp_path):
    write_flat_shards(tmp_path)
    seen = []
    for rank in range(2):
        images, labels = read_epoch(loader("dali", tmp_path, rank=rank, world_size=2, pad_last_batch=True))
        files = decode_file_index(images)
        assert labels.tolist() == [f % 5 for f in files]
        seen += files
    assert set(seen) == set(range(21))
    with pytest.raises(ValueError, match="tar shards"):
        loader("torchvision", tmp_path)


def write_textured(root, source: str) -> None:
    """12 noise images (crops and flips show) as an image folder or as 2 tar shards."""
    rng = np.random.default_rng(0)
    encoded = []
    for k in range(12):
        buf = io.BytesIO()
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
        encoded.append(buf.getvalue())
    if source == "list":
        for k, data in enumerate(encoded):
            (root / f"c{k % 2}").mkdir(exist_ok=True)
            (root / f"c{k % 2}" / f"{k:03d}.png").write_bytes(data)
        return
    for s in range(2):
        with tarfile.open(root / f"shard-{s}.tar", "w") as tf:
            for k in range(s * 6, s * 6 + 6):
                for ext, data in (("png", encoded[k]), ("cls", str(k % 2).encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
@pytest.mark.parametrize("source", ["list", "tar"])
def test_dali_resumed_mid_epoch_draws_the_uninterrupted_crops(tmp_path, source):
    import pickle

    write_textured(tmp_path, source)
    full = loader("dali", tmp_path, seed=2, batch_size=2)
    full.set_epoch(1)
    batches = [images for images, _ in full]
    assert full.state_dict() is None  # between epochs: nothing to keep
    part = loader("dali", tmp_path, seed=2, batch_size=2)
    part.set_epoch(1)
    reading = iter(part)
    assert all(torch.equal(next(reading)[0], batches[i]) for i in range(2))
    state = pickle.loads(pickle.dumps(part.state_dict()))  # as a checkpoint keeps it
    reading.close()
    resumed = loader("dali", tmp_path, seed=2, batch_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1, start_batch=2)
    rest = [images for images, _ in resumed]
    assert len(rest) == len(batches) - 2
    assert all(torch.equal(a, b) for a, b in zip(rest, batches[2:]))
    # without the state: an image list's pipeline starts at the batch with other random crops; tar
    # shards' reads past the batches done (the same crops, at the cost of decoding them again)
    plain = loader("dali", tmp_path, seed=2, batch_size=2)
    plain.set_epoch(1, start_batch=2)
    assert torch.equal(next(iter(plain))[0], batches[2]) == (source == "tar")


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
@pytest.mark.parametrize("world", [1, 2, 4])
def test_dali_evaluates_tar_shards_counting_each_image_once(tmp_path, world):
    from fastmae.data import build_loader
    from fastmae.distributed import DistInfo
    from fastmae.engine import evaluate

    class Oracle(torch.nn.Module):  # right on every image: the label from the image's colour
        def forward(self, imgs):
            return torch.nn.functional.one_hot(torch.tensor(decode_file_index(imgs)) % 5, 5).float()

    write_flat_shards(tmp_path)
    images = 0
    for rank in range(world):
        val = build_loader(backend="dali", root=str(tmp_path), mode="eval", input_size=16, batch_size=4, device=CPU,
                           rank=rank, world_size=world, num_workers=1)
        assert val.num_samples == 21
        # one process per rank here: the sum over the ranks is this loop's
        result = evaluate(Oracle(), val, num_samples=val.num_samples, device=CPU, dist=DistInfo(rank, world))
        assert result["acc1"] == 100.0
        images += result["images"]
    assert images == 21  # the padding left out, every image once


# -- synthetic and selection ---------------------------------------------------------------------

def test_synthetic_batches():
    lo = build_pretrain_loader(backend="synthetic", data_path=None, input_size=32, batch_size=3, device=CPU,
                               synthetic_batches=5)
    batches = list(lo)
    assert len(lo) == len(batches) == 5 and batches[0][0].shape == (3, 3, 32, 32)


def test_explicit_dali_without_dali_is_an_error(monkeypatch):
    from fastmae.data import dali_loader
    from fastmae.ops import BackendUnavailableError

    monkeypatch.setattr(dali_loader, "DALI_IMPORT_ERROR", "ModuleNotFoundError: nvidia.dali")
    with pytest.raises(BackendUnavailableError, match="DALI is not installed"):
        build_pretrain_loader(backend="dali", data_path=None, input_size=32, batch_size=3, device=CPU)


def test_torchvision_transform_is_the_originals():
    names = [type(t).__name__ for t in pretrain_transform(224).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    crop = pretrain_transform(224).transforms[0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation.value == "bicubic"


@pytest.mark.skipif(not HAS_DALI, reason="DALI not installed")
def test_pretrain_runs_on_dali_cpu_mode(flat_folder, tmp_path):
    assert cli(["--data_path", str(flat_folder), "--data_backend", "dali", "--output_dir", str(tmp_path),
                "--batch_size", "8", "--epochs", "1", "--num_workers", "1"]) == 0
    assert (tmp_path / "checkpoint-0.pth").exists()


@pytest.mark.parametrize("backend", [b for b in LOADERS if b != "nvjpeg"])
def test_evaluation_and_finetuning_modes(backend, flat_folder):
    """eval: every file once, in file order, center-cropped; the fine-tuning augmentation (with
    RandAugment) yields batches of the same form."""
    from fastmae.data import build_loader

    common = dict(backend=backend, root=str(flat_folder), input_size=16, batch_size=4, device=CPU, num_workers=0)
    images, labels = read_epoch(build_loader(mode="eval", **common))
    files, file_labels, _ = list_image_folder(str(flat_folder))
    number = [int(os.path.basename(f)[:3]) for f in files]
    assert decode_file_index(images)[:43] == number and labels[:43].tolist() == file_labels.tolist()
    images, labels = read_epoch(build_loader(mode="train_randaug", **common))
    assert images.shape == (40, 3, 16, 16) and torch.isfinite(images).all()  # the last, incomplete batch left out


@pytest.mark.parametrize("backend", [*LOADERS, "synthetic"])
def test_every_loader_is_an_epoch_loader(backend, flat_folder):
    from fastmae.data.protocol import EpochLoader

    loader_ = loader(backend, flat_folder, batch_size=4)
    assert isinstance(loader_, EpochLoader)
    steps = loader_.steps_per_epoch
    loader_.set_epoch(0, start_batch=2)
    assert loader_.steps_per_epoch == steps and len(loader_) == steps - 2 == len(list(loader_))
