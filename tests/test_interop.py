"""Hugging Face ViTMAE checkpoints in, timm and Hugging Face checkpoints out: tiny models of both
libraries built here (no download), outputs compared after conversion."""
from functools import partial

import pytest
import torch

from fastmae.checkpoint import load_checkpoint, model_state_dict
from fastmae.interop import export, from_hugging_face, main, to_timm
from fastmae.models import MaskedAutoencoderViT, create_vit, load_encoder
from fastmae.testing import assert_close

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the dev extra has it)")
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, mlp_ratio=4.0)


def tiny_fastmae(**kwargs):
    return MaskedAutoencoderViT(**TINY, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kwargs).eval()


def tiny_hugging_face(norm_pix_loss=True):
    config = transformers.ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=4,
        decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
        norm_pix_loss=norm_pix_loss, layer_norm_eps=1e-6, mask_ratio=0.75)
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(config).eval()
    with torch.no_grad():  # no zero biases: a swapped bias must show
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def as_published(state):
    """transformers 5's names back to those of the published (transformers 4) checkpoints."""
    renames = [("vit.layers.", "vit.encoder.layer."), ("attention.q_proj", "attention.attention.query"),
               ("attention.k_proj", "attention.attention.key"), ("attention.v_proj", "attention.attention.value"),
               ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
               ("mlp.fc2", "output.dense")]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_a_hugging_face_mae_computes_the_same_in_fastmae(tmp_path, norm_pix_loss):
    hf = tiny_hugging_face(norm_pix_loss)
    hf.save_pretrained(tmp_path / "hf")
    ours = tiny_fastmae(norm_pix_loss=norm_pix_loss, kernel_backend="torch", attention_backend="math")
    assert not load_checkpoint(ours, tmp_path / "hf", strict=True).missing_keys  # the folder, safetensors
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        want = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, want.mask)
    assert_close(pred, want.logits)
    assert_close(loss, want.loss)
    # the published checkpoints' names (transformers 4) convert to the same weights
    converted = from_hugging_face(hf.state_dict())
    assert converted.keys() == ours.state_dict().keys()
    for key, value in from_hugging_face(as_published(hf.state_dict())).items():
        assert torch.equal(value, converted[key]), key


def test_a_hugging_face_encoder_fine_tunes_in_fastmae(tmp_path):
    hf = tiny_hugging_face()
    hf.vit.save_pretrained(tmp_path / "encoder")  # a ViTMAEModel: no "vit." prefix, no decoder
    vit = create_vit("vit_tiny_patch4", embed_dim=32, depth=2, num_heads=2, num_classes=5)
    load_encoder(vit, str(tmp_path / "encoder"))
    torch.testing.assert_close(vit.patch_embed.proj.weight, hf.vit.embeddings.patch_embeddings.projection.weight)


def test_export_to_hugging_face_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    ours = tiny_fastmae(kernel_backend="torch", attention_backend="math")
    export(ours.state_dict(), "hf", str(tmp_path / "hf"), heads=2)
    hf = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf").eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        latent, _, _ = ours.forward_encoder(imgs, 0.75, noise)
        want = hf(pixel_values=imgs, noise=noise).last_hidden_state
    assert_close(latent, want)


def test_export_to_timm_loads_in_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    ours = tiny_fastmae(kernel_backend="torch", attention_backend="math")
    theirs = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2,
                                                              num_heads=2, num_classes=0).eval()
    theirs.load_state_dict(to_timm(ours.state_dict()), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # nothing masked, patches in order: fastmae's encoder is timm's ViT
        latent, _, _ = ours.forward_encoder(imgs, 0.0, torch.arange(64.0).expand(2, 64))
        want = theirs.forward_features(imgs)
    assert_close(latent, want)


def test_export_command(tmp_path, capsys):
    ours = create_model_checkpoint(tmp_path)
    assert main(["--checkpoint", str(ours), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf")
    assert hf.config.hidden_size == 192 and hf.config.num_attention_heads == 3 and hf.config.num_hidden_layers == 4
    assert main(["--checkpoint", str(ours), "--to", "timm", "--out", str(tmp_path / "vit.pth")]) == 0
    assert "decoder_embed.weight" not in torch.load(tmp_path / "vit.pth")
    assert model_state_dict(str(tmp_path / "hf")).keys() <= model_state_dict(str(ours)).keys()


def create_model_checkpoint(tmp_path):
    import argparse

    from fastmae.models import create_model

    path = tmp_path / "checkpoint-0.pth"
    model = create_model("mae_vit_tiny_patch4")
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model="mae_vit_tiny_patch4")}, path)
    return path
