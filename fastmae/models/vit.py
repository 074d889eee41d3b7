"""The Vision Transformer that evaluates an MAE encoder (the original ``models_vit.py``: timm's ViT
with global average pooling and ``fc_norm``, or the cls token), and loading encoders into it."""
from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from fastmae.errors import UsageError
from fastmae.models.layers import AttentionBackendSwitch, Block, PatchEmbed
from fastmae.presets import ENCODERS
from fastmae.models.mae import PRESETS

logger = logging.getLogger("fastmae")


class VisionTransformer(AttentionBackendSwitch, nn.Module):
    """ViT classifier with the parameter names of timm's (and the original MAE's) ViT.

    Args:
        img_size, patch_size, in_chans: input geometry.
        num_classes: classes of the linear head (0: no head, features only).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias, norm_layer: the encoder.
        drop_path_rate: stochastic depth, rising linearly from 0 to this over the blocks.
        global_pool: average the patch tokens and normalize them with ``fc_norm`` (the original's
            fine-tuning default), instead of the normalized cls token.
        attention_backend: ``fastmae.ops`` attention backend (None: default).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate: float = 0.0,
        global_pool: bool = False,
        *,
        attention_backend: str | None = None,
    ):
        super().__init__()
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm_layer,
                  attention_backend=attention_backend, drop_path=rate)
            for rate in rates
        ])
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # timm 0.3.2's ViT, which the original builds on
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> pooled features [N, D]."""
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for blk in self.blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False) if self.grad_checkpointing and self.training else blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_vit(name: str, **kwargs) -> VisionTransformer:
    """A ViT preset by name (the encoders of the MAE presets); ``kwargs`` override its settings."""
    if name not in ENCODERS:
        raise UsageError(f"unknown model {name!r}; choose one of {sorted(ENCODERS)}")
    return VisionTransformer(**{**ENCODERS[name], **kwargs})


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[1, 1 + h*w, D]`` position embeddings resized (bicubic, as the original) to ``grid``; the
    cls row is kept as it is."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise UsageError(f"position embedding of {patches.shape[1]} patches is not a square grid")
    if (old, old) == tuple(grid):
        return pos_embed
    d = patches.shape[-1]
    patches = patches.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos_embed.dtype)], dim=1)


def load_encoder(model: VisionTransformer, checkpoint: str | os.PathLike | Mapping[str, Any]) -> list[str]:
    """Load a pretrained encoder into ``model``: from fastmae's pretraining checkpoints, the
    original's (full MAE or encoder-only ``mae_pretrain_vit_*.pth``) or a fine-tuned ViT. The
    position embedding is interpolated when the resolution differs; a head of another shape is
    left out. Returns the keys left as initialized (the head, ``fc_norm``); any other missing key
    is an error that names them."""
    from fastmae.checkpoint import model_state_dict  # reading files is the layer above the models'

    state = model_state_dict(checkpoint)
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in state and (key not in own or state[key].shape != own[key].shape):
            del state[key]
    if "pos_embed" in state:
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], model.patch_embed.grid_size)
    used = {k: v for k, v in state.items() if k in own}
    for key, value in used.items():
        if value.shape != own[key].shape:
            raise UsageError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}")
    missing = [k for k in own if k not in used]
    allowed = ("head.", "fc_norm.")
    if any(not k.startswith(allowed) for k in missing):
        raise UsageError(f"the checkpoint is not an encoder of this model: missing "
                       f"{[k for k in missing if not k.startswith(allowed)]}")
    model.load_state_dict(used, strict=False)
    logger.info("loaded encoder (%d tensors); initialized here: %s; unused from the checkpoint: %d tensors",
                len(used), ", ".join(missing) or "nothing", len(state) - len(used))
    return missing
