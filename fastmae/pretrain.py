"""``python -m fastmae.pretrain``: MAE pretraining, on one device or many (torchrun, or SLURM's srun).

With no arguments it pretrains the small ``mae_vit_tiny_patch4`` preset on the built-in shapes
dataset, on the CPU in a few minutes. The flags are the original ``main_pretrain.py``'s, with the
same meanings, plus fastmae's (backends, precision, checkpoints, data).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time

import numpy as np
import torch

from fastmae import ops
from fastmae.checkpoint import (
    link_or_copy, newest_checkpoint, read_checkpoint, rng_state, save_checkpoint, set_rng_state,
)
from fastmae.data import DATA_BACKENDS, UnreadableImageError, build_pretrain_loader
from fastmae.distributed import DistInfo, all_gather_objects, barrier, cleanup, init_distributed
from fastmae.engine import NonFiniteLossError, Progress, StepConfig, train_one_epoch
from fastmae.flops import peak_flops, train_flops_per_image
from fastmae.models import PRESETS, create_model
from fastmae.optim import OPTIMIZERS, build_optimizer, param_groups_weight_decay

logger = logging.getLogger("fastmae")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m fastmae.pretrain", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch_size", default=64, type=int,
                   help="batch size per device; effective batch = batch_size * accum_iter * devices")
    p.add_argument("--epochs", default=10, type=int)
    p.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="mae_vit_tiny_patch4", choices=sorted(PRESETS), metavar="MODEL",
                   help=f"preset: {', '.join(sorted(PRESETS))}")
    g.add_argument("--input_size", default=None, type=int, help="image size (default: the preset's)")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed, in [0, 1)")
    g.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalized pixels")
    g.add_argument("--kernels", default=None, choices=ops.backend_names("kernels") + [ops.AUTO],
                   help="kernel backend (default: $FASTMAE_KERNELS, else automatic)")
    g.add_argument("--attention", default=None, choices=ops.backend_names("attention") + [ops.AUTO],
                   help="attention backend (default: $FASTMAE_ATTENTION, else automatic)")
    g.add_argument("--norm", default=None, choices=ops.backend_names("norm") + [ops.AUTO],
                   help="LayerNorm implementation (default: $FASTMAE_NORM, else apex when installed)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute block activations in the backward (less memory, ~1/3 more compute)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                   help="adamw: torch AdamW (fused on CUDA); apex_adam / apex_lamb: apex's FusedAdam / FusedLAMB")
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", default=1e-3, type=float, help="base lr, for an effective batch of 256")
    g.add_argument("--min_lr", default=0.0, type=float, help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", default=1, type=float, help="linear warmup epochs")
    g.add_argument("--clip_grad", default=None, type=float, help="clip the gradient norm to this")
    g.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="autocast dtype (fp16 adds a gradient scaler); default: bf16 on CUDA, fp32 on CPU")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None,
                   help="ImageFolder root (DIR/train if it exists, else DIR), or a folder of tar shards "
                        "(DALI); default: the built-in shapes dataset")
    g.add_argument("--data_backend", default="auto", choices=DATA_BACKENDS,
                   help="auto: DALI on CUDA when installed, else torchvision; synthetic: random batches on the device")
    g.add_argument("--skip_unreadable", action="store_true",
                   help="replace unreadable image files by readable ones (logged and counted) instead of stopping")
    g.add_argument("--num_workers", default=2, type=int, help="DataLoader workers (torchvision) or DALI threads")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="pin host memory in the loader for faster transfers to the GPU")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, reconstructions")
    g.add_argument("--log_dir", default=None, help="TensorBoard logs, when tensorboard is installed (default: output_dir)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto': the newest in --output_dir")
    g.add_argument("--start_epoch", default=0, type=int)
    g.add_argument("--save_freq", default=20, type=int, help="keep checkpoint-EPOCH.pth every this many epochs (and the last)")
    g.add_argument("--checkpoint_steps", default=0, type=int,
                   help="also update checkpoint-last.pth every this many batches within an epoch (0: epoch ends only)")
    g.add_argument("--print_freq", default=20, type=int, help="log record (and loss check) every this many batches")
    g.add_argument("--vis_freq", default=20, type=int, help="reconstruction PNG every this many epochs (0: never)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.mask_ratio < 1:
        p.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    for name in ("batch_size", "epochs", "accum_iter", "save_freq", "print_freq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} was requested but no CUDA device is available")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        p.error("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")


class RunFiles:
    """What rank 0 writes to ``output_dir``: ``log.txt`` (per epoch, the original's fields and more),
    ``log_steps.txt`` (every log record), checkpoints, reconstructions, TensorBoard scalars."""

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
                if isinstance(v, (int, float)) and v is not None:
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dist = init_distributed(device.type)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    if not dist.is_main:
        logger.setLevel(logging.WARNING)
    seed = args.seed + dist.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    files = RunFiles(args, dist)
    logger.info("args: %s", json.dumps(vars(args)))

    model = create_model(args.model, norm_pix_loss=args.norm_pix_loss, norm_backend=args.norm,
                         kernel_backend=args.kernels, attention_backend=args.attention,
                         **({"img_size": args.input_size} if args.input_size else {}))
    args.input_size = model.patch_embed.img_size[0]
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(device)
    # resolve now, so that a backend that cannot run fails before any data is read
    kernels = ops.resolve("kernels", args.kernels, device.type)
    attention = ops.resolve("attention", args.attention, device.type)
    logger.info("model %s: %.1fM parameters, kernels %s, attention %s, LayerNorm %s",
                args.model, sum(p.numel() for p in model.parameters()) / 1e6, kernels, attention,
                type(model.norm).__module__ + "." + type(model.norm).__name__)

    loader = build_pretrain_loader(
        backend=args.data_backend, data_path=args.data_path, input_size=args.input_size,
        batch_size=args.batch_size, device=device, rank=dist.rank, world_size=dist.world_size, seed=args.seed,
        num_workers=args.num_workers, pin_memory=args.pin_mem, skip_unreadable=args.skip_unreadable,
    )
    steps_per_epoch = len(loader)
    logger.info("data: %s via %s, %d steps per epoch per rank, %d ranks",
                args.data_path or "built-in shapes", type(loader).__name__, steps_per_epoch, dist.world_size)

    eff_batch_size = args.batch_size * args.accum_iter * dist.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    logger.info("base lr %.2e, actual lr %.2e, effective batch size %d", args.lr * 256 / eff_batch_size,
                args.lr, eff_batch_size)
    optimizer, description = build_optimizer(
        args.optimizer, param_groups_weight_decay(model, args.weight_decay), args.lr, device.type
    )
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    logger.info("optimizer: %s; precision: %s", description, precision)

    start_epoch, start_batch = args.start_epoch, 0
    resume = newest_checkpoint(args.output_dir) if args.resume == "auto" else args.resume
    if args.resume == "auto" and resume is None:
        logger.info("--resume auto: no checkpoint in %s, starting afresh", args.output_dir)
    if resume:
        start_epoch, start_batch = load_training_state(resume, model, optimizer, scaler, dist, device)

    # the step runs the distributed / compiled module; checkpoints hold the plain one's state dict
    train_model = model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    flops = train_flops_per_image(model, args.mask_ratio)
    peak = peak_flops(device)
    cfg = StepConfig(mask_ratio=args.mask_ratio, accum_iter=args.accum_iter, autocast_dtype=PRECISIONS[precision],
                     schedule=dict(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs),
                     clip_grad=args.clip_grad, print_freq=args.print_freq, checkpoint_steps=args.checkpoint_steps)

    def checkpoint(epoch: int, next_batch: int, numbered: bool = False) -> None:
        # every rank's random state, so that a resumed run draws the same masks
        rngs = all_gather_objects({k: v.cpu() for k, v in rng_state(device).items()})
        if dist.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler else None,
                     "epoch": epoch if next_batch == 0 else epoch - 1,  # the original's: last finished epoch
                     "data_position": {"epoch": epoch + 1 if next_batch == 0 else epoch, "batch": next_batch},
                     "args": args, "rng": rngs, "world_size": dist.world_size}
            last = os.path.join(args.output_dir, "checkpoint-last.pth")
            if numbered:
                path = os.path.join(args.output_dir, f"checkpoint-{epoch}.pth")
                save_checkpoint(state, path)
                link_or_copy(path, last)
            else:
                save_checkpoint(state, last)
        barrier()

    stats: dict = {}
    vis_batch = None
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch, start_batch)
        progress = Progress(dist.is_main, epoch, steps_per_epoch, start_batch, logger.info)

        def log(record, epoch=epoch):
            progress(record)
            files.append("log_steps.txt", record)
            files.scalars({k: record[k] for k in ("loss", "lr", "images_per_sec")},
                          epoch * steps_per_epoch + record["batch"])

        stats = train_one_epoch(train_model, loader, optimizer, epoch, cfg, device=device,
                                steps_per_epoch=steps_per_epoch, start_batch=start_batch, scaler=scaler,
                                dist=dist, log=log, on_checkpoint=checkpoint)
        progress.close()
        start_batch = 0
        checkpoint(epoch, 0, numbered=epoch % args.save_freq == 0 or epoch + 1 == args.epochs)
        record = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                  "mfu": stats["images_per_sec"] * flops / (peak * dist.world_size) if peak else None,
                  "files_skipped": loader.files_skipped}
        files.append("log.txt", record)
        files.scalars(record, epoch)
        logger.info("epoch %d: loss %.4f, %.0f images/s%s", epoch, stats["loss"], stats["images_per_sec"],
                    f", MFU {record['mfu']:.1%}" if record["mfu"] is not None else "")
        if args.vis_freq and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs) and dist.is_main:
            from fastmae.visualize import save_reconstructions

            vis_batch = vis_batch if vis_batch is not None else next(iter(loader))[0][:8]
            save_reconstructions(model, vis_batch, args.mask_ratio,
                                 os.path.join(args.output_dir, f"reconstruction-{epoch}.png"))
    logger.info("training time %.0fs", time.time() - start)
    return stats


def load_training_state(path, model, optimizer, scaler, dist: DistInfo, device) -> tuple[int, int]:
    """Restore a checkpoint (fastmae's, or the original's); returns where training continues
    (epoch, batch)."""
    ckpt = read_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    if "optimizer" in ckpt and "epoch" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    position = ckpt.get("data_position") or {"epoch": ckpt.get("epoch", -1) + 1, "batch": 0}
    rngs = ckpt.get("rng")
    if rngs and ckpt.get("world_size") == dist.world_size:
        set_rng_state(rngs[dist.rank], device)
    elif rngs:
        logger.warning("checkpoint from %s ranks, resuming on %s: masks will differ from an uninterrupted run",
                       ckpt.get("world_size"), dist.world_size)
    logger.info("resumed from %s at epoch %d, batch %d", path, position["epoch"], position["batch"])
    return position["epoch"], position["batch"]


def cli(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        main(args)
    except (NonFiniteLossError, ops.BackendUnavailableError, FileNotFoundError, UnreadableImageError, ValueError) as e:
        logger.error("error: %s", e)
        return 1
    except torch.OutOfMemoryError as e:
        logger.error("error: out of memory at --batch_size %d (%s). Lower --batch_size and raise --accum_iter to "
                     "keep the effective batch, or add --grad_checkpointing.", args.batch_size, str(e).splitlines()[0])
        return 1
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
