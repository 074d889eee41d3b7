"""What every training entry point shares (pretrain, finetune, linprobe): the run's setup (device,
process group, seeds, output folder, precision, threads), the step mode, resume, and the epoch loop
with checkpoints that survive faults, logs and progress. (Their flags: :mod:`fastmae.cli`.)"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import random
import signal
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Callable

import numpy as np
import torch
from torch import nn

from fastmae import ops
from fastmae.checkpoint import (
    ShardedCheckpointer, UnreadableCheckpointError, checkpoint_kind, checkpoints_newest_first,
    consolidate, is_sharded_checkpoint, link_or_copy, model_state_dict, newest_readable_checkpoint,
    optimizer_state_by_name, parameter_names, peek_checkpoint, read_checkpoint, remove_stale_temporaries, rng_state,
    save_checkpoint, set_rng_state, sharded_name, sharded_state,
)
from fastmae.distributed import (
    DistInfo, all_gather_objects, all_reduce_sum, barrier, init_distributed, is_process_group_failure, set_phase,
)
from fastmae.engine import (
    STOP_SIGNALS, EpochConfig, Progress, StopRequested, check_finite_weights, mean_and_any_signal, train_one_epoch,
)
from fastmae.errors import UsageError
from fastmae.sharding import fsdp_unavailable_reasons, is_sharded, shard_model
from fastmae.step import TrainStep, step_mode_unavailable_reasons

logger = logging.getLogger("fastmae")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # by config.PRECISIONS


class RunFiles:
    """What rank 0 writes to ``output_dir``: ``log.txt`` (per epoch), ``log_steps.txt`` (every log
    record), checkpoints, TensorBoard scalars."""

    def __init__(self, args: argparse.Namespace, dist: DistInfo):
        self.dir, self.enabled = args.output_dir, dist.is_main
        self.writer = None
        if self.enabled:
            os.makedirs(self.dir, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=args.log_dir or self.dir)
            except ImportError:
                logger.info("tensorboard is not installed: no TensorBoard logs (log.txt has the same figures)")

    def append(self, name: str, record: dict) -> None:
        if self.enabled:
            with open(os.path.join(self.dir, name), "a") as f:
                f.write(json.dumps(record) + "\n")

    def scalars(self, record: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()


def check_output_dir(output_dir: str, kind: str) -> None:
    """Refuse an ``output_dir`` that cannot be written, or whose checkpoints are of another kind than
    this run's: the run would write its own beside them (``log.txt``, numbered checkpoints) and
    ``--resume auto`` would pick up theirs."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise UsageError(f"--output_dir {output_dir} cannot be written ({type(e).__name__}: {e.strerror or e})") from e
    for newest in checkpoints_newest_first(output_dir):
        try:
            found = checkpoint_kind(newest)
        except UnreadableCheckpointError:  # --resume auto passes over it too
            continue
        if found != kind:
            raise UsageError(f"{output_dir} holds {found} checkpoints ({os.path.basename(newest)}); a {kind} run "
                             "would write its own beside them: choose another --output_dir")
        return


