"""Sharded training and checkpoints: FSDP under torchrun (two gloo ranks) writing
torch.distributed.checkpoint folders in the background, a rank killed and the run restarted by
torchrun resuming exactly, the consolidated single file in the original's layout, fine-tuning
sharded from it; the flags' rules. (Sharded checkpoints in one process: test_resume.py.)"""
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from fastmae.checkpoint import read_checkpoint
from fastmae.models import create_model
from fastmae.optim import param_groups_weight_decay
from fastmae.pretrain import cli
from fastmae.sharding import training_state_per_rank

from test_resume import args, children, epoch_records, folder, step_losses  # noqa: F401 (a fixture)


def torchrun(module: str, argv: list[str], restarts: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--max-restarts", str(restarts), "-m", module, *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finished(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_fsdp_run_restarted_after_a_rank_died_resumes_exactly_from_its_async_sharded_checkpoint(folder, tmp_path):
    fsdp = ["--batch_size", "4", "--fsdp", "--checkpoint_steps", "1", "--async_checkpoint", "--resume", "auto"]
    finished(torchrun("fastmae.pretrain", args(folder, tmp_path / "whole", *fsdp)))
    part = torchrun("fastmae.pretrain", args(folder, tmp_path / "part", *fsdp), restarts=1)
    log = tmp_path / "part" / "log_steps.txt"
    while part.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 8):
        time.sleep(0.05)
    workers = children(part.pid)
    assert len(workers) == 2
    os.kill(workers[1], 9)
    finished(part)
    assert step_losses(tmp_path / "part") == step_losses(tmp_path / "whole")
    assert epoch_records(tmp_path / "part") == epoch_records(tmp_path / "whole")

    for out in (tmp_path / "whole", tmp_path / "part"):
        # the mid-epoch checkpoints are gone once a newer one is complete; the epochs' ends kept
        # (--save_freq 20: epoch 0 and the last), and the last consolidated
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0.dcp", "checkpoint-1.dcp",
                                                                     "checkpoint-1.pth"]
    whole, part = (read_checkpoint(tmp_path / out / "checkpoint-1.pth") for out in ("whole", "part"))
    assert whole["epoch"] == 1 and whole["kind"] == "pretrain" and whole["world_size"] == 2
    assert_same_state(part["model"], whole["model"])
    # the original's layout: the whole model's state, the optimizer's keyed by parameter index
    model = create_model(whole["args"].model, img_size=whole["args"].input_size)
    model.load_state_dict(whole["model"])
    trained = [p for group in param_groups_weight_decay(model, 0.05) for p in group["params"]]
    optimizer_state = whole["optimizer"]["state"]
    assert sorted(optimizer_state) == list(range(len(trained)))
    for index, param in enumerate(trained):
        assert optimizer_state[index]["exp_avg"].shape == param.shape

    # fine-tuned sharded from the consolidated checkpoint, blocks recomputed in the backward
    finished(torchrun("fastmae.finetune", ["--output_dir", str(tmp_path / "ft"), "--builtin_size", "32",
                                           "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--fsdp",
                                           "--grad_checkpointing", "--finetune", str(tmp_path / "part" / "checkpoint-1.pth")]))
    assert sorted(p.name for p in (tmp_path / "ft").glob("checkpoint-*")) == ["checkpoint-0.dcp", "checkpoint-0.pth"]
    assert read_checkpoint(tmp_path / "ft" / "checkpoint-0.pth")["kind"] == "finetune"


@pytest.mark.parametrize("flags,message", [
    (["--fsdp", "--precision", "fp16"], "--fsdp: fp16 with a gradient scaler is not supported sharded"),
    (["--fsdp", "--checkpoint_format", "full"], "--fsdp writes sharded checkpoints"),
    (["--async_checkpoint"], "--async_checkpoint writes sharded checkpoints"),
])
def test_sharding_flags_that_cannot_go_together_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli(flags)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_fsdp_in_one_process_says_how_to_launch(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert cli(["--output_dir", str(tmp_path), "--fsdp"]) == 1
    assert "--fsdp was requested but cannot run: it shards across processes" in caplog.text


def test_the_memory_table_counts_what_each_rank_holds():
    tiny = "mae_vit_tiny_patch4"
    with torch.device("meta"):
        trained = sum(p.numel() for p in create_model(tiny).parameters() if p.requires_grad)
    assert training_state_per_rank(tiny, 1, sharded=False)["fp32 weights, gradients, AdamW moments"] == 16 * trained
    whole, quarter = (training_state_per_rank(tiny, n, sharded=True)["fp32 weights, gradients, AdamW moments"]
                      for n in (1, 4))
    assert whole == 16 * trained
    # a quarter of each parameter's rows (padded), the (1, ...)-shaped tokens whole on rank 0
    assert 16 * trained / 4 < quarter < 16 * trained / 4 * 1.1


def test_the_fp16_rule_is_the_same_for_the_command_line_and_a_run():
    from fastmae.config import fsdp_precision_problem
    from fastmae.distributed import DistInfo
    from fastmae.sharding import fsdp_unavailable_reasons

    assert fsdp_precision_problem("bf16") is None
    dist = DistInfo(rank=0, world_size=2, local_rank=0)
    assert fsdp_unavailable_reasons(dist, "fp16") == [fsdp_precision_problem("fp16")]
    assert fsdp_unavailable_reasons(dist, "bf16") == []
