"""The ``triton`` kernel backend of :mod:`fastmae.ops`: the fused Triton kernels of ``kernels/``
(installed as ``fastmae.kernels``) for MAE's hot paths and for the transformer block's elementwise
work, behind the op interface.

Each op is registered with ``torch.library`` (``custom_op`` + ``register_fake`` +
``register_autograd``) so that ``torch.compile`` traces the model through them without graph breaks.
The kernels run on CUDA GPUs, and on the CPU under the Triton interpreter (``TRITON_INTERPRET=1``
set before fastmae is imported), which is how they are tested without a GPU.
"""
from __future__ import annotations

import torch

from fastmae.kernels._launch import INTERPRET
from fastmae.kernels.add_layer_norm import add_layer_norm
from fastmae.kernels.bias_gelu import bias_gelu_op as bias_gelu
from fastmae.kernels.gather_visible import (
    encoder_input_op, gather_patches_op, gather_visible_backward_op, gather_visible_op,
)
from fastmae.kernels.masked_pixel_loss import masked_pixel_loss_backward_op, masked_pixel_loss_op
from fastmae.kernels.random_masking import random_masking_op
from fastmae.kernels.unshuffle import unshuffle_backward_op, unshuffle_op
from fastmae.ops.fused import FusedBackend, FusedOps, register_autograd, register_fakes

OPS = FusedOps(
    name="triton", random_masking=random_masking_op, gather_visible=gather_visible_op,
    gather_visible_backward=gather_visible_backward_op, gather_patches=gather_patches_op,
    encoder_input=encoder_input_op, unshuffle=unshuffle_op,
    unshuffle_backward=unshuffle_backward_op, masked_pixel_loss=masked_pixel_loss_op,
    masked_pixel_loss_backward=masked_pixel_loss_backward_op,
)
register_fakes(OPS)
register_autograd(OPS)
_backend = FusedBackend(OPS)
random_masking = _backend.random_masking
gather_visible = _backend.gather_visible
embed_visible_patches = _backend.embed_visible_patches
encoder_input = _backend.encoder_input
unshuffle_with_mask_token = _backend.unshuffle_with_mask_token
masked_pixel_loss = _backend.masked_pixel_loss
# the transformer block's residual add + LayerNorm and bias + GELU, fused (the model uses them in eager
# steps: a compiled step lets Inductor fuse the reference's ops itself)
FUSES_LAYERS = True


# the ops whose inputs this backend may refuse, with the dims its reasons read (besides the dtypes)
LIMITED_OPS = {"random_masking": ()}


def not_supported_reasons(op: str, inputs) -> list[str]:
    if op == "random_masking" and inputs.dtypes["noise"] == torch.float64:
        # the sort keys hold 32-bit floats: float64 ties would break differently from argsort
        return ["the Triton random_masking sorts 32-bit keys: float64 noise is not supported"]
    return []


def unavailable_reasons(device_type: str) -> list[str]:
    if device_type == "cuda" or (device_type == "cpu" and INTERPRET):
        return []
    if device_type == "cpu":
        return ["Triton kernels run on CUDA; on the CPU only under the Triton interpreter "
                "(TRITON_INTERPRET=1 set before fastmae is imported)"]
    return [f"Triton kernels do not run on {device_type}"]
