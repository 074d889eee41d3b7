"""Closed-form FLOPs of an MAE training step, and model FLOPs utilization (MFU).

Counted as the model needs them (matrix multiplies only, 2 FLOPs per multiply-add): the patch
embedding and encoder over the visible patches plus cls, the decoder over every position. A training
step costs three forwards (the backward computes gradients for activations and for weights).
"""
from __future__ import annotations

import torch

# dense bf16 tensor-core peaks (TFLOP/s), by device-name substring
# dense bf16 TFLOP/s by a part of the device name; the longest matching name wins ("H100 PCIe" over
# "H100", "L40S" over "L40" over "L4")
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "A100": 312.0,
                    "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "L4": 121.0}


def _blocks(tokens: int, dim: int, depth: int, mlp_ratio: float) -> float:
    # qkv 3, proj 1, mlp 2 * mlp_ratio: (4 + 2 * ratio) * n * d^2 multiply-adds; attention 2 * n^2 * d
    return depth * (2 * (4 + 2 * mlp_ratio) * tokens * dim * dim + 4 * tokens * tokens * dim)


def mae_forward_flops(model, mask_ratio: float) -> float:
    """Forward FLOPs per image of a ``MaskedAutoencoderViT`` (with ``encoder_mask_tokens``, the
    patch embedding and the encoder run over all L positions)."""
    L = model.num_patches
    visible = L if model.encoder_mask_tokens else model.len_keep(mask_ratio)
    patch_dim = model.decoder_pred.out_features
    enc_dim, dec_dim = model.pos_embed.shape[-1], model.decoder_pos_embed.shape[-1]
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / enc_dim if len(model.blocks) else 4.0
    dec_mlp = model.decoder_blocks[0].mlp.fc1.out_features / dec_dim if len(model.decoder_blocks) else 4.0
    return (
        2 * visible * patch_dim * enc_dim
        + _blocks(1 + visible, enc_dim, len(model.blocks), mlp_ratio)
        + 2 * (1 + visible) * enc_dim * dec_dim
        + _blocks(1 + L, dec_dim, len(model.decoder_blocks), dec_mlp)
        + 2 * L * dec_dim * patch_dim
    )


def train_flops_per_image(model, mask_ratio: float) -> float:
    return 3 * mae_forward_flops(model, mask_ratio)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    matches = [key for key in PEAK_BF16_TFLOPS if key in device_name]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] * 1e12 if matches else None
