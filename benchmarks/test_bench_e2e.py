"""Pretraining side by side with the original implementation: one epoch of training steps (forward,
backward, optimizer, the loop's logging) with the batches already on the device, for

- ``original``: the original's model and its ``engine_pretrain.train_one_epoch`` (fp16 autocast,
  GradScaler, its grad-norm, a ``loss.item()`` and a synchronization per step; torch's default AdamW),
  from ``../shared/original_mae`` (needs timm);
- ``reference``: fastmae's all-reference configuration (torch kernels, math attention), eager;
- ``fastmae``: fastmae as ``python -m fastmae.pretrain`` runs it by default (the automatic kernels
  and attention; on CUDA the step compiled and replayed as CUDA graphs, bf16), through its own
  ``train_one_epoch``.

Each records images/s, MFU, peak memory, and its speedup over the original (and over the reference).
``test_host_cost`` runs the same three on a model of ViT-L's depth with tiny widths, where the
device's work is negligible: the host's milliseconds and the ops dispatched per step.

    pytest benchmarks/test_bench_e2e.py --benchmark-only
    FASTMAE_BENCH_E2E=mae_vit_large_patch16:64,mae_vit_large_patch16:256 pytest benchmarks/test_bench_e2e.py ...
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from bench_utils import DEVICE, ON_GPU, measure, peak_memory_gib
from fastmae import ops
from fastmae.engine import EpochConfig, train_one_epoch
from fastmae.flops import peak_flops, train_flops_per_image
from fastmae.models import PRESETS, MaskedAutoencoderViT, create_model
from fastmae.optim import build_optimizer, param_groups_weight_decay
from fastmae.step import TrainStep
from fastmae.testing import RecordOps

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
PROVIDERS = ("original", "reference", "fastmae")
# (preset, batch per step): the paper's per-GPU batch (64) and a GPU-filling one, for each size
if os.environ.get("FASTMAE_BENCH_E2E"):
    CASES = [(name, int(batch)) for name, batch in (c.split(":") for c in os.environ["FASTMAE_BENCH_E2E"].split(","))]
elif ON_GPU:
    CASES = [(p, b) for p in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14") for b in (64, 256)]
else:
    CASES = [("mae_vit_tiny_patch4", 64)]
STEPS = 20 if ON_GPU else 4  # steps per timed epoch
HOST_STEPS = 20
FASTMAE_MODE = "graphed" if ON_GPU else "eager"  # what python -m fastmae.pretrain chooses
_rates: dict = {}


def original_modules():
    """The original's (models_mae, engine_pretrain, util.misc), or skip without timm."""
    pytest.importorskip("timm", reason="the original implementation needs timm (pip install timm)")
    sys.path.insert(0, os.path.join(SHARED, "original_mae"))
    from compat import original

    return original()


@contextmanager
def original_on_this_device():
    """The original's loop synchronizes CUDA every step; on a CPU that call has nothing to wait for."""
    if ON_GPU:
        yield
        return
    real = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.synchronize = real


def build(provider: str, preset: str | None, batch: int, steps: int = STEPS, **config):
    """``(model, run_epoch)``: ``run_epoch()`` trains one epoch of ``steps`` batches. ``provider``:
    one of ``PROVIDERS``, or ``fastmae_compiled`` (fastmae with ``--compile``)."""
    torch.manual_seed(0)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    if provider == "original":
        models_mae, engine_pretrain, misc = original_modules()
        with DEVICE:  # the preset's configuration, as fastmae's presets write it (the original's, plus a tiny one)
            config = {"mlp_ratio": 4.0, **(PRESETS[preset] if preset else config)}
            model = models_mae.MaskedAutoencoderViT(**config, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                                    norm_pix_loss=True)
        size = model.patch_embed.img_size[0]
        batches = [(torch.randn(batch, 3, size, size, device=DEVICE, generator=g), torch.zeros(batch, dtype=torch.long))
                   for _ in range(steps)]
        optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        scaler = misc.NativeScalerWithGradNormCount()
        args = argparse.Namespace(accum_iter=1, mask_ratio=0.75, lr=1e-4, min_lr=0.0, warmup_epochs=0, epochs=1)

        def run_epoch():
            with original_on_this_device(), open(os.devnull, "w") as null, _stdout(null):
                engine_pretrain.train_one_epoch(model, batches, optimizer, DEVICE, 0, scaler, args=args)
        return model, run_epoch

    kernels, attention, mode = {"reference": ("torch", "math", "eager"), "fastmae": (None, None, FASTMAE_MODE),
                                "fastmae_compiled": (None, None, "compiled")}[provider]
    with DEVICE:
        model = (create_model(preset, norm_pix_loss=True, kernel_backend=kernels, attention_backend=attention) if preset
                 else MaskedAutoencoderViT(**config, norm_pix_loss=True, kernel_backend=kernels, attention_backend=attention))
    size = model.patch_embed.img_size[0]
    batches = [(torch.randn(batch, 3, size, size, device=DEVICE, generator=g), torch.zeros(batch, dtype=torch.long, device=DEVICE))
               for _ in range(steps)]
    optimizer, _ = build_optimizer("adamw", param_groups_weight_decay(model, 0.05), 1e-4, DEVICE, capturable=mode == "graphed")
    step = TrainStep(model, optimizer, lambda m, x, y: m(x, mask_ratio=0.75)[0], mode=mode,
                     autocast_dtype=torch.bfloat16 if ON_GPU else None)
    cfg = EpochConfig(schedule=dict(lr=1e-4, min_lr=0.0, warmup_epochs=0, epochs=1), print_freq=20)

    def run_epoch():
        train_one_epoch(step, batches, 0, cfg, device=DEVICE, steps_per_epoch=steps)
    return model, run_epoch


