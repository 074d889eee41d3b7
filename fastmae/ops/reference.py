"""The ``torch`` kernel backend: pure-PyTorch references, written as the original MAE computes them.

Every other backend is tested against these functions. Inputs are validated once in
:mod:`fastmae.ops`; these functions assume valid shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmae.numerics import NORM_PIX_EPS


def unavailable_reasons(device_type: str) -> list[str]:
    return []


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, L, p*p*C]``, layout ``nchpwq -> nhwpqc`` as the original."""
    n, c, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: tuple[int, int], in_chans: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[N, L, p*p*C] -> [N, C, H, W]``."""
    n = x.shape[0]
    p = patch_size
    h, w = grid_size
    x = x.reshape(n, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, h * p, w * p)


def random_masking(noise: torch.Tensor, len_keep: int):
    n, L = noise.shape
    # ascending: small noise is kept; ties (rare, but rand's 2^24 values do repeat) in position order
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # The original builds [0]*len_keep + [1]*(L-len_keep) and un-shuffles it with ids_restore,
    # which is the same as asking where each position went.
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_keep, ids_restore, mask


def gather_visible(x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None):
    if pos_embed is not None:
        x = x + pos_embed  # the original adds the position embedding before masking
    index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, dim=1, index=index)


def embed_visible_patches(
    imgs: torch.Tensor, ids_keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None = None,
):
    # the original: embed every patch (a stride-p convolution), add the position embedding, gather
    x = F.conv2d(imgs, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    return gather_visible(x, ids_keep, pos_embed)


def encoder_input(x: torch.Tensor, ids_keep: torch.Tensor, cls_token: torch.Tensor, pos_embed: torch.Tensor):
    n, _, d = x.shape
    # the original adds the position embedding to every patch before masking: the same sums
    x = x + pos_embed[1:][ids_keep]
    cls = cls_token.reshape(1, 1, d) + pos_embed[:1].unsqueeze(0)
    return torch.cat([cls.expand(n, -1, -1), x], dim=1)


def unshuffle_with_mask_token(
    x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, pos_embed: torch.Tensor | None = None
):
    n, k1, d = x.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, d).expand(n, L + 1 - k1, d)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, d))
    out = torch.cat([x[:, :1, :], x_], dim=1)
    if pos_embed is not None:
        out = out + pos_embed
    return out


def masked_pixel_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool):
    # At least fp32 arithmetic whatever the input dtypes (the original's target is fp32 imgs,
    # which promotes the fp16 prediction); float64 stays float64.
    acc = torch.promote_types(torch.promote_types(pred.dtype, imgs.dtype), torch.float32)
    target = patchify(imgs, patch_size).to(acc)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the original
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = (pred.to(acc) - target) ** 2
    loss = loss.mean(dim=-1)
    mask = mask.to(acc)
    # Equal to the original's (loss * mask).sum() / mask.sum() whenever a patch is removed; with
    # none removed (mask_ratio 0) the loss is 0 instead of 0/0.
    return (loss * mask).sum() / mask.sum().clamp_min(torch.finfo(acc).tiny)


# -- the transformer block's elementwise work (fused by the triton backend) ---------------------------

def add_layer_norm(x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None = None):
    h = x if branch is None else x + branch
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return h, y if out_dtype is None else y.to(out_dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # in fp32 (fp64 for fp64), rounded once to x's dtype
    acc = torch.promote_types(torch.promote_types(x.dtype, bias.dtype), torch.float32)
    return F.gelu(x.to(acc) + bias.to(acc)).to(x.dtype)
