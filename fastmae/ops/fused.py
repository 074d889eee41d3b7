"""What the fused kernel backends (``triton``: ``kernels/``; ``native``: ``csrc/``) share around their
``torch.library`` ops: their fake kernels (for ``torch.compile``: the ops' specs,
:data:`fastmae.ops.spec.FUSED_SPECS`), the autograd formulas that call the backward kernels (the
Triton backend registers them; the native library has the same formulas in C++,
``csrc/fastmae_autograd.cpp``, and its tests compare the two), and the Python side of the op
interface (the visible-patch embedding, the encoder input's dtype mixes that the kernels leave to the
reference, the loss's gradient switch).

A backend describes its ops with :class:`FusedOps`, calls :func:`register_fakes` (and
:func:`register_autograd` where its library has no autograd of its own) once, and answers the op
interface through :class:`FusedBackend`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastmae.ops import reference
from fastmae.ops.spec import FUSED_SPECS


# a torch.library custom op (Triton) or an OpOverload (native): callable, and accepted by
# torch.library.register_fake and register_autograd
LibraryOp = Union[torch.library.CustomOpDef, torch._ops.OpOverload]


@dataclass(frozen=True)
class FusedOps:
    """One backend's ops, one per entry of :data:`fastmae.ops.spec.FUSED_SPECS` (their arguments
    and outputs are given there)."""

    name: str
    random_masking: LibraryOp
    gather_visible: LibraryOp
    gather_visible_backward: LibraryOp
    gather_patches: LibraryOp  # the visible patches in the patch-embedding weight's (c, i, j) order
    encoder_input: LibraryOp
    unshuffle: LibraryOp
    unshuffle_backward: LibraryOp
    masked_pixel_loss: LibraryOp  # -> (loss, mask * (pred - target) and mask.sum() for the backward)
    masked_pixel_loss_backward: LibraryOp


# -- autograd ------------------------------------------------------------------------------------

def _gather_visible_setup(ctx, inputs, output):
    x, ids_keep, pos_embed = inputs
    ctx.save_for_backward(ids_keep)
    ctx.L, ctx.x_dtype = x.shape[1], x.dtype
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None


def _gather_patches_setup(ctx, inputs, output):
    imgs, ids_keep, patch_size, _ = inputs
    ctx.save_for_backward(ids_keep)
    ctx.shape, ctx.patch_size, ctx.imgs_dtype = imgs.shape, patch_size, imgs.dtype


def _gather_patches_backward(ctx, dpatches):
    # Images rarely need a gradient; this path is plain PyTorch (scatter the rows, fold the patches).
    (ids_keep,) = ctx.saved_tensors
    n, c, H, W = ctx.shape
    p = ctx.patch_size
    full = dpatches.new_zeros(n, (H // p) * (W // p), c * p * p)
    full.scatter_(1, ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[2]), dpatches)
    dimgs = full.reshape(n, H // p, W // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, H, W)
    return dimgs.to(ctx.imgs_dtype), None, None, None


def _encoder_input_setup(ctx, inputs, output):
    x, ids_keep, cls_token, pos_embed = inputs
    ctx.save_for_backward(ids_keep)
    ctx.x_dtype, ctx.cls_dtype, ctx.pos_dtype, ctx.L = x.dtype, cls_token.dtype, pos_embed.dtype, pos_embed.shape[0] - 1


def _unshuffle_setup(ctx, inputs, output):
    x, ids_restore, mask_token, pos_embed = inputs
    ctx.save_for_backward(ids_restore)
    ctx.k1, ctx.x_dtype, ctx.tok_dtype = x.shape[1], x.dtype, mask_token.dtype
    ctx.pos_dtype = pos_embed.dtype if pos_embed is not None else None


def _masked_pixel_loss_setup(ctx, inputs, output):
    _, g, msum = output
    ctx.save_for_backward(g, msum)
    ctx.with_grad = inputs[5]
    ctx.set_materialize_grads(False)  # g and msum get no gradient: no zeros of g's size to fill


def register_fakes(ops: FusedOps) -> None:
    """Fake kernels for a backend's ops (once per process)."""
    for name, spec in FUSED_SPECS.items():
        torch.library.register_fake(getattr(ops, name), spec.fake)


def register_autograd(ops: FusedOps) -> None:
    """Autograd for a backend's differentiable ops (once per process)."""
    for op, backward, setup in autograd_formulas(ops):
        torch.library.register_autograd(op, backward, setup_context=setup)


