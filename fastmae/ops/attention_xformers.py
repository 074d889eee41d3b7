"""The ``xformers`` attention backend: ``xformers.ops.memory_efficient_attention`` (CUDA only).

xformers picks its kernel per input (FlashAttention, CUTLASS); it is imported here only when installed.
"""
from __future__ import annotations

import torch

try:
    import xformers.ops as xops

    _IMPORT_ERROR = None
except Exception as e:  # ImportError, or a broken build
    xops = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def unavailable_reasons(device_type: str) -> list[str]:
    if xops is None:
        return [f"xformers is not installed (pip install 'fastmae[xformers]'; {_IMPORT_ERROR})"]
    if device_type != "cuda":
        return ["xformers' memory-efficient attention runs on CUDA only"]
    return []


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, heads, N, Dh] <-> xformers' [B, N, heads, Dh]: transposes are views. q, k, v are slices of
    # one qkv projection laid out [B, N, 3, heads, Dh], so no copy is made, and the output comes back
    # contiguous in the [B, N, heads * Dh] order that the projection after attention reads.
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