@contextmanager
def _stdout(stream):
    real, sys.stdout = sys.stdout, stream
    try:
        yield
    finally:
        sys.stdout = real


def configuration(provider: str) -> dict:
    if provider == "original":
        return dict(kernels="the original's", attention="timm", mode="eager", precision="fp16" if ON_GPU else "fp32")
    kernels, attention = ("torch", "math") if provider == "reference" else (None, None)
    mode = {"reference": "eager", "fastmae": FASTMAE_MODE, "fastmae_compiled": "compiled"}[provider]
    return dict(kernels=ops.resolve("kernels", kernels, DEVICE.type), attention=ops.resolve("attention", attention, DEVICE.type),
                mode=mode, precision="bf16" if ON_GPU else "fp32")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("preset,batch", CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_training_step(benchmark, provider, preset, batch):
    model, run_epoch = build(provider, preset, batch)
    run_epoch()  # compiles and captures fastmae's step; warms every provider up
    memory = peak_memory_gib(run_epoch)
    seconds = measure(benchmark, run_epoch, rounds=3, op="training_step_e2e", provider=provider, preset=preset,
                      batch=batch, steps_per_round=STEPS, peak_memory_mib=memory and memory * 1024,
                      **configuration(provider)) / STEPS
    rate = batch / seconds
    peak = peak_flops(DEVICE)
    flops = train_flops_per_image(create_model(preset, norm_pix_loss=True), 0.75) if preset else None
    benchmark.extra_info.update(step_ms=seconds * 1e3, images_per_sec=rate,
                                mfu=rate * flops / peak if peak and flops else None)
    rates = _rates.setdefault((preset, batch), {})
    rates[provider] = rate
    if provider == "fastmae":
        benchmark.extra_info.update(
            speedup_vs_original=rate / rates["original"] if "original" in rates else None,
            speedup_vs_reference=rate / rates["reference"] if "reference" in rates else None,
        )


# ViT-L's depth and structure (24 + 8 blocks) with tiny widths: the device's work is negligible, what
# is left is the host's
HOST_BOUND = dict(img_size=32, patch_size=4, embed_dim=64, depth=24, num_heads=4, decoder_embed_dim=32,
                  decoder_depth=8, decoder_num_heads=4)
_host: dict = {}


# fastmae's default step compiles on CUDA; on a CPU, "--compile" is measured beside it
@pytest.mark.parametrize("provider", PROVIDERS + (() if ON_GPU else ("fastmae_compiled",)))
def test_host_cost(benchmark, provider):
    _, run_epoch = build(provider, None, 2, steps=HOST_STEPS, **HOST_BOUND)
    run_epoch()
    ops_per_step = None
    if configuration(provider)["mode"] == "eager":  # a dispatch mode sees neither compiled code nor graphs
        with RecordOps() as record:
            run_epoch()
        ops_per_step = len(record.ops) / HOST_STEPS
    seconds = measure(benchmark, run_epoch, rounds=5, op="host_cost", provider=provider, steps_per_round=HOST_STEPS,
                      ops_per_step=ops_per_step, **configuration(provider),
                      model="ViT-L depth (24 + 8 blocks), widths 64 / 32, batch 2") / HOST_STEPS
    _host[provider] = seconds
    benchmark.extra_info.update(host_ms_per_step=seconds * 1e3,
                                host_cost_vs_original=seconds / _host["original"] if "original" in _host else None)
