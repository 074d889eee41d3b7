"""What the command lines share, importable without torch: the common flags and their checks, the
evaluation entry points' model flags, and ``cli_main``, which parses and checks the flags before it
imports anything heavy."""
from __future__ import annotations

import argparse
import logging
import math
import os
import traceback
from typing import Callable

from fastmae.config import AUTO, DATA_BACKENDS, PRECISIONS, backend_names, fsdp_precision_problem
from fastmae.presets import ENCODERS

logger = logging.getLogger("fastmae")


def add_common_args(p: argparse.ArgumentParser, **defaults) -> None:
    """The flags every entry point takes (the original's, with the same meanings, and fastmae's);
    ``defaults`` override the defaults per entry point."""
    g = p.add_argument_group("schedule")
    g.add_argument("--batch_size", default=64, type=int,
                   help="batch size per device; effective batch = batch_size * accum_iter * devices")
    g.add_argument("--epochs", default=10, type=int)
    g.add_argument("--accum_iter", default=1, type=int, help="gradient accumulation steps")
    g.add_argument("--weight_decay", default=0.05, type=float)
    g.add_argument("--lr", default=None, type=float, help="absolute lr (default: blr * effective batch / 256)")
    g.add_argument("--blr", default=1e-3, type=float, help="base lr, for an effective batch of 256")
    g.add_argument("--min_lr", default=0.0, type=float, help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", default=1, type=float, help="linear warmup epochs")
    g.add_argument("--clip_grad", default=None, type=float, help="clip the gradient norm to this")
    g.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="autocast dtype (fp16 adds a gradient scaler); default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (forward, backward; the fused optimizer step). "
                        "Default: on for pretraining on CUDA, else off")
    g.add_argument("--cuda_graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the compiled step as CUDA graphs (one launch per step). Default: on when "
                        "compiling pretraining on one CUDA device")
    g.add_argument("--attention", default=None, choices=backend_names("attention") + [AUTO],
                   help="attention backend (default: $FASTMAE_ATTENTION, else automatic)")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="image folder root; default: the built-in shapes dataset")
    g.add_argument("--builtin_size", default=5000, type=int,
                   help="images in the built-in shapes dataset (its validation set: a fifth of that)")
    g.add_argument("--data_backend", default="auto", choices=DATA_BACKENDS,
                   help="auto: DALI on CUDA when installed, else torchvision (fine-tuning with auto-augmentation and "
                   "timm: torchvision, for timm's); nvjpeg: JPEGs decoded and cropped on the GPU "
                   "without DALI; synthetic: random batches on the device")
    g.add_argument("--pad_last_batch", action="store_true",
                   help="repeat images to fill each rank's last batch of an epoch, instead of leaving it out as the "
                        "original does")
    g.add_argument("--skip_unreadable", action="store_true",
                   help="replace unreadable image files by readable ones (logged and counted) instead of stopping")
    g.add_argument("--num_workers", default=None, type=int,
                   help="DataLoader workers (torchvision) or DALI threads (default: 2 on CUDA; on a CPU, at most "
                        "the cores less one, the model's computation needing one)")
    g.add_argument("--pin_mem", action=argparse.BooleanOptionalAction, default=True,
                   help="pin host memory in the loader for faster transfers to the GPU")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="./output_dir", help="checkpoints, log.txt, log_steps.txt")
    g.add_argument("--log_dir", default=None, help="TensorBoard logs, when tensorboard is installed (default: output_dir)")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="", help="checkpoint to resume from, or 'auto': the newest in --output_dir")
    g.add_argument("--start_epoch", default=0, type=int)
    g.add_argument("--save_freq", default=20, type=int, help="keep checkpoint-EPOCH.pth every this many epochs (and the last)")
    g.add_argument("--checkpoint_steps", default=0, type=int,
                   help="also update checkpoint-last.pth every this many batches within an epoch (0: epoch ends only)")
    g.add_argument("--checkpoint_format", default="auto", choices=["auto", "full", "sharded"],
                   help="full: checkpoint-last.pth, one file that rank 0 writes; sharded: a checkpoint-*.dcp folder "
                   "that every rank writes its part of (torch.distributed.checkpoint), consolidated into "
                   "checkpoint-EPOCH.pth at the end; auto: sharded with --fsdp, else full")
    g.add_argument("--async_checkpoint", action="store_true",
                   help="sharded checkpoints written in the background while training goes on")
    g.add_argument("--print_freq", default=20, type=int, help="log record (and loss check) every this many batches")
    g.add_argument("--debug", action="store_true", help="on an error, the full traceback besides its one line")

    g = p.add_argument_group("the original's launch flags", "accepted so that its launch scripts run unchanged; "
                             "fastmae takes ranks from the launcher's environment (torchrun, srun)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="as --no-pin_mem")
    g.add_argument("--world_size", default=None, type=int, help="ignored: the launcher's WORLD_SIZE / SLURM_NTASKS")
    g.add_argument("--local_rank", "--local-rank", default=None, type=int, help="ignored: LOCAL_RANK / SLURM_LOCALID")
    g.add_argument("--dist_url", default="env://", help="only env:// (MASTER_ADDR, MASTER_PORT)")
    g.add_argument("--dist_eval", action="store_true", help="always on: every rank evaluates its share, each image once")
    g.add_argument("--dist_timeout", default=10.0, type=float,
                   help="minutes a collective waits for a rank before the run fails, naming the rank it waited for")
    p.set_defaults(**defaults)


def add_sharding_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--fsdp", action="store_true",
                   help="shard parameters, gradients and optimizer state across the ranks (FSDP2, one unit per block; "
                   "parameters gathered and gradients reduced in fp32, autocast casting as under DDP) instead of "
                   "replicating them (DDP): for models whose AdamW state does not fit beside them on one GPU")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute block activations in the backward (less memory, ~1/3 more compute)")


