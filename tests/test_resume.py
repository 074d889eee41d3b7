"""A run killed at any point (SIGKILL, mid-epoch, mid-save) and resumed continues as if it had never
stopped; a non-finite loss stops the run and leaves the last good checkpoint."""
import importlib.util
import json
import logging
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastmae.checkpoint import (
    UnreadableCheckpointError, checkpoints_newest_first, main as checkpoint_tool, read_checkpoint, save_checkpoint,
)
from fastmae.distributed import DistInfo
from fastmae.data.shapes import ShapesDataset
from fastmae.models import MaskedAutoencoderViT
from fastmae.pretrain import cli
from fastmae.training import load_training_state


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ShapesDataset(48, image_size=40).write_image_folder(root)
    return root


def args(folder, out, *extra):
    return ["--data_path", str(folder), "--output_dir", str(out), "--batch_size", "8", "--epochs", "2",
            "--num_workers", "0", "--print_freq", "1", "--warmup_epochs", "0.5", "--vis_freq", "0", *extra]


def step_losses(out) -> dict:
    """(epoch, batch) -> loss; a step redone after a resume keeps its last value."""
    records = [json.loads(line) for line in (out / "log_steps.txt").read_text().splitlines()]
    return {(r["epoch"], r["batch"]): r["loss"] for r in records}


