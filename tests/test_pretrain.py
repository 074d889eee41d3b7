import importlib.util
import json
import logging
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

from fastmae.checkpoint import load_checkpoint
from fastmae.data.shapes import ShapesDataset
from fastmae.models import create_model
from fastmae.ops import BackendUnavailableError
from fastmae.optim import build_optimizer, lr_at, param_groups_weight_decay
from fastmae.pretrain import cli
from fastmae.training import choose_threads, cores_per_rank
from fastmae.visualize import main as visualize_main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ShapesDataset(48, image_size=40).write_image_folder(root / "train")
    return root


def read_log(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def run(folder, out, *extra):
    return cli(["--data_path", str(folder), "--output_dir", str(out), "--batch_size", "16",
                "--num_workers", "0", "--print_freq", "1", *extra])


def test_pretrain_writes_log_and_checkpoints_and_resumes(folder, tmp_path):
    assert run(folder, tmp_path, "--epochs", "2", "--save_freq", "1") == 0
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [0, 1]
    assert all({"train_loss", "train_lr", "train_images_per_sec"} <= set(r) for r in log)
    result = load_checkpoint(create_model("mae_vit_tiny_patch4"), tmp_path / "checkpoint-1.pth", strict=True)
    assert not result.missing_keys

    assert run(folder, tmp_path, "--epochs", "3", "--resume", str(tmp_path / "checkpoint-1.pth")) == 0
    assert [r["epoch"] for r in read_log(tmp_path)] == [0, 1, 2]
    assert torch.load(tmp_path / "checkpoint-2.pth", weights_only=False)["epoch"] == 2


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "is not a directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no images found"),
])
def test_bad_data_path_is_reported(tmp_path, caplog, make, message):
    assert cli(["--data_path", str(make(tmp_path)), "--output_dir", str(tmp_path / "o")]) == 1
    assert message in caplog.text


@pytest.mark.parametrize("args", [["--mask_ratio", "1.0"], ["--model", "nope"], ["--kernels", "nope"],
                                  ["--device", "cuda"] if not torch.cuda.is_available() else ["--epochs", "0"],
                                  ["--checkpoint_steps", "-1"], ["--checkpoint_steps", "3", "--accum_iter", "2"],
                                  ["--lr", "-1"], ["--blr", "-0.1"], ["--weight_decay", "-1"], ["--clip_grad", "0"],
                                  ["--blr", "nan"], ["--weight_decay", "inf"], ["--clip_grad", "nan"],
                                  ["--input_size", "0"], ["--num_workers", "-1"], ["--start_epoch", "-1"]])
def test_bad_flags_are_refused(args):
    with pytest.raises(SystemExit) as e:
        cli(args)
    assert e.value.code == 2


def test_lr_schedule_is_the_originals():
    kw = dict(lr=1.0, min_lr=0.1, warmup_epochs=4, epochs=20)
    assert lr_at(0, **kw) == 0 and lr_at(2, **kw) == 0.5 and lr_at(4, **kw) == 1.0
    assert lr_at(12, **kw) == pytest.approx(0.55)
    assert lr_at(20, **kw) == pytest.approx(0.1)


def test_weight_decay_groups():
    model = create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1)
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    decayed = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "cls_token" in decayed and "mask_token" in decayed
    assert not any(n.endswith(".bias") or "norm" in n for n in decayed)
    assert "pos_embed" not in {names[id(p)] for g in (decay, no_decay) for p in g["params"]}


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "fastmae.pretrain", "--help"], capture_output=True, text=True, check=True)
    assert "--norm_pix_loss" in out.stdout and "--blr" in out.stdout


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    """The no-argument job (built-in data, tiny preset), cut to two epochs: the loss falls."""
    assert cli(["--output_dir", str(tmp_path), "--epochs", "2", "--warmup_epochs", "0.5"]) == 0
    first, last = (r["train_loss"] for r in read_log(tmp_path))
    assert last < 0.8 * first


@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "apex_lamb"], "apex"),
    (["--norm", "apex"], "apex is not installed"),
])
def test_explicit_apex_without_apex_is_an_error(folder, tmp_path, caplog, flags, message):
    if importlib.util.find_spec("apex") is not None:
        pytest.skip("apex is installed here")
    assert run(folder, tmp_path, "--epochs", "1", *flags) == 1
    assert message in caplog.text


