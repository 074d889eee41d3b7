"""Loading MAE / ViT checkpoints: fastmae's own and the original implementation's, unchanged."""
from __future__ import annotations

import argparse
import glob
import io
import logging
import math
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from fastmae.errors import FastMAEError, MissingPathError, UsageError
from fastmae.interop import from_hugging_face, is_hugging_face, read_hugging_face

logger = logging.getLogger("fastmae")


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` found: keys the model has but the checkpoint lacks, and keys
    the checkpoint has but the model lacks (both by name)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


class UnreadableCheckpointError(FastMAEError, ValueError):
    """A checkpoint file that cannot be loaded (empty, truncated, not a checkpoint); the message
    starts with its path."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` on the CPU, with tensors only plus the ``argparse.Namespace`` that the
    original's checkpoints carry under ``args``; a Hugging Face model folder or ``.safetensors`` file
    gives its weights under ``model`` (:mod:`fastmae.interop`). A file that is not a readable
    checkpoint raises :class:`UnreadableCheckpointError` naming it."""
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path)
    if os.path.isdir(path) or os.fspath(path).endswith(".safetensors"):  # a Hugging Face model
        return {"model": read_hugging_face(os.fspath(path))}
    if not os.path.isfile(path):
        raise MissingPathError(f"checkpoint not found: {path}")
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
        raise UsageError("checkpoint holds no state dict (expected tensors, or a dict with a 'model' entry)")
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
            raise UsageError(
                f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
            )
    result = LoadResult(
        missing_keys=[k for k in own if k not in state],
        unexpected_keys=[k for k in state if k not in own],
    )
    if strict and (result.missing_keys or result.unexpected_keys):
        raise UsageError(f"checkpoint does not match the model: missing {_some(result.missing_keys)}; "
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
    """Temporary checkpoint files, and sharded checkpoints without their metadata, left by runs
    that were killed while saving (call with the output folder's lock held: no live run is
    writing them)."""
    for tmp in glob.glob(os.path.join(output_dir, "checkpoint-*.pth.*tmp")):
        os.remove(tmp)
    for folder in glob.glob(os.path.join(output_dir, "checkpoint-*" + SHARDED_SUFFIX)):
        if not is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _replace_durably(tmp: str, path: str | os.PathLike) -> None:
    # the rename is atomic, and fsync of the folder makes it survive a crash of the node
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


KINDS = ("pretrain", "finetune", "linprobe")


def peek_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path`` with its tensors mapped, not read (cheap for multi-GB files; a
    sharded one's model weights are ``meta`` tensors of their shapes); a file that is not a
    readable checkpoint raises :class:`UnreadableCheckpointError`."""
    if is_sharded_checkpoint(path):
        return peek_sharded_checkpoint(path)
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
    """The checkpoints in ``output_dir``, the most recently completed first: ``checkpoint-*.pth``
    files (``checkpoint-last.pth``, fastmae's latest state, before a numbered file that is its hard
    link) and complete sharded checkpoints (``checkpoint-*.dcp`` folders with their metadata)."""
    last = os.path.join(output_dir, "checkpoint-last.pth")
    files = sorted(glob.glob(os.path.join(output_dir, "checkpoint-*.pth")), key=lambda f: f != last)
    folders = [d for d in glob.glob(os.path.join(output_dir, "checkpoint-*" + SHARDED_SUFFIX)) if is_complete(d)]
    # sorted() is stable: of two with one time, a sharded checkpoint comes before its consolidated
    # copy, and checkpoint-last.pth before its numbered link
    candidates = sorted(folders + files, key=_completion_time, reverse=True)
    found, seen = [], set()
    for path in candidates:
        inode = os.stat(path).st_ino
        if inode not in seen:
            seen.add(inode)
            found.append(path)
    return found


def _completion_time(path: str) -> int:
    return os.stat(os.path.join(path, METADATA) if os.path.isdir(path) else path).st_mtime_ns


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


# -- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------------
# A folder per checkpoint, each rank writing its shards in parallel: {"model": ..., "optimizer": ...
# (keyed by parameter name, as get_state_dict gives it), "trainer": the other entries of a
# single-file checkpoint (epoch, data position, every rank's random state, args), pickled}.
# DCP renames .metadata into place once every rank's part is written: a folder without it is one
# that a kill cut short, and is never loaded.

