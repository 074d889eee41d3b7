"""The model reproduces the original implementation's own outputs and gradients."""
import importlib.util
from functools import partial

import pytest
import torch

from fastmae.models import MaskedAutoencoderViT
from fastmae.ops.registry import resolve
from fastmae.testing import PARITY_FORWARD_REL, PARITY_GRAD_REL, relative_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def build(official, **kwargs):
    # the original's presets use LayerNorm eps 1e-6, and so do the fixtures
    model = MaskedAutoencoderViT(**official["config"], norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kwargs)
    missing, unexpected = model.load_state_dict(official["state_dict"], strict=True)
    assert not missing and not unexpected
    return model


def test_state_dict_keys_are_the_originals(official):
    model = build(official)
    assert list(model.state_dict()) == list(official["state_dict"])


def test_fixed_position_embeddings_equal_the_originals(official):
    fresh = MaskedAutoencoderViT(**official["config"])
    for key in ("pos_embed", "decoder_pos_embed"):
        torch.testing.assert_close(getattr(fresh, key).data, official["state_dict"][key], atol=1e-7, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernels,attention", [
    ("torch", "math"), ("torch", "sdpa"), ("torch", "sdpa_flash"), ("torch", "sdpa_efficient"),
    ("torch", "xformers"), ("triton", "sdpa"), ("native", "sdpa"),
])
def test_parity_with_original(official, kernels, attention, device, monkeypatch):
    if (attention, device) == ("sdpa_flash", "cuda"):
        pytest.skip("PyTorch's flash kernel takes no fp32 on CUDA")
    if (attention, device) == ("sdpa_efficient", "cpu") or (attention == "xformers" and (
            device == "cpu" or importlib.util.find_spec("xformers") is None)):
        pytest.skip(f"{attention} does not run on this {device} (by design, or not installed)")
    resolve("kernels", kernels, device)  # any other backend that cannot run here is a failure
    resolve("attention", attention, device)
    # fp32 means fp32: cuDNN convolutions default to TF32 on GPUs (matmuls do not)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = build(official, kernel_backend=kernels, attention_backend=attention).to(device)
    imgs, noise, ratio = official["imgs"].to(device), official["noise"].to(device), official["mask_ratio"]
    official = {k: v.to(device) if torch.is_tensor(v) else v for k, v in official.items()}
    official["grads"] = {k: v.to(device) for k, v in official["grads"].items()}

    latent, mask, ids_restore = model.forward_encoder(imgs, ratio, noise)
    assert relative_error(latent, official["latent"]) <= PARITY_FORWARD_REL
    assert torch.equal(mask, official["mask"])
    assert torch.equal(ids_restore, official["ids_restore"])

    loss, pred, mask = model(imgs, mask_ratio=ratio, noise=noise)
    assert relative_error(loss, official["loss"]) <= PARITY_FORWARD_REL
    assert relative_error(pred, official["pred"]) <= PARITY_FORWARD_REL
    assert torch.equal(mask, official["mask"])

    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(official["grads"])
    errors = {n: relative_error(g, official["grads"][n]) for n, g in grads.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= PARITY_GRAD_REL, f"{worst}: relative error {errors[worst]:.2e}"
