"""``python -m fastmae.pretrain``: MAE pretraining, on one device or many (torchrun, or SLURM's srun).

With no arguments it pretrains the small ``mae_vit_tiny_patch4`` preset on the built-in shapes
dataset, on the CPU in a few minutes. The flags are the original ``main_pretrain.py``'s, with the
same meanings, plus fastmae's (backends, precision, checkpoints, data).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastmae.cli import add_common_args, add_sharding_args, cli_main, logger
from fastmae.config import AUTO, OPTIMIZERS, backend_flag, backend_names
from fastmae.presets import PRESETS

if TYPE_CHECKING:  # the heavy imports wait until the flags are parsed and checked
    import torch

    from fastmae.models import MaskedAutoencoderViT
    from fastmae.training import Run


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m fastmae.pretrain", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mae_vit_tiny_patch4", choices=sorted(PRESETS), metavar="MODEL",
                   help=f"preset: {', '.join(sorted(PRESETS))}")
    g.add_argument("--input_size", default=None, type=int, help="image size (default: the preset's)")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed, in [0, 1)")
    g.add_argument("--norm_pix_loss", action="store_true", help="regress per-patch normalized pixels")
    g.add_argument("--kernels", default=None, type=backend_flag("kernels"), choices=backend_names("kernels") + [AUTO],
                   help="kernel backend (default: $FASTMAE_KERNELS, else automatic)")
    g.add_argument("--norm", default=None, choices=backend_names("norm") + [AUTO],
                   help="LayerNorm implementation (default: $FASTMAE_NORM, else torch; apex only when named)")
    add_sharding_args(g)
    g.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS),
                   help="adamw: torch AdamW (fused, on CUDA and CPU); apex_adam / apex_lamb: apex's FusedAdam / FusedLAMB")
    g.add_argument("--vis_freq", default=20, type=int, help="reconstruction PNG every this many epochs (0: never)")
    add_common_args(p)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0 <= args.mask_ratio < 1:
        p.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")


@dataclass
class Pretraining:
    """What a pretraining run is made of (built by :func:`build`; :func:`main` trains it,
    ``python -m fastmae.profile`` profiles its step)."""

    run: Run
    model: MaskedAutoencoderViT
    loader: object
    optimizer: torch.optim.Optimizer
    step_mode: str
    mask_ratio: float

    def compute_loss(self, model, imgs, labels):
        return model(imgs, mask_ratio=self.mask_ratio)[0]


def build(args: argparse.Namespace) -> Pretraining:
    from fastmae import ops
    from fastmae.data import build_pretrain_loader
    from fastmae.data.nvjpeg_loader import crop_backend_for
    from fastmae.models import create_model
    from fastmae.optim import build_optimizer, param_groups_weight_decay
    from fastmae.training import Run, choose_step_mode

    run = Run(args, "pretrain")
    device, dist = run.device, run.dist
    model = create_model(args.model, norm_pix_loss=args.norm_pix_loss, norm_backend=args.norm,
                         kernel_backend=args.kernels, attention_backend=args.attention,
                         **({"img_size": args.input_size} if args.input_size else {}))
    args.input_size = model.patch_embed.img_size[0]
    model.len_keep(args.mask_ratio)  # a ratio that keeps no patch fails here, before any data is read
    model.set_grad_checkpointing(args.grad_checkpointing)
    run.prepare(model)
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
        builtin_size=args.builtin_size, pad_last_batch=args.pad_last_batch, crop_backend=crop_backend_for(kernels),
    )
    logger.info("data: %s via %s, %d steps per epoch per rank, %d ranks",
                args.data_path or "built-in shapes", type(loader).__name__, loader.steps_per_epoch, dist.world_size)
    warn_about_small_data(loader.num_samples, args.batch_size * dist.world_size, loader.steps_per_epoch,
                          args.warmup_epochs)
    # the loss draws its masks on the device: the step can be captured as a CUDA graph
    step_mode = choose_step_mode(args, run, compile_by_default=True, capturable_loss=True,
                                 fused_optimizer=args.optimizer == "adamw")
    optimizer, description = build_optimizer(
        args.optimizer, param_groups_weight_decay(model, args.weight_decay), run.lr(args), device,
        capturable=step_mode == "graphed",
    )
    logger.info("optimizer: %s", description)
    return Pretraining(run, model, loader, optimizer, step_mode, args.mask_ratio)


def warn_about_small_data(images: int, global_batch: int, steps_per_epoch: int, warmup_epochs: float) -> None:
    if images < global_batch:  # with --pad_last_batch (else no batch is whole: an error)
        logger.warning("the dataset holds %d images, fewer than one batch across the ranks (%d): every step "
                       "repeats images to fill its batch", images, global_batch)
    if steps_per_epoch == 1 and warmup_epochs > 0:
        logger.warning("one step per epoch: epoch 0 trains at lr 0 (the warmup starts from 0 at its first step)")


def main(args: argparse.Namespace) -> dict:
    from fastmae.flops import peak_flops, train_flops_per_image
    from fastmae.training import fit

    job = build(args)
    run, model, loader = job.run, job.model, job.loader
    flops, peak = train_flops_per_image(model, args.mask_ratio), peak_flops(run.device)
    vis_batch = []

    def after_epoch(epoch: int, train_model, stats: dict) -> dict:
        # sharded, every rank takes part in the forward (it gathers the weights); rank 0 saves
        if args.vis_freq and (epoch % args.vis_freq == 0 or epoch + 1 == args.epochs) and (run.dist.is_main or run.fsdp):
            from fastmae.visualize import reconstruction_grid, save_grid

            if not vis_batch:
                vis_batch.append(next(iter(loader))[0][:8].clone())  # not a view that keeps the batch
            grid = reconstruction_grid(model, vis_batch[0], args.mask_ratio)
            if run.dist.is_main:
                save_grid(grid, vis_batch[0].shape[-2], os.path.join(args.output_dir, f"reconstruction-{epoch}.png"))
        # model FLOPs utilization: the closed-form FLOPs of the images trained, against the GPUs' peak
        return {"mfu": stats["images_per_sec"] * flops / (peak * run.dist.world_size) if peak else None}

    return fit(run, args, model, job.optimizer, loader, job.compute_loss, step_mode=job.step_mode,
               after_epoch=after_epoch)


def cli(argv: list[str] | None = None) -> int:
    return cli_main(get_args_parser(), main, check_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