def test_apex_optimizers_are_built_with_the_recipe(monkeypatch):
    """The plumbing, with a stand-in for apex.optimizers (apex itself needs a CUDA build)."""
    made = {}

    class FakeFused(torch.optim.AdamW):
        def __init__(self, params, lr, betas, adam_w_mode=None):
            made.update(betas=betas, adam_w_mode=adam_w_mode)
            super().__init__(params, lr=lr, betas=betas)

    fake = types.ModuleType("apex.optimizers")
    fake.FusedAdam = fake.FusedLAMB = FakeFused
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))
    monkeypatch.setitem(sys.modules, "apex.optimizers", fake)
    groups = param_groups_weight_decay(create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1), 0.05)
    opt, description = build_optimizer("apex_adam", groups, 1e-3, "cuda")
    assert description == "apex FusedAdam" and made == {"betas": (0.9, 0.95), "adam_w_mode": True}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    with pytest.raises(BackendUnavailableError, match="CUDA only"):
        build_optimizer("apex_lamb", groups, 1e-3, "cpu")


@pytest.mark.slow
def test_compiled_training_writes_a_plain_checkpoint_and_keeps_its_cache(folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # so that the run's own choice is undone afterwards
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    caplog.set_level(logging.INFO, logger="fastmae")
    assert run(folder, tmp_path, "--epochs", "1", "--compile", "--kernels", "triton") == 0
    state = torch.load(tmp_path / "checkpoint-0.pth", weights_only=False)["model"]
    assert "blocks.0.norm1.weight" in state and not any(k.startswith("_orig_mod") for k in state)
    assert "step: compiled (torch.compile" in caplog.text and "the first compiled step took" in caplog.text
    assert any((tmp_path / "torch_compile_cache").iterdir())  # beside the checkpoints, for a resumed run


@pytest.mark.parametrize("flags, message", [
    (["--cuda_graphs", "--no-compile"], "needs --compile"),
    (["--cuda_graphs"], "CUDA graphs need a CUDA device"),
])
def test_cuda_graphs_that_cannot_run_are_refused(folder, tmp_path, caplog, flags, message):
    assert run(folder, tmp_path, "--epochs", "1", *flags) == 1
    assert message in caplog.text


def test_the_step_mode_is_logged(folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastmae")
    assert run(folder, tmp_path, "--epochs", "1") == 0
    assert "step: eager (op by op)" in caplog.text  # the CPU default


def test_reconstruction_png_and_visualize_cli(folder, tmp_path):
    assert run(folder, tmp_path, "--epochs", "1", "--vis_freq", "1", "--norm_pix_loss") == 0
    png = Image.open(tmp_path / "reconstruction-0.png")
    assert png.size == (4 * 128, 8 * 128)  # 8 images: original | masked | reconstruction | pasted, 32 px shown 4x
    image = folder / "train" / "circle"
    first = sorted(image.iterdir())[0]
    out = tmp_path / "vis.png"
    assert visualize_main(["--checkpoint", str(tmp_path / "checkpoint-0.pth"), "--image", str(first), str(first),
                           "--out", str(out)]) == 0
    assert Image.open(out).size == (4 * 128, 2 * 128)


@pytest.fixture
def bad_files(tmp_path):
    """An encoder-only checkpoint, an empty file, a truncated checkpoint, a truncated image, a full checkpoint."""
    model = create_model("mae_vit_tiny_patch4")
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("decoder")}},
               tmp_path / "enc.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "full.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:5000])
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "ok.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    return tmp_path


