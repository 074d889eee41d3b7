from fastmae.models.mae import (
    PRESETS,
    MaskedAutoencoderViT,
    create_model,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_tiny_patch4,
)

__all__ = [
    "PRESETS",
    "MaskedAutoencoderViT",
    "create_model",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "mae_vit_tiny_patch4",
]
