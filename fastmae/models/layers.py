"""Vision Transformer layers with the parameter names of timm's ViT (and so of the original MAE)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastmae import ops
from fastmae.errors import UsageError


class Linear(nn.Linear):
    """``nn.Linear`` that can multiply with low-precision working copies of its weight and bias,
    handed to it for an eager autocast step (:class:`fastmae.models.working_copies.WorkingCopies`),
    instead of having autocast cast its fp32 parameters at every call."""

    working: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def own_weights(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        return self.weight, self.bias

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The working copies when handed out, else the parameters."""
        return self.working if self.working is not None else (self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.weights())


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
            raise UsageError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    # like Linear's: the projection's weight and bias, or their working copies when handed out
    working: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def own_weights(self) -> tuple[nn.Parameter, nn.Parameter | None]:
        return self.proj.weight, self.proj.bias

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.working if self.working is not None else (self.proj.weight, self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, *self.weights(), stride=self.patch_size).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward_fused(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:
        """The same with fc1's bias added in a fused GELU (``ops.bias_gelu``)."""
        weight, bias = self.fc1.weights()
        return self.fc2(ops.bias_gelu(F.linear(x, weight), bias, backend=backend))


class Attention(nn.Module):
    """Multi-head self-attention through :mod:`fastmae.ops`' attention backends.

    Args:
        dim: token dimension.
        num_heads: heads; must divide ``dim``.
        qkv_bias: bias on the fused qkv projection (MAE: on).
        attention_backend: ``fastmae.ops`` attention backend name, or None for the default. It is
            resolved once per device type, at the first call there (no lookup per call).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attention_backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise UsageError(f"dimension {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attention_backend = attention_backend
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    @property
    def attention_backend(self) -> str | None:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str | None) -> None:
        self._attention_backend = name
        self._attend: dict[str, object] = {}  # device type -> the backend's attention function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = self.attention_function(x.device.type)(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    def attention_function(self, device_type: str):
        """The backend's attention function on ``device_type``, resolved at the first call (a model
        to be compiled resolves it before: filled while traced, the cache would change under the
        compiled graph's guards and recompile it, see :func:`resolve_attention`)."""
        attend = self._attend.get(device_type)
        if attend is None:
            attend = self._attend[device_type] = ops.attention_function(self._attention_backend, device_type)
        return attend


def resolve_attention(model: nn.Module, device_type: str) -> None:
    """Resolve the attention backend of every :class:`Attention` in ``model`` on ``device_type``
    now: before ``torch.compile`` traces the model."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.attention_function(device_type)


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

    def forward(self, x: torch.Tensor, branch: torch.Tensor | None = None, fused: bool = False,
                backend: str | None = None):
        """``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``: the residual stream after this block.

        ``fused``: the same block with its residual additions fused into the next LayerNorm
        (``ops.add_layer_norm`` of the kernel ``backend``) and the MLP's bias into its GELU. Then
        ``x`` is the residual stream without the previous block's last branch ``branch`` (None
        before the first block), which this block adds first, and the block returns its own
        ``(residual, branch)``: the caller adds that branch, fused into the next LayerNorm too
        (:func:`run_blocks`)."""
        if not fused:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x, y = ops.add_layer_norm(x, branch, self.norm1.weight, self.norm1.bias, self.norm1.eps, backend=backend)
        x, y = ops.add_layer_norm(x, self.drop_path(self.attn(y)), self.norm2.weight, self.norm2.bias, self.norm2.eps,
                                  backend=backend)
        return x, self.drop_path(self.mlp.forward_fused(y, backend))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, norm: nn.Module, *, fused: bool, backend: str | None = None,
               checkpointed: bool = False) -> torch.Tensor:
    """``norm(blocks(x))``. ``fused``: every residual addition fused into the LayerNorm after it,
    the final one into ``norm`` (:meth:`Block.forward`). ``checkpointed``: each block's
    activations are recomputed in the backward instead of kept."""
    def call(blk, *args):
        return checkpoint(blk, *args, use_reentrant=False) if checkpointed else blk(*args)

    if not fused:
        for blk in blocks:
            x = call(blk, x)
        return norm(x)
    branch = None
    for blk in blocks:
        x, branch = call(blk, x, branch, True, backend)
    return ops.add_layer_norm(x, branch, norm.weight, norm.bias, norm.eps, backend=backend)[1]


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
