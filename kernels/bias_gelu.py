"""The MLP's bias and GELU in one pass: ``y = gelu(x + bias)`` (exact, erf GELU), for ``x`` the
first MLP matmul's output without its bias.

Unfused, the backward of ``gelu(x @ W1^T + b1)`` reads the pre-activation twice: once for GELU's
derivative, once more to sum the bias gradient over the rows. Here the backward reads ``dy`` and
``x`` once and writes ``dx``, and sums the bias gradient per program into fp32 partial rows (then one
``torch.sum``: deterministic). The forward computes in fp32 and rounds once, to ``x``'s dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastmae.kernels._launch import FP_FUSION, accumulator_is_fp64, on_device, row_tiles

SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _bias_gelu_fwd(
    x_ptr, b_ptr, y_ptr, n_rows, D, tiles_per_program,
    FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    i_p = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    b_b = tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(acc_dtype)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)
        m = (o_r < n_rows)[:, None] & m_d[None, :]
        o = o_r[:, None] * D + o_d[None, :]
        b_a = tl.load(x_ptr + o, mask=m, other=0.0).to(acc_dtype) + b_b[None, :]
        b_y = 0.5 * b_a * (1.0 + tl.math.erf(b_a * SQRT1_2))
        tl.store(y_ptr + o, b_y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bias_gelu_bwd(
    dy_ptr, x_ptr, b_ptr, dx_ptr, db_partial_ptr, n_rows, D, tiles_per_program,
    FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    i_p = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BLOCK_W)
    m_d = o_d < D
    b_b = tl.load(b_ptr + o_d, mask=m_d, other=0.0).to(acc_dtype)
    b_db = tl.zeros([BLOCK_W], dtype=acc_dtype)
    for i_t in range(tiles_per_program):
        o_r = (i_p * tiles_per_program + i_t) * BLOCK_R + tl.arange(0, BLOCK_R)
        m = (o_r < n_rows)[:, None] & m_d[None, :]
        o = o_r[:, None] * D + o_d[None, :]
        b_a = tl.load(x_ptr + o, mask=m, other=0.0).to(acc_dtype) + b_b[None, :]
        b_dgelu = 0.5 * (1.0 + tl.math.erf(b_a * SQRT1_2)) + b_a * INV_SQRT_2PI * tl.exp(-0.5 * b_a * b_a)
        b_dx = tl.where(m, tl.load(dy_ptr + o, mask=m, other=0.0).to(acc_dtype) * b_dgelu, 0.0)
        b_db += tl.sum(b_dx, axis=0)
        tl.store(dx_ptr + o, b_dx.to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(db_partial_ptr + i_p * D + o_d, b_db, mask=m_d)


@torch.library.custom_op("fastmae::bias_gelu", mutates_args=())
def bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    D = x.shape[-1]
    y = torch.empty_like(x)
    t = row_tiles(x.numel() // D, D, x.device)
    with on_device(x):
        _bias_gelu_fwd[t.grid](x, bias.contiguous(), y, x.numel() // D, D, t.tiles_per_program,
                               FP64=accumulator_is_fp64(x, bias), BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W,
                               num_warps=t.num_warps, enable_fp_fusion=FP_FUSION)
    return y


@torch.library.custom_op("fastmae::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx in x's dtype, dbias summed in fp32 (fp64))."""
    dy, x = dy.contiguous(), x.contiguous()
    D = x.shape[-1]
    rows = x.numel() // D
    dx = torch.empty_like(x)
    fp64 = accumulator_is_fp64(x, bias)
    t = row_tiles(rows, D, x.device, reducing=True)
    db_partial = torch.empty(t.grid[0], D, dtype=torch.float64 if fp64 else torch.float32, device=x.device)
    with on_device(x):
        _bias_gelu_bwd[t.grid](dy, x, bias.contiguous(), dx, db_partial, rows, D, t.tiles_per_program,
                               FP64=fp64, BLOCK_R=t.BLOCK_R, BLOCK_W=t.BLOCK_W, num_warps=t.num_warps,
                               enable_fp_fusion=FP_FUSION)
    return dx, db_partial.sum(0)


@bias_gelu_op.register_fake
def _(x, bias):
    return torch.empty_like(x)


@bias_gelu_backward_op.register_fake
def _(dy, x, bias):
    acc = torch.float64 if accumulator_is_fp64(x, bias) else torch.float32
    return torch.empty_like(x), x.new_empty(x.shape[-1], dtype=acc)


def _setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = bias_gelu_backward_op(dy, x, bias)
    return dx, db.to(bias.dtype)


bias_gelu_op.register_autograd(once_differentiable(_backward), setup_context=_setup)
