"""One training epoch and one evaluation pass, for every entry point: the learning-rate schedule,
logs and checkpoints around the training step (:mod:`fastmae.step`), and no host-device
synchronization except where a log line or a checkpoint is due."""
from __future__ import annotations

import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from fastmae.distributed import DistInfo, all_reduce_mean, all_reduce_sum, set_phase
from fastmae.errors import FastMAEError
from fastmae.optim import lr_at, set_lr
from fastmae.step import TrainStep


class NonFiniteLossError(FastMAEError, RuntimeError):
    """The loss, or the weights an update left, went NaN or infinite: the run stops without
    overwriting its last checkpoint."""


@torch.no_grad()
def check_finite_weights(model: nn.Module, epoch: int, next_batch: int) -> None:
    """Raise :class:`NonFiniteLossError` on every rank if any rank's weights (its shards, under
    FSDP) hold a NaN or an infinity: an update can break them with a finite loss (a non-finite
    gradient), which the loss check before the checkpoint does not see. One collective and one
    read, at checkpoints only."""
    names, tensors = zip(*((n, p.to_local() if hasattr(p, "to_local") else p) for n, p in model.named_parameters()))
    bad = torch.stack([~torch.isfinite(t).all() for t in tensors])
    if all_reduce_sum(bad.sum().float()).item() > 0:
        mine = [n for n, b in zip(names, bad.tolist()) if b]
        where = f"at epoch {epoch}, batch {next_batch}" if next_batch else f"at the end of epoch {epoch}"
        raise NonFiniteLossError(
            f"the last update left weights that are not finite {where} "
            f"({', '.join(mine[:3]) + (', ...' if len(mine) > 3 else '') if mine else 'on another rank'}); stopping "
            f"without writing a checkpoint. The last checkpoint in the output folder was written before this and is "
            f"intact: lower the lr (--blr), set --clip_grad, or use --precision bf16 instead of fp16."
        )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what asks a run to stop: SLURM's preemption, scancel, sbatch --signal


class StopRequested(Exception):
    """Training stopped at a signal (SIGTERM, SIGUSR1), after a checkpoint of where it stood."""

    def __init__(self, signum: int, epoch: int, batch: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch}, batch {batch}")
        self.signum, self.epoch, self.batch = signum, epoch, batch


@dataclass
class EpochConfig:
    """How the epoch loop runs its steps.

    Args:
        schedule: ``lr_at``'s keyword arguments (lr, min_lr, warmup_epochs, epochs).
        print_freq: a log line (and the one host-device sync) every this many batches.
        checkpoint_steps: call ``on_checkpoint`` every this many batches (0: never mid-epoch).
    """

    schedule: dict
    print_freq: int = 20
    checkpoint_steps: int = 0


