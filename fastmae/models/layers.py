"""Vision Transformer layers with the parameter names of timm's ViT (and so of the original MAE)."""
from __future__ import annotations

import torch
from torch import nn

from fastmae import ops


class PatchEmbed(nn.Module):
    """Image [N, C, H, W] -> patch embeddings [N, L, D] by a stride-p convolution.

    Args:
        img_size: input resolution (square).
        patch_size: patch side ``p``; must divide ``img_size``.
        in_chans: image channels.
        embed_dim: embedding dimension ``D``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through :func:`fastmae.ops.attention`.

    Args:
        dim: token dimension.
        num_heads: heads; must divide ``dim``.
        qkv_bias: bias on the fused qkv projection (MAE: on).
        attention_backend: ``fastmae.ops`` attention backend name, or None for the default.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attention_backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dimension {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_backend = attention_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = ops.attention(q, k, v, backend=self.attention_backend)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DropPath(nn.Module):
    """Stochastic depth: in training, drop the residual branch of a whole sample with probability
    ``p`` (and scale the kept ones by 1 / (1 - p)), as timm's ``DropPath``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: token dimension.
        num_heads: attention heads.
        mlp_ratio: MLP hidden dimension over ``dim``.
        qkv_bias: bias on the qkv projection.
        norm_layer: normalization layer constructor.
        attention_backend: ``fastmae.ops`` attention backend name, or None for the default.
        drop_path: stochastic depth rate of both residual branches (fine-tuning).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        attention_backend: str | None = None,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attention_backend=attention_backend)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AttentionBackendSwitch:
    """For models: ``attention_backend`` reads and sets the backend of every :class:`Attention`
    layer at once (None: the default)."""

    @property
    def attention_backend(self) -> str | None:
        return next((m.attention_backend for m in self.modules() if isinstance(m, Attention)), None)

    @attention_backend.setter
    def attention_backend(self, name: str | None) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.attention_backend = name
