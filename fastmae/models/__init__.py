from fastmae.models.mae import (
    PRESETS,
    MaskedAutoencoderViT,
    create_model,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch4,
)
from fastmae.models.vit import ENCODERS, VisionTransformer, create_vit, interpolate_pos_embed, load_encoder

__all__ = [
    "ENCODERS",
    "PRESETS",
    "VisionTransformer",
    "create_vit",
    "interpolate_pos_embed",
    "load_encoder",
    "MaskedAutoencoderViT",
    "create_model",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_tiny_patch4",
]
