"""The model presets: the original's three MAE models (and a tiny one), and their encoders under
timm's names. Plain data, importable without torch (the command lines take their names as choices)."""
from __future__ import annotations

_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

PRESETS: dict[str, dict] = {
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DECODER),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DECODER),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER),
    # ViT-g/14 (Zhai et al. 2022): 1408 wide, 40 blocks, MLP 6144 (ratio 48/11); not in the original
    "mae_vit_giant_patch14": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11, **_DECODER),
    # small enough to pretrain on a laptop CPU in minutes (32x32 images, 64 patches)
    "mae_vit_tiny_patch4": dict(
        img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
}
# the original's long names
PRESETS["mae_vit_base_patch16_dec512d8b"] = PRESETS["mae_vit_base_patch16"]
PRESETS["mae_vit_large_patch16_dec512d8b"] = PRESETS["mae_vit_large_patch16"]
PRESETS["mae_vit_huge_patch14_dec512d8b"] = PRESETS["mae_vit_huge_patch14"]

# the encoders of the MAE presets, under the original's (timm's) names: vit_base_patch16, ... (the
# presets' long names, *_dec512d8b, are the same models)
_ENCODER_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
ENCODERS: dict[str, dict] = {
    name.removeprefix("mae_"): {k: v for k, v in preset.items() if k in _ENCODER_KEYS}
    for name, preset in PRESETS.items() if not name.endswith("_dec512d8b")
}
