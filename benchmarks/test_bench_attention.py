"""Attention backends at MAE's encoder and decoder shapes: forward + backward time and peak memory.

The encoder attends over the visible tokens only (1 + L/4), the decoder over all 1 + L; bf16 on a
GPU (fp32 and a small batch on a CPU).

    pytest benchmarks/test_bench_attention.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, measure
from fastmae import ops
from fastmae.ops.registry import BACKENDS

BATCH = 256 if ON_GPU else 4
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# name: (heads, tokens, head dim)
SHAPES = {
    "vit_b16_encoder": (12, 50, 64),
    "vit_l16_encoder": (16, 50, 64),
    "vit_h14_encoder": (16, 65, 80),
    "decoder_l196": (16, 197, 32),
    "decoder_l256": (16, 257, 32),
}
PROVIDERS = [
    pytest.param(b.name, marks=[pytest.mark.skip(reason="; ".join(r))] if (r := b.unavailable_reasons(DEVICE.type)) else [])
    for b in BACKENDS["attention"]
]


def peak_memory_mib(fn) -> float | None:
    """Peak memory the call adds over what was allocated before it."""
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention(benchmark, shape, provider):
    heads, n, head_dim = SHAPES[shape]
    q, k, v = (torch.randn(BATCH, heads, n, head_dim, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    dy = torch.randn_like(q)

    def fwd_bwd():
        out = ops.attention(q, k, v, backend=provider)
        return torch.autograd.grad(out, (q, k, v), dy)

    try:
        fwd_bwd()
    except RuntimeError as e:  # a pinned kernel that does not take these inputs
        pytest.skip(f"{provider}: {str(e).splitlines()[0]}")
    memory = peak_memory_mib(fwd_bwd)
    seconds = measure(benchmark, fwd_bwd, op="attention", provider=provider, mode="fwd+bwd", preset=shape,
                      shape=[BATCH, heads, n, head_dim], dtype=str(DTYPE), peak_memory_mib=memory)
    # forward 4*B*H*N^2*Dh, backward 2x that (flash recomputes more; counted as the model's FLOPs)
    flops = 3 * 4 * BATCH * heads * n * n * head_dim
    benchmark.extra_info.update(tflops=flops / seconds / 1e12)
