"""A full training step (forward, backward, optimizer) with fastmae's automatic backends (the fastest
available: Triton kernels, else the native ones; xformers, else SDPA; each result records which) against
the all-reference one (torch kernels, math attention), same batch, bf16 autocast on a GPU: images/s,
model FLOPs utilization and peak memory, for each preset. Set FASTMAE_BENCH_COMPILE=1 to add
torch.compile to the fast configuration (several minutes of compilation per preset).

    pytest benchmarks/test_bench_e2e.py --benchmark-only
"""
from __future__ import annotations

import os

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, measure, peak_memory_gib, training_step
from fastmae import ops
from fastmae.flops import peak_flops, train_flops_per_image
from fastmae.models import create_model
from fastmae.optim import build_optimizer, param_groups_weight_decay

# batch per step: large enough that the GPU's work, not the host's kernel launches, sets the time
PRESETS = ({"mae_vit_base_patch16": 512, "mae_vit_large_patch16": 256, "mae_vit_huge_patch14": 128}
           if ON_GPU else {"mae_vit_tiny_patch4": 64})
COMPILE = os.environ.get("FASTMAE_BENCH_COMPILE") == "1"
CONFIGS = {
    "fastmae": dict(kernel_backend=None, attention_backend=None),  # the automatic choices (recorded)
    "reference": dict(kernel_backend="torch", attention_backend="math"),
}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_step(benchmark, preset, config):
    torch.manual_seed(0)
    batch = PRESETS[preset]
    with DEVICE:  # initialized where it runs: ViT-H takes seconds to initialize on a CPU
        model = create_model(preset, norm_backend="torch", **CONFIGS[config])
    optimizer, optimizer_name = build_optimizer("adamw", param_groups_weight_decay(model, 0.05), 1e-4, DEVICE.type)
    step_model = torch.compile(model) if COMPILE and config == "fastmae" else model
    imgs = torch.randn(batch, 3, *model.patch_embed.img_size, device=DEVICE)
    step = training_step(step_model, optimizer, imgs, torch.bfloat16 if ON_GPU else None)
    step()
    memory = peak_memory_gib(step)
    seconds = measure(benchmark, step, rounds=10 if ON_GPU else 3, op="training_step_e2e", provider=config, batch=batch,
                      mode="compiled" if COMPILE and config == "fastmae" else "eager", preset=preset,
                      peak_memory_mib=memory and memory * 1024, optimizer=optimizer_name,
                      kernels=ops.resolve("kernels", CONFIGS[config]["kernel_backend"], DEVICE.type),
                      attention=ops.resolve("attention", CONFIGS[config]["attention_backend"], DEVICE.type))
    rate = batch / seconds
    peak = peak_flops(DEVICE)
    benchmark.extra_info.update(images_per_sec=rate,
                                mfu=rate * train_flops_per_image(model, 0.75) / peak if peak else None)