def start(argv):
    return subprocess.Popen([sys.executable, "-m", "fastmae.pretrain", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_after(proc, out, records: int, extra_delay: float = 0.0) -> bool:
    """SIGKILL ``proc`` once ``records`` step records are logged (plus ``extra_delay`` s); False if it
    finished first."""
    log = out / "log_steps.txt"
    while proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= records:
            time.sleep(extra_delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


def epoch_records(out) -> dict:
    """epoch -> (train_loss, train_lr) in log.txt; an epoch logged again after a resume keeps its last."""
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return {r["epoch"]: (r["train_loss"], r["train_lr"]) for r in records}


@pytest.fixture(scope="module")
def uninterrupted_dir(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert cli(args(folder, out)) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_dir):
    return step_losses(uninterrupted_dir)


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(folder, tmp_path, uninterrupted, uninterrupted_dir):
    assert kill_after(start(args(folder, tmp_path, "--checkpoint_steps", "2")), tmp_path, records=9)
    assert (tmp_path / "checkpoint-last.pth").exists()
    assert cli(args(folder, tmp_path, "--checkpoint_steps", "2", "--resume", "auto")) == 0
    assert step_losses(tmp_path) == uninterrupted  # bit-identical losses, every step
    # and the resumed epoch's means cover the batches before the kill too
    assert epoch_records(tmp_path) == epoch_records(uninterrupted_dir)


def test_killed_repeatedly_even_while_saving(folder, tmp_path, uninterrupted):
    """A checkpoint every step, so that the kills often land inside a save."""
    extra = ["--checkpoint_steps", "1"]
    for records, delay in ((2, 0.0), (5, 0.01), (8, 0.03)):
        proc = start(args(folder, tmp_path, *extra, "--resume", "auto"))
        if not kill_after(proc, tmp_path, records, delay):
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        read_checkpoint(tmp_path / "checkpoint-last.pth")  # never torn
    assert cli(args(folder, tmp_path, *extra, "--resume", "auto")) == 0
    assert step_losses(tmp_path) == uninterrupted


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="DALI not installed")
def test_dali_killed_mid_epoch_and_resumed_equals_uninterrupted(folder, tmp_path):
    """DALI's random crops come from its pipeline's streams: the checkpoint keeps each rank's
    pipeline state, and the resumed run draws the uninterrupted run's crops (losses bit for bit)."""
    dali = ["--data_backend", "dali", "--checkpoint_steps", "2"]
    assert cli(args(folder, tmp_path / "whole", *dali)) == 0
    assert kill_after(start(args(folder, tmp_path / "part", *dali)), tmp_path / "part", records=9)
    assert cli(args(folder, tmp_path / "part", *dali, "--resume", "auto")) == 0
    assert step_losses(tmp_path / "part") == step_losses(tmp_path / "whole")


def test_sharded_checkpoints_in_one_process_resume_exactly_and_consolidate(folder, tmp_path, uninterrupted):
    sharded = ["--checkpoint_format", "sharded", "--checkpoint_steps", "2"]
    assert kill_after(start(args(folder, tmp_path, *sharded)), tmp_path, records=9)
    (tmp_path / "checkpoint-1-5.dcp").mkdir()  # as a kill mid-save leaves one: no .metadata
    assert re.fullmatch(r"checkpoint-1-\d\.dcp", os.path.basename(checkpoints_newest_first(tmp_path)[0]))
    assert str(tmp_path / "checkpoint-1-5.dcp") not in checkpoints_newest_first(tmp_path)
    assert cli(args(folder, tmp_path, *sharded, "--resume", "auto")) == 0
    assert step_losses(tmp_path) == uninterrupted
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0.dcp", "checkpoint-1.dcp",
                                                                      "checkpoint-1.pth"]
    # the consolidated copy is dated as its original: a resume reads the shards, not the whole file
    assert checkpoints_newest_first(tmp_path)[0].endswith("checkpoint-1.dcp")

    assert checkpoint_tool(["consolidate", str(tmp_path / "checkpoint-1.dcp"), str(tmp_path / "again.pth")]) == 0
    again, at_the_end = read_checkpoint(tmp_path / "again.pth"), read_checkpoint(tmp_path / "checkpoint-1.pth")
    assert_same_tensors(again["model"], at_the_end["model"])
    assert again["data_position"] == at_the_end["data_position"]
    # a sharded checkpoint also loads directly where a single file does
    assert_same_tensors(read_checkpoint(tmp_path / "checkpoint-1.dcp")["model"], at_the_end["model"])
    with pytest.raises(SystemExit):
        checkpoint_tool(["consolidate", str(tmp_path / "checkpoint-1.pth"), str(tmp_path / "x.pth")])


def test_a_sharded_checkpoint_is_never_written_over(tmp_path):
    """A resumed run that saves at the position it resumed from writes a new folder (a kill mid-write
    would otherwise leave a torn folder that still looks complete); the older one goes once the new
    one is complete."""
    from fastmae.checkpoint import ShardedCheckpointer

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saver = ShardedCheckpointer(str(tmp_path), asynchronous=False, is_main=True, kept=lambda epoch: True)
    saver.save(model, optimizer, {"epoch": 0}, "checkpoint-1-2.dcp")
    saver.save(model, optimizer, {"epoch": 1}, "checkpoint-1-2.dcp")
    assert saver.last == str(tmp_path / "checkpoint-1-2.1.dcp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1-2.1.dcp"]
    assert read_checkpoint(saver.last)["epoch"] == 1


def test_a_sharded_checkpoint_is_on_disk_before_the_older_ones_go(tmp_path, monkeypatch):
    """Its folder (where its metadata was renamed into place) and the output folder are fsynced
    before the pruning."""
    import shutil

    import fastmae.checkpoint
    from fastmae.checkpoint import ShardedCheckpointer

    events = []
    real_fsync, real_rmtree = fastmae.checkpoint._fsync, shutil.rmtree
    monkeypatch.setattr(fastmae.checkpoint, "_fsync", lambda path: events.append(("fsync", os.path.relpath(path, tmp_path)))
                        or real_fsync(path))
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: events.append(("remove", os.path.relpath(path, tmp_path)))
                        or real_rmtree(path, **kw))
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    saver = ShardedCheckpointer(str(tmp_path), asynchronous=False, is_main=True, kept=lambda epoch: False)
    saver.save(model, optimizer, {"epoch": 0}, "checkpoint-0-2.dcp")
    events.clear()
    saver.save(model, optimizer, {"epoch": 0}, "checkpoint-0-4.dcp")
    assert events == [("fsync", "checkpoint-0-4.dcp"), ("fsync", "."),
                      ("remove", "checkpoint-0-2.dcp")]


