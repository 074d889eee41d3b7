"""Loading MAE / ViT checkpoints: fastmae's own and the original implementation's, unchanged."""
from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from fastmae.interop import from_hugging_face, is_hugging_face, read_hugging_face

logger = logging.getLogger("fastmae")


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` found: keys the model has but the checkpoint lacks, and keys
    the checkpoint has but the model lacks (both by name)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that cannot be loaded (empty, truncated, not a checkpoint); the message
    starts with its path."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` on the CPU, with tensors only plus the ``argparse.Namespace`` that the
    original's checkpoints carry under ``args``; a Hugging Face model folder or ``.safetensors`` file
    gives its weights under ``model`` (:mod:`fastmae.interop`). A file that is not a readable
    checkpoint raises :class:`UnreadableCheckpointError` naming it."""
    if os.path.isdir(path) or os.fspath(path).endswith(".safetensors"):  # a Hugging Face model
        return {"model": read_hugging_face(os.fspath(path))}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise UnreadableCheckpointError(f"{path}: an empty file, not a checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unpickling refused, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from e


def model_state_dict(checkpoint: str | os.PathLike | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint: a path or a dict, ``{'model': state_dict, ...}`` or a
    bare state dict; a ``module.`` prefix (DistributedDataParallel) is removed."""
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("checkpoint holds no state dict (expected tensors, or a dict with a 'model' entry)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if is_hugging_face(state):
        state = from_hugging_face(state)
    return dict(state)


def _some(keys: list[str], shown: int = 6) -> str:
    return f"{len(keys)} keys" + (f" ({', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''})" if keys else "")


def load_checkpoint(
    model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], *, strict: bool = False
) -> LoadResult:
    """Load weights into ``model`` from a path or a (state) dict.

    Full checkpoints and encoder-only ones (the released ``mae_pretrain_vit_*.pth``) both load; what
    does not match is reported by name in the result and in the log (and raises with ``strict``).
    A shape mismatch is always an error naming the key and both shapes.
    """
    state = model_state_dict(checkpoint)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
            )
    result = LoadResult(
        missing_keys=[k for k in own if k not in state],
        unexpected_keys=[k for k in state if k not in own],
    )
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(f"checkpoint does not match the model: missing {_some(result.missing_keys)}; "
                         f"unexpected {_some(result.unexpected_keys)}")
    model.load_state_dict(state, strict=False)
    if result.missing_keys:
        logger.warning("checkpoint lacks %d keys (left as initialized): %s",
                       len(result.missing_keys), ", ".join(result.missing_keys))
    if result.unexpected_keys:
        logger.warning("checkpoint has %d keys the model does not use: %s",
                       len(result.unexpected_keys), ", ".join(result.unexpected_keys))
    return result


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then rename: a kill
    during the save, or a node crash after it, leaves any previous file at ``path`` intact."""
    tmp = _temporary_name(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _replace_durably(tmp, path)


def _temporary_name(path: str | os.PathLike) -> str:
    # this process's own: two writers never rename each other's file
    return f"{os.fspath(path)}.{os.getpid()}.tmp"


def remove_stale_temporaries(output_dir: str | os.PathLike) -> None:
    """Temporary checkpoint files left by runs that were killed while saving (call with the output
    folder's lock held: no live run is writing them)."""
    for tmp in glob.glob(os.path.join(output_dir, "checkpoint-*.pth.*tmp")):
        os.remove(tmp)


def _replace_durably(tmp: str, path: str | os.PathLike) -> None:
    # the rename is atomic, and fsync of the folder makes it survive a crash of the node
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


KINDS = ("pretrain", "finetune", "linprobe")


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` with its tensors mapped, not read (cheap for multi-GB files); a
    file that is not a readable checkpoint raises :class:`UnreadableCheckpointError`."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one), or unreadable: read_checkpoint says why
        return read_checkpoint(path)


def checkpoint_kind(path: str | os.PathLike) -> str:
    """What a checkpoint was trained for: its ``kind`` entry (fastmae writes one), else what its
    weights say (an MAE decoder: ``pretrain``; a linear-probe head, BatchNorm then Linear:
    ``linprobe``; a classifier head: ``finetune``; an encoder alone: ``encoder``). Reads the
    tensors' metadata only."""
    ckpt = peek_checkpoint(path)
    if isinstance(ckpt, Mapping) and ckpt.get("kind") in KINDS:
        return ckpt["kind"]
    keys = set(model_state_dict(ckpt))
    if "decoder_pred.weight" in keys:
        return "pretrain"
    if "head.1.weight" in keys or "head.0.running_mean" in keys:
        return "linprobe"
    return "finetune" if "head.weight" in keys else "encoder"


def checkpoints_newest_first(output_dir: str | os.PathLike) -> list[str]:
    """``checkpoint-last.pth`` (the latest state of a fastmae run), then the other
    ``checkpoint-*.pth`` (numbered ones, the original's) from the most recently written; a file
    that is another's hard link is listed once."""
    last = os.path.join(output_dir, "checkpoint-last.pth")
    others = sorted((f for f in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")) if f != last),
                    key=os.path.getmtime, reverse=True)
    found, seen = [], set()
    for path in ([last] if os.path.isfile(last) else []) + others:
        inode = os.stat(path).st_ino
        if inode not in seen:
            seen.add(inode)
            found.append(path)
    return found


def newest_readable_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest checkpoint in ``output_dir`` that loads (an unreadable one, e.g. cut short by a
    full disk, is passed over with a warning naming it), else None."""
    for path in checkpoints_newest_first(output_dir):
        try:
            peek_checkpoint(path)
            return path
        except UnreadableCheckpointError as e:
            logger.warning("passing over %s; trying the one before it", e)
    return None


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link, else a copy), replacing it atomically."""
    tmp = _temporary_name(dst)
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    _replace_durably(tmp, dst)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random state a training step draws from: torch's CPU generator and the device's (masking
    noise comes from it), and Python's and NumPy's (timm's Mixup and RandomErasing draw there, in
    fine-tuning); data order and the loader's augmentation are seeded per epoch and sample. As
    tensors, so that checkpoints load with ``weights_only``."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"cpu": torch.get_rng_state(),
             "python": torch.tensor([version, *keys], dtype=torch.int64),
             "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
             "numpy": torch.tensor([np_pos, np_has_gauss, *np_keys.astype(np.int64)], dtype=torch.int64),
             "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64)}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "python" in state:  # checkpoints from before fastmae saved them have none
        version, *keys = state["python"].tolist()
        gauss = state["python_gauss"].item()
        random.setstate((version, tuple(keys), None if math.isnan(gauss) else gauss))
        pos, has_gauss, *np_keys = state["numpy"].tolist()
        np.random.set_state(("MT19937", np.array(np_keys, dtype=np.uint32), pos, has_gauss,
                             state["numpy_gauss"].item()))