def train_one_epoch(
    step: TrainStep,
    loader: Iterable,
    epoch: int,
    cfg: EpochConfig,
    *,
    device: torch.device,
    steps_per_epoch: int,
    start_batch: int = 0,
    dist: DistInfo = DistInfo(),
    log: Callable[[dict], None] = lambda record: None,
    on_checkpoint: Callable[[int, int, dict], None] = lambda epoch, next_batch, totals: None,
    totals: dict | None = None,
    stop_signal: Callable[[], int] = lambda: 0,
) -> dict:
    """Train on ``loader`` (already positioned at ``start_batch`` of ``epoch``) with ``step``
    (forward, backward, and an update every ``step.accum_iter`` batches).

    ``log`` receives a record ``{epoch, batch, loss, lr, images_per_sec, eta_seconds, eta_run_seconds}``
    every ``print_freq`` batches (loss averaged over the batches since the last record and over the
    ranks; the time left in the epoch and in the run); a non-finite loss raises
    :class:`NonFiniteLossError` there, and before every checkpoint, so that no checkpoint is written
    after the loss went bad (``fit``'s checkpoints check the weights too: :func:`check_finite_weights`).
    ``on_checkpoint(epoch, next_batch, totals)`` gets the epoch's running sums, which a run resumed
    mid-epoch passes back as ``totals``, so that its epoch means are the uninterrupted run's. ``stop_signal()``: a signal number once one asked the run to stop (else 0);
    the epoch then stops at the next optimizer step, after a checkpoint, with :class:`StopRequested`
    (with several ranks, the ranks agree on it at a log record, all stopping at the same step).
    Returns the epoch's mean loss and lr (the original's ``train_loss``, ``train_lr``), its images/s
    (all ranks; the batches since a resume only) and the peak GPU memory.
    """
    step.model.train()
    accum = step.accum_iter
    totals = totals or {"loss_sum": 0.0, "lr_sum": 0.0, "batches": 0}
    loss_sum = torch.full((), totals["loss_sum"], device=device)
    window_sum = torch.zeros((), device=device)
    window = images = window_images = 0
    lr, lr_sum = 0.0, totals["lr_sum"]
    epochs = cfg.schedule["epochs"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = window_start = time.perf_counter()
    step.discard_gradients()
    batch = start_batch - 1
    stopping = 0  # the signal that stops the epoch at its next optimizer step
    for batch, (imgs, labels) in enumerate(loader, start=start_batch):
        if batch % accum == 0:
            lr = lr_at(epoch + batch / steps_per_epoch, **cfg.schedule)
            set_lr(step.optimizer, lr)
        lr_sum += lr
        update = (batch + 1) % accum == 0
        last = batch + 1 == steps_per_epoch
        set_phase(f"training, epoch {epoch} batch {batch + 1}", tell=False)  # told at the log records
        # an incomplete accumulation at the epoch's end is reduced, then discarded (below)
        loss = step(imgs, labels, update, reduce=update or last)
        loss_sum += loss
        window_sum += loss
        window += 1
        images += imgs.shape[0]
        window_images += imgs.shape[0]
        if not dist.enabled:  # one process: no rank to agree with
            stopping = stopping or stop_signal()
        checkpoint_due = cfg.checkpoint_steps and (batch + 1) % cfg.checkpoint_steps == 0 and update and not last
        if (batch + 1) % cfg.print_freq == 0 or last or checkpoint_due or (stopping and update and not last):
            # the sync point: the loss since the last record, and whether any rank was asked to stop
            set_phase(f"training, epoch {epoch} batch {batch + 1}")
            value, signalled = mean_and_any_signal(window_sum / window, stop_signal())
            stopping = stopping or signalled
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at epoch {epoch}, batch {batch}; stopping. The last checkpoint in the "
                    f"output folder was written before this and is intact: lower the lr (--blr), set "
                    f"--clip_grad, or use --precision bf16 instead of fp16."
                )
            now = time.perf_counter()
            seconds_per_step = (now - window_start) / window
            left = steps_per_epoch - batch - 1
            log({"epoch": epoch, "batch": batch + 1, "loss": value, "lr": lr,
                 "images_per_sec": window_images * dist.world_size / (now - window_start),
                 "eta_seconds": left * seconds_per_step,
                 "eta_run_seconds": (left + max(epochs - epoch - 1, 0) * steps_per_epoch) * seconds_per_step})
            window_sum.zero_()
            window = window_images = 0
            window_start = now
        # a stop decided at this record (or before, for one process) is after the loss was checked
        stop_now = bool(stopping) and update and not last
        if checkpoint_due or stop_now:
            on_checkpoint(epoch, batch + 1, {"loss_sum": all_reduce_mean(loss_sum).item(), "lr_sum": lr_sum,
                                             "batches": totals["batches"] + batch + 1 - start_batch})
        if stop_now:
            raise StopRequested(stopping, epoch, batch + 1)
    if batch < start_batch:
        raise RuntimeError(f"the data loader yielded no batches from batch {start_batch} of epoch {epoch} "
                           f"(the loader has {steps_per_epoch} per epoch)")
    if (batch + 1) % accum:
        # an incomplete accumulation at the end of the epoch is dropped, as in the original
        step.discard_gradients()
    done = totals["batches"] + batch + 1 - start_batch
    return {
        "loss": all_reduce_mean(loss_sum / done).item(),
        "lr": lr_sum / done,
        "images_per_sec": images * dist.world_size / (time.perf_counter() - start),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def mean_and_any_signal(value: torch.Tensor, signum: int) -> tuple[float, int]:
    """``(value's mean over the ranks, the stop signal a rank got, else 0)``: one collective, one
    read (SIGTERM where ranks got different ones)."""
    got = torch.tensor([float(signum == s) for s in STOP_SIGNALS], device=value.device)
    mean, *shares = all_reduce_mean(torch.cat([value.float().reshape(1), got])).tolist()
    return mean, next((s for s, share in zip(STOP_SIGNALS, shares) if share > 0), 0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, num_samples: int, device: torch.device, dist: DistInfo = DistInfo(),
             autocast_dtype: torch.dtype | None = None) -> dict:
    """Top-1 / top-5 accuracy (%) and cross-entropy over ``num_samples`` images, each counted once:
    the loader deals sample ``j`` of this rank's shard from global position ``j * world + rank``
    (or where its ``sample_positions`` says: DALI's tar shards), and the positions past the end
    (padding) are left out."""
    model.eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1, top-5, count
    seen = 0
    for imgs, labels in loader:
        with autocast:
            logits = model(imgs).float()
        if hasattr(loader, "sample_positions"):
            position = loader.sample_positions(seen, len(labels), device)
        else:
            position = (seen + torch.arange(len(labels), device=device)) * dist.world_size + dist.rank
        seen += len(labels)
        valid = (position < num_samples).double()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        totals += torch.stack([
            (nn.functional.cross_entropy(logits, labels, reduction="none").double() * valid).sum(),
            (top5[:, 0].double() * valid).sum(), (top5.any(dim=1).double() * valid).sum(), valid.sum(),
        ])
    totals = all_reduce_sum(totals)
    loss, acc1, acc5, count = totals.tolist()
    return {"loss": loss / count, "acc1": 100 * acc1 / count, "acc5": 100 * acc5 / count, "images": round(count)}


class Progress:
    """What rank 0 shows: a tqdm bar on a terminal (loss, lr, images/s at each log record), else
    one line per log record (batch jobs, files)."""

    def __init__(self, enabled: bool, epoch: int, total: int, initial: int, line: Callable[[str], None]):
        self.line, self.bar = line, None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", dynamic_ncols=True)
        self.enabled, self.total, self.last_batch = enabled, total, initial

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        rate = record["images_per_sec"]
        run_eta = _duration(record["eta_run_seconds"])
        if self.bar is not None:
            self.bar.update(record["batch"] - self.last_batch)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{rate:.0f}",
                                 run_eta=run_eta)
        else:
            self.line(f"Epoch [{record['epoch']}] [{record['batch']}/{self.total}] loss {record['loss']:.4f} "
                      f"lr {record['lr']:.3e} {rate:.0f} images/s eta {_duration(record['eta_seconds'])} "
                      f"(run {run_eta})")
        self.last_batch = record["batch"]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