def test_a_checkpoint_folder_of_another_tool_says_so(tmp_path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": torch.nn.Linear(3, 2).state_dict()}, checkpoint_id=str(tmp_path / "other.dcp"), no_dist=True)
    with pytest.raises(UnreadableCheckpointError, match="not fastmae's"):
        read_checkpoint(tmp_path / "other.dcp")


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch, caplog):
    calls = {"n": 0}
    original = MaskedAutoencoderViT.forward_loss

    def poisoned(self, imgs, pred, mask):
        calls["n"] += 1
        loss = original(self, imgs, pred, mask)
        return loss * float("nan") if calls["n"] >= 9 else loss  # from the 3rd batch of epoch 1

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", poisoned)
    assert cli(args(folder, tmp_path, "--checkpoint_steps", "1")) == 1
    assert "loss is nan" in caplog.text and "last checkpoint" in caplog.text
    ckpt = read_checkpoint(tmp_path / "checkpoint-last.pth")
    position = ckpt["data_position"]
    assert position.pop("totals")["batches"] == 2  # the epoch's running sums so far
    assert position == {"epoch": 1, "batch": 2, "batch_size": 8, "accum_iter": 1, "steps_per_epoch": 6}
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_an_update_that_breaks_the_weights_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch, caplog):
    """A finite loss, then an update that writes NaN (a non-finite gradient would): the checkpoint
    due after it is not written."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def poisoned_step(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    assert cli(args(folder, tmp_path, "--checkpoint_steps", "1")) == 1
    assert "weights that are not finite at epoch 0, batch 3" in caplog.text and "last checkpoint" in caplog.text
    ckpt = read_checkpoint(tmp_path / "checkpoint-last.pth")
    assert (ckpt["data_position"]["epoch"], ckpt["data_position"]["batch"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_an_accumulation_longer_than_an_epoch_is_refused(folder, tmp_path, caplog):
    """6 batches per epoch and --accum_iter 8: every epoch's accumulation would be dropped unfinished."""
    assert cli(args(folder, tmp_path, "--accum_iter", "8")) == 1
    assert "--accum_iter 8 needs at least 8 batches per epoch, and each rank has 6" in caplog.text
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_kill_between_the_kept_file_and_its_link_resumes_from_the_kept_file(folder, tmp_path, monkeypatch):
    import fastmae.training

    def killed(src, dst):
        raise RuntimeError("killed before checkpoint-last.pth was relinked")

    monkeypatch.setattr(fastmae.training, "link_or_copy", killed)
    with pytest.raises(RuntimeError, match="killed"):
        cli(args(folder, tmp_path, "--epochs", "1"))
    assert not (tmp_path / "checkpoint-last.pth").exists()
    monkeypatch.undo()
    assert cli(args(folder, tmp_path, "--resume", "auto")) == 0
    assert [json.loads(line)["epoch"] for line in (tmp_path / "log.txt").read_text().splitlines()] == [1]
    assert read_checkpoint(tmp_path / "checkpoint-0.pth")["data_position"]["epoch"] == 1


def test_a_finished_run_resumed_says_there_is_nothing_to_train(folder, tmp_path, caplog):
    assert cli(args(folder, tmp_path, "--epochs", "1")) == 0
    assert cli(args(folder, tmp_path, "--epochs", "1", "--resume", "auto")) == 0
    assert "nothing to train: the run starts at epoch 1 and --epochs is 1" in caplog.text


