"""One pretraining epoch."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from torch import nn

from fastmae.optim import lr_at, set_lr


class NonFiniteLossError(RuntimeError):
    pass


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    *,
    steps_per_epoch: int,
    device: torch.device,
    mask_ratio: float,
    accum_iter: int,
    schedule: dict,
    autocast_dtype: torch.dtype | None = None,
    print_freq: int = 20,
    log: Callable[[str], None] = print,
) -> dict:
    """Train for one pass over ``loader``; returns the epoch's mean loss and learning rate (the
    original's ``train_loss``, ``train_lr``) and its images/s.

    The loss stays on the device and is read (one host-device sync) only every ``print_freq``
    steps, where a non-finite value stops training with :class:`NonFiniteLossError`.
    ``schedule`` holds ``lr_at``'s keyword arguments (lr, min_lr, warmup_epochs, epochs).
    """
    model.train()
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    )
    loss_sum = torch.zeros((), device=device)
    window_sum = torch.zeros((), device=device)
    window_steps = images = window_images = 0
    lr = lr_sum = 0.0
    start = window_start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    step = -1
    for step, (imgs, _) in enumerate(loader):
        if step % accum_iter == 0:
            lr = lr_at(epoch + step / steps_per_epoch, **schedule)
            set_lr(optimizer, lr)
        lr_sum += lr
        imgs = imgs.to(device, non_blocking=True)
        with autocast:
            loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        (loss / accum_iter).backward()
        if (step + 1) % accum_iter == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        loss = loss.detach()
        loss_sum += loss
        window_sum += loss
        window_steps += 1
        images += imgs.shape[0]
        window_images += imgs.shape[0]
        if (step + 1) % print_freq == 0 or step + 1 == steps_per_epoch:
            value = (window_sum / window_steps).item()
            if not math.isfinite(value):
                raise NonFiniteLossError(f"loss is {value} at epoch {epoch} step {step}; stopping training")
            now = time.perf_counter()
            rate = window_images / (now - window_start)
            eta = (steps_per_epoch - step - 1) * imgs.shape[0] / rate
            log(
                f"Epoch [{epoch}] [{step + 1}/{steps_per_epoch}] loss {value:.4f} lr {lr:.3e} "
                f"{rate:.0f} images/s eta {eta:.0f}s"
            )
            window_sum.zero_()
            window_steps = window_images = 0
            window_start = now
    if step < 0:
        raise RuntimeError("the data loader yielded no batches (is the dataset smaller than one batch?)")
    if (step + 1) % accum_iter:
        # an incomplete accumulation at the end of the epoch is dropped, as in the original
        optimizer.zero_grad(set_to_none=True)
    loss_mean = (loss_sum / (step + 1)).item()
    if not math.isfinite(loss_mean):
        raise NonFiniteLossError(f"loss is {loss_mean} at the end of epoch {epoch}; stopping training")
    return {"loss": loss_mean, "lr": lr_sum / (step + 1), "images_per_sec": images / (time.perf_counter() - start)}