def cores_per_rank() -> int:
    """The cores this process may use, shared among the node's ranks (torchrun's LOCAL_WORLD_SIZE)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def choose_threads(device_type: str, num_workers: int | None, cores: int,
                   omp_num_threads: str | None) -> tuple[int | None, int]:
    """``(intra-op threads, loader workers)`` such that the model's threads and the loader's
    workers (one thread each) do not outnumber the ``cores``: OpenMP threads that find their core
    taken spin and wait, and a 2-core CPU shared with one busy process trained 4-6x slower with
    2 threads than with 1. ``num_workers`` None: 2 on CUDA, on a CPU at most ``cores - 1``. An
    ``OMP_NUM_THREADS`` the user set is kept (threads None)."""
    if num_workers is None:
        num_workers = 2 if device_type == "cuda" else min(2, cores - 1)
    threads = None if omp_num_threads else max(1, cores - num_workers)
    return threads, num_workers


_locks: list = []  # the output folders this process holds (released by cli_main, or at exit)


def lock_output_dir(output_dir: str) -> None:
    """One run at a time per output folder: an exclusive lock on ``OUTPUT_DIR/.fastmae-run.lock``
    for the run's life, which the OS releases when the process ends however it ends (a killed run
    leaves nothing stuck). A second run on the folder is refused, naming the first."""
    path = os.path.join(output_dir, ".fastmae-run.lock")
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"{output_dir} is in use by another run ({owner}): wait for it to end, or choose another "
                         "--output_dir") from None
    except OSError as e:  # a file system without locks (some network mounts)
        logger.warning("cannot lock %s (%s): make sure no other run writes to it", output_dir, e)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _locks.append(handle)
    remove_stale_temporaries(output_dir)


def release_output_dirs() -> None:
    while _locks:
        _locks.pop().close()


class Run:
    """One process's share of a run (a ``kind`` of :data:`fastmae.checkpoint.KINDS`): device, place
    in the process group, seeds, files, precision."""

    def __init__(self, args: argparse.Namespace, kind: str):
        self.kind = kind
        check_output_dir(args.output_dir, kind)
        device = torch.device(args.device)
        self.dist = init_distributed(device.type, args.dist_timeout)
        if self.dist.is_main:  # rank 0 writes the folder
            lock_output_dir(args.output_dir)
        if device.type == "cuda" and self.dist.enabled:
            device = torch.device("cuda", self.dist.local_rank)
        self.device = device
        if not self.dist.is_main:
            logger.setLevel(logging.WARNING)
        threads, args.num_workers = choose_threads(device.type, args.num_workers, cores_per_rank(),
                                                   os.environ.get("OMP_NUM_THREADS"))
        if threads is not None:
            torch.set_num_threads(threads)
        logger.info("threads: %d for the model's ops, %d data loader workers, on %d cores%s", torch.get_num_threads(),
                    args.num_workers, cores_per_rank(),
                    "" if threads is None else " (OMP_NUM_THREADS and --num_workers choose otherwise)")
        if torch.get_num_threads() + args.num_workers > cores_per_rank():
            logger.warning("the model's %d threads and %d loader workers outnumber the %d cores: expect them to wait "
                           "on each other", torch.get_num_threads(), args.num_workers, cores_per_rank())
        seed = args.seed + self.dist.rank
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.files = RunFiles(args, self.dist)
        self.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.fsdp = bool(getattr(args, "fsdp", False))
        if self.fsdp and (reasons := fsdp_unavailable_reasons(self.dist, self.precision)):
            raise ops.BackendUnavailableError(f"--fsdp was requested but cannot run: {'; '.join(reasons)}")
        logger.info("args: %s", json.dumps(vars(args)))

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` on this run's device, sharded across the ranks with ``--fsdp``: call before
        building the optimizer (sharding replaces the parameters)."""
        model.to(self.device)
        if self.fsdp:
            shard_model(model, self.device)
            logger.info("FSDP: %d transformer blocks and the rest sharded across %d ranks, parameters gathered and "
                        "gradients reduced in fp32 (autocast casts the matmuls' operands, as under DDP)",
                        sum(1 for m in model.modules() if is_sharded(m)) - 1, self.dist.world_size)
        return model

    def lr(self, args: argparse.Namespace) -> float:
        """``args.lr``, else ``blr * effective batch / 256`` (and set it in ``args``)."""
        eff_batch_size = args.batch_size * args.accum_iter * self.dist.world_size
        if args.lr is None:
            args.lr = args.blr * eff_batch_size / 256
        logger.info("base lr %.2e, actual lr %.2e, effective batch size %d; precision %s",
                    args.lr * 256 / eff_batch_size, args.lr, eff_batch_size, self.precision)
        return args.lr


