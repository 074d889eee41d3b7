"""``python -m fastmae.finetune``: fine-tune a pretrained MAE encoder end to end (or its last blocks:
``--finetune_blocks``), with the original ``main_finetune.py``'s recipe and flags: layer-wise lr
decay, drop path, RandAugment, random erasing, mixup / cutmix with label smoothing, AdamW, warmup +
cosine; top-1 / top-5 on the validation set after every epoch.

With no arguments it fine-tunes a randomly initialized ``vit_tiny_patch4`` on the built-in shapes
dataset (pass ``--finetune output_dir/checkpoint-9.pth`` to start from ``python -m fastmae.pretrain``'s).
"""
from __future__ import annotations

import argparse
import math
import sys

from fastmae.cli import add_common_args, add_eval_args, add_sharding_args, cli_main, logger
from fastmae.config import FINETUNE_AA
from fastmae.errors import UsageError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m fastmae.finetune", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_eval_args(p, global_pool=True)
    g = p.add_argument_group("fine-tuning recipe", "the original's main_finetune.py flags; with timm installed its "
                             "transform, RandomErasing and Mixup, as the original's")
    g.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate (ViT-L: 0.2, ViT-H: 0.3)")
    g.add_argument("--layer_decay", default=0.75, type=float, help="layer-wise lr decay (ViT-B: 0.65)")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--color_jitter", default=None, type=float,
                   help="color jitter factor (timm applies it only without --aa, as the original)")
    g.add_argument("--aa", default=FINETUNE_AA,
                   help="auto-augmentation policy (timm's syntax, e.g. rand-m9-mstd0.5-inc1), or none")
    g.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    g.add_argument("--remode", default="pixel", help="random erasing mode (pixel, rand, const)")
    g.add_argument("--recount", default=1, type=int, help="random erasing count")
    g.add_argument("--resplit", action="store_true", help="accepted as the original's; unused there too")
    g.add_argument("--mixup", default=0.8, type=float, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", default=1.0, type=float, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio (overrides alpha, enables cutmix)")
    g.add_argument("--mixup_prob", default=1.0, type=float, help="probability of mixup or cutmix per batch or element")
    g.add_argument("--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix over mixup when both are on")
    g.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"],
                   help="mixup parameters per batch, pair or element")
    g.add_argument("--finetune_blocks", default=None, type=int,
                   help="partial fine-tuning: train only the last k blocks (and the norm and head)")
    add_sharding_args(p.add_argument_group("memory"))
    add_common_args(p, epochs=10, warmup_epochs=1, min_lr=1e-6, output_dir="./output_dir_finetune")
    return p


# the recipe's numbers and their ranges (each a rate, a probability or a Beta distribution's alpha)
RECIPE_RANGES = {"drop_path": (0, 1), "layer_decay": (0, 1), "smoothing": (0, 1), "reprob": (0, 1),
                 "mixup_prob": (0, 1), "mixup_switch_prob": (0, 1), "mixup": (0, math.inf), "cutmix": (0, math.inf)}


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.finetune_blocks is not None and args.finetune_blocks < 0:
        p.error(f"--finetune_blocks must be at least 0, got {args.finetune_blocks}")
    for name, (low, high) in RECIPE_RANGES.items():
        value = getattr(args, name)
        if not low <= value <= high or math.isinf(value):
            p.error(f"--{name} must be a number from {low} to {high:g}, got {value}")
    if args.recount < 1:
        p.error(f"--recount must be at least 1, got {args.recount}")


def freeze_all_but_last_blocks(model, k: int) -> None:
    """Partial fine-tuning (the paper's Fig. 9): the last ``k`` blocks, the final norm and the
    head train; the embeddings and the earlier blocks are frozen."""
    if k > len(model.blocks):
        raise UsageError(f"--finetune_blocks {k}: the model has {len(model.blocks)} blocks")
    trainable = {f"blocks.{i}." for i in range(len(model.blocks) - k, len(model.blocks))} | {"norm.", "fc_norm.", "head."}
    for name, param in model.named_parameters():
        param.requires_grad = any(name.startswith(prefix) for prefix in trainable)


def main(args: argparse.Namespace) -> dict:
    import torch.nn.functional as F

    from fastmae.data.augment import build_mixup, build_random_erasing, soft_target_cross_entropy, timm_available
    from fastmae.data.dali_loader import DaliLoader
    from fastmae.evaluation import EpochEvaluation, build_classifier, build_data, evaluate_checkpoint, log_parameters
    from fastmae.optim import build_optimizer, param_groups_lrd
    from fastmae.training import Run, choose_step_mode, fit

    run = Run(args, "finetune")
    augmented = args.aa != "none" or args.color_jitter is not None
    train_loader, val_loader, num_classes = build_data(args, run, "train_randaug" if augmented else "train")
    model = build_classifier(args, num_classes, head_init_std=2e-5, drop_path_rate=args.drop_path)
    if args.eval:
        return evaluate_checkpoint(args, run, model.to(run.device), val_loader)
    if args.finetune_blocks is not None:
        freeze_all_but_last_blocks(model, args.finetune_blocks)
    model.set_grad_checkpointing(args.grad_checkpointing)
    run.prepare(model)
    log_parameters(model)

    groups = param_groups_lrd(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                              layer_decay=args.layer_decay)
    optimizer, description = build_optimizer("adamw", groups, run.lr(args), run.device, betas=(0.9, 0.999))
    logger.info("optimizer: %s", description)
    erase = build_random_erasing(args.reprob, args.remode, args.recount, run.device)
    mix = build_mixup(num_classes, args.mixup, args.cutmix, args.smoothing, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode)
    if not augmented:
        augmentation = "RandomResizedCrop and flip (--aa none)"
    elif isinstance(train_loader, DaliLoader):
        augmentation = "DALI's RandAugment (without magnitude noise)"
    elif timm_available():
        augmentation = "timm's, as the original"
    else:
        augmentation = "torchvision's (timm is not installed: RandAugment without magnitude noise)"
    logger.info("augmentation: %s; mixup %s, cutmix %s, label smoothing %s, random erasing %s (%s, count %d), "
                "drop path %s, layer decay %s", augmentation,
                args.mixup, args.cutmix, args.smoothing, args.reprob, args.remode, args.recount, args.drop_path,
                args.layer_decay)

    def compute_loss(m, imgs, labels):
        if erase is not None:
            imgs = erase(imgs)
        if mix is not None:
            imgs, target = mix(imgs, labels)
            return soft_target_cross_entropy(m(imgs), target)
        return F.cross_entropy(m(imgs).float(), labels, label_smoothing=args.smoothing)

    return fit(run, args, model, optimizer, train_loader, compute_loss,
               step_mode=choose_step_mode(args, run, compile_by_default=False, capturable_loss=False), after_epoch=EpochEvaluation(run, model, val_loader))


def cli(argv: list[str] | None = None) -> int:
    return cli_main(get_args_parser(), main, check_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
