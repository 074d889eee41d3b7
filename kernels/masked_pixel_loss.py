"""MAE's loss in one pass: patchify, per-patch normalization, squared error, masked mean.

Each program reads rows ``n*L + l`` of ``pred`` [N, L, P] (P = p*p*C) and the matching patch of
``imgs`` [N, C, H, W] directly, in the target's ``nhwpqc`` layout; the normalized target lives only
in registers. Rows whose mask is 0 are not read at all. When the prediction needs a gradient, the
same pass also writes ``g = mask * (pred - target)`` (zeros for kept rows), so the backward is one
elementwise pass, ``g * (2 * grad_loss / (P * mask.sum()))``: the loss's inputs are never read
twice. (``g`` holds values of the size of the pixels, not of the gradient: an fp16 gradient, tiny
until the loss scale multiplies it, would lose its small entries to underflow if it were rounded
before that.)
Per-row losses, and the mask (the count of removed patches, the mean's denominator), are summed per
program in a fixed order, and the per-program partial sums by one more kernel, which also divides:
two launches in all, the result is deterministic, and the mask is read once, by this pass (the
backward takes its sum from here).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._launch import (
    FP_FUSION, INTERPRET, INTERPRET_TILE_ELEMENTS, TILE_ELEMENTS, accumulator_is_fp64, div_rn, needs_int64_offsets,
    on_device, program_index, row_tiles,
)
from fastmae.numerics import NORM_PIX_EPS


@triton.jit
def _div(a, b, FP64: tl.constexpr):
    """a / b correctly rounded (fp64's `/` is)."""
    if FP64:
        return a / b
    else:
        return div_rn(a, b)


@triton.jit
def _masked_pixel_loss_fwd(
    pred_ptr, img_ptr, mask_ptr, partial_ptr, dpred_ptr,
    n_rows, L, H, W, GW, tiles_per_program, n_programs,
    C: tl.constexpr, PATCH: tl.constexpr, EPS: tl.constexpr, NORM_PIX: tl.constexpr, WITH_GRAD: tl.constexpr,
    FP64: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    i_p = program_index(INT64)
    P: tl.constexpr = PATCH * PATCH * C
    # A tile is [rows, element e of pred's row], in pred's own (i, j, c) order (patchify's nhwpqc):
    # pred and the gradient, the 2-byte streams, move as contiguous vectors (16 bytes where a row's
    # bytes are a multiple of 16, as at p=16; 8 at p=14); each element's pixel is gathered from the
    # patch's C * PATCH rows of the image, which the row's neighbouring lanes read too (the image is
    # read from memory once, the gather is served by the cache).
    o_e = tl.arange(0, BLOCK_E)[None, :]
    m_e = o_e < P
    o_pix = o_e // C
    o_c = o_e % C
    if INT64:
        o_c = o_c.to(tl.int64)  # a single image may pass 2^31 elements
    o_img = (o_c * H + o_pix // PATCH) * W + o_pix % PATCH  # [1, BE] offset from the patch's corner
    b_loss = tl.zeros([BLOCK_R], dtype=acc_dtype)
    b_msum = tl.zeros([BLOCK_R], dtype=acc_dtype)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)  # row n*L + l
        m_r = o_r < n_rows
        b_m = tl.load(mask_ptr + o_r, mask=m_r, other=0.0).to(acc_dtype)  # [BR]
        b_msum += b_m
        m = (m_r & (b_m != 0))[:, None] & m_e  # kept patches are not read
        o_n = o_r // L
        o_l = o_r % L
        o_corner = (o_n * C * H + (o_l // GW) * PATCH) * W + (o_l % GW) * PATCH  # [BR] image offset
        b_t = tl.load(img_ptr + o_corner[:, None] + o_img, mask=m, other=0.0).to(acc_dtype)
        b_pred = tl.load(pred_ptr + o_r[:, None] * P + o_e, mask=m, other=0.0).to(acc_dtype)
        if NORM_PIX:
            b_mean = _div(tl.sum(b_t, axis=1), P, FP64)
            b_c = tl.where(m, b_t - b_mean[:, None], 0.0)
            b_var = _div(tl.sum(b_c * b_c, axis=1), P - 1, FP64)  # unbiased, as torch.var
            # sqrt_rn: correctly rounded (plain sqrt is approximate in fp32 on GPUs); fp32 only
            b_std = tl.sqrt(b_var + EPS) if FP64 else tl.sqrt_rn(b_var + EPS)
            b_t = _div(b_c, b_std[:, None], FP64)
        b_diff = tl.where(m, b_pred - b_t, 0.0)
        b_loss += b_m * _div(tl.sum(b_diff * b_diff, axis=1), P, FP64)
        if WITH_GRAD:
            b_dpred = b_diff * b_m[:, None]
            tl.store(dpred_ptr + o_r[:, None] * P + o_e, b_dpred.to(dpred_ptr.dtype.element_ty),
                     mask=m_r[:, None] & m_e)
    tl.store(partial_ptr + i_p, tl.sum(b_loss, axis=0))
    tl.store(partial_ptr + n_programs + i_p, tl.sum(b_msum, axis=0))


@triton.jit
def _clamp_count(msum, TINY: tl.constexpr):
    """The loss's denominator, max(mask sum, TINY) (the accumulator's smallest normal number), as the
    reference's ``clamp_min``: a NaN sum stays NaN (csrc/fastmae_ops.h's clamp_count is the same)."""
    return tl.where(msum < TINY, TINY, msum)


@triton.jit
def _finish_loss(partial_ptr, loss_ptr, msum_ptr, n_programs,
                 TINY: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """One program: msum = the mask's partial sums' total, loss = the losses' total / max(msum, tiny)."""
    acc_dtype = tl.float64 if FP64 else tl.float32
    b_loss = tl.zeros([BLOCK], dtype=acc_dtype)
    b_msum = tl.zeros([BLOCK], dtype=acc_dtype)
    for start in range(0, n_programs, BLOCK):
        o = start + tl.arange(0, BLOCK)
        b_loss += tl.load(partial_ptr + o, mask=o < n_programs, other=0.0)
        b_msum += tl.load(partial_ptr + n_programs + o, mask=o < n_programs, other=0.0)
    loss = tl.sum(b_loss, axis=0)
    msum = tl.sum(b_msum, axis=0)
    tl.store(loss_ptr, _div(loss, _clamp_count(msum, TINY), FP64))
    tl.store(msum_ptr, msum)


@torch.library.custom_op("fastmae::masked_pixel_loss", mutates_args=())
def masked_pixel_loss_op(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss, g, mask.sum()): ``g = mask * (pred - target)`` when ``with_grad`` (d loss / d pred is
    ``g * 2 / (P * mask.sum())``), else an empty tensor."""
    pred, imgs, mask = pred.contiguous(), imgs.contiguous(), mask.contiguous()
    n, c, H, W = imgs.shape
    L = pred.shape[1]
    fp64 = accumulator_is_fp64(pred, imgs)
    acc = torch.float64 if fp64 else torch.float32
    # one scalar partial of each sum per program: no need to cap the programs
    t = row_tiles(n * L, pred.shape[2], pred.device)
    partial = torch.empty(2, t.grid[0], dtype=acc, device=pred.device)
    loss = torch.empty((), dtype=acc, device=pred.device)
    msum = torch.empty((), dtype=acc, device=pred.device)
    dpred = torch.empty_like(pred) if with_grad else pred.new_empty(0)
    with on_device(pred):
        _masked_pixel_loss_fwd[t.grid](
            pred, imgs, mask, partial, dpred,
            n * L, L, H, W, W // patch_size, t.tiles_per_program, t.grid[0],
            C=c, PATCH=patch_size, EPS=NORM_PIX_EPS, NORM_PIX=norm_pix, WITH_GRAD=with_grad, FP64=fp64,
            INT64=needs_int64_offsets(pred, imgs),
            BLOCK_R=t.BLOCK_R, BLOCK_E=t.BLOCK_W, num_warps=t.num_warps, enable_fp_fusion=FP_FUSION,
        )
        _finish_loss[(1,)](partial, loss, msum, t.grid[0], TINY=torch.finfo(acc).tiny, FP64=fp64, BLOCK=1024,
                           enable_fp_fusion=FP_FUSION)
    return loss, dpred, msum


@triton.jit
def _masked_pixel_loss_bwd(g_ptr, dloss_ptr, msum_ptr, dpred_ptr, n_elements, P,
                           TINY: tl.constexpr, FP64: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """dpred = g * (2 * dloss / (P * max(msum, tiny))): the factor formed in the accumulator dtype by
    every program (two scalar loads), each element rounded once, to g's dtype."""
    acc_dtype = tl.float64 if FP64 else tl.float32
    msum = tl.load(msum_ptr).to(acc_dtype)
    twice = 2 * tl.load(dloss_ptr).to(acc_dtype)
    denominator = _clamp_count(msum, TINY) * P  # P converted to the accumulator dtype (exactly: P < 2^24)
    factor = _div(twice, denominator, FP64)
    o = program_index(INT64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_elements
    b_g = tl.load(g_ptr + o, mask=m, other=0.0).to(acc_dtype)
    tl.store(dpred_ptr + o, (b_g * factor).to(dpred_ptr.dtype.element_ty), mask=m)


@torch.library.custom_op("fastmae::masked_pixel_loss_backward", mutates_args=())
def masked_pixel_loss_backward_op(g: torch.Tensor, dloss: torch.Tensor, msum: torch.Tensor) -> torch.Tensor:
    """d loss / d pred from the forward's ``g`` and ``mask.sum()`` and the loss's gradient ``dloss``
    (the loss scale of fp16 training included, applied before anything is rounded): one pass."""
    g = g.contiguous()
    fp64 = accumulator_is_fp64(g, dloss, msum)
    dpred = torch.empty_like(g)
    block = INTERPRET_TILE_ELEMENTS if INTERPRET else TILE_ELEMENTS
    with on_device(g):
        _masked_pixel_loss_bwd[(max(1, triton.cdiv(g.numel(), block)),)](
            g, dloss, msum, dpred, g.numel(), g.shape[-1],
            TINY=torch.finfo(torch.float64 if fp64 else torch.float32).tiny, FP64=fp64,
            INT64=needs_int64_offsets(g), BLOCK=block, num_warps=8, enable_fp_fusion=FP_FUSION,
        )
    return dpred
