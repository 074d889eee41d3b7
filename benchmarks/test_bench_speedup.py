"""The visible-only encoder against the paper's "w/ [M]" baseline (mask tokens through the encoder):
one training step (forward, backward, AdamW) for each preset with an 8-block and a 1-block decoder.
The paper's Table 2 (ViT-L: 2.8x with 8 decoder blocks, 3.7x with 1; ViT-H: 3.5x, 4.1x) sits beside
the measured speedup and the one the FLOP count predicts.

    pytest benchmarks/test_bench_speedup.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, measure, peak_memory_gib, training_step
from fastmae.flops import train_flops_per_image
from fastmae.models import create_model
from fastmae.optim import build_optimizer, param_groups_weight_decay

PAPER = {("mae_vit_large_patch16", 8): 2.8, ("mae_vit_large_patch16", 1): 3.7,
         ("mae_vit_huge_patch14", 8): 3.5, ("mae_vit_huge_patch14", 1): 4.1}
# preset -> batch per step: the largest that fits the w/ [M] baseline on an 80 GB GPU in bf16, so that
# the GPU's work, not the host's kernel launches, sets the time of the visible-only step
PRESETS = ({"mae_vit_large_patch16": 256, "mae_vit_huge_patch14": 96}
           if ON_GPU else {"mae_vit_base_patch16": 2})
_times: dict = {}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("decoder_depth", [8, 1])
@pytest.mark.parametrize("encoder", ["visible_only", "with_mask_tokens"])
def test_training_step(benchmark, preset, decoder_depth, encoder):
    torch.manual_seed(0)
    batch = PRESETS[preset]
    with DEVICE:  # initialized where it runs: ViT-H takes seconds to initialize on a CPU
        model = create_model(preset, decoder_depth=decoder_depth, encoder_mask_tokens=encoder == "with_mask_tokens")
    optimizer, _ = build_optimizer("adamw", param_groups_weight_decay(model, 0.05), 1e-4, DEVICE.type)
    imgs = torch.randn(batch, 3, *model.patch_embed.img_size, device=DEVICE)
    step = training_step(model, optimizer, imgs, torch.bfloat16 if ON_GPU else None)
    step()
    memory = peak_memory_gib(step)
    seconds = measure(benchmark, step, rounds=10 if ON_GPU else 3, op="training_step", provider=encoder, batch=batch,
                      mode=f"decoder_depth={decoder_depth}", preset=preset, peak_memory_mib=memory and memory * 1024)
    flops = train_flops_per_image(model, 0.75)
    benchmark.extra_info.update(images_per_sec=batch / seconds, flops_per_image=flops)
    key = (preset, decoder_depth)
    _times.setdefault(key, {})[encoder] = (seconds, flops)
    if len(_times[key]) == 2:  # both encoders measured: record the speedup on the second
        (t_vis, f_vis), (t_m, f_m) = _times[key]["visible_only"], _times[key]["with_mask_tokens"]
        benchmark.extra_info.update(speedup=t_m / t_vis, flop_ratio=f_m / f_vis, paper_speedup=PAPER.get(key))
