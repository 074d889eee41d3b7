import pytest
import torch

from fastmae.models import PRESETS, MaskedAutoencoderViT, create_model


def tiny(**kw):
    return create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, **kw)


def encoder_keys(state):
    return {k: v for k, v in state.items() if not (k.startswith("decoder") or k == "mask_token")}


def test_vit_base_encoder_has_timm_vit_b16_parameters():
    model = create_model("mae_vit_base_patch16")
    enc = encoder_keys(model.state_dict())
    # timm's vit_base_patch16_224 without its head: 86,567,656 - 769,000
    assert sum(v.numel() for v in enc.values()) == 85_798_656
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.bias", "norm.weight"} <= set(enc)


@pytest.mark.parametrize("name,dim,depth,patch", [
    ("mae_vit_large_patch16", 1024, 24, 16), ("mae_vit_huge_patch14", 1280, 32, 14),
])
def test_large_presets(name, dim, depth, patch):
    with torch.device("meta"):
        model = create_model(name)
    assert model.pos_embed.shape == (1, 1 + (224 // patch) ** 2, dim)
    assert len(model.blocks) == depth and len(model.decoder_blocks) == 8
    assert model.decoder_embed.out_features == 512 and model.decoder_blocks[0].attn.num_heads == 16
    assert model.blocks[0].norm1.eps == 1e-6


def test_forward_shapes_and_mask_count():
    model = tiny()
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert loss.shape == () and pred.shape == (3, 64, 48) and mask.shape == (3, 64)
    assert torch.all(mask.sum(1) == 48)
    latent, _, ids_restore = model.forward_encoder(imgs, 0.75)
    assert latent.shape == (3, 1 + 16, 192) and ids_restore.shape == (3, 64)


def test_noise_replaces_rand_and_is_deterministic():
    model = tiny()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    a = model(imgs, noise=noise)
    b = model(imgs, noise=noise)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(a[2], (torch.argsort(torch.argsort(noise, 1), 1) >= 16).float())


def test_mask_ratio_zero_gives_finite_zero_loss():
    loss, _, mask = tiny()(torch.randn(1, 3, 32, 32), mask_ratio=0.0)
    assert mask.sum() == 0 and loss.item() == 0.0


def test_unpatchify_inverts_patchify():
    model = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


@pytest.mark.parametrize("call, error, message", [
    (lambda: MaskedAutoencoderViT(img_size=30, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2), ValueError, "not divisible"),
    (lambda: tiny()(torch.randn(1, 1, 32, 32)), ValueError, "3 image channels"),
    (lambda: tiny()(torch.randn(1, 3, 36, 36)), ValueError, "does not match"),
    (lambda: tiny()(torch.randn(3, 32, 32)), ValueError, r"\[N, C, H, W\]"),
    (lambda: tiny()(torch.randn(1, 3, 32, 32), mask_ratio=1.0), ValueError, "mask_ratio"),
    (lambda: tiny()(torch.randn(1, 3, 32, 32), mask_ratio=-0.1), ValueError, "mask_ratio"),
    (lambda: tiny()(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 63)), ValueError, "noise"),
    (lambda: create_model("mae_vit_gigantic"), ValueError, "unknown model"),
    (lambda: tiny(attention_backend="flash9")(torch.randn(1, 3, 32, 32)), ValueError, "unknown attention backend"),
])
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_presets_include_the_original_names():
    for name in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
                 "mae_vit_base_patch16_dec512d8b", "mae_vit_tiny_patch4"):
        assert name in PRESETS


def test_encoder_mask_tokens_baseline():
    """The paper's w/ [M]: all L positions through the encoder, same loss contract."""
    model = create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1, encoder_mask_tokens=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 65, 192)
    loss, pred, mask = model(imgs, noise=noise)
    loss.backward()
    assert pred.shape == (2, 64, 48) and mask.sum() == 2 * 48
    assert model.encoder_mask_token.grad is not None and model.encoder_mask_token.grad.abs().sum() > 0
    assert "encoder_mask_token" not in create_model("mae_vit_tiny_patch4").state_dict()
