"""The ``sdpa`` attention backend: ``torch.nn.functional.scaled_dot_product_attention``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unavailable_reasons(device_type: str) -> list[str]:
    return []


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)