def autograd_formulas(ops: FusedOps) -> list[tuple]:
    """``(op, backward, setup_context)`` for each differentiable op, calling ``ops``' backward kernels."""

    def gather_visible_backward(ctx, dout):
        (ids_keep,) = ctx.saved_tensors
        need_x, _, need_pos = ctx.needs_input_grad
        if not (need_x or need_pos):
            return None, None, None
        # with pos_embed to differentiate, dx stays in dout's (wider) dtype for the sum over the batch
        dx = ops.gather_visible_backward(dout, ids_keep, ctx.L, dout.dtype if need_pos else ctx.x_dtype)
        dpos = dx.sum(0).to(ctx.pos_dtype) if need_pos else None
        return (dx.to(ctx.x_dtype) if need_x else None), None, dpos

    def encoder_input_backward(ctx, dout):
        # what the original's add, expand and cat give back: the rows after the first to x (in its
        # dtype), the first row summed over the batch to the cls token
        (ids_keep,) = ctx.saved_tensors
        need_x, _, need_cls, need_pos = ctx.needs_input_grad
        dx = dout[:, 1:].to(ctx.x_dtype) if need_x else None
        dfirst = dout[:, 0].sum(0) if need_cls or need_pos else None
        dpos = None
        if need_pos:  # MAE's is fixed; the position rows' gradient is the gather's
            drows = ops.gather_visible_backward(dout[:, 1:], ids_keep, ctx.L, dout.dtype).sum(0)
            dpos = torch.cat([dfirst[None], drows]).to(ctx.pos_dtype)
        return dx, None, dfirst.to(ctx.cls_dtype) if need_cls else None, dpos

    def masked_pixel_loss_backward(ctx, dloss, _dg, _dmsum):
        # the forward wrote g = mask * (pred - target) and summed the mask: d loss / d pred =
        # g * 2 / (P * mask.sum()), the loss scale in dloss. One kernel forms the factor in fp32 and
        # rounds each element once; ATen's g * factor would launch five ops, and on CUDA it rounds
        # a factor held on the device to g's dtype first (to nothing, at fp16's floor, without a scale).
        if dloss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        g, msum = ctx.saved_tensors
        if not ctx.with_grad:
            raise RuntimeError("masked_pixel_loss was computed without its gradient (with_grad=False)")
        return ops.masked_pixel_loss_backward(g, dloss, msum), None, None, None, None, None

    def unshuffle_backward(ctx, dout):
        (ids_restore,) = ctx.saved_tensors
        dx, dtok = ops.unshuffle_backward(dout, ids_restore, ctx.k1, ctx.x_dtype)
        dpos = dout.sum(0).to(ctx.pos_dtype) if ctx.needs_input_grad[3] else None
        return dx, None, dtok.to(ctx.tok_dtype), dpos

    # First derivatives only: a second differentiation through one of these raises (PyTorch's
    # once_differentiable error) instead of silently getting no gradient.
    return [
        (ops.gather_visible, once_differentiable(gather_visible_backward), _gather_visible_setup),
        (ops.gather_patches, once_differentiable(_gather_patches_backward), _gather_patches_setup),
        (ops.encoder_input, once_differentiable(encoder_input_backward), _encoder_input_setup),
        (ops.unshuffle, once_differentiable(unshuffle_backward), _unshuffle_setup),
        (ops.masked_pixel_loss, once_differentiable(masked_pixel_loss_backward), _masked_pixel_loss_setup),
    ]


def gemm_input_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul reads ``x`` in: autocast's for an fp32 ``x`` under autocast, else ``x``'s."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class FusedBackend:
    """The op interface (as :mod:`fastmae.ops.reference` defines it) on a backend's fused ops."""

    def __init__(self, ops: FusedOps):
        self.ops = ops

    def random_masking(self, noise, len_keep):
        return self.ops.random_masking(noise, len_keep)

    def gather_visible(self, x, ids_keep, pos_embed=None):
        return self.ops.gather_visible(x, ids_keep, pos_embed)

    def embed_visible_patches(self, imgs, ids_keep, weight, bias, pos_embed=None):
        # Only the visible patches are read from the image and embedded: one GEMM over N*K patches
        # instead of a convolution over all N*L of them. Under autocast the gather writes them in
        # the GEMM's dtype, rounded as autocast would round them, instead of fp32 for a cast pass.
        patches = self.ops.gather_patches(imgs, ids_keep, weight.shape[-1], gemm_input_dtype(imgs))
        x = F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
        return x if pos_embed is None else x + pos_embed[ids_keep]

    def encoder_input(self, x, ids_keep, cls_token, pos_embed):
        rows, first = torch.promote_types(x.dtype, pos_embed.dtype), torch.promote_types(cls_token.dtype, pos_embed.dtype)
        if rows != first:
            # The original rounds each sum in its own pair's dtype before the concatenation widens
            # the narrower one; the kernel adds once in the output's. MAE's dtypes (bf16 or fp32
            # embeddings, fp32 parameters; or all one dtype) never get here.
            return reference.encoder_input(x, ids_keep, cls_token, pos_embed)
        return self.ops.encoder_input(x, ids_keep, cls_token, pos_embed)

    def unshuffle_with_mask_token(self, x, ids_restore, mask_token, pos_embed=None):
        return self.ops.unshuffle(x, ids_restore, mask_token, pos_embed)

    def masked_pixel_loss(self, pred, imgs, mask, patch_size, norm_pix):
        if imgs.requires_grad or mask.requires_grad:
            raise NotImplementedError(
                f"the {self.ops.name} masked_pixel_loss differentiates with respect to pred only; "
                "use backend='torch' for gradients of imgs or mask"
            )
        with_grad = torch.is_grad_enabled() and pred.requires_grad
        return self.ops.masked_pixel_loss(pred, imgs, mask, patch_size, norm_pix, with_grad)[0]
