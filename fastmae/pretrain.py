"""``python -m fastmae.pretrain``: MAE pretraining.

With no arguments it pretrains the small ``mae_vit_tiny_patch4`` preset on the built-in shapes
dataset, on the CPU in a few minutes. The flags are the original ``main_pretrain.py``'s, with the
same meanings.
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
from fastmae.checkpoint import read_checkpoint, save_checkpoint
from fastmae.data import DATA_BACKENDS, UnreadableImageError, build_pretrain_loader
from fastmae.engine import NonFiniteLossError, train_one_epoch
from fastmae.models import PRESETS, create_model
from fastmae.optim import OPTIMIZERS, build_optimizer, param_groups_weight_decay

logger = logging.getLogger("fastmae")


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

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                   help="adamw: torch AdamW (fused on CUDA); apex_adam / apex_lamb: apex's FusedAdam / FusedLAMB")
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", default=1e-3, type=float, help="base lr, for an effective batch of 256")
    g.add_argument("--min_lr", default=0.0, type=float, help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", default=1, type=float, help="linear warmup epochs")

    g = p.add_argument_group("data and run")
    g.add_argument("--data_path", default=None,
                   help="ImageFolder root (DIR/train if it exists, else DIR), or a folder of tar shards "
                        "(DALI); default: the built-in shapes dataset")
    g.add_argument("--data_backend", default="auto", choices=DATA_BACKENDS,
                   help="auto: DALI on CUDA when installed, else torchvision; synthetic: random batches on the device")
    g.add_argument("--skip_unreadable", action="store_true",
                   help="replace unreadable image files by readable ones (logged and counted) instead of stopping")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints and log.txt")
    g.add_argument("--log_dir", default=None, help="TensorBoard logs, when tensorboard is installed (default: output_dir)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint to resume from")
    g.add_argument("--start_epoch", default=0, type=int)
    g.add_argument("--num_workers", default=2, type=int, help="DataLoader workers (torchvision) or DALI threads")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="pin host memory in the loader for faster transfers to the GPU")
    g.add_argument("--save_freq", default=20, type=int, help="save checkpoint-EPOCH.pth every this many epochs (and the last)")
    g.add_argument("--print_freq", default=20, type=int, help="progress line every this many steps")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.mask_ratio < 1:
        p.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    for name in ("batch_size", "epochs", "accum_iter", "save_freq", "print_freq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} was requested but no CUDA device is available")


def open_tensorboard(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed: no TensorBoard logs (log.txt has the same figures)")
        return None
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    logger.info("args: %s", json.dumps(vars(args)))

    model = create_model(args.model, norm_pix_loss=args.norm_pix_loss, norm_backend=args.norm,
                         kernel_backend=args.kernels, attention_backend=args.attention,
                         **({"img_size": args.input_size} if args.input_size else {}))
    args.input_size = model.patch_embed.img_size[0]
    model.to(device)
    # resolve now, so that a backend that cannot run fails before any data is read
    kernels = ops.resolve("kernels", args.kernels, device.type)
    attention = ops.resolve("attention", args.attention, device.type)
    logger.info("model %s: %.1fM parameters, kernels %s, attention %s, LayerNorm %s",
                args.model, sum(p.numel() for p in model.parameters()) / 1e6, kernels, attention,
                type(model.norm).__module__ + "." + type(model.norm).__name__)

    loader = build_pretrain_loader(
        backend=args.data_backend, data_path=args.data_path, input_size=args.input_size,
        batch_size=args.batch_size, device=device, seed=args.seed, num_workers=args.num_workers,
        pin_memory=args.pin_mem, skip_unreadable=args.skip_unreadable,
    )
    logger.info("data: %s via %s, %d steps per epoch",
                args.data_path or "built-in shapes", type(loader).__name__, len(loader))

    eff_batch_size = args.batch_size * args.accum_iter
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    logger.info("base lr %.2e, actual lr %.2e, effective batch size %d", args.lr * 256 / eff_batch_size,
                args.lr, eff_batch_size)

    optimizer, description = build_optimizer(
        args.optimizer, param_groups_weight_decay(model, args.weight_decay), args.lr, device.type
    )
    logger.info("optimizer: %s", description)
    if args.resume:
        ckpt = read_checkpoint(args.resume)
        model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt and "epoch" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            args.start_epoch = ckpt["epoch"] + 1
        logger.info("resumed from %s, starting at epoch %d", args.resume, args.start_epoch)

    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    # the training step runs the compiled module; checkpoints hold the plain one's state dict
    train_model = torch.compile(model) if args.compile else model
    writer = open_tensorboard(args.log_dir or args.output_dir)
    schedule = dict(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs)
    stats: dict = {}
    start = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        loader.set_epoch(epoch)
        stats = train_one_epoch(
            train_model, loader, optimizer, epoch, steps_per_epoch=len(loader), device=device,
            mask_ratio=args.mask_ratio, accum_iter=args.accum_iter, schedule=schedule,
            autocast_dtype=autocast_dtype, print_freq=args.print_freq, log=logger.info,
        )
        if epoch % args.save_freq == 0 or epoch + 1 == args.epochs:
            save_checkpoint(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "args": args},
                os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"),
            )
        log_stats = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch,
                     "files_skipped": loader.files_skipped}
        with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(log_stats) + "\n")
        if writer is not None:
            for k, v in stats.items():
                writer.add_scalar(f"train/{k}", v, epoch)
            writer.flush()
    logger.info("training time %.0fs", time.time() - start)
    return stats


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
    return 0


if __name__ == "__main__":
    sys.exit(cli())