@pytest.mark.parametrize("checkpoint, image, message", [
    ("enc.pth", "ok.png", "holds an encoder only"),
    ("missing.pth", "ok.png", "checkpoint not found"),
    ("empty.pth", "ok.png", "empty.pth: an empty file, not a checkpoint"),
    ("truncated.pth", "ok.png", "truncated.pth: not a readable checkpoint"),
    ("full.pth", "missing.png", "image not found"),
    ("full.pth", "truncated.png", "truncated.png: unreadable image"),
])
def test_visualize_says_what_is_wrong_in_one_line(bad_files, capsys, checkpoint, image, message):
    assert visualize_main(["--checkpoint", str(bad_files / checkpoint), "--image", str(bad_files / image),
                           "--model", "mae_vit_tiny_patch4", "--out", str(bad_files / "out.png")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_visualize_refuses_a_mask_ratio_of_one(bad_files, capsys):
    with pytest.raises(SystemExit):
        visualize_main(["--checkpoint", str(bad_files / "full.pth"), "--image", str(bad_files / "ok.png"),
                        "--mask_ratio", "1.0"])
    assert "--mask_ratio must be in [0, 1)" in capsys.readouterr().err


def test_a_mask_ratio_that_keeps_no_patch_is_refused(folder, tmp_path, caplog):
    assert run(folder, tmp_path, "--mask_ratio", "0.999") == 1
    assert "keeps none of the 64 patches" in caplog.text and "at most 0.9844" in caplog.text


def test_a_batch_larger_than_the_data(folder, tmp_path, caplog):
    """No whole batch: an error, as the original's loader (drop_last) would run no step; padded on
    request, with a warning."""
    assert run(folder, tmp_path, "--batch_size", "64", "--epochs", "1", "--vis_freq", "0") == 1
    assert "48 images make no whole batch of 64" in caplog.text and "--pad_last_batch" in caplog.text
    assert run(folder, tmp_path, "--batch_size", "64", "--epochs", "1", "--vis_freq", "0", "--pad_last_batch") == 0
    assert "holds 48 images, fewer than one batch" in caplog.text
    assert "epoch 0 trains at lr 0" in caplog.text


@pytest.mark.parametrize("device, workers, cores, omp, expected", [
    ("cpu", None, 2, None, (1, 1)),  # the model's thread and one worker: the two cores, no more
    ("cpu", None, 16, None, (14, 2)),
    ("cpu", 0, 2, None, (2, 0)),
    ("cpu", None, 1, None, (1, 0)),
    ("cuda", None, 16, None, (14, 2)),
    ("cpu", None, 2, "2", (None, 1)),  # OMP_NUM_THREADS is the user's
])
def test_threads_do_not_outnumber_the_cores(device, workers, cores, omp, expected):
    assert choose_threads(device, workers, cores, omp) == expected


def test_the_threads_chosen_are_logged(folder, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fastmae")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cli(["--data_path", str(folder), "--output_dir", str(tmp_path), "--batch_size", "16", "--epochs", "1",
                "--num_workers", "3", "--vis_freq", "0"]) == 0
    assert "data loader workers, on" in caplog.text
    if cores_per_rank() <= 3:
        assert "outnumber the" in caplog.text


@pytest.mark.parametrize("entry", ["pretrain", "finetune", "linprobe", "profile"])
def test_flags_are_parsed_and_checked_before_torch_is_imported(entry):
    """--help and a mistyped flag answer at once (torch and its compiler take seconds to import)."""
    code = (f"import sys\nfrom fastmae.{entry} import cli, get_args_parser\nget_args_parser().format_help()\n"
            "for argv in (['--bogus'], ['--batch_size', '0']):\n"
            "    try:\n        cli(argv)\n    except SystemExit as e:\n        assert e.code == 2, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_only_fastmaes_own_errors_are_one_line(monkeypatch, tmp_path, caplog):
    """A user's error (fastmae's FastMAEError) is one line and exit status 1; any other error is a
    bug and keeps its traceback."""
    import fastmae.pretrain as pretrain
    from fastmae.errors import UsageError

    def fail(error):
        def main(args):
            raise error
        return main

    monkeypatch.setattr(pretrain, "main", fail(ValueError("an internal bug")))
    with pytest.raises(ValueError, match="an internal bug"):
        pretrain.cli(["--output_dir", str(tmp_path)])
    monkeypatch.setattr(pretrain, "main", fail(UsageError("this flag cannot be used so")))
    assert pretrain.cli(["--output_dir", str(tmp_path)]) == 1
    assert "error: this flag cannot be used so (--debug or FASTMAE_DEBUG=1: the traceback)" in caplog.text
    assert "Traceback" not in caplog.text
