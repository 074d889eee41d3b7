"""The ``triton`` kernel backend of :mod:`fastmae.ops`: fused Triton kernels for MAE's hot paths.

Each op is registered with ``torch.library`` (``custom_op`` + ``register_fake`` +
``register_autograd``) so that ``torch.compile`` traces the model through them without graph breaks.
The kernels run on CUDA GPUs, and on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``
set before fastmae is imported), which is how they are tested without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmae.kernels._launch import INTERPRET
from fastmae.kernels.gather_visible import gather_patches_op, gather_visible_op
from fastmae.kernels.masked_pixel_loss import masked_pixel_loss_op
from fastmae.kernels.random_masking import random_masking_op
from fastmae.kernels.unshuffle import unshuffle_op


def unavailable_reasons(device_type: str) -> list[str]:
    if device_type == "cuda" or (device_type == "cpu" and INTERPRET):
        return []
    if device_type == "cpu":
        return ["Triton kernels run on CUDA; on the CPU only under the Triton interpreter "
                "(TRITON_INTERPRET=1 set before fastmae is imported)"]
    return [f"Triton kernels do not run on {device_type}"]


def random_masking(noise, len_keep):
    return random_masking_op(noise, len_keep)


def gather_visible(x, ids_keep, pos_embed=None):
    return gather_visible_op(x, ids_keep, pos_embed)


def embed_visible_patches(imgs, ids_keep, weight, bias, pos_embed=None):
    # Only the visible patches are read from the image and embedded: one GEMM over N*K patches
    # instead of a convolution over all N*L of them.
    patches = gather_patches_op(imgs, ids_keep, weight.shape[-1])
    x = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    return x if pos_embed is None else x + pos_embed[ids_keep]


def unshuffle_with_mask_token(x, ids_restore, mask_token, pos_embed=None):
    return unshuffle_op(x, ids_restore, mask_token, pos_embed)


def masked_pixel_loss(pred, imgs, mask, patch_size, norm_pix):
    if imgs.requires_grad or mask.requires_grad:
        raise NotImplementedError(
            "the triton masked_pixel_loss differentiates with respect to pred only; "
            "use backend='torch' for gradients of imgs or mask"
        )
    with_grad = torch.is_grad_enabled() and pred.requires_grad
    return masked_pixel_loss_op(pred, imgs, mask, patch_size, norm_pix, with_grad)[0]
