"""Process groups for multi-GPU and multi-node runs: torchrun (``env://``) or SLURM's ``srun``.

Under torchrun, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set.
Under ``srun`` (one task per GPU), rank, world size and local rank come from ``SLURM_PROCID``,
``SLURM_NTASKS`` and ``SLURM_LOCALID``, as in the original; the rendezvous address is
``MASTER_ADDR`` when exported, else the job's first node (``scontrol show hostnames``).
NCCL on GPUs, gloo on CPUs.

A rank that dies or hangs is noticed in bounded time: collectives time out after ``--dist_timeout``
minutes, and each rank leaves word in the rendezvous store of what it is doing (:func:`set_phase`,
at every log record and checkpoint), so that the survivors can say which rank went silent, when,
and while doing what (:func:`peers_report`).
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastmae.errors import FastMAEError


class RendezvousError(FastMAEError, RuntimeError):
    """The ranks did not all meet: a launch problem the user can fix."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
            return out.stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            pass
    raise RendezvousError("under SLURM, export MASTER_ADDR (the first node's hostname) and MASTER_PORT before srun")


def launch_environment() -> DistInfo:
    """Rank, world size and local rank from torchrun's or SLURM's environment (one process if neither)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(device_type: str, timeout_minutes: float = 10.0) -> DistInfo:
    """Join the process group when launched with several processes; returns this process's place.
    A collective that waits longer than ``timeout_minutes`` for a rank fails."""
    info = launch_environment()
    if not info.enabled:
        return info
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    os.environ.setdefault("MASTER_PORT", "29500")
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    timeout = timedelta(minutes=timeout_minutes)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=info.rank, world_size=info.world_size, timeout=timeout))
    except dist.DistError as e:
        launcher = ("SLURM (SLURM_PROCID, SLURM_NTASKS): start the ranks with srun, one process per task, or "
                    "run a single process with SLURM_NTASKS unset" if "RANK" not in os.environ else
                    "torchrun's environment (RANK, WORLD_SIZE)")
        raise RendezvousError(f"rank {info.rank} of {info.world_size}: the ranks did not all meet at "
                              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within {timeout_minutes:g} "
                              f"minutes (--dist_timeout): the ranks come from {launcher} ({e})") from e
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # torchrun's agent keeps one store across restarts: without a prefix per attempt, a restarted
        # rank can read the address a dead rank of the previous attempt left there, and fail to connect
        store = dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=store,
                            rank=info.rank, world_size=info.world_size, timeout=timeout)
    set_phase("starting")
    return info


_phase = "starting"


def set_phase(what: str, tell: bool = True) -> None:
    """What this rank is doing now; ``tell``: also left in the rendezvous store for the others (a
    failed or hung rank is then named with its last word; the survivors tell theirs when they
    report). Nothing is sent without a process group."""
    global _phase
    _phase = what
    if tell and dist.is_available() and dist.is_initialized():
        try:
            dist.distributed_c10d._get_default_store().set(
                f"fastmae/phase/{dist.get_rank()}", json.dumps({"time": time.time(), "phase": what}))
        except Exception:  # the store is gone: the failure will say so
            pass


def current_phase() -> str:
    return _phase


def peers_report(timeout_seconds: float = 5.0) -> str:
    """Where every rank last said it was, oldest first: ``rank 1: training, epoch 0 batch 40 (93 s
    ago)``; the rank furthest behind is the one the others wait for. This rank tells its own first."""
    set_phase(_phase)
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=timeout_seconds))
        now, seen = time.time(), []
        for rank in range(dist.get_world_size()):
            try:
                word = json.loads(store.get(f"fastmae/phase/{rank}"))
                seen.append((word["time"], f"rank {rank}: {word['phase']} ({now - word['time']:.0f} s ago)"))
            except Exception:
                seen.append((0.0, f"rank {rank}: no word"))
        return "; ".join(line for _, line in sorted(seen))
    except Exception as e:  # under srun, rank 0 hosts the store: it may be the rank that died
        return f"the rendezvous store is unreachable ({type(e).__name__}), its host (rank 0, or torchrun's agent) is gone"


def is_process_group_failure(error: BaseException) -> bool:
    """A collective that failed because a rank died, hung or lost its network."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        hint in text for hint in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out"))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks (a copy; the input is untouched). Identity when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over the ranks (a copy; the input is untouched). Identity when not distributed."""
    return all_reduce_sum(t) / (dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1)


def all_gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group, once what the job no longer needs is freed: called in a
    ``finally``, it also frees the locals of the frames an exception in flight holds (its traceback
    still prints, without them)."""
    if dist.is_available() and dist.is_initialized():
        # The group must outlive every DDP wrapper: one freed after it leaves its reducer with the
        # group's last reference, and gloo's destructor then joins its worker threads holding the
        # GIL while a worker may need the GIL to free a tensor (a hang at exit, seen with torch
        # 2.11). So first the frames of an exception in flight, then reference cycles; a caller must
        # not keep a wrapper alive itself.
        error = sys.exc_info()[1]
        while error is not None:
            traceback.clear_frames(error.__traceback__)
            error = error.__cause__ or error.__context__
        gc.collect()
        dist.destroy_process_group()
