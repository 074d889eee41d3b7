"""Process groups for multi-GPU and multi-node runs: torchrun (``env://``) or SLURM's ``srun``.

Under torchrun, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set.
Under ``srun`` (one task per GPU), rank, world size and local rank come from ``SLURM_PROCID``,
``SLURM_NTASKS`` and ``SLURM_LOCALID``, as in the original; the rendezvous address is
``MASTER_ADDR`` when exported, else the job's first node (``scontrol show hostnames``).
NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    raise RuntimeError("under SLURM, export MASTER_ADDR (the first node's hostname) and MASTER_PORT before srun")


def launch_environment() -> DistInfo:
    """Rank, world size and local rank from torchrun's or SLURM's environment (one process if neither)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched with several processes; returns this process's place."""
    info = launch_environment()
    if not info.enabled:
        return info
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    os.environ.setdefault("MASTER_PORT", "29500")
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://",
                            rank=info.rank, world_size=info.world_size)
    return info


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
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