def choose_step_mode(args: argparse.Namespace, run: Run, *, compile_by_default: bool, capturable_loss: bool,
                     fused_optimizer: bool = True) -> str:
    """The step mode (:data:`fastmae.step.STEP_MODES`) of ``--compile`` and ``--cuda_graphs``.

    ``compile_by_default``: compile on CUDA unless ``--no-compile`` (pretraining).
    ``capturable_loss``: the entry point's loss draws its randomness on the device only, so its
    step can be captured (fine-tuning's mixup draws on the host). Automatic choices fall back
    quietly and log why; ``--cuda_graphs`` where graphs cannot run is an error that says why."""
    if args.compile is not None:
        compile_ = args.compile
    else:  # --cuda_graphs asks for the compiled step
        compile_ = bool(args.cuda_graphs) or (compile_by_default and run.device.type == "cuda")
    if not compile_:
        if args.cuda_graphs:
            raise ops.BackendUnavailableError("--cuda_graphs replays the compiled step: it needs --compile")
        return "eager"
    if args.cuda_graphs is False or (args.cuda_graphs is None and not compile_by_default):
        return "compiled"
    reasons = step_mode_unavailable_reasons("graphed", run.device, distributed=run.dist.enabled,
                                            fused_optimizer=fused_optimizer)
    if not capturable_loss:
        reasons.append("the loss draws random numbers on the host (mixup, cutmix)")
    if not reasons:
        return "graphed"
    if args.cuda_graphs:
        raise ops.BackendUnavailableError(f"--cuda_graphs was requested but cannot run: {'; '.join(reasons)}")
    logger.info("step: no CUDA graphs (%s)", "; ".join(reasons))
    return "compiled"


def resume_path(args: argparse.Namespace) -> str | None:
    """The checkpoint ``--resume`` names: a path, or with ``auto`` the newest in ``--output_dir``."""
    if args.resume != "auto":
        return args.resume or None
    # rank 0 decides: ranks that looked on their own (a file system's attribute caches) could differ
    path = all_gather_objects(newest_readable_checkpoint(args.output_dir))[0]
    if path is None:
        logger.info("--resume auto: no checkpoint in %s, starting afresh", args.output_dir)
    return path


# flags whose change between a checkpoint and the run resuming it changes what is computed
RECIPE_FLAGS = ("norm_pix_loss", "mask_ratio")


