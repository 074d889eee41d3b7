"""The hot-path ops of MAE, one signature each, several backends (see :mod:`fastmae.ops.registry`).

Every op takes a keyword-only ``backend``: ``None`` means the family's environment variable, else
automatic. Each call's inputs are checked here, once, against the op's spec
(:mod:`fastmae.ops.spec`), so that every backend sees valid input; the backend is then chosen for
those inputs (:func:`fastmae.ops.registry.choose`).
"""
from __future__ import annotations

import functools

import torch

from fastmae.ops.spec import SPECS
from fastmae.ops.reference import patchify, unpatchify
from fastmae.ops.registry import (
    AUTO, BackendUnavailableError, backend_names, chosen_backend, fuses_layers, implementation, is_limited,
    resolve,
)

__all__ = [
    "AUTO",
    "BackendUnavailableError",
    "add_layer_norm",
    "attention",
    "attention_function",
    "bias_gelu",
    "backend_names",
    "embed_visible_patches",
    "encoder_input",
    "fuses_layers",
    "gather_visible",
    "layer_norm",
    "masked_pixel_loss",
    "patchify",
    "random_masking",
    "resolve",
    "unpatchify",
    "unshuffle_with_mask_token",
]


def random_masking(noise: torch.Tensor, len_keep: int, *, backend: str | None = None):
    """Per-sample random masking from ``noise`` [N, L]: the ``len_keep`` positions with the
    smallest noise are kept.

    Returns ``ids_keep`` [N, len_keep] int64 (kept positions, in ascending-noise order),
    ``ids_restore`` [N, L] int64 (the inverse permutation) and ``mask`` [N, L] float32 (1 = removed).
    """
    inputs = SPECS["random_masking"].bind(noise, len_keep)
    return implementation("kernels", "random_masking", backend, inputs)(noise, len_keep)