def check_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("batch_size", "epochs", "accum_iter", "save_freq", "print_freq"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "blr", "min_lr", "weight_decay", "warmup_epochs"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"--{name} must be a finite number, not negative, got {value}")
    if args.clip_grad is not None and not (math.isfinite(args.clip_grad) and args.clip_grad > 0):
        p.error(f"--clip_grad must be a finite positive number, got {args.clip_grad}")
    if args.input_size is not None and args.input_size < 1:
        p.error(f"--input_size must be at least 1 (or left out for the preset's), got {args.input_size}")
    if args.num_workers is not None and args.num_workers < 0:
        p.error(f"--num_workers must not be negative, got {args.num_workers}")
    if args.start_epoch < 0:
        p.error(f"--start_epoch must not be negative, got {args.start_epoch}")
    if args.checkpoint_steps < 0 or args.checkpoint_steps % args.accum_iter:
        p.error(f"--checkpoint_steps {args.checkpoint_steps}: checkpoints fall between optimizer steps, so it must be "
                f"0 or a positive multiple of --accum_iter {args.accum_iter}")
    fsdp = getattr(args, "fsdp", False)
    if args.checkpoint_format == "auto":
        args.checkpoint_format = "sharded" if fsdp else "full"
    if fsdp and args.checkpoint_format != "sharded":
        p.error("--fsdp writes sharded checkpoints (no rank holds the whole state): drop --checkpoint_format full")
    if args.async_checkpoint and args.checkpoint_format != "sharded":
        p.error("--async_checkpoint writes sharded checkpoints: add --checkpoint_format sharded (or --fsdp)")
    if fsdp and fsdp_precision_problem(args.precision):
        p.error(f"--fsdp: {fsdp_precision_problem(args.precision)}")
    if args.dist_url != "env://":
        p.error(f"--dist_url {args.dist_url}: fastmae meets its ranks through the environment (env://); "
                "launch with torchrun, or srun with MASTER_ADDR and MASTER_PORT exported")


def add_eval_args(p: argparse.ArgumentParser, *, global_pool: bool) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_tiny_patch4", choices=sorted(ENCODERS), help="the encoder's preset")
    g.add_argument("--input_size", default=None, type=int, help="image size (default: the preset's)")
    g.add_argument("--finetune", default="", help="pretrained checkpoint: fastmae's or the original's, full or encoder-only")
    g.add_argument("--global_pool", action="store_true", default=global_pool,
                   help="classify the average of the patch tokens (with fc_norm)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify the cls token instead")
    g.add_argument("--nb_classes", default=None, type=int, help="classes (default: the class folders' count)")
    g.add_argument("--eval", action="store_true", help="only evaluate the checkpoint given with --resume")


def cli_main(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], object],
             check: Callable[[argparse.ArgumentParser, argparse.Namespace], None], argv: list[str] | None) -> int:
    """Parse and check the flags, then (only then: ``--help`` and a bad flag answer without importing
    torch) run ``main``; errors a user can fix become one log line and exit status 1, a stop signal
    exits with 128 + the signal."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    check(parser, args)
    import torch

    from fastmae.distributed import cleanup, current_phase, is_process_group_failure, peers_report
    from fastmae.engine import StopRequested
    from fastmae.errors import FastMAEError
    from fastmae.training import release_output_dirs

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} was requested but no CUDA device is available")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        parser.error("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    try:
        main(args)
    except FastMAEError as e:  # what the user can fix: one line (anything else is a bug: its traceback)
        debug = args.debug or os.environ.get("FASTMAE_DEBUG", "") not in ("", "0")
        logger.error("error: %s%s", e, "" if debug else " (--debug or FASTMAE_DEBUG=1: the traceback)")
        if debug:
            logger.error("".join(traceback.format_exception(e)))
        return 1
    except StopRequested as e:
        logger.info("%s: the newest checkpoint in %s holds where it stood; --resume auto continues from there", e,
                    args.output_dir)
        return 128 + e.signum
    except torch.OutOfMemoryError as e:
        hint = ", or add --grad_checkpointing" if hasattr(args, "grad_checkpointing") else ""
        logger.error("error: out of memory at --batch_size %d (%s). Lower --batch_size and raise --accum_iter to "
                     "keep the effective batch%s.", args.batch_size, str(e).splitlines()[0], hint)
        return 1
    except Exception as e:
        if not is_process_group_failure(e):
            raise
        import torch.distributed as dist

        logger.error("error: rank %d lost the others while %s (%s). Last word from each rank, the furthest behind "
                     "first: %s", dist.get_rank(), current_phase(), str(e).strip().splitlines()[0][:300],
                     peers_report())
        return 1
    finally:
        cleanup()
        release_output_dirs()
    return 0