def load_training_state(path, model, optimizer, scaler, dist: DistInfo, device, layout: dict,
                        args: argparse.Namespace | None = None, loader=None,
                        after_epoch=None) -> tuple[int, int, dict | None]:
    """Restore a checkpoint (fastmae's, or the original's); returns where training continues
    (epoch, batch) and, for a position within an epoch, the epoch's running sums up to it.
    ``layout``: this run's batches (batch_size, accum_iter, steps_per_epoch), which a mid-epoch
    position must have been counted in. ``args``: this run's flags, compared with the checkpoint's
    (a changed ``RECIPE_FLAGS`` is logged). ``loader``: given the state its rank saved (a loader
    with ``load_state_dict``: DALI's) when the position is within an epoch. ``after_epoch``: given
    its saved state (fine-tuning's evaluation: the best accuracy so far)."""
    sharded_model = is_sharded(model)
    # a sharded checkpoint into a sharded model: each rank reads its own shards, never the whole
    ckpt = peek_checkpoint(path) if sharded_model and is_sharded_checkpoint(path) else read_checkpoint(path)
    saved = vars(ckpt.get("args") or argparse.Namespace())
    check_same_architecture(path, model_state_dict(ckpt), saved, model, args)
    for flag in RECIPE_FLAGS:
        if args is not None and flag in saved and hasattr(args, flag) and saved[flag] != getattr(args, flag):
            logger.warning("resuming %s with --%s %s: the checkpoint was trained with %s", path, flag,
                           getattr(args, flag), saved[flag])
    with_optimizer = ckpt.get("sharded") or ("optimizer" in ckpt and "epoch" in ckpt)
    # the saved groups carry the saving run's implementation flags (a CPU run's non-fused AdamW)
    # and lr values: keep this run's flags, and its device-tensor lr (a captured step reads it;
    # the schedule sets its value before the next update)
    implementation = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g}
                      | ({"lr": g["lr"]} if torch.is_tensor(g["lr"]) else {}) for g in optimizer.param_groups]
    if sharded_model:
        restore_sharded(path, ckpt, model, optimizer if with_optimizer else None)
    else:
        model.load_state_dict(model_state_dict(ckpt))
        if with_optimizer:
            optimizer.load_state_dict(ckpt["optimizer"])
    if with_optimizer:
        for group, flags in zip(optimizer.param_groups, implementation):
            group.update(flags)
        # load_state_dict placed the step counters by the *saved* flags (on the host for an
        # unfused optimizer's checkpoint, the original's): fused and captured updates read them on the device
        for group in optimizer.param_groups:
            for param in group["params"] if group.get("fused") or group.get("capturable") else ():
                state = optimizer.state.get(param, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(param.device, torch.float32)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    position = ckpt.get("data_position") or {"epoch": ckpt.get("epoch", -1) + 1, "batch": 0}
    rngs = ckpt.get("rng")
    if rngs and ckpt.get("world_size") == dist.world_size:
        set_rng_state(rngs[dist.rank], device)
    elif rngs:
        # a data position counts one rank's batches, which mean other samples on another number of ranks
        logger.warning("checkpoint from %s ranks, resuming on %s: epoch %d restarts from its first batch, and "
                       "random draws differ from an uninterrupted run", ckpt.get("world_size"), dist.world_size,
                       position["epoch"])
        position = {"epoch": position["epoch"], "batch": 0}
    changed = {k: (position[k], v) for k, v in layout.items() if k in position and position[k] != v}
    if position["batch"] and changed:
        # a batch count means other samples (and another place in the accumulation) in other batches
        logger.warning("checkpoint counted its batches with %s; this run's differ: epoch %d restarts from its first batch",
                       ", ".join(f"{k} {old} (now {new})" for k, (old, new) in changed.items()), position["epoch"])
        position = {"epoch": position["epoch"], "batch": 0}
    if ckpt.get("after_epoch") is not None and hasattr(after_epoch, "load_state_dict"):
        after_epoch.load_state_dict(ckpt["after_epoch"])
    loaders = ckpt.get("loader")
    if position["batch"] and loaders and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(loaders[dist.rank])  # same ranks and batches: checked above
    logger.info("resumed from %s at epoch %d, batch %d", path, position["epoch"], position["batch"])
    return position["epoch"], position["batch"], position.get("totals") if position["batch"] else None


def restore_sharded(path, ckpt: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load ``path`` into an FSDP ``model`` (and ``optimizer``): a sharded checkpoint shard by shard,
    a single-file one (``ckpt``, read whole) by handing each rank its shards of it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    if ckpt.get("sharded"):
        state = sharded_state(model, optimizer)
        dcp.load(state, checkpoint_id=os.fspath(path))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        return
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state_dict(ckpt), options=whole)
    if optimizer is not None:
        by_name = optimizer_state_by_name(ckpt["optimizer"], parameter_names(model, optimizer))
        set_optimizer_state_dict(model, optimizer, by_name, options=whole)


@contextmanager
def stop_signals():
    """While training: SIGTERM (SLURM's preemption, ``scancel``) and SIGUSR1 (``sbatch
    --signal=USR1@SECONDS``) ask the run to stop at its next optimizer step, after a checkpoint.
    Yields ``stop_signal()``: the signal number once one came, else 0."""
    received = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield lambda: 0
        return
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        yield lambda: received[0] if received else 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def describe_weights(state: dict, model_name: str | None) -> str:
    """``mae_vit_base_patch16 (embed dim 768, patch 16, 196 patches, 12 blocks)``, from weights."""
    parts = []
    if "patch_embed.proj.weight" in state:
        weight = state["patch_embed.proj.weight"]
        parts += [f"embed dim {weight.shape[0]}", f"patch {weight.shape[-1]}"]
    if "pos_embed" in state:
        parts.append(f"{state['pos_embed'].shape[1] - 1} patches")
    parts.append(f"{len({k.split('.')[1] for k in state if k.startswith('blocks.')})} blocks")
    return f"{model_name or 'a model'} ({', '.join(parts)})"


def check_same_architecture(path, state: dict, saved: dict, model: nn.Module, args) -> None:
    """A checkpoint of another preset or image size is an error that says what it holds and what
    this run builds (instead of a list of size mismatches)."""
    own = model.state_dict()
    if all(k in state and state[k].shape == v.shape for k, v in own.items()) and state.keys() <= own.keys():
        return
    this = getattr(args, "model", None) if args is not None else None
    raise UsageError(f"{path} holds {describe_weights(state, saved.get('model'))}; this run builds "
                     f"{describe_weights(own, this)}: resume with the checkpoint's --model and --input_size, or "
                     "train afresh in another --output_dir")


def portable_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict with plain-float learning rates (a captured step keeps them in
    device tensors), as the original's checkpoints hold them."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if torch.is_tensor(group["lr"]):
            group["lr"] = group["lr"].item()
    return state


def build_step(run: Run, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer,
               compute_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], step_mode: str) -> TrainStep:
    """The training step of ``model`` (DDP across the ranks) in ``step_mode``, with the run's
    precision, accumulation and clipping. Checkpoints keep holding the plain model's state dict."""
    train_model = model
    if run.dist.enabled and not is_sharded(model):  # FSDP reduce-scatters the gradients itself
        device_ids = [run.dist.local_rank] if run.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if step_mode != "eager":
        # Inductor's cache beside the checkpoints: a restart or a resume, on this node or another,
        # reads the compiled kernels instead of compiling them again
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(args.output_dir, "torch_compile_cache"))
        logger.info("torch.compile cache: %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    step = TrainStep(train_model, optimizer, compute_loss, accum_iter=args.accum_iter, autocast_dtype=run.autocast_dtype,
                     clip_grad=args.clip_grad, scaler=run.scaler, mode=step_mode)
    logger.info("step: %s", step.describe())
    return step


