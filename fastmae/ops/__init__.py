"""The hot-path ops of MAE, one signature each, several backends (see :mod:`fastmae.ops.registry`).

Every op takes a keyword-only ``backend``: ``None`` means the family's environment variable, else
automatic. Shapes are checked here, once, so that every backend sees valid input.
"""
from __future__ import annotations

import torch

from fastmae.errors import UsageError
from fastmae.ops.reference import patchify, unpatchify
from fastmae.ops.registry import AUTO, BackendUnavailableError, backend_names, fuses_layers, implementation, resolve

__all__ = [
    "AUTO",
    "BackendUnavailableError",
    "add_layer_norm",
    "attention",
    "attention_function",
    "bias_gelu",
    "backend_names",
    "embed_visible_patches",
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


def _fail(op: str, msg: str):
    raise UsageError(f"{op}: {msg}")


def _check_index(op: str, name: str, ids: torch.Tensor, n: int):
    if ids.dim() != 2 or ids.shape[0] != n:
        _fail(op, f"{name} must be [N={n}, *], got {tuple(ids.shape)}")
    if ids.dtype != torch.int64:
        _fail(op, f"{name} must be int64, got {ids.dtype}")


def _check_keep(op: str, ids_keep: torch.Tensor, n: int, L: int):
    _check_index(op, "ids_keep", ids_keep, n)
    if ids_keep.shape[1] > L:
        _fail(op, f"ids_keep keeps {ids_keep.shape[1]} rows of L={L}")


def _patch_grid(op: str, imgs: torch.Tensor, p: int) -> int:
    """``imgs`` [N, C, H, W] checked; returns its number of patches L."""
    if imgs.dim() != 4:
        _fail(op, f"imgs must be [N, C, H, W], got {tuple(imgs.shape)}")
    H, W = imgs.shape[2:]
    if H % p or W % p:
        _fail(op, f"image size {H}x{W} is not divisible by the patch size {p}")
    return (H // p) * (W // p)


def _check_pos_embed(op: str, pos_embed: torch.Tensor | None, rows: int, d: int):
    if pos_embed is not None and tuple(pos_embed.shape) != (rows, d):
        _fail(op, f"pos_embed must be [{rows}, {d}], got {tuple(pos_embed.shape)}")


def _check_devices(op: str, first: str, tensors: dict[str, torch.Tensor | None]):
    # a kernel launched for the first tensor's device would read the others' memory as its own
    device = tensors[first].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            _fail(op, f"{name} is on {t.device}, {first} on {device}: all must be on one device")


def random_masking(noise: torch.Tensor, len_keep: int, *, backend: str | None = None):
    """Per-sample random masking from ``noise`` [N, L]: the ``len_keep`` positions with the
    smallest noise are kept.

    Returns ``ids_keep`` [N, len_keep] int64 (kept positions, in ascending-noise order),
    ``ids_restore`` [N, L] int64 (the inverse permutation) and ``mask`` [N, L] float32 (1 = removed).
    """
    if noise.dim() != 2 or not noise.is_floating_point():
        _fail("random_masking", f"noise must be a floating [N, L] tensor, got {noise.dtype} {tuple(noise.shape)}")
    if not 0 <= len_keep <= noise.shape[1]:
        _fail("random_masking", f"len_keep must be in [0, L={noise.shape[1]}], got {len_keep}")
    return implementation("kernels", "random_masking", backend, noise.device.type)(noise, len_keep)


def gather_visible(
    x: torch.Tensor, ids_keep: torch.Tensor, pos_embed: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Rows of ``x`` [N, L, D] picked by ``ids_keep`` [N, K] -> [N, K, D]. ``ids_keep`` holds K
    distinct positions per row, as :func:`random_masking` returns them (the fused backwards write
    each row of the gradient once, so a repeated position would get one gradient, not their sum).

    With ``pos_embed`` [L, D] the result is ``(x + pos_embed)`` gathered, as the original adds the
    position embedding before masking.
    """
    if x.dim() != 3:
        _fail("gather_visible", f"x must be [N, L, D], got {tuple(x.shape)}")
    n, L, d = x.shape
    _check_keep("gather_visible", ids_keep, n, L)
    _check_pos_embed("gather_visible", pos_embed, L, d)
    _check_devices("gather_visible", "x", {"x": x, "ids_keep": ids_keep, "pos_embed": pos_embed})
    return implementation("kernels", "gather_visible", backend, x.device.type)(x, ids_keep, pos_embed)


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
    op = "embed_visible_patches"
    if imgs.dim() != 4:
        _fail(op, f"imgs must be [N, C, H, W], got {tuple(imgs.shape)}")
    n, c = imgs.shape[:2]
    if weight.dim() != 4 or weight.shape[1] != c or weight.shape[2] != weight.shape[3]:
        _fail(op, f"weight must be [D, C={c}, p, p], got {tuple(weight.shape)}")
    d, p = weight.shape[0], weight.shape[-1]
    L = _patch_grid(op, imgs, p)
    _check_keep(op, ids_keep, n, L)
    if bias is not None and tuple(bias.shape) != (d,):
        _fail(op, f"bias must be [{d}], got {tuple(bias.shape)}")
    _check_pos_embed(op, pos_embed, L, d)
    _check_devices(op, "imgs", {"imgs": imgs, "ids_keep": ids_keep, "weight": weight, "bias": bias, "pos_embed": pos_embed})
    return implementation("kernels", op, backend, imgs.device.type)(imgs, ids_keep, weight, bias, pos_embed)


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
    if x.dim() != 3:
        _fail("unshuffle_with_mask_token", f"x must be [N, 1+K, D], got {tuple(x.shape)}")
    n, k1, d = x.shape
    _check_index("unshuffle_with_mask_token", "ids_restore", ids_restore, n)
    L = ids_restore.shape[1]
    if not 1 <= k1 <= L + 1:
        _fail("unshuffle_with_mask_token", f"x has {k1} rows; expected 1 + K with 0 <= K <= L={L}")
    if mask_token.numel() != d:
        _fail("unshuffle_with_mask_token", f"mask_token must have D={d} elements, got {tuple(mask_token.shape)}")
    _check_pos_embed("unshuffle_with_mask_token", pos_embed, L + 1, d)
    _check_devices("unshuffle_with_mask_token", "x",
                   {"x": x, "ids_restore": ids_restore, "mask_token": mask_token, "pos_embed": pos_embed})
    return implementation("kernels", "unshuffle_with_mask_token", backend, x.device.type)(
        x, ids_restore, mask_token.reshape(d), pos_embed
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
    ``norm_pix``), averaged over the removed patches (``mask`` [N, L], 1 = removed). A scalar computed
    and returned in fp32 (float64 for float64 inputs)."""
    op = "masked_pixel_loss"
    p = patch_size
    L = _patch_grid(op, imgs, p)
    n, c = imgs.shape[:2]
    if tuple(pred.shape) != (n, L, p * p * c):
        _fail(op, f"pred must be [N={n}, L={L}, p*p*C={p * p * c}], got {tuple(pred.shape)}")
    if tuple(mask.shape) != (n, L):
        _fail(op, f"mask must be [N={n}, L={L}], got {tuple(mask.shape)}")
    _check_devices(op, "pred", {"pred": pred, "imgs": imgs, "mask": mask})
    return implementation("kernels", op, backend, pred.device.type)(pred, imgs, mask, p, bool(norm_pix))


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
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        _fail("attention", f"q, k, v must share one [B, heads, N, head_dim] shape, got "
              f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return attention_function(backend, q.device.type)(q, k, v)


def attention_function(backend: str | None, device_type: str):
    """The attention backend's ``f(q, k, v)`` on ``device_type``, resolved once: layers keep it
    and call it directly (no lookup per call; q, k, v as :func:`attention` takes them)."""
    return implementation("attention", "attention", backend, device_type)


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
    d = x.shape[-1]
    if branch is not None and branch.shape != x.shape:
        _fail("add_layer_norm", f"branch must be shaped as x {tuple(x.shape)}, got {tuple(branch.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (d,):
            _fail("add_layer_norm", f"{name} must be [D={d}], got {tuple(t.shape)}")
    _check_devices("add_layer_norm", "x", {"x": x, "branch": branch, "weight": weight, "bias": bias})
    device_type = x.device.type
    out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return implementation("kernels", "add_layer_norm", backend, device_type)(x, branch, weight, bias, eps, out_dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``gelu(x + bias)`` (exact GELU) for a matmul's output ``x`` [..., D] and ``bias`` [D]: the
    MLP's first layer with its bias added here instead of in the matmul, and so taken in ``x``'s
    precision (an fp32 bias is rounded to bf16 for a bf16 ``x``, as autocast's matmul would).
    Computed in fp32 (fp64 for fp64) and rounded once to ``x``'s dtype."""
    if tuple(bias.shape) != (x.shape[-1],):
        _fail("bias_gelu", f"bias must be [D={x.shape[-1]}], got {tuple(bias.shape)}")
    _check_devices("bias_gelu", "x", {"x": x, "bias": bias})
    if bias.dtype != x.dtype:
        bias = bias.to(x.dtype)  # as the matmul would have added it (eager autocast steps hand it out in x's dtype)
    return implementation("kernels", "bias_gelu", backend, x.device.type)(x, bias)


def layer_norm(*, backend: str | None = None) -> type[torch.nn.Module]:
    """The LayerNorm class of the ``norm`` backend (``torch`` or ``apex``); its parameters are named
    as ``nn.LayerNorm``'s."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return implementation("norm", "layer_norm", backend, device_type)()
