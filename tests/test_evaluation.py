"""Fine-tuning and linear probing: the ViT, loading encoders, the recipe's parts, the entry points."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fastmae.data
from fastmae.checkpoint import checkpoint_kind, read_checkpoint
from fastmae.data import TorchvisionLoader, transform
from fastmae.data.augment import (
    MixupCutmix, build_mixup, build_random_erasing, random_erasing, soft_target_cross_entropy, timm_available,
)
from fastmae.data.shapes import ShapesDataset
from fastmae.engine import evaluate
from fastmae.finetune import cli as finetune_cli
from fastmae.finetune import freeze_all_but_last_blocks
from fastmae.linprobe import cli as linprobe_cli
from fastmae.models import create_model, create_vit, load_encoder
from fastmae.optim import LARS, param_groups_lrd
from fastmae.pretrain import cli as pretrain_cli


def tiny_vit(**kw):
    return create_vit("vit_tiny_patch4", depth=3, num_classes=10, **kw)


def test_layer_decay_groups_follow_the_original_formula():
    model = tiny_vit(global_pool=True)
    groups = param_groups_lrd(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    num_layers = len(model.blocks) + 1  # 4

    def layer(name):
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return num_layers

    for name, p in model.named_parameters():
        assert scale_of[id(p)] == pytest.approx(0.65 ** (num_layers - layer(name))), name
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        assert decay_of[id(p)] == (0.0 if no_decay else 0.05), name
    assert scale_of[id(model.head.weight)] == 1.0 and scale_of[id(model.cls_token)] == pytest.approx(0.65**4)


def test_lars_step_equals_its_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    w.grad, b.grad = torch.tensor([[1.0, 0.0]]), torch.tensor([0.5, 0.5])
    opt = LARS([w, b], lr=0.1, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    dp = torch.tensor([[1.0, 0.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # grad + weight decay
    q = 0.001 * 5.0 / dp.norm()  # trust ratio: |w| = 5
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 4.0]]) - 0.1 * q * dp)
    torch.testing.assert_close(b.data, torch.tensor([1.0, -1.0]) - 0.1 * torch.tensor([0.5, 0.5]))  # 1-D: plain
    w.grad = torch.tensor([[1.0, 0.0]])
    w1 = w.data.clone()
    mu = q * dp  # after the first step
    opt.step()  # momentum: mu = 0.9 * mu + dp', dp' the scaled update at the new weights
    dp2 = torch.tensor([[1.0, 0.0]]) + 0.1 * w1
    q2 = 0.001 * w1.norm() / dp2.norm()
    torch.testing.assert_close(w.data, w1 - 0.1 * (0.9 * mu + q2 * dp2))


def test_original_encoder_checkpoint_loads_with_14_to_16_interpolation():
    mae = create_model("mae_vit_tiny_patch4", img_size=56)  # a 14x14 grid
    # the released encoder-only format: the encoder's keys, as the original saves them
    encoder = {k: v for k, v in mae.state_dict().items() if not (k.startswith("decoder") or k == "mask_token")}
    vit = create_vit("vit_tiny_patch4", img_size=64, num_classes=7, global_pool=True)  # a 16x16 grid
    missing = load_encoder(vit, {"model": encoder})
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert vit.pos_embed.shape == (1, 1 + 16 * 16, 192)
    torch.testing.assert_close(vit.pos_embed[:, 0], encoder["pos_embed"][:, 0])  # cls row untouched
    grid = encoder["pos_embed"][:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, 192)
    torch.testing.assert_close(vit.pos_embed[:, 1:], expected)
    torch.testing.assert_close(vit.blocks[2].mlp.fc2.weight, encoder["blocks.2.mlp.fc2.weight"])


def test_a_checkpoint_that_is_not_an_encoder_is_refused():
    with pytest.raises(ValueError, match="missing"):
        load_encoder(tiny_vit(), {"model": {"cls_token": torch.zeros(1, 1, 192)}})


def test_vit_pooling_and_drop_path():
    x = torch.randn(2, 3, 32, 32)
    for global_pool in (False, True):
        model = tiny_vit(global_pool=global_pool, drop_path_rate=0.5)
        assert model(x).shape == (2, 10)
        assert hasattr(model, "fc_norm") == global_pool and hasattr(model, "norm") != global_pool
        model.eval()
        torch.testing.assert_close(model(x), model(x))  # no drop path in eval
    assert [b.drop_path.p for b in model.blocks[1:]] == pytest.approx([0.25, 0.5])


def test_partial_fine_tuning_trains_the_last_blocks_only():
    model = tiny_vit(global_pool=True)
    freeze_all_but_last_blocks(model, 1)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.2", "fc_norm", "head"}
    freeze_all_but_last_blocks(model, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def test_batch_augmentations():
    x = torch.zeros(4000, 3, 16, 16)
    erased = (random_erasing(x, 0.25) != 0).flatten(1).any(1).float().mean()
    assert abs(erased - 0.25) < 0.03
    images, target = MixupCutmix(10, 0.8, 1.0, smoothing=0.1)(torch.randn(8, 3, 16, 16), torch.arange(8))
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    assert target.min() >= 0.01 - 1e-6
    _, plain = MixupCutmix(10, 0, 0, smoothing=0.1)(torch.randn(2, 3, 16, 16), torch.tensor([3, 4]))
    assert plain[0, 3] == pytest.approx(0.91) and plain[0, 0] == pytest.approx(0.01)
    logits = torch.randn(2, 10)
    torch.testing.assert_close(soft_target_cross_entropy(logits, plain),
                               F.cross_entropy(logits, torch.tensor([3, 4]), label_smoothing=0.1))


def test_evaluate_counts_each_image_once():
    data = ShapesDataset(21, image_size=40, transform=transform("eval", 32))
    loader = TorchvisionLoader(data, batch_size=8, device=torch.device("cpu"), shuffle=False, num_workers=0)

    class Oracle(torch.nn.Module):  # right on every image: logits from the labels the loader also yields
        def __init__(self):
            super().__init__()
            self.labels = iter([torch.tensor(data.targets[i:i + 8] + [data.targets[-1]] * 3)[:8] for i in range(0, 24, 8)])

        def forward(self, x):
            return F.one_hot(next(self.labels), 10).float()

    result = evaluate(Oracle(), loader, num_samples=len(data), device=torch.device("cpu"))
    assert result["images"] == 21 and result["acc1"] == 100.0 and result["acc5"] == 100.0


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    ShapesDataset(320, image_size=40, seed=0).write_image_folder(root / "train")
    ShapesDataset(100, image_size=40, seed=1).write_image_folder(root / "val")
    return root


def run_eval(cli, folder, out, *extra):
    common = (["--data_path", str(folder)] if folder else []) + ["--output_dir", str(out), "--num_workers", "0",
                                                                  "--print_freq", "5"]
    assert cli(common + list(extra)) == 0
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def test_entry_points_run_and_resume(labelled_folder, tmp_path):
    log = run_eval(linprobe_cli, labelled_folder, tmp_path / "lp", "--epochs", "1", "--batch_size", "64")
    assert {"train_loss", "test_acc1", "test_acc5", "max_accuracy", "epoch"} <= set(log[0])
    log = run_eval(finetune_cli, labelled_folder, tmp_path / "ft", "--epochs", "2", "--batch_size", "32",
                   "--finetune_blocks", "2", "--resume", "auto")
    assert [r["epoch"] for r in log] == [0, 1]
    best = read_checkpoint(tmp_path / "ft" / "checkpoint-1.pth")["after_epoch"]["max_accuracy"]
    assert best == max(r["test_acc1"] for r in log)  # what a resumed run starts from
    log = run_eval(finetune_cli, labelled_folder, tmp_path / "ft", "--epochs", "3", "--batch_size", "32",
                   "--finetune_blocks", "2", "--resume", "auto")
    assert [r["epoch"] for r in log] == [0, 1, 2]  # resumed after epoch 1
    assert log[2]["max_accuracy"] == max(best, log[2]["test_acc1"])
    # --eval: a checkpoint's accuracy, nothing trained
    assert finetune_cli(["--data_path", str(labelled_folder), "--output_dir", str(tmp_path / "ev"), "--eval",
                         "--resume", str(tmp_path / "ft" / "checkpoint-1.pth"), "--num_workers", "0"]) == 0
    assert finetune_cli(["--data_path", str(labelled_folder), "--output_dir", str(tmp_path / "ft"), "--eval",
                         "--resume", "auto", "--num_workers", "0"]) == 0


def test_fewer_classes_than_folders_is_refused(labelled_folder, tmp_path, caplog):
    assert finetune_cli(["--data_path", str(labelled_folder), "--output_dir", str(tmp_path), "--nb_classes", "2",
                         "--num_workers", "0"]) == 1
    assert "--nb_classes 2 is fewer than" in caplog.text


def test_eval_needs_train_and_val_folders(tmp_path, caplog):
    ShapesDataset(20, image_size=40).write_image_folder(tmp_path / "train")
    assert finetune_cli(["--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o")]) == 1
    assert "val" in caplog.text


@pytest.mark.slow
def test_pretrain_then_finetune_on_the_builtin_data(tmp_path):
    """The whole path on the built-in shapes: a brief pretraining, then fine-tuning of its encoder,
    which learns. (Linear probing and fine-tuning from a random encoder run in the entry-point tests:
    at CPU scale a probe of random features can match a brief MAE's, so they assert nothing here.)"""
    data = ["--builtin_size", "1000", "--num_workers", "1", "--print_freq", "50"]
    assert pretrain_cli(data + ["--output_dir", str(tmp_path / "pre"), "--epochs", "3", "--batch_size", "64",
                                "--vis_freq", "0"]) == 0
    encoder = str(tmp_path / "pre" / "checkpoint-2.pth")
    # small-scale settings: the fine-tuning regularizers need far more epochs than these
    mild = ["--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--drop_path", "0", "--blr", "4e-3"]
    log = run_eval(finetune_cli, None, tmp_path / "finetune", *data, "--epochs", "2", "--batch_size", "64", *mild,
                   "--finetune", encoder)
    print("top-1 on 200 held-out images (chance 10%):", log[-1]["max_accuracy"])
    assert log[-1]["max_accuracy"] > 20


def test_the_originals_launch_flags_are_accepted(labelled_folder, tmp_path):
    assert linprobe_cli(["--data_path", str(labelled_folder), "--output_dir", str(tmp_path), "--epochs", "1",
                         "--num_workers", "0", "--no_pin_mem", "--dist_eval", "--local-rank", "0",
                         "--world_size", "1", "--dist_url", "env://"]) == 0
    with pytest.raises(SystemExit):
        linprobe_cli(["--dist_url", "tcp://10.0.0.1:23456"])


@pytest.mark.parametrize("flags", [["--layer_decay", "nan"], ["--drop_path", "-0.1"], ["--smoothing", "1.5"],
                                   ["--mixup", "inf"], ["--cutmix", "-1"], ["--reprob", "nan"], ["--recount", "0"]])
def test_bad_recipe_flags_are_refused(flags):
    with pytest.raises(SystemExit) as e:
        finetune_cli(flags)
    assert e.value.code == 2


def test_synthetic_labels_fit_the_classes(tmp_path):
    assert finetune_cli(["--data_backend", "synthetic", "--nb_classes", "7", "--output_dir", str(tmp_path),
                         "--epochs", "1", "--batch_size", "8", "--builtin_size", "40"]) == 0


def test_the_readmes_commands_keep_to_their_own_folders(tmp_path, monkeypatch, caplog):
    """pretrain, then finetune and linprobe of its checkpoint, each with its default folder: none
    touches another's; a folder or a checkpoint of another kind is refused, naming the kind."""
    monkeypatch.chdir(tmp_path)
    small = ["--builtin_size", "60", "--epochs", "1", "--batch_size", "16", "--num_workers", "0"]
    assert pretrain_cli(small + ["--vis_freq", "0"]) == 0
    pretraining_log = (tmp_path / "output_dir" / "log.txt").read_text()
    assert finetune_cli(small + ["--finetune", "output_dir/checkpoint-0.pth"]) == 0
    assert linprobe_cli(small + ["--finetune", "output_dir/checkpoint-0.pth"]) == 0
    assert (tmp_path / "output_dir" / "log.txt").read_text() == pretraining_log
    for kind in ("finetune", "linprobe"):
        assert checkpoint_kind(tmp_path / f"output_dir_{kind}" / "checkpoint-0.pth") == kind
    assert checkpoint_kind(tmp_path / "output_dir" / "checkpoint-0.pth") == "pretrain"

    assert finetune_cli(small + ["--output_dir", "output_dir"]) == 1
    assert "output_dir holds pretrain checkpoints (checkpoint-last.pth); a finetune run would" in caplog.text
    assert pretrain_cli(small + ["--output_dir", "elsewhere", "--resume", "output_dir_finetune/checkpoint-0.pth"]) == 1
    assert "output_dir_finetune/checkpoint-0.pth is a finetune checkpoint" in caplog.text


# -- the original's fine-tuning recipe (timm's transform, RandomErasing and Mixup) ----------------------

requires_timm = pytest.mark.skipif(not timm_available(), reason="timm is not installed (pip install -e '.[timm]')")


@requires_timm
def test_fine_tuning_augments_as_the_original():
    """main_finetune.py's build_transform and Mixup, flag for flag: timm's create_transform (its random
    erasing applied to the batch on the device instead, with the same RandomErasing), timm's Mixup."""
    from timm.data import Mixup, create_transform
    from timm.data.random_erasing import RandomErasing

    ours = transform("train_randaug", 224)
    theirs = create_transform(input_size=224, is_training=True, color_jitter=None, auto_augment="rand-m9-mstd0.5-inc1",
                              interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1,
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert repr(ours) == repr(type(theirs)(theirs.transforms[:-1]))  # all but the erasing, the last step
    erase = build_random_erasing(0.25, "pixel", 1, torch.device("cpu"))
    assert isinstance(erase, RandomErasing) and repr(erase) == repr(theirs.transforms[-1])
    mix = build_mixup(10, 0.8, 1.0, 0.1, cutmix_minmax=None, prob=0.7, switch_prob=0.3, mode="pair")
    assert isinstance(mix, Mixup)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.mode, mix.label_smoothing,
            mix.num_classes) == (0.8, 1.0, 0.7, 0.3, "pair", 0.1, 10)


@requires_timm
def test_timms_strongest_posterize_works_with_this_pillow():
    from timm.data.auto_augment import AugmentOp

    transform("train_randaug", 32)  # installs the compatibility of timm's posterize
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # 0 bits kept: black, as the original's Pillow
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_without_timm_the_flags_only_timm_has_are_refused(monkeypatch):
    from fastmae.data import augment

    monkeypatch.setattr(augment, "timm_available", lambda: False)
    monkeypatch.setattr(fastmae.data, "timm_available", lambda: False)
    names = [type(t).__name__ for t in transform("train_randaug", 32).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ToTensor", "Normalize"]
    with pytest.raises(ValueError, match="--remode const needs timm"):
        augment.build_random_erasing(0.25, "const", 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="--mixup_mode elem needs timm"):
        augment.build_mixup(10, 0.8, 1.0, 0.1, mode="elem")
    with pytest.raises(ValueError, match="--aa rand-m7 needs timm"):
        transform("train_randaug", 32, aa="rand-m7")


@requires_timm
def test_fine_tuning_killed_and_resumed_equals_uninterrupted(labelled_folder, tmp_path):
    """With timm's augmentation (Python's and NumPy's generators: seeded per sample in the loader,
    saved in the checkpoint for Mixup and RandomErasing) a resumed fine-tuning is the uninterrupted one."""
    flags = ["--data_path", str(labelled_folder), "--batch_size", "16", "--epochs", "2", "--num_workers", "0",
             "--print_freq", "1", "--checkpoint_steps", "3", "--warmup_epochs", "0.5", "--reprob", "0.5"]

    def losses(out):
        records = [json.loads(line) for line in (out / "log_steps.txt").read_text().splitlines()]
        return {(r["epoch"], r["batch"]): r["loss"] for r in records}

    assert finetune_cli(flags + ["--output_dir", str(tmp_path / "whole")]) == 0
    part = tmp_path / "part"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "fastmae.finetune", *flags, "--output_dir", str(part)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while proc.poll() is None and not ((part / "log_steps.txt").exists()
                                       and len((part / "log_steps.txt").read_text().splitlines()) >= 26):
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -9  # killed mid-run, not finished
    assert finetune_cli(flags + ["--output_dir", str(part), "--resume", "auto"]) == 0
    assert losses(part) == losses(tmp_path / "whole")


def test_a_kernel_backend_that_cannot_run_does_not_stop_evaluation(monkeypatch):
    """The ViT uses no kernel backend: FASTMAE_KERNELS naming one that cannot run here changes nothing
    for linear probing's data (only the nvjpeg loader's crop asks for it, and then falls back)."""
    import types

    from fastmae.evaluation import build_data
    from fastmae.linprobe import get_args_parser
    from fastmae.ops import registry

    monkeypatch.setenv("FASTMAE_KERNELS", "triton")
    monkeypatch.setattr(registry._find("kernels", "triton"), "unavailable_reasons", lambda device: ["not here"])
    monkeypatch.setattr(registry, "_resolved", {})
    run = types.SimpleNamespace(device=torch.device("cpu"), dist=types.SimpleNamespace(rank=0, world_size=1))
    for backend in ("torchvision", "nvjpeg"):
        args = get_args_parser().parse_args(["--data_backend", backend, "--builtin_size", "40", "--batch_size", "8",
                                             "--num_workers", "0"])
        train, _, _ = build_data(args, run, "train")
        assert train.steps_per_epoch > 0