def fit(
    run: Run,
    args: argparse.Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader,
    compute_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    step_mode: str = "eager",
    after_epoch: Callable[[int, nn.Module, dict], dict] = lambda epoch, train_model, stats: {},
) -> dict:
    """Train ``model`` for ``args.epochs`` epochs from where ``args.resume`` left off: DDP across
    the ranks, the training step run as ``step_mode`` says (:func:`choose_step_mode`); a checkpoint
    (atomic) at every epoch end and every ``--checkpoint_steps`` batches; ``log.txt`` gets the epoch's ``train_*`` figures and what
    ``after_epoch(epoch, train_model)`` returns (evaluation, pictures). Returns the last record."""
    dist, device = run.dist, run.device
    steps_per_epoch = loader.steps_per_epoch
    if steps_per_epoch < args.accum_iter:
        # each epoch's incomplete accumulation is dropped, as the original's: no step would ever update
        raise UsageError(f"--accum_iter {args.accum_iter} needs at least {args.accum_iter} batches per epoch, and each "
                         f"rank has {steps_per_epoch}: no optimizer step would ever be taken; lower --accum_iter "
                         f"or --batch_size")
    start_epoch, start_batch, totals = args.start_epoch, 0, None
    layout = {"batch_size": args.batch_size, "accum_iter": args.accum_iter, "steps_per_epoch": steps_per_epoch}
    resume = resume_path(args)
    if resume and (found := checkpoint_kind(resume)) != run.kind:
        raise UsageError(f"{resume} is a {found} checkpoint: a {run.kind} run resumes {run.kind} checkpoints")
    if resume:
        start_epoch, start_batch, totals = load_training_state(resume, model, optimizer, run.scaler, dist, device,
                                                               layout, args, loader, after_epoch)

    step = build_step(run, args, model, optimizer, compute_loss, step_mode)
    cfg = EpochConfig(schedule=dict(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs),
                      print_freq=args.print_freq, checkpoint_steps=args.checkpoint_steps)

    def kept(epoch: int) -> bool:  # the epochs whose end's checkpoint is kept
        return epoch % args.save_freq == 0 or epoch + 1 == args.epochs

    checkpointer = ShardedCheckpointer(args.output_dir, asynchronous=args.async_checkpoint, is_main=dist.is_main,
                                       kept=kept) if args.checkpoint_format == "sharded" else None

    def checkpoint(epoch: int, next_batch: int, totals: dict | None = None, numbered: bool = False) -> None:
        set_phase(f"writing a checkpoint at epoch {epoch}, batch {next_batch}")
        check_finite_weights(model, epoch, next_batch)
        # every rank's random state, so that a resumed run draws the same masks and mixes
        rngs = all_gather_objects({k: v.cpu() for k, v in rng_state(device).items()})
        # mid-epoch, the epoch's running sums too: the resumed epoch logs the uninterrupted one's means
        position = {"epoch": epoch + 1 if next_batch == 0 else epoch, "batch": next_batch, **layout,
                    **({"totals": totals} if next_batch else {})}
        trainer = {"kind": run.kind, "scaler": run.scaler.state_dict() if run.scaler else None,
                   "epoch": epoch if next_batch == 0 else epoch - 1,  # the original's: last finished epoch
                   "data_position": position, "args": args, "rng": rngs, "world_size": dist.world_size}
        if hasattr(after_epoch, "state_dict"):  # fine-tuning's best accuracy so far
            trainer["after_epoch"] = after_epoch.state_dict()
        if hasattr(loader, "state_dict"):  # a loader whose random draws are not seeded per sample (DALI)
            trainer["loader"] = all_gather_objects(loader.state_dict())
        if checkpointer:
            checkpointer.save(model, optimizer, trainer, sharded_name(epoch, next_batch))
        elif dist.is_main:
            state = {"model": model.state_dict(), "optimizer": portable_state_dict(optimizer), **trainer}
            last = os.path.join(args.output_dir, "checkpoint-last.pth")
            if numbered:
                # the kept file first: a kill before checkpoint-last.pth is relinked leaves it, the newest,
                # for --resume auto (the other way round, the kept epoch would never be written)
                kept_file = os.path.join(args.output_dir, f"checkpoint-{epoch}.pth")
                save_checkpoint(state, kept_file)
                link_or_copy(kept_file, last)
            else:
                save_checkpoint(state, last)
        barrier()

    def fit_epoch(epoch: int, start_batch: int, totals: dict | None, stop_signal) -> dict:
        loader.set_epoch(epoch, start_batch)
        progress = Progress(dist.is_main, epoch, steps_per_epoch, start_batch, logger.info)

        def log(step_record):
            progress(step_record)
            run.files.append("log_steps.txt", step_record)
            run.files.scalars({k: step_record[k] for k in ("loss", "lr", "images_per_sec")},
                              epoch * steps_per_epoch + step_record["batch"])

        try:
            stats = train_one_epoch(step, loader, epoch, cfg, device=device, steps_per_epoch=steps_per_epoch,
                                    start_batch=start_batch, dist=dist, log=log, on_checkpoint=checkpoint,
                                    totals=totals, stop_signal=stop_signal)
        finally:
            progress.close()
        set_phase(f"ending epoch {epoch} (evaluation, pictures)")
        skipped = all_reduce_sum(torch.tensor(float(loader.files_skipped), device=device))
        record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                  "files_skipped": round(skipped.item()), **after_epoch(epoch, step.model, stats)}
        # after the evaluation: its best accuracy so far is part of the state a resumed run continues
        checkpoint(epoch, 0, numbered=kept(epoch))
        run.files.append("log.txt", record)
        run.files.scalars(record, epoch)
        logger.info("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                     if isinstance(v, float)))
        return record

    record: dict = {}
    if start_epoch >= args.epochs:
        logger.warning("nothing to train: the run starts at epoch %d and --epochs is %d%s", start_epoch, args.epochs,
                       f" ({resume} finished it)" if resume else "")
    start = time.time()
    try:
        with stop_signals() as stop_signal:
            for epoch in range(start_epoch, args.epochs):
                # a signal during an epoch's last step: its end's checkpoint holds the position (the ranks agree)
                signalled = mean_and_any_signal(torch.zeros((), device=device), stop_signal())[1]
                if signalled:
                    raise StopRequested(signalled, epoch, start_batch)
                record = fit_epoch(epoch, start_batch, totals, stop_signal)
                start_batch, totals = 0, None
    except BaseException as e:
        if checkpointer and not is_process_group_failure(e):
            set_phase("finishing the checkpoint in flight")
            checkpointer.wait()  # the run ends with its last checkpoint complete
        raise
    logger.info("training time %.0fs", time.time() - start)
    if checkpointer:
        set_phase("finishing the last checkpoint")
        checkpointer.wait()
        barrier()  # every rank's part written; the others need not wait for the consolidation
        if dist.is_main and checkpointer.last:
            # the original's single file too: what its code, --finetune and other tools load
            single = os.path.join(args.output_dir, f"checkpoint-{args.epochs - 1}.pth")
            consolidate(checkpointer.last, single)
            logger.info("consolidated %s into %s", os.path.basename(checkpointer.last), single)
    return record
