"""``python -m fastmae.linprobe``: linear probing of a pretrained MAE encoder, as the original
``main_linprobe.py``: the encoder frozen, a ``BatchNorm1d(affine=False, eps=1e-6)`` + linear head on
its cls token (``--global_pool`` for the average of the patch tokens), LARS, large batches (use
``--accum_iter``), warmup + cosine; top-1 / top-5 on the validation set after every epoch.

With no arguments it probes a randomly initialized ``vit_tiny_patch4`` on the built-in shapes dataset
(pass ``--finetune output_dir/checkpoint-9.pth`` to probe ``python -m fastmae.pretrain``'s encoder).
"""
from __future__ import annotations

import argparse
import sys

from fastmae.cli import add_common_args, add_eval_args, cli_main


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m fastmae.linprobe", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_eval_args(p, global_pool=False)
    add_common_args(p, batch_size=256, epochs=10, blr=0.1, weight_decay=0.0, warmup_epochs=1,
                    output_dir="./output_dir_linprobe")
    return p


def main(args: argparse.Namespace) -> dict:
    import torch.nn.functional as F
    from torch import nn

    from fastmae.evaluation import EpochEvaluation, build_classifier, build_data, evaluate_checkpoint, log_parameters
    from fastmae.optim import LARS
    from fastmae.training import Run, choose_step_mode, fit

    run = Run(args, "linprobe")
    train_loader, val_loader, num_classes = build_data(args, run, "probe")
    model = build_classifier(args, num_classes, head_init_std=0.01)
    # the probe: batch statistics normalize the frozen features before the linear layer
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    model.to(run.device)
    if args.eval:
        return evaluate_checkpoint(args, run, model, val_loader)
    log_parameters(model)
    optimizer = LARS(model.head.parameters(), lr=run.lr(args), weight_decay=args.weight_decay)

    def compute_loss(m, imgs, labels):
        return F.cross_entropy(m(imgs).float(), labels)

    return fit(run, args, model, optimizer, train_loader, compute_loss,
               step_mode=choose_step_mode(args, run, compile_by_default=False, capturable_loss=True,
                                                 fused_optimizer=False),
               after_epoch=EpochEvaluation(run, model, val_loader))


def cli(argv: list[str] | None = None) -> int:
    return cli_main(get_args_parser(), main, lambda p, args: None, argv)


if __name__ == "__main__":
    sys.exit(cli())
