"""The ``math`` attention backend: explicit ``softmax(q k^T / sqrt(d)) v``, the reference."""
from __future__ import annotations

import torch


def unavailable_reasons(device_type: str) -> list[str]:
    return []


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return attn @ v
