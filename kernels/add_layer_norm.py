"""Residual addition and LayerNorm in one pass: ``h = x + branch``, ``y = layer_norm(h)``.

A pre-norm transformer block adds each branch to the residual stream and normalizes the sum for
the next branch; unfused that is an add, a LayerNorm and (under autocast) a cast of its fp32 output
for the next matmul: three passes over the activations. Here each row is read once (``x``, the
branch), and written once as ``h`` (the residual, in ``x``'s dtype promoted with the branch's) and
once as ``y`` in the dtype the next matmul takes. Statistics in fp32 (fp64 for fp64), from ``h`` as
stored (a bf16 residual is normalized as rounded, as the unfused ops do).

The backward is one pass too: ``dh = dh_out + LN'(dy)``, written as the gradient of ``x`` and of
the branch (each in its own dtype); the weight and bias gradients are summed per program into fp32
partial rows, then by one ``torch.sum``: deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastmae.kernels._launch import FP_FUSION, accumulator_is_fp64, on_device, row_tiles


@triton.jit
def _add_layer_norm_fwd(
    x_ptr, branch_ptr, w_ptr, b_ptr, h_ptr, y_ptr, mean_ptr, rstd_ptr,
    n_rows, D, eps, tiles_per_program,
    HAS_BRANCH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    i_p = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    b_w = tl.full([BLOCK_W], 1.0, acc_dtype)
    b_b = tl.zeros([BLOCK_W], dtype=acc_dtype)
    if HAS_W:
        b_w = tl.load(w_ptr + o_d, mask=m_d, other=1.0).to(acc_dtype)
    if HAS_B:
        b_b = tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(acc_dtype)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < n_rows
        m = m_r[:, None] & m_d[None, :]
        o = o_r[:, None] * D + o_d[None, :]  # [BR, BW]
        b_h = tl.load(x_ptr + o, mask=m, other=0.0).to(acc_dtype)
        if HAS_BRANCH:
            b_h += tl.load(branch_ptr + o, mask=m, other=0.0).to(acc_dtype)
            b_h = b_h.to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + o, b_h, mask=m)
            b_h = b_h.to(acc_dtype)  # normalized as stored
        b_mean = tl.sum(b_h, axis=1) / D  # [BR]
        b_c = tl.where(m, b_h - b_mean[:, None], 0.0)
        b_var = tl.sum(b_c * b_c, axis=1) / D  # biased, as layer_norm
        b_rstd = 1.0 / tl.sqrt(b_var + eps)
        b_y = b_c * b_rstd[:, None] * b_w[None, :] + b_b[None, :]
        tl.store(y_ptr + o, b_y.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + o_r, b_mean, mask=m_r)
        tl.store(rstd_ptr + o_r, b_rstd, mask=m_r)


@triton.jit
def _add_layer_norm_bwd(
    dy_ptr, dh_ptr, h_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dbranch_ptr, dw_partial_ptr, db_partial_ptr,
    n_rows, D, tiles_per_program,
    HAS_DH: tl.constexpr, HAS_BRANCH: tl.constexpr, HAS_W: tl.constexpr, FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    i_p = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    b_w = tl.full([BLOCK_W], 1.0, acc_dtype)
    if HAS_W:
        b_w = tl.load(w_ptr + o_d, mask=m_d, other=0.0).to(acc_dtype)
    b_dw = tl.zeros([BLOCK_W], dtype=acc_dtype)
    b_db = tl.zeros([BLOCK_W], dtype=acc_dtype)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)
        m_r = o_r < n_rows
        m = m_r[:, None] & m_d[None, :]
        o = o_r[:, None] * D + o_d[None, :]
        b_mean = tl.load(mean_ptr + o_r, mask=m_r, other=0.0)
        b_rstd = tl.load(rstd_ptr + o_r, mask=m_r, other=0.0)
        b_xhat = tl.where(m, (tl.load(h_ptr + o, mask=m, other=0.0).to(acc_dtype) - b_mean[:, None]) * b_rstd[:, None], 0.0)
        b_dy = tl.load(dy_ptr + o, mask=m, other=0.0).to(acc_dtype)
        b_dw += tl.sum(b_dy * b_xhat, axis=0)
        b_db += tl.sum(b_dy, axis=0)
        b_wdy = b_dy * b_w[None, :]
        c1 = tl.sum(b_xhat * b_wdy, axis=1) / D  # [BR]
        c2 = tl.sum(b_wdy, axis=1) / D
        b_dh = (b_wdy - (b_xhat * c1[:, None] + c2[:, None])) * b_rstd[:, None]
        if HAS_DH:
            b_dh += tl.load(dh_ptr + o, mask=m, other=0.0).to(acc_dtype)
        tl.store(dx_ptr + o, b_dh.to(dx_ptr.dtype.element_ty), mask=m)
        if HAS_BRANCH:
            tl.store(dbranch_ptr + o, b_dh.to(dbranch_ptr.dtype.element_ty), mask=m)
    tl.store(dw_partial_ptr + i_p * D + o_d, b_dw, mask=m_d)
    tl.store(db_partial_ptr + i_p * D + o_d, b_db, mask=m_d)


def _stats_dtype(*tensors) -> torch.dtype:
    return torch.float64 if accumulator_is_fp64(*tensors) else torch.float32


@torch.library.custom_op("fastmae::add_layer_norm", mutates_args=())
def add_layer_norm_op(
    x: torch.Tensor, branch: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: float, out_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (h, y, mean, rstd): ``h = x + branch`` (empty without a branch: ``h`` is ``x``), ``y`` its
    LayerNorm in ``out_dtype`` (default: ``h``'s), per-row mean and 1/std for the backward."""
    x = x.contiguous()
    D = x.shape[-1]
    rows = x.numel() // D
    h_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    h = torch.empty(x.shape, dtype=h_dtype, device=x.device) if branch is not None else x.new_empty(0)
    y = torch.empty(x.shape, dtype=out_dtype or h_dtype, device=x.device)
    stats = _stats_dtype(x, branch)
    mean = torch.empty(x.shape[:-1], dtype=stats, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=stats, device=x.device)
    t = row_tiles(rows, D, x.device)
    with on_device(x):
        _add_layer_norm_fwd[t.grid](
            x, branch.contiguous() if branch is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, h, y, mean, rstd, rows, D, eps, t.tiles_per_program,
            HAS_BRANCH=branch is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            FP64=stats == torch.float64, BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    return h, y, mean, rstd


@torch.library.custom_op("fastmae::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward_op(
    dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype, branch_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dbranch, dweight, dbias); ``dbranch`` is empty without a branch, ``dweight`` and
    ``dbias`` are fp32 (fp64) sums, in the parameters' shape."""
    dy, h = dy.contiguous(), h.contiguous()
    D = h.shape[-1]
    rows = h.numel() // D
    dx = torch.empty(h.shape, dtype=x_dtype, device=h.device)
    dbranch = torch.empty(h.shape, dtype=branch_dtype, device=h.device) if branch_dtype is not None else h.new_empty(0)
    t = row_tiles(rows, D, h.device, reducing=True)
    dw_partial = torch.empty(t.grid[0], D, dtype=mean.dtype, device=h.device)
    db_partial = torch.empty_like(dw_partial)
    with on_device(h):
        _add_layer_norm_bwd[t.grid](
            dy, dh.contiguous() if dh is not None else dy, h, weight if weight is not None else h, mean, rstd,
            dx, dbranch, dw_partial, db_partial, rows, D, t.tiles_per_program,
            HAS_DH=dh is not None, HAS_BRANCH=branch_dtype is not None, HAS_W=weight is not None,
            FP64=mean.dtype == torch.float64, BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps,
            enable_fp_fusion=FP_FUSION,
        )
    return dx, dbranch, dw_partial.sum(0), db_partial.sum(0)


@add_layer_norm_op.register_fake
def _(x, branch, weight, bias, eps, out_dtype):
    h_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    stats = _stats_dtype(x, branch)
    h = torch.empty_like(x, dtype=h_dtype) if branch is not None else x.new_empty(0)
    return h, torch.empty_like(x, dtype=out_dtype or h_dtype), x.new_empty(x.shape[:-1], dtype=stats), \
        x.new_empty(x.shape[:-1], dtype=stats)


@add_layer_norm_backward_op.register_fake
def _(dy, dh, h, weight, mean, rstd, x_dtype, branch_dtype):
    D = h.shape[-1]
    dbranch = torch.empty_like(h, dtype=branch_dtype) if branch_dtype is not None else h.new_empty(0)
    return torch.empty_like(h, dtype=x_dtype), dbranch, h.new_empty(D, dtype=mean.dtype), h.new_empty(D, dtype=mean.dtype)


def _setup(ctx, inputs, output):
    x, branch, weight, bias, eps, out_dtype = inputs
    h, _, mean, rstd = output
    ctx.save_for_backward(h if branch is not None else x, weight, mean, rstd)
    ctx.x_dtype, ctx.branch_dtype = x.dtype, branch.dtype if branch is not None else None
    ctx.w_dtype = weight.dtype if weight is not None else None
    ctx.b_dtype = bias.dtype if bias is not None else None
    # An output without a gradient stays None rather than a tensor of zeros: mean and rstd never have
    # one, nor has h where nothing reads it (the final norm's residual): no fills, no zeros to read.
    ctx.set_materialize_grads(False)


def _backward(ctx, dh, dy, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if ctx.branch_dtype is None:
        dh = None  # without a branch the op's h is empty: x's other uses carry their own gradient
    if dy is None:  # only the residual is read on (rare): the sum's gradient passes to both inputs
        if dh is None:
            return None, None, None, None, None, None
        return dh.to(ctx.x_dtype), dh.to(ctx.branch_dtype), None, None, None, None
    dx, dbranch, dw, db = add_layer_norm_backward_op(dy, dh, h, weight, mean, rstd, ctx.x_dtype, ctx.branch_dtype)
    return (dx, dbranch if ctx.branch_dtype is not None else None,
            dw.to(ctx.w_dtype) if ctx.w_dtype is not None else None,
            db.to(ctx.b_dtype) if ctx.b_dtype is not None else None, None, None)


add_layer_norm_op.register_autograd(once_differentiable(_backward), setup_context=_setup)


def add_layer_norm(x, branch, weight, bias, eps, out_dtype=None):
    h, y, _, _ = add_layer_norm_op(x, branch, weight, bias, eps, out_dtype)
    return (h if branch is not None else x), y
