"""What fine-tuning and linear probing share: the classifier built around a pretrained encoder,
the labelled loaders, and the evaluation after every epoch."""
from __future__ import annotations

import argparse

from torch import nn

from fastmae.checkpoint import model_state_dict
from fastmae import ops
from fastmae.data import build_classification_loaders
from fastmae.data.nvjpeg_loader import crop_backend_for
from fastmae.engine import evaluate
from fastmae.errors import UsageError
from fastmae.models import ENCODERS, VisionTransformer, create_vit, load_encoder
from fastmae.training import Run, logger, resume_path


def build_data(args: argparse.Namespace, run: Run, train_mode: str):
    """``(train loader, validation loader, number of classes)`` at the model's input size."""
    input_size = args.input_size or ENCODERS[args.model].get("img_size", 224)
    crop_backend = None  # the nvjpeg loader's default
    if args.data_backend == "nvjpeg":  # (automatic selection never picks it)
        # its crop kernel: Triton's where the kernel backend (FASTMAE_KERNELS, else automatic) is; the
        # ViT itself uses no kernel backend, so one named that cannot run here only loses the choice
        try:
            crop_backend = crop_backend_for(ops.resolve("kernels", None, run.device.type))
        except ops.BackendUnavailableError as e:
            logger.warning("nvjpeg crop: the loader's default (%s)", e)
    train, val, classes = build_classification_loaders(
        data_path=args.data_path, train_mode=train_mode, backend=args.data_backend, input_size=input_size,
        batch_size=args.batch_size, device=run.device, rank=run.dist.rank, world_size=run.dist.world_size,
        seed=args.seed, num_workers=args.num_workers, pin_memory=args.pin_mem, skip_unreadable=args.skip_unreadable,
        pad_last_batch=args.pad_last_batch, **({"aa": args.aa, "color_jitter": args.color_jitter} if hasattr(args, "aa") else {}),
        builtin_size=args.builtin_size, crop_backend=crop_backend,
        **({"num_classes": args.nb_classes} if args.nb_classes else {}),
    )
    if args.nb_classes and args.nb_classes < len(classes) and args.data_backend != "synthetic":  # synthetic: labels < nb_classes
        raise UsageError(f"--nb_classes {args.nb_classes} is fewer than the {len(classes)} classes of "
                         f"{args.data_path or 'the built-in shapes'}: labels would fall outside the head")
    logger.info("data: %s, %d classes, %d training steps per epoch per rank", args.data_path or "built-in shapes",
                len(classes), train.steps_per_epoch)
    return train, val, args.nb_classes or len(classes)


def build_classifier(args: argparse.Namespace, num_classes: int, head_init_std: float, **kwargs) -> VisionTransformer:
    """The ViT of ``args.model`` with ``--finetune``'s encoder loaded (position embeddings
    interpolated to ``--input_size``) and the head initialized as the original: truncated normal
    with ``head_init_std``, zero bias."""
    model = create_vit(args.model, num_classes=num_classes, global_pool=args.global_pool,
                       attention_backend=args.attention,
                       **({"img_size": args.input_size} if args.input_size else {}), **kwargs)
    if args.finetune and not args.eval:
        load_encoder(model, args.finetune)
        logger.info("encoder from %s", args.finetune)
    elif not args.eval:
        logger.info("no --finetune checkpoint: the encoder is randomly initialized")
    nn.init.trunc_normal_(model.head.weight, std=head_init_std)
    nn.init.zeros_(model.head.bias)
    return model


class EpochEvaluation:
    """``fit``'s ``after_epoch``: top-1 / top-5 on the validation set, and the best top-1 so far."""

    def __init__(self, run: Run, model: nn.Module, val_loader):
        self.run, self.model, self.loader = run, model, val_loader
        self.best = 0.0

    def state_dict(self) -> dict:
        return {"max_accuracy": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["max_accuracy"]

    def __call__(self, epoch: int, train_model: nn.Module, stats: dict) -> dict:
        result = self.evaluate()
        self.best = max(self.best, result["acc1"])
        logger.info("epoch %d: top-1 %.2f%%, top-5 %.2f%% on %d images; best top-1 %.2f%%",
                    epoch, result["acc1"], result["acc5"], self.num_samples, self.best)
        return {f"test_{k}": v for k, v in result.items()} | {"max_accuracy": self.best}

    @property
    def num_samples(self) -> int:
        return self.loader.num_samples

    def evaluate(self) -> dict:
        return evaluate(self.model, self.loader, num_samples=self.num_samples, device=self.run.device,
                        dist=self.run.dist, autocast_dtype=self.run.autocast_dtype)


def evaluate_checkpoint(args: argparse.Namespace, run: Run, model: nn.Module, val_loader) -> dict:
    """``--eval``: the model of ``--resume`` on the validation set."""
    path = resume_path(args)
    if not path:
        raise UsageError(f"--eval needs the checkpoint to evaluate: --resume PATH, or auto with one in {args.output_dir}")
    model.load_state_dict(model_state_dict(path))
    result = EpochEvaluation(run, model, val_loader).evaluate()
    logger.info("accuracy of %s on %d images: top-1 %.2f%%, top-5 %.2f%%", path, val_loader.num_samples,
                result["acc1"], result["acc5"])
    return result


def log_parameters(model: nn.Module) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("parameters: %.2fM trainable of %.2fM", trainable / 1e6, total / 1e6)


__all__ = ["EpochEvaluation", "build_classifier", "build_data", "evaluate_checkpoint", "log_parameters"]