def gather_visible(
    x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Rows of ``x`` [N, L, D] picked by ``ids_keep`` [N, K] -> [N, K, D]. ``ids_keep`` holds K
    distinct positions per row, as :func:`random_masking` returns them (the fused backwards write
    each row of the gradient once, so a repeated position would get one gradient, not their sum).

    With ``pos_embed`` [L, D] the result is ``(x + pos_embed)`` gathered, as the original adds the
    position embedding before masking.
    """
    inputs = SPECS["gather_visible"].bind(x, ids_keep, pos_embed)
    return implementation("kernels", "gather_visible", backend, inputs)(x, ids_keep, pos_embed)


def embed_visible_patches(
    imgs: torch.Tensor,
    ids_keep: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Patch embeddings of the visible patches: ``gather_visible(patch_embed(imgs), ids_keep,
    pos_embed)`` for the patch embedding ``weight`` [D, C, p, p] and ``bias`` [D] (a stride-p
    convolution), ``imgs`` [N, C, H, W], ``ids_keep`` [N, K] -> [N, K, D]. Backends may embed only
    the visible patches."""
    inputs = SPECS["embed_visible_patches"].bind(imgs, ids_keep, weight, bias, pos_embed)
    return implementation("kernels", "embed_visible_patches", backend, inputs)(imgs, ids_keep, weight, bias, pos_embed)


def encoder_input(
    x: torch.Tensor,
    ids_keep: torch.Tensor,
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Encoder input: ``x`` [N, K, D] (the embeddings of the visible patches, in ``ids_keep``'s
    order) with their position embeddings, after the cls token -> [N, 1+K, D]. Row 0 is
    ``cls_token`` [D] + ``pos_embed[0]``, row 1+k is ``x[:, k] + pos_embed[1 + ids_keep[:, k]]``
    (``pos_embed`` [1+L, D], row 0 the cls token's): what the original computes with an add before
    its masking gather, an add for the cls token and a concatenation, in the dtype those give."""
    inputs = SPECS["encoder_input"].bind(x, ids_keep, cls_token, pos_embed)
    return implementation("kernels", "encoder_input", backend, inputs)(
        x, ids_keep, cls_token.reshape(x.shape[-1]), pos_embed
    )


def unshuffle_with_mask_token(
    x: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decoder input: ``x`` [N, 1+K, D] (row 0 is cls, then the K visible tokens in shuffled order)
    -> [N, 1+L, D] with cls first, each visible token at its original position, ``mask_token`` [D]
    at the removed ones, plus ``pos_embed`` [1+L, D] when given. ``ids_restore`` is a permutation of
    ``0..L-1`` per row, as :func:`random_masking` returns it."""
    inputs = SPECS["unshuffle_with_mask_token"].bind(x, ids_restore, mask_token, pos_embed)
    return implementation("kernels", "unshuffle_with_mask_token", backend, inputs)(
        x, ids_restore, mask_token.reshape(x.shape[-1]), pos_embed
    )


def masked_pixel_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE's loss: mean squared error per patch between ``pred`` [N, L, p*p*C] and the patchified
    ``imgs`` [N, C, H, W] (each patch normalized to zero mean, unit unbiased variance when
    ``norm_pix``), averaged over the removed patches (``mask`` [N, L], 1 = removed; a boolean or
    integer mask is taken as float32). A scalar computed and returned in fp32 (float64 for float64
    inputs)."""
    inputs = SPECS["masked_pixel_loss"].bind(pred, imgs, mask, patch_size, norm_pix)
    if not mask.is_floating_point():
        mask = mask.float()
    return implementation("kernels", "masked_pixel_loss", backend, inputs)(pred, imgs, mask, patch_size, bool(norm_pix))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` for ``q, k, v`` [B, heads, N, head_dim].

    MAE uses neither an attention mask nor attention dropout, and no backend here implements them:
    asking for either is an error rather than a silently different computation."""
    if attn_mask is not None or dropout_p:
        raise NotImplementedError(
            "fastmae.ops.attention has no attention mask and no dropout (MAE uses neither); "
            "use torch.nn.functional.scaled_dot_product_attention for them"
        )
    inputs = SPECS["attention"].bind(q, k, v)
    if torch.is_autocast_enabled(q.device.type):  # SDPA runs in the autocast dtype: what the kernel sees
        inputs = inputs.under_autocast(torch.get_autocast_dtype(q.device.type))
    return implementation("attention", "attention", backend, inputs)(q, k, v)


def attention_function(backend: str | None, device_type: str):
    """The attention backend's ``f(q, k, v)`` on ``device_type``, resolved once: layers keep it and
    call it directly (q, k, v as :func:`attention` takes them). A backend with limits on its inputs
    (the pinned SDPA kernels) comes as :func:`attention` itself, which checks each call's inputs."""
    chosen = chosen_backend("attention", backend, device_type)
    if is_limited("attention", chosen.name, "attention"):  # a constant to torch.compile, not a guard on a dict
        return functools.partial(attention, backend=chosen.name)
    return chosen.op("attention")


def add_layer_norm(
    x: torch.Tensor,
    branch: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's residual step: ``h = x + branch`` (``x`` itself when ``branch`` is None)
    and ``y = layer_norm(h)`` over the last dimension (``weight``, ``bias`` [D], ``eps``). Returns
    ``(h, y)``; under autocast ``y`` comes in the autocast dtype, the one the next matmul takes."""
    inputs = SPECS["add_layer_norm"].bind(x, branch, weight, bias, eps)
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return implementation("kernels", "add_layer_norm", backend, inputs)(x, branch, weight, bias, eps, out_dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``gelu(x + bias)`` (exact GELU) for a matmul's output ``x`` [..., D] and ``bias`` [D]: the
    MLP's first layer with its bias added here instead of in the matmul, and so taken in ``x``'s
    precision (an fp32 bias is rounded to bf16 for a bf16 ``x``, as autocast's matmul would).
    Computed in fp32 (fp64 for fp64) and rounded once to ``x``'s dtype."""
    inputs = SPECS["bias_gelu"].bind(x, bias)
    if bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # as the matmul would have added it (eager autocast steps hand it out in x's dtype)
    return implementation("kernels", "bias_gelu", backend, inputs)(x, bias)


def layer_norm(*, backend: str | None = None) -> type[torch.nn.Module]:
    """The LayerNorm class of the ``norm`` backend (``torch`` or ``apex``); its parameters are named
    as ``nn.LayerNorm``'s."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return chosen_backend("norm", backend, device_type).op("layer_norm")()
