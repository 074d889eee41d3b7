"""The ``sdpa`` attention backends: ``torch.nn.functional.scaled_dot_product_attention``.

``sdpa`` lets PyTorch pick its kernel per input (flash, memory-efficient, cuDNN, math); ``sdpa_flash``,
``sdpa_efficient`` and ``sdpa_cudnn`` pin one kernel (an input it cannot take is an error from
PyTorch listing why).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
CUDA_ONLY = ("efficient", "cudnn")  # PyTorch has CPU kernels for math and flash only


def unavailable_reasons(device_type: str, kernel: str | None = None) -> list[str]:
    if kernel in CUDA_ONLY and device_type != "cuda":
        return [f"PyTorch's {kernel} attention kernel runs on CUDA only"]
    if kernel == "cudnn" and not torch.backends.cudnn.is_available():
        return ["cuDNN is not available"]
    return []


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel([KERNELS[kernel]]):
        return F.scaled_dot_product_attention(q, k, v)
