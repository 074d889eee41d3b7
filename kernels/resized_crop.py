"""The pretraining augmentation of a batch of decoded images in one pass: for each image, its
RandomResizedCrop box resized to ``S x S`` (bicubic, no antialias: what torchvision's
``resized_crop`` computes on a tensor, rounded and clamped to uint8 as it does), flipped if drawn
so, divided by 255 and normalized by the mean and std, written into one ``[B, 3, S, S]`` batch.

The images keep the sizes they were decoded at (a list of uint8 ``[3, H, W]`` tensors, as nvJPEG
gives them): the kernel reads each through a table of their addresses, so no image is copied into
a common buffer first. One program computes ``BLOCK`` output pixels of one image, all three
channels: a 4 x 4 neighbourhood per pixel, weighted in fp32 with PyTorch's bicubic coefficients
(A = -0.75; source index ``(i + 0.5) * h / S - 0.5``, neighbours clamped to the crop), summed in
PyTorch's order (each row across, then the rows down). Stores are contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmae.kernels._launch import FP_FUSION, INTERPRET, div_rn, on_device

A = tl.constexpr(-0.75)
TABLE_WIDTH = tl.constexpr(8)


@triton.jit
def _cubic_weights(t):
    """PyTorch's ``get_cubic_upsample_coefficients`` for the fraction ``t``."""
    x0 = t + 1.0
    x1 = t
    x2 = 1.0 - t
    x3 = x2 + 1.0  # (1 - t) + 1 as PyTorch writes it: 2 - t rounds otherwise
    w0 = ((A * x0 - 5.0 * A) * x0 + 8.0 * A) * x0 - 4.0 * A
    w1 = ((A + 2.0) * x1 - (A + 3.0)) * x1 * x1 + 1.0
    w2 = ((A + 2.0) * x2 - (A + 3.0)) * x2 * x2 + 1.0
    w3 = ((A * x3 - 5.0 * A) * x3 + 8.0 * A) * x3 - 4.0 * A
    return w0, w1, w2, w3


@triton.jit
def _source(o, scale, size):
    """The first of the 4 source indices of output index ``o`` and the fraction past it
    (PyTorch's ``guard_index_and_lambda``)."""
    real = scale * (o.to(tl.float32) + 0.5) - 0.5
    i = tl.minimum(tl.floor(real).to(tl.int32), size - 1)
    t = tl.minimum(tl.maximum(real - i.to(tl.float32), 0.0), 1.0)
    return i, t


@triton.jit
def _row(img, row, c0, c1, c2, c3, w0, w1, w2, w3, mask):
    """One source row's contribution: its 4 neighbours weighted, summed left to right."""
    v = tl.load(img + row + c0, mask=mask, other=0).to(tl.float32) * w0
    v += tl.load(img + row + c1, mask=mask, other=0).to(tl.float32) * w1
    v += tl.load(img + row + c2, mask=mask, other=0).to(tl.float32) * w2
    v += tl.load(img + row + c3, mask=mask, other=0).to(tl.float32) * w3
    return v


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _resized_crop_kernel(
    table_ptr, out_ptr,
    mean0, mean1, mean2, std0, std1, std2,
    S: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = o < S * S
    row = table_ptr + TABLE_WIDTH * b  # this image's (address, H, W, top, left, h, w, flip)
    img = tl.load(row).to(tl.pointer_type(tl.uint8), bitcast=True)
    H = tl.load(row + 1).to(tl.int32)
    W = tl.load(row + 2).to(tl.int32)
    top = tl.load(row + 3).to(tl.int32)
    left = tl.load(row + 4).to(tl.int32)
    h = tl.load(row + 5).to(tl.int32)
    w = tl.load(row + 6).to(tl.int32)
    flip = tl.load(row + 7) != 0

    oy = o // S
    ox = o % S
    ox = tl.where(flip, S - 1 - ox, ox)  # the flip of the resized crop
    # the scales correctly rounded, as PyTorch computes them (on the host)
    y, ty = _source(oy, div_rn(h.to(tl.float32), S), h)
    x, tx = _source(ox, div_rn(w.to(tl.float32), S), w)
    wy0, wy1, wy2, wy3 = _cubic_weights(ty)
    wx0, wx1, wx2, wx3 = _cubic_weights(tx)
    # neighbours clamped to the crop, then placed in the image
    c0 = left + tl.minimum(tl.maximum(x - 1, 0), w - 1)
    c1 = left + tl.minimum(tl.maximum(x, 0), w - 1)
    c2 = left + tl.minimum(tl.maximum(x + 1, 0), w - 1)
    c3 = left + tl.minimum(tl.maximum(x + 2, 0), w - 1)
    r0 = (top + tl.minimum(tl.maximum(y - 1, 0), h - 1)).to(tl.int64) * W
    r1 = (top + tl.minimum(tl.maximum(y, 0), h - 1)).to(tl.int64) * W
    r2 = (top + tl.minimum(tl.maximum(y + 1, 0), h - 1)).to(tl.int64) * W
    r3 = (top + tl.minimum(tl.maximum(y + 2, 0), h - 1)).to(tl.int64) * W
    plane = H.to(tl.int64) * W
    out = out_ptr + b.to(tl.int64) * 3 * S * S + o
    for c in tl.static_range(3):
        channel = img + c * plane
        v = _row(channel, r0, c0, c1, c2, c3, wx0, wx1, wx2, wx3, mask) * wy0
        v += _row(channel, r1, c0, c1, c2, c3, wx0, wx1, wx2, wx3, mask) * wy1
        v += _row(channel, r2, c0, c1, c2, c3, wx0, wx1, wx2, wx3, mask) * wy2
        v += _row(channel, r3, c0, c1, c2, c3, wx0, wx1, wx2, wx3, mask) * wy3
        v = _round_half_even(tl.minimum(tl.maximum(v, 0.0), 255.0))
        v = div_rn(v, 255.0)
        if c == 0:
            v = div_rn(v - mean0, std0)
        elif c == 1:
            v = div_rn(v - mean1, std1)
        else:
            v = div_rn(v - mean2, std2)
        tl.store(out + c * S * S, v.to(out_ptr.dtype.element_ty), mask=mask)


def resized_crop_batch(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int,
                       mean: tuple[float, float, float], std: tuple[float, float, float],
                       out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` [B, 3, size, size] from ``images`` (uint8 [3, H, W], contiguous, on ``out``'s
    device), ``boxes`` [B, 4] (top, left, height, width) and ``flips`` [B] on the host. Checks are
    the caller's (:func:`fastmae.data.gpu_augment.resized_crop`)."""
    # one table per batch, one copy from pinned memory: a copy from pageable memory would wait for
    # the training step queued on the device
    on_gpu = out.device.type == "cuda"
    table = torch.empty(len(images), 8, dtype=torch.int64, pin_memory=on_gpu)
    table[:, 0] = torch.tensor([img.data_ptr() for img in images], dtype=torch.int64)
    table[:, 1:3] = torch.tensor([img.shape[1:] for img in images], dtype=torch.int64)
    table[:, 3:7] = boxes
    table[:, 7] = flips
    table = table.to(out.device, non_blocking=True)
    block = triton.next_power_of_2(size * size) if INTERPRET else 256
    grid = (len(images), triton.cdiv(size * size, block))
    with on_device(out):
        _resized_crop_kernel[grid](table, out, *mean, *std, S=size, BLOCK=block, num_warps=4,
                                   enable_fp_fusion=FP_FUSION)
    return out