def test_checkpoint_contents(folder, tmp_path):
    assert cli(args(folder, tmp_path, "--epochs", "1")) == 0
    ckpt = read_checkpoint(tmp_path / "checkpoint-0.pth")
    assert {"model", "optimizer", "scaler", "epoch", "data_position", "args", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 0
    assert ckpt["data_position"] == {"epoch": 1, "batch": 0, "batch_size": 8, "accum_iter": 1, "steps_per_epoch": 6}
    assert os.path.samefile(tmp_path / "checkpoint-0.pth", tmp_path / "checkpoint-last.pth")
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert {"train_loss", "train_lr", "epoch", "train_images_per_sec", "mfu", "train_peak_memory_gib"} <= set(log[0])
    assert math.isfinite(log[0]["train_loss"])


def test_a_mid_epoch_position_in_other_batches_restarts_the_epoch(tmp_path, caplog):
    """A batch count means other samples under another batch size or accumulation: the epoch
    restarts from its first batch rather than skip the wrong samples."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    layout = {"batch_size": 8, "accum_iter": 1, "steps_per_epoch": 6}
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2,
                     "data_position": {"epoch": 3, "batch": 4, **layout}}, tmp_path / "c.pth")

    def resume(**changes):
        return load_training_state(tmp_path / "c.pth", model, optimizer, None, DistInfo(), torch.device("cpu"),
                                   {**layout, **changes})[:2]

    assert resume() == (3, 4)
    assert resume(batch_size=16, steps_per_epoch=3) == (3, 0)
    assert "batch_size 8 (now 16)" in caplog.text
    assert resume(accum_iter=2) == (3, 0)


def test_a_resumed_fine_tuning_keeps_its_best_accuracy(tmp_path):
    from fastmae.evaluation import EpochEvaluation

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 4,
                     "after_epoch": {"max_accuracy": 77.5}}, tmp_path / "c.pth")
    evaluation = EpochEvaluation(None, model, None)
    load_training_state(tmp_path / "c.pth", model, optimizer, None, DistInfo(), torch.device("cpu"), {}, None, None,
                        evaluation)
    assert evaluation.best == 77.5


@pytest.mark.cuda
def test_an_unfused_optimizers_checkpoint_resumes_a_fused_cuda_one_with_its_step_counts_on_the_device(tmp_path):
    """The original's checkpoints hold an unfused AdamW's state: loaded as saved, the step counts
    would stay on the host, where a fused (or captured) update cannot read them."""
    model = torch.nn.Linear(2, 2)
    unfused = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    unfused.step()
    save_checkpoint({"model": model.state_dict(), "optimizer": unfused.state_dict(), "epoch": 0}, tmp_path / "c.pth")
    model.cuda()
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    load_training_state(tmp_path / "c.pth", model, fused, None, DistInfo(), torch.device("cuda"),
                        {"batch_size": 8, "accum_iter": 1, "steps_per_epoch": 6})
    assert {state["step"].device.type for state in fused.state.values()} == {"cuda"}
    model(torch.randn(3, 2, device="cuda")).sum().backward()
    fused.step()
    assert all(state["step"].item() == 2 for state in fused.state.values())


def test_compiled_run_killed_and_resumed_equals_uninterrupted(folder, tmp_path, monkeypatch, uninterrupted):
    """The compiled step (``--compile``) resumes exactly too, and computes the eager run's losses."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # compiled once for the three runs
    whole = tmp_path / "whole"
    assert cli(args(folder, whole, "--compile")) == 0
    compiled = step_losses(whole)
    assert compiled.keys() == uninterrupted.keys()
    for key, loss in compiled.items():
        assert loss == pytest.approx(uninterrupted[key], rel=1e-5), key

    part = tmp_path / "part"
    extra = ["--compile", "--checkpoint_steps", "2"]
    assert kill_after(start(args(folder, part, *extra)), part, records=9)
    assert cli(args(folder, part, *extra, "--resume", "auto")) == 0
    assert step_losses(part) == compiled


def test_a_resume_with_another_loss_recipe_says_so(folder, tmp_path, caplog):
    assert cli(args(folder, tmp_path, "--epochs", "1")) == 0
    assert cli(args(folder, tmp_path, "--resume", "auto", "--norm_pix_loss", "--mask_ratio", "0.5")) == 0
    assert "with --norm_pix_loss True: the checkpoint was trained with False" in caplog.text
    assert "with --mask_ratio 0.5: the checkpoint was trained with 0.75" in caplog.text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_ends_the_run_at_a_step_with_a_checkpoint(folder, tmp_path, uninterrupted, signum):
    """SLURM's preemption (SIGTERM to every process of the job, loader workers included) or its
    advance warning (SIGUSR1): the run finishes its step, writes checkpoint-last.pth, says so and
    exits with 128 + the signal; --resume auto then computes what the uninterrupted run does."""
    # a loader worker to receive the signal too; the model's threads as in the uninterrupted run (the
    # thread count changes the rounding of the sums)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "fastmae.pretrain", *args(folder, tmp_path, "--num_workers", "1")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, env=env)
    log = tmp_path / "log_steps.txt"
    # signalled after its second step: the 6-step epoch's last four leave a loaded machine time to
    # deliver the signal before the epoch ends (after the fourth, a slow poll once missed it)
    while proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err.decode()[-2000:]
    assert f"stopped by {signal.Signals(signum).name}" in err.decode()
    assert read_checkpoint(tmp_path / "checkpoint-last.pth")["data_position"]["batch"] > 0  # mid-epoch, as it stood
    assert cli(args(folder, tmp_path, "--resume", "auto")) == 0
    assert step_losses(tmp_path) == uninterrupted


def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_one_leaves_no_lock(folder, tmp_path, caplog):
    proc = start(args(folder, tmp_path, "--checkpoint_steps", "1"))
    while proc.poll() is None and not (tmp_path / "log_steps.txt").exists():
        time.sleep(0.02)
    assert cli(args(folder, tmp_path, "--resume", "auto")) == 1
    assert f"{tmp_path} is in use by another run (pid {proc.pid} on" in caplog.text
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (tmp_path / "checkpoint-last.pth.12345.tmp").write_bytes(b"half a checkpoint")  # a killed save's leftovers
    assert cli(args(folder, tmp_path, "--resume", "auto")) == 0  # the lock died with its process
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unwritable_output_folder_is_refused_first(folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastmae")
    (tmp_path / "file").write_text("a file where the folder would be")  # unwritable, even for root
    assert cli(args(folder, tmp_path / "file" / "out")) == 1
    assert "cannot be written (NotADirectoryError" in caplog.text
    assert "model mae_vit_tiny_patch4" not in caplog.text  # refused before anything was built


def test_a_checkpoint_of_another_model_says_what_it_holds(folder, tmp_path, caplog):
    assert cli(args(folder, tmp_path, "--epochs", "1")) == 0
    assert cli(args(folder, tmp_path / "b", "--resume", str(tmp_path / "checkpoint-0.pth"), "--input_size", "48")) == 1
    assert ("checkpoint-0.pth holds mae_vit_tiny_patch4 (embed dim 192, patch 4, 64 patches, 4 blocks); this run "
            "builds mae_vit_tiny_patch4 (embed dim 192, patch 4, 144 patches, 4 blocks)") in caplog.text


def test_resume_auto_passes_over_an_unreadable_newest_checkpoint(folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastmae")
    assert cli(args(folder, tmp_path, "--epochs", "1", "--checkpoint_steps", "2")) == 0
    kept = tmp_path / "checkpoint-0.pth"
    (tmp_path / "checkpoint-last.pth").unlink()  # a newest one cut short (a full disk, a node lost mid-copy)
    (tmp_path / "checkpoint-last.pth").write_bytes(kept.read_bytes()[:1000])
    assert cli(args(folder, tmp_path, "--resume", "auto")) == 0
    assert "passing over" in caplog.text and "checkpoint-last.pth: not a readable checkpoint" in caplog.text
    assert f"resumed from {kept} at epoch 1, batch 0" in caplog.text


def children(pid: int) -> list[int]:
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_torchrun_restarts_a_run_whose_rank_died(folder, tmp_path):
    """torchrun --max-restarts with --resume auto: a worker killed mid-epoch, the group restarted, the
    run ends with the uninterrupted run's losses (two gloo ranks)."""
    def launch(out):
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
             "-m", "fastmae.pretrain", *args(folder, out, "--batch_size", "4", "--checkpoint_steps", "1", "--resume", "auto")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    whole = launch(tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()[-2000:]
    part = launch(tmp_path / "part")
    log = tmp_path / "part" / "log_steps.txt"
    while part.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 8):
        time.sleep(0.05)
    workers = children(part.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    _, err = part.communicate(timeout=300)
    assert part.returncode == 0, err.decode()[-3000:]
    assert "restart" in err.decode().lower()
    assert step_losses(tmp_path / "part") == step_losses(tmp_path / "whole")
    assert epoch_records(tmp_path / "part") == epoch_records(tmp_path / "whole")
