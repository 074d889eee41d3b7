"""Fixed 2-D sin-cos position embeddings, computed as the original MAE (``util/pos_embed.py``)."""
from __future__ import annotations

import numpy as np

from fastmae.errors import UsageError


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """``pos`` [M] -> [M, embed_dim]: sin of the first half of the frequencies, cos of the second."""
    if embed_dim % 2:
        raise UsageError(f"sin-cos position embedding needs an even dimension, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> np.ndarray:
    """[(1 if cls_token) + h*w, embed_dim]; the cls row is zeros. Half the channels encode the row,
    half the column (the original's meshgrid puts w first and uses grid[0] for the first half)."""
    if embed_dim % 4:
        raise UsageError(f"2-D sin-cos position embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb
