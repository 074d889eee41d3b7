"""MAE's loss in one pass: patchify, per-patch normalization, squared error, masked mean.

Each program reads rows ``n*L + l`` of ``pred`` [N, L, P] (P = p*p*C) and the matching patch of
``imgs`` [N, C, H, W] directly, in the target's ``nhwpqc`` layout; the normalized target lives only
in registers. Rows whose mask is 0 are not read at all. When the prediction needs a gradient, the
same pass also writes ``dpred = 2 * mask * (pred - target) / (P * mask.sum())`` (zeros for kept rows),
so the backward is only ``dpred * grad_loss``: the loss's inputs are never read twice.
Per-row losses are summed per program in a fixed order, and the per-program partial sums by one
``torch.sum``: the result is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._launch import accumulator_is_fp64, row_tiles
from fastmae.ops.reference import NORM_PIX_EPS


@triton.jit
def _masked_pixel_loss_fwd(
    pred_ptr, img_ptr, mask_ptr, msum_ptr, loss_partial_ptr, dpred_ptr,
    n_rows, L, C, H, W, GW, tiles_per_program, eps,
    PATCH: tl.constexpr, NORM_PIX: tl.constexpr, WITH_GRAD: tl.constexpr, FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    i_p = tl.program_id(0).to(tl.int64)
    P = PATCH * PATCH * C
    o_e = tl.arange(0, BLOCK_W)  # element of the patch, (i, j, c) order as patchify's nhwpqc
    m_e = o_e < P
    o_c = o_e % C
    o_q = (o_e // C) % PATCH
    o_pi = o_e // (C * PATCH)
    if WITH_GRAD:
        b_scale = 2.0 / (P * tl.maximum(tl.load(msum_ptr).to(acc_dtype), 1e-30))
    b_loss = tl.zeros([BLOCK_R], dtype=acc_dtype)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)  # row n*L + l
        m_r = o_r < n_rows
        b_m = tl.load(mask_ptr + o_r, mask=m_r, other=0.0).to(acc_dtype)  # [BR]
        m_removed = m_r & (b_m != 0)
        m = m_removed[:, None] & m_e[None, :]
        o_n = o_r // L
        o_l = o_r % L
        o_h = (o_l // GW) * PATCH
        o_w = (o_l % GW) * PATCH
        o_img = ((o_n[:, None] * C + o_c[None, :]) * H + o_h[:, None] + o_pi[None, :]) * W + o_w[:, None] + o_q[None, :]
        b_t = tl.load(img_ptr + o_img, mask=m, other=0.0).to(acc_dtype)  # [BR, BW]
        b_pred = tl.load(pred_ptr + o_r[:, None] * P + o_e[None, :], mask=m, other=0.0).to(acc_dtype)
        if NORM_PIX:
            b_mean = tl.sum(b_t, axis=1) / P
            b_c = tl.where(m, b_t - b_mean[:, None], 0.0)
            b_var = tl.sum(b_c * b_c, axis=1) / (P - 1)  # unbiased, as torch.var
            # sqrt_rn: IEEE rounding (plain sqrt is approximate in fp32 on GPUs); fp32 only
            b_std = tl.sqrt(b_var + eps) if FP64 else tl.sqrt_rn(b_var + eps)
            b_t = b_c / b_std[:, None]
        b_diff = tl.where(m, b_pred - b_t, 0.0)
        b_loss += b_m * (tl.sum(b_diff * b_diff, axis=1) / P)
        if WITH_GRAD:
            b_dpred = b_diff * (b_m * b_scale)[:, None]
            tl.store(dpred_ptr + o_r[:, None] * P + o_e[None, :], b_dpred.to(dpred_ptr.dtype.element_ty),
                     mask=m_r[:, None] & m_e[None, :])
    tl.store(loss_partial_ptr + i_p, tl.sum(b_loss, axis=0))


@torch.library.custom_op("fastmae::masked_pixel_loss", mutates_args=())
def masked_pixel_loss_op(
    pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss, dpred): dpred is d loss / d pred when ``with_grad``, else an empty tensor."""
    pred, imgs, mask = pred.contiguous(), imgs.contiguous(), mask.contiguous()
    n, c, H, W = imgs.shape
    L, P = pred.shape[1], pred.shape[2]
    fp64 = accumulator_is_fp64(pred, imgs)
    acc = torch.float64 if fp64 else torch.float32
    msum = mask.sum(dtype=acc)
    t = row_tiles(n * L, P, reducing=True)
    partial = torch.empty(t.grid[0], dtype=acc, device=pred.device)
    dpred = torch.empty_like(pred) if with_grad else pred.new_empty(0)
    _masked_pixel_loss_fwd[t.grid](
        pred, imgs, mask, msum, partial, dpred,
        n * L, L, c, H, W, W // patch_size, t.tiles_per_program, NORM_PIX_EPS,
        PATCH=patch_size, NORM_PIX=norm_pix, WITH_GRAD=with_grad, FP64=fp64,
        BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps,
    )
    return partial.sum() / msum.clamp_min(torch.finfo(acc).tiny), dpred


@masked_pixel_loss_op.register_fake
def _(pred, imgs, mask, patch_size, norm_pix, with_grad):
    acc = torch.float64 if torch.float64 in (pred.dtype, imgs.dtype) else torch.float32
    return pred.new_empty((), dtype=acc), (torch.empty_like(pred) if with_grad else pred.new_empty(0))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, dloss, _ddpred):
    (dpred,) = ctx.saved_tensors
    if dpred.numel() == 0 and ctx.needs_input_grad[0]:
        raise RuntimeError("masked_pixel_loss was computed without its gradient (with_grad=False)")
    return dpred * dloss, None, None, None, None, None


masked_pixel_loss_op.register_autograd(_backward, setup_context=_setup)
