"""MAE with a Vision Transformer backbone, computing what the original ``models_mae.py`` computes.

The encoder sees only the visible patches (plus cls); the decoder sees every position. The hot paths
(masking, gathering the visible tokens, the unshuffle with the mask token, the loss, attention) go
through :mod:`fastmae.ops`, so choosing a backend switches the model. Parameter names are the
original's, so its checkpoints load unchanged.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fastmae import ops
from fastmae.errors import UsageError
from fastmae.models.layers import AttentionBackendSwitch, Block, Linear, PatchEmbed, run_blocks
from fastmae.models.pos_embed import get_2d_sincos_pos_embed
from fastmae.presets import PRESETS


class MaskedAutoencoderViT(AttentionBackendSwitch, nn.Module):
    """Masked Autoencoder with a ViT encoder and a lighter ViT decoder.

    Args:
        img_size, patch_size, in_chans: input geometry; ``patch_size`` must divide ``img_size``.
        embed_dim, depth, num_heads: encoder width, blocks and heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width, blocks and heads.
        mlp_ratio: MLP hidden dimension over the token dimension.
        norm_layer: normalization layer constructor (the presets use LayerNorm with eps 1e-6).
        norm_pix_loss: regress per-patch normalized pixels.
        kernel_backend: ``fastmae.ops`` kernel backend (``torch``, ``triton``, ...; None: default).
        attention_backend: ``fastmae.ops`` attention backend (``sdpa``, ``math``, ...; None: default).
        encoder_mask_tokens: the paper's "w/ [M]" baseline (Table 2), for benchmarks: the encoder
            sees all L positions, a learned ``encoder_mask_token`` at the removed ones; the decoder
            takes them in place. Not MAE: its parameters differ (one more) and it is 3-4x slower.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
        *,
        kernel_backend: str | None = None,
        attention_backend: str | None = None,
        encoder_mask_tokens: bool = False,
    ):
        super().__init__()
        self.kernel_backend = kernel_backend
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.encoder_mask_tokens = encoder_mask_tokens
        if encoder_mask_tokens:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos embedding; a Parameter without grad, as the original, so its key is in the state dict
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attention_backend=attention_backend)
             for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                      attention_backend=attention_backend)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    # -- configuration ---------------------------------------------------------------------------

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (less memory,
        about a third more compute): for the largest presets."""
        self.grad_checkpointing = enable

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        # the kernel backend's fused block ops run in eager steps; a compiled step lets Inductor fuse
        # the model's own ops
        fused = not torch.compiler.is_compiling() and ops.fuses_layers(self.kernel_backend, x.device.type)
        return run_blocks(blocks, x, norm, fused=fused, backend=self.kernel_backend,
                          checkpointed=self.grad_checkpointing and self.training)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def initialize_weights(self) -> None:
        grid = self.patch_embed.grid_size
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        dpos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(dpos).float().unsqueeze(0))

        # the patch embedding is a linear map per patch: initialize it as one
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.encoder_mask_tokens:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # -- the original's methods ------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C]"""
        self._check_imgs(imgs)
        return ops.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]"""
        return ops.unpatchify(x, self.patch_size, self.patch_embed.grid_size, self.patch_embed.in_chans)

    def random_masking(self, n: int, mask_ratio: float, noise: torch.Tensor | None = None, device=None):
        """``ids_keep, ids_restore, mask`` for ``n`` samples; ``noise`` [n, L] replaces ``rand``."""
        if not 0 <= mask_ratio < 1:
            raise UsageError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        L = self.num_patches
        if noise is None:
            noise = torch.rand(n, L, device=device)
        elif tuple(noise.shape) != (n, L):
            raise UsageError(f"noise must be [N={n}, L={L}], got {tuple(noise.shape)}")
        return ops.random_masking(noise, self.len_keep(mask_ratio), backend=self.kernel_backend)

    def len_keep(self, mask_ratio: float) -> int:
        """How many patches the encoder sees: the original's ``int(L * (1 - mask_ratio))``; a ratio
        that keeps none is an error (the encoder would see only the cls token)."""
        L = self.num_patches
        keep = int(L * (1 - mask_ratio))
        if keep == 0:
            raise UsageError(f"mask ratio {mask_ratio} keeps none of the {L} patches (the encoder would see only the "
                             f"cls token): use at most {1 - 1 / L:.4g}")
        return keep

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Encode the visible patches. Returns ``latent`` [N, 1+K, D] (with ``encoder_mask_tokens``:
        [N, 1+L, D] in position order), ``mask`` [N, L], ``ids_restore`` [N, L]."""
        self._check_imgs(imgs)
        n = imgs.shape[0]
        ids_keep, ids_restore, mask = self.random_masking(n, mask_ratio, noise, imgs.device)
        if self.encoder_mask_tokens:
            x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token, self.patch_embed(imgs))
            x = x + self.pos_embed[:, 1:, :]
            cls_token = self.cls_token + self.pos_embed[:, :1, :]
            x = torch.cat((cls_token.expand(n, -1, -1), x), dim=1)
        else:
            x = ops.embed_visible_patches(imgs, ids_keep, *self.patch_embed.weights(), backend=self.kernel_backend)
            # position embeddings and the cls token: one pass writing the encoder's input
            x = ops.encoder_input(x, ids_keep, self.cls_token, self.pos_embed[0], backend=self.kernel_backend)
        x = self._run_blocks(self.blocks, x, self.norm)
        return x, mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent [N, 1+K, D] -> per-patch pixel predictions [N, L, p*p*C]."""
        x = self.decoder_embed(x)
        if self.encoder_mask_tokens:  # already every position, in order
            x = x + self.decoder_pos_embed
        else:
            x = ops.unshuffle_with_mask_token(
                x, ids_restore, self.mask_token, self.decoder_pos_embed[0], backend=self.kernel_backend
            )
        x = self._run_blocks(self.decoder_blocks, x, self.decoder_norm)
        # the original predicts cls too and drops it; dropping it first saves a row of the projection
        # and gives the loss a contiguous prediction
        return self.decoder_pred(x[:, 1:, :])

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the removed patches (normalized pixels with ``norm_pix_loss``)."""
        return ops.masked_pixel_loss(
            pred, imgs, mask, self.patch_size, self.norm_pix_loss, backend=self.kernel_backend
        )

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        """Returns ``(loss, pred, mask)`` as the original; ``noise`` [N, L] replaces the internal ``rand``."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def _check_imgs(self, imgs: torch.Tensor) -> None:
        pe = self.patch_embed
        if imgs.dim() != 4:
            raise UsageError(f"expected images [N, C, H, W], got shape {tuple(imgs.shape)}")
        if imgs.shape[1] != pe.in_chans:
            raise UsageError(f"expected {pe.in_chans} image channels, got {imgs.shape[1]}")
        if tuple(imgs.shape[2:]) != pe.img_size:
            raise UsageError(
                f"image size {tuple(imgs.shape[2:])} does not match the model's {pe.img_size} "
                f"(patch size {self.patch_size}); build the model with img_size={imgs.shape[2]}"
            )


# -- presets ---------------------------------------------------------------------------------------

def create_model(name: str, *, norm_backend: str | None = None, **kwargs) -> MaskedAutoencoderViT:
    """A preset by name (mlp ratio 4, LayerNorm eps 1e-6, the LayerNorm class of ``norm_backend``:
    ``torch``, ``apex``, or None for ``$FASTMAE_NORM``, else automatic); ``kwargs`` override its settings."""
    if name not in PRESETS:
        raise UsageError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    norm_layer = partial(ops.layer_norm(backend=norm_backend), eps=1e-6)
    return MaskedAutoencoderViT(**{"mlp_ratio": 4.0, "norm_layer": norm_layer, **PRESETS[name], **kwargs})


def _preset_constructor(name: str):
    def constructor(**kwargs) -> MaskedAutoencoderViT:
        return create_model(name, **kwargs)

    constructor.__name__ = name
    constructor.__doc__ = f"The ``{name}`` preset; keyword arguments override its settings."
    return constructor


mae_vit_base_patch16 = _preset_constructor("mae_vit_base_patch16")
mae_vit_large_patch16 = _preset_constructor("mae_vit_large_patch16")
mae_vit_huge_patch14 = _preset_constructor("mae_vit_huge_patch14")
mae_vit_tiny_patch4 = _preset_constructor("mae_vit_tiny_patch4")
