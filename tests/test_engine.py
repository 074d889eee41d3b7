"""The epoch loop: distributed data parallel and gradient accumulation compute the same update as one
process with the whole batch, eager and compiled; FLOP counts; the reconstruction picture."""
import os
import signal
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.flop_counter import FlopCounterMode

from fastmae import ops
from fastmae.data import TorchvisionLoader, pretrain_transform
from fastmae.data.shapes import ShapesDataset
from fastmae.distributed import cleanup, init_distributed
from fastmae.engine import EpochConfig, StopRequested, train_one_epoch
from fastmae.flops import mae_forward_flops, peak_flops_of
from fastmae.models import MaskedAutoencoderViT, create_model
from fastmae.optim import param_groups_weight_decay
from fastmae.sharding import shard_model
from fastmae.step import TrainStep
from fastmae.visualize import reconstruction_grid

IMAGES, BATCH = 32, 4


class SampleNoiseMAE(MaskedAutoencoderViT):
    """Masks drawn from each image itself (its patch sums), not from a random stream: the same
    sample gets the same mask however the batch is split across ranks or micro-batches."""

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        return super().forward(imgs, mask_ratio, ops.patchify(imgs, self.patch_size).float().sum(-1))


def join(rank: int, world_size: int, port: int):
    """This process's place (a spawned rank of its own when ``world_size`` > 1) and a tiny model."""
    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
    dist = init_distributed("cpu")
    torch.manual_seed(0)
    return dist, SampleNoiseMAE(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def train(rank: int, world_size: int, batch_size: int, accum_iter: int, out: str, port: int, mode: str = "eager",
          sharding: str = "ddp", bf16: bool = False) -> None:
    dist, model = join(rank, world_size, port)
    try:
        train_and_save(dist, model, batch_size, accum_iter, out, mode, sharding, bf16)
    finally:  # once the DDP wrapper is gone with train_and_save's frame (see distributed.cleanup)
        cleanup()


def train_and_save(dist, model, batch_size: int, accum_iter: int, out: str, mode: str, sharding: str,
                   bf16: bool) -> None:
    if sharding == "fsdp":
        shard_model(model, torch.device("cpu"))
    # SGD: Adam turns rounding noise in near-zero gradients into full-size steps, which would hide
    # what is compared here (the gradients)
    optimizer = torch.optim.SGD(param_groups_weight_decay(model, 0.05), lr=0.1)
    step_model = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled and sharding == "ddp" else model
    loader = TorchvisionLoader(ShapesDataset(IMAGES, image_size=40, transform=pretrain_transform(32)),
                               batch_size=batch_size, device=torch.device("cpu"), rank=dist.rank,
                               world_size=dist.world_size, seed=1, num_workers=0)
    # aot_eager: the compiled step's graphs (DDP's split at its buckets) without Inductor's code generation
    step = TrainStep(step_model, optimizer, lambda m, x, y: m(x)[0], accum_iter=accum_iter, mode=mode,
                     compile_backend="aot_eager", autocast_dtype=torch.bfloat16 if bf16 else None)
    cfg = EpochConfig(schedule=dict(lr=0.1, min_lr=0, warmup_epochs=0, epochs=2), print_freq=1)
    losses = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        train_one_epoch(step, loader, epoch, cfg, device=torch.device("cpu"), steps_per_epoch=loader.steps_per_epoch, dist=dist,
                        log=lambda r: losses.append(r["loss"]))
    # a sharded parameter gathered whole (a collective: every rank takes part)
    params = [(p.full_tensor() if sharding == "fsdp" else p).detach().clone() for p in model.parameters()]
    if dist.is_main:
        torch.save({"params": params, "losses": losses}, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, world_size, batch_size, accum_iter, mode="eager", sharding="ddp", bf16=False):
    out = str(tmp_path / f"w{world_size}b{batch_size}a{accum_iter}{mode}{sharding}{bf16}.pt")
    if world_size == 1:
        train(0, 1, batch_size, accum_iter, out, 0, mode, bf16=bf16)
    else:
        mp.spawn(train, args=(world_size, batch_size, accum_iter, out, free_port(), mode, sharding, bf16),
                 nprocs=world_size)
    return torch.load(out)


@pytest.fixture(scope="module")
def whole_batch(tmp_path_factory):
    return run(tmp_path_factory.mktemp("whole"), 1, 2 * BATCH, 1)


def assert_same_training(got, want):
    for g, w in zip(got["params"], want["params"]):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_two_process_ddp_equals_one_process_with_the_doubled_batch(tmp_path, whole_batch, mode):
    ddp = run(tmp_path, 2, BATCH, 1, mode)
    # the logged loss is the mean over ranks of each rank's batch mean: the whole batch's mean
    np.testing.assert_allclose(ddp["losses"], whole_batch["losses"], rtol=1e-5)
    assert_same_training(ddp, whole_batch)


@pytest.mark.parametrize("mode,accum_iter", [("eager", 1), ("eager", 2), ("compiled", 1)])
def test_two_process_fsdp_equals_ddp_and_one_process_with_the_doubled_batch(tmp_path, whole_batch, mode, accum_iter):
    # FSDP2 with its reduce-scatter; accumulation: the gradients kept unsharded, reduced on the last micro-batch
    fsdp = run(tmp_path, 2, BATCH // accum_iter, accum_iter, mode, sharding="fsdp")
    if accum_iter == 1:  # (accumulating, it logs each micro-batch's loss)
        np.testing.assert_allclose(fsdp["losses"], whole_batch["losses"], rtol=1e-5)
    assert_same_training(fsdp, whole_batch)
    if accum_iter == 1 and mode == "eager":
        assert_same_training(fsdp, run(tmp_path, 2, BATCH, 1, mode, sharding="ddp"))


@pytest.mark.parametrize("batch,accum_iter,bf16", [(2, 3, False), (BATCH, 1, True)],
                         ids=["an incomplete accumulation dropped each epoch", "bf16 autocast"])
def test_two_process_fsdp_equals_ddp(tmp_path, batch, accum_iter, bf16):
    """8 micro-batches per epoch in 3s: the last 2 dropped at each epoch's end, by FSDP too (whose
    unreduced accumulation lives outside the parameters' gradients); under bf16 autocast, the
    parameters gathered in fp32 and cast as DDP's are."""
    fsdp = run(tmp_path, 2, batch, accum_iter, sharding="fsdp", bf16=bf16)
    ddp = run(tmp_path, 2, batch, accum_iter, sharding="ddp", bf16=bf16)
    np.testing.assert_allclose(fsdp["losses"], ddp["losses"], rtol=1e-5 if not bf16 else 1e-3)
    assert_same_training(fsdp, ddp)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_accumulating_two_micro_batches_equals_the_doubled_batch(tmp_path, whole_batch, mode):
    accum = run(tmp_path, 1, BATCH, 2, mode)
    assert_same_training(accum, whole_batch)


@pytest.mark.parametrize("name,kernels,with_mask_tokens", [
    ("mae_vit_tiny_patch4", "triton", False), ("mae_vit_base_patch16", "torch", False), ("mae_vit_tiny_patch4", "torch", True),
])
def test_closed_form_flops_match_a_flop_counter(name, kernels, with_mask_tokens):
    model = create_model(name, kernel_backend=kernels, attention_backend="math", encoder_mask_tokens=with_mask_tokens)
    n = 2
    imgs = torch.randn(n, 3, *model.patch_embed.img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(imgs, mask_ratio=0.75)
    counted = counter.get_total_flops()
    if kernels == "torch" and not with_mask_tokens:  # the reference embeds every patch; the closed form counts the visible ones
        L, K = model.num_patches, int(model.num_patches * 0.25)
        counted -= 2 * n * (L - K) * model.decoder_pred.out_features * model.pos_embed.shape[-1]
    assert counted == pytest.approx(n * mae_forward_flops(model, 0.75), rel=1e-6)


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                         ("NVIDIA L40", 181), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
                                         ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_takes_the_longest_matching_name(name, tflops):
    assert peak_flops_of(name) == (tflops and tflops * 1e12)


def test_reconstruction_grid():
    for norm_pix in (False, True):
        model = create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, norm_pix_loss=norm_pix)
        grid = reconstruction_grid(model, torch.randn(3, 3, 32, 32))
        assert grid.shape == (3 * 32, 4 * 32, 3) and grid.dtype == np.uint8
        assert model.training


def test_progress_shows_the_epochs_and_the_runs_time_left():
    from fastmae.engine import Progress

    lines = []
    progress = Progress(True, 0, 10, 0, lines.append)
    progress({"epoch": 0, "batch": 5, "loss": 0.5, "lr": 1e-3, "images_per_sec": 100.0, "eta_seconds": 5.2,
              "eta_run_seconds": 3725.0})
    assert lines and "eta 0:05 (run 1:02:05)" in lines[0]


def test_cleanup_frees_the_ddp_wrapper_an_exception_holds_before_destroying_the_group(monkeypatch):
    """A job that fails keeps its DDP wrapper alive in the exception's frames; the process group must
    still outlive it (a reducer holding the group's last reference hangs gloo's destructor)."""
    import weakref

    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    wrapper = None
    freed_first = []
    destroy = torch_dist.destroy_process_group

    def destroy_and_record():
        freed_first.append(wrapper() is None)
        destroy()

    monkeypatch.setattr(torch_dist, "destroy_process_group", destroy_and_record)

    def fail():
        nonlocal wrapper
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        ddp(torch.ones(2, 4)).sum().backward()
        wrapper = weakref.ref(ddp)
        raise RuntimeError("the step failed")

    try:
        with pytest.raises(RuntimeError, match="the step failed"):
            try:
                fail()
            finally:
                cleanup()
    finally:
        if torch_dist.is_initialized():
            destroy()
    assert freed_first == [True]


def stop_on_rank_0(rank: int, world_size: int, out: str, port: int) -> None:
    """Rank 0 alone gets SIGUSR1 after its 3rd step; both ranks must stop at the same step."""
    dist, model = join(rank, world_size, port)
    try:
        stop_and_save(dist, model, rank, out)
    finally:
        cleanup()


def stop_and_save(dist, model, rank: int, out: str) -> None:
    step = TrainStep(torch.nn.parallel.DistributedDataParallel(model), torch.optim.SGD(model.parameters(), lr=0.1),
                     lambda m, x, y: m(x)[0], accum_iter=2)
    loader = TorchvisionLoader(ShapesDataset(IMAGES, image_size=40, transform=pretrain_transform(32)), batch_size=2,
                               device=torch.device("cpu"), rank=dist.rank, world_size=dist.world_size, seed=1,
                               num_workers=0)
    steps = []
    checkpoints = []
    cfg = EpochConfig(schedule=dict(lr=0.1, min_lr=0, warmup_epochs=0, epochs=1), print_freq=1)
    try:
        train_one_epoch(step, loader, 0, cfg, device=torch.device("cpu"), steps_per_epoch=loader.steps_per_epoch, dist=dist,
                        log=lambda r: steps.append(r["batch"]), on_checkpoint=lambda e, b, t: checkpoints.append(b),
                        stop_signal=lambda: signal.SIGUSR1 if rank == 0 and len(steps) >= 3 else 0)
        stopped = None
    except StopRequested as e:
        stopped = (e.batch, int(e.signum))
    torch.save({"stopped": stopped, "checkpoints": checkpoints}, f"{out}.{rank}")


def test_ranks_agree_on_a_stop_signal_that_one_of_them_got(tmp_path):
    out = str(tmp_path / "stop")
    mp.spawn(stop_on_rank_0, args=(2, out, free_port()), nprocs=2)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    # rank 0's signal seen by both at the 3rd record; the next optimizer step (accumulation 2) is the 4th batch
    assert [r["stopped"] for r in results] == [(4, signal.SIGUSR1), (4, signal.SIGUSR1)]  # rank 1 told which
    assert [r["checkpoints"] for r in results] == [[4], [4]]


def fail_on_rank_1(rank: int, world_size: int, folder: str, out: str, port: int, how: str) -> None:
    """The pretraining command on two gloo ranks, rank 1 dying (or hanging) at its 4th step."""
    import logging

    from fastmae.pretrain import cli
    from fastmae.step import TrainStep

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logging.getLogger("fastmae").addHandler(logging.FileHandler(f"{out}.{rank}.log"))
    real, calls = TrainStep.__call__, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 4:
            if how == "dies":
                os._exit(3)
            time.sleep(60)  # hangs
        return real(self, *args, **kwargs)

    TrainStep.__call__ = step
    code = cli(["--data_path", folder, "--output_dir", f"{out}-run", "--batch_size", "4", "--epochs", "1",
                "--num_workers", "0", "--print_freq", "1", "--dist_timeout", "0.1", "--vis_freq", "0"])
    with open(f"{out}.{rank}.code", "w") as f:
        f.write(str(code))
    os._exit(0)  # no waiting on the dead or hung rank at exit


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_is_named_in_bounded_time(tmp_path, how):
    folder = tmp_path / "shapes"
    ShapesDataset(32, image_size=40).write_image_folder(folder)
    out = str(tmp_path / "fail")
    start = time.time()
    context = mp.start_processes(fail_on_rank_1, args=(2, str(folder), out, free_port(), how), nprocs=2, join=False,
                                 start_method="spawn")
    while not os.path.exists(f"{out}.0.code") and time.time() - start < 50:
        time.sleep(0.1)
    for p in context.processes:
        p.kill()
    assert open(f"{out}.0.code").read() == "1"
    assert time.time() - start < 50  # the hang is noticed after --dist_timeout (6 s), not half an hour
    log = open(f"{out}.0.log").read()
    assert "error: rank 0 lost the others while training, epoch 0 batch" in log
    assert "Last word from each rank, the furthest behind first: rank 1: training, epoch 0 batch 3" in log


def test_ranks_from_slurm_that_never_meet_say_how_to_launch(monkeypatch):
    """One process inside an sbatch script for several tasks (no srun): SLURM's variables make it
    rank 0 of 2, and the rendezvous ends in a line that says where the ranks came from."""
    import socket

    from fastmae.distributed import RendezvousError, init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(RendezvousError, match=r"rank 0 of 2: the ranks did not all meet .* SLURM .* srun"):
        init_distributed("cpu", timeout_minutes=0.02)