SHARDED_SUFFIX = ".dcp"
METADATA = ".metadata"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and (os.fspath(path).endswith(SHARDED_SUFFIX) or is_complete(path))


def is_complete(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


def sharded_name(epoch: int, next_batch: int) -> str:
    """``checkpoint-EPOCH.dcp`` at the end of an epoch (as ``checkpoint-EPOCH.pth``), else
    ``checkpoint-EPOCH-BATCH.dcp`` (continuing at ``BATCH`` of ``EPOCH``); a save at a position
    whose folder exists writes ``...N.dcp`` (:meth:`ShardedCheckpointer.save`)."""
    return f"checkpoint-{epoch}{f'-{next_batch}' if next_batch else ''}{SHARDED_SUFFIX}"


def sharded_position(name: str) -> tuple[int, int] | None:
    """``(epoch, next batch)`` of a sharded checkpoint's folder name (:func:`sharded_name`'s, with
    or without its ``.N``); None for another name."""
    found = re.fullmatch(r"checkpoint-(\d+)(?:-(\d+))?(?:\.\d+)?" + re.escape(SHARDED_SUFFIX), name)
    return (int(found[1]), int(found[2] or 0)) if found else None


def pack_trainer(entries: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(entries), buffer)
    return buffer.getvalue()


def unpack_trainer(blob: bytes) -> dict[str, Any]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _read_without_process_group(path: str | os.PathLike, keys: set[str] | None = None) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not is_complete(path):
        raise UnreadableCheckpointError(f"{path}: a sharded checkpoint without its {METADATA} (cut short while "
                                        "being written)")
    state: dict[str, Any] = {}
    try:
        # the planner rebuilds the saved structure from the metadata (dcp_to_torch_save's way)
        _load_state_dict(state, storage_reader=FileSystemReader(os.fspath(path)),
                         planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnreadableCheckpointError(f"{path}: not a readable sharded checkpoint ({type(e).__name__}: "
                                        f"{reason})") from e
    return state


def _trainer_of(path, state: Mapping[str, Any]) -> dict[str, Any]:
    if "trainer" not in state:
        raise UnreadableCheckpointError(f"{path}: a torch.distributed.checkpoint folder, but not fastmae's (no "
                                        "trainer entry: epoch, data position, args)")
    try:
        return unpack_trainer(state["trainer"])
    except Exception as e:
        raise UnreadableCheckpointError(f"{path}: its trainer entry does not load ({type(e).__name__}: {e})") from e


def read_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint whole, in one process, in the single-file checkpoints' layout (the
    original's: the optimizer's state keyed by parameter index)."""
    state = _read_without_process_group(path)
    return {**_trainer_of(path, state), "model": state["model"],
            "optimizer": optimizer_state_by_index(state["optimizer"])}


def peek_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint's trainer entries, with its model weights as ``meta`` tensors of their
    shapes (read from the metadata) and ``sharded`` True."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    trainer = _trainer_of(path, _read_without_process_group(path, keys={"trainer"}))
    entries = FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    shapes = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
              for key, meta in entries.items() if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    return {**trainer, "model": shapes, "sharded": True}


def optimizer_state_by_index(state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (``get_optimizer_state_dict``'s) keyed by
    index instead (``Optimizer.state_dict``'s, the original checkpoints')."""
    order = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def optimizer_state_by_name(state: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_index`; ``names``: the parameters' names in the
    optimizer's order."""
    saved = sum(len(group["params"]) for group in state["param_groups"])
    if saved != len(names) or len(state["param_groups"]) == 0:
        raise UsageError(f"the checkpoint's optimizer holds {saved} parameters in {len(state['param_groups'])} "
                         f"groups; this model's optimizer has {len(names)}")
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in ``model``, in the optimizer's order."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class ShardedCheckpointer:
    """Writes sharded checkpoints into ``output_dir``, every rank its own part, at most one write in
    flight. ``asynchronous``: :meth:`save` returns once the state is copied to host memory, and
    the files are written while training goes on (on a process group of its own: gloo, which
    the writing thread may use beside the training's collectives). When a checkpoint is complete,
    rank 0 removes the ones it supersedes: mid-epoch ones, those of its own position, and the
    epoch ends that ``kept(epoch)`` does not keep."""

    def __init__(self, output_dir: str, *, asynchronous: bool, is_main: bool, kept: Callable[[int], bool]):
        import torch.distributed as dist

        self.output_dir, self.asynchronous, self.is_main, self.kept = output_dir, asynchronous, is_main, kept
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None
        if not dist.is_initialized():
            # said on every save (from the writing thread too), although one process is what we ask for
            warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        self.pending: tuple[Any, str] | None = None
        self.last: str | None = None  # the newest complete checkpoint this run wrote

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: Mapping[str, Any], name: str) -> None:
        import torch.distributed.checkpoint as dcp

        self.wait()
        path = self._fresh_path(name)
        state = {**sharded_state(model, optimizer), "trainer": pack_trainer(trainer)}
        no_dist = not torch.distributed.is_initialized()  # one process: it writes the whole state
        if self.asynchronous:
            self.pending = (dcp.async_save(state, checkpoint_id=path, process_group=self.group, no_dist=no_dist), path)
        else:
            dcp.save(state, checkpoint_id=path, no_dist=no_dist)
            self._completed(path)

    def _fresh_path(self, name: str) -> str:
        """``name`` in the output folder, or ``STEM.N.dcp`` if a folder of that name exists (one a
        resumed run started from): a checkpoint is never written over, so a kill mid-write leaves
        the one before whole. Rank 0 decides (the ranks must agree on one folder)."""
        import torch.distributed as dist

        stem, path, n = name[: -len(SHARDED_SUFFIX)], os.path.join(self.output_dir, name), 0
        while os.path.exists(path):
            n += 1
            path = os.path.join(self.output_dir, f"{stem}.{n}{SHARDED_SUFFIX}")
        if dist.is_initialized():
            chosen = [path]
            dist.broadcast_object_list(chosen, src=0, group=self.group)
            path = chosen[0]
        return path

    def wait(self) -> None:
        """Wait for the write in flight, if any."""
        if self.pending is None:
            return
        future, path = self.pending
        self.pending = None
        future.result()
        self._completed(path)

    def _completed(self, path: str) -> None:
        self.last = path
        if not self.is_main:
            return
        # torch.distributed.checkpoint fsyncs the files but renames the metadata into place without
        # an fsync of the folder: make the new checkpoint survive a crash before the older ones go
        for folder in (path, self.output_dir):
            _fsync(folder)
        position = sharded_position(os.path.basename(path))
        for other in glob.glob(os.path.join(self.output_dir, "checkpoint-*" + SHARDED_SUFFIX)):
            theirs = sharded_position(os.path.basename(other))
            if other == path or theirs is None:
                continue
            epoch, next_batch = theirs
            if theirs == position or next_batch or not self.kept(epoch):
                shutil.rmtree(other, ignore_errors=True)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model", "optimizer"}`` as ``torch.distributed.checkpoint`` saves and loads them: this
    rank's shards (an FSDP model's DTensors; a replicated model's tensors, written once)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def consolidate(path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write the sharded checkpoint ``path`` as one file ``out`` in the original's layout
    (``model``, ``optimizer`` keyed by index, ``epoch``, ``args``, ... ): what the original code,
    ``--finetune`` and ``--resume`` load. ``out`` is dated as ``path`` completed, so that ``--resume
    auto`` takes the sharded original (each rank reading its shards) over the copy (read whole)."""
    save_checkpoint(read_sharded_checkpoint(path), out)
    completed = os.stat(os.path.join(path, METADATA))
    os.utime(out, ns=(completed.st_atime_ns, completed.st_mtime_ns))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m fastmae.checkpoint", description="Checkpoint tools.")
    commands = p.add_subparsers(dest="command", required=True)
    c = commands.add_parser("consolidate", help="a sharded checkpoint (a checkpoint-*.dcp folder) as one .pth file in "
                            "the original's layout, in one process")
    c.add_argument("checkpoint", help="the checkpoint-*.dcp folder")
    c.add_argument("out", help="the .pth file to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not is_sharded_checkpoint(args.checkpoint):
        p.error(f"{args.checkpoint} is not a sharded checkpoint (a folder with a {METADATA} file)")
    try:
        consolidate(args.checkpoint, args.out)
    except (UnreadableCheckpointError, OSError) as e:
        logger.error("error: %s", e)
        return 1
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
