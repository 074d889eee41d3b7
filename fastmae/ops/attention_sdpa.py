"""The ``sdpa`` attention backends: ``torch.nn.functional.scaled_dot_product_attention``.

``sdpa`` lets PyTorch pick its kernel per input (flash, memory-efficient, cuDNN, math); ``sdpa_flash``,
``sdpa_efficient`` and ``sdpa_cudnn`` pin one kernel (an input it cannot take is an error from
PyTorch listing why). A pinned call switches PyTorch's per-kernel flags around itself, as
``torch.nn.attention.sdpa_kernel`` does, without that context manager's bookkeeping (tens of
microseconds of host time per call).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_ONLY = ("efficient", "cudnn")  # PyTorch has CPU kernels for math and flash only


def unavailable_reasons(device_type: str, kernel: str | None = None) -> list[str]:
    if kernel in CUDA_ONLY and device_type != "cuda":
        return [f"PyTorch's {kernel} attention kernel runs on CUDA only"]
    if kernel == "cudnn" and not torch.backends.cudnn.is_available():
        return ["cuDNN is not available"]
    return []


# what a pinned kernel takes on CUDA (on the CPU, PyTorch's flash kernel takes every floating dtype)
HALF_ONLY = ("flash", "cudnn")


def limited_ops(kernel: str | None = None) -> dict[str, tuple[str, ...]]:
    """The ops whose inputs a pinned kernel may refuse, with the dims it reads (none: the dtypes)."""
    return {"attention": ()} if kernel in HALF_ONLY else {}


def not_supported_reasons(op: str, inputs, kernel: str | None = None) -> list[str]:
    if kernel in HALF_ONLY and inputs.device_type == "cuda":
        wrong = {str(d).removeprefix("torch.") for d in inputs.dtypes.values()} - {"float16", "bfloat16"}
        if wrong:
            return [f"PyTorch's {kernel} attention kernel takes float16 or bfloat16 on CUDA, got {', '.join(sorted(wrong))} "
                    "(train under bf16 autocast, or use sdpa)"]
    return []


# PyTorch's flag of each SDPA kernel, (getter, setter), and the flag of each kernel that can be pinned
_FLAGS = {name: (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"))
          for name in ("cudnn", "flash", "mem_efficient", "math", "overrideable")
          if hasattr(torch._C, f"_set_sdp_use_{name}") and hasattr(torch._C, f"_get_{name}_sdp_enabled")}
KERNELS = {"flash": "flash", "efficient": "mem_efficient", "cudnn": "cudnn"}
PINNED = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v)
    if torch.compiler.is_compiling():  # the context manager that torch.compile traces
        with sdpa_kernel([getattr(SDPBackend, PINNED[kernel])]):
            return F.scaled_dot_product_attention(q, k, v)
    previous = [(setter, getter()) for getter, setter in _FLAGS.values()]
    for name, (_, setter) in _FLAGS.items():
        setter(name == KERNELS[kernel])
    try:
        return F.scaled_dot_product_attention(q, k, v)
    finally:
        for setter, enabled in previous:
            setter(enabled)
