import argparse
import logging

import pytest
import torch

from fastmae.checkpoint import load_checkpoint, save_checkpoint
from fastmae.models import create_model


def tiny():
    return create_model("mae_vit_tiny_patch4", depth=1, decoder_depth=1)


def test_full_checkpoint_in_the_originals_format(tmp_path):
    src, dst = tiny(), tiny()
    path = tmp_path / "checkpoint-0.pth"
    # the original saves args as an argparse.Namespace beside the model
    torch.save({"model": src.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1.0)}, path)
    result = load_checkpoint(dst, path)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_encoder_only_checkpoint_reports_the_decoder_missing(caplog):
    src, dst = tiny(), tiny()
    encoder = {k: v for k, v in src.state_dict().items() if not (k.startswith("decoder") or k == "mask_token")}
    with caplog.at_level(logging.WARNING, logger="fastmae"):
        result = load_checkpoint(dst, {"model": encoder})
    assert "mask_token" in result.missing_keys and "decoder_pred.weight" in result.missing_keys
    assert not any(k.startswith("blocks") for k in result.missing_keys)
    assert "decoder_pred.weight" in caplog.text
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_unexpected_keys_and_ddp_prefix():
    state = {f"module.{k}": v for k, v in tiny().state_dict().items()}
    state["module.head.weight"] = torch.zeros(10, 192)
    result = load_checkpoint(tiny(), state)
    assert result.unexpected_keys == ["head.weight"] and not result.missing_keys
    with pytest.raises(ValueError, match=r"unexpected 1 keys \(head.weight\)"):
        load_checkpoint(tiny(), state, strict=True)


def test_shape_mismatch_names_key_and_shapes():
    state = tiny().state_dict()
    state["pos_embed"] = torch.zeros(1, 50, 192)
    with pytest.raises(ValueError, match=r"pos_embed: checkpoint \(1, 50, 192\), model \(1, 65, 192\)"):
        load_checkpoint(tiny(), state)


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_checkpoint(tiny(), tmp_path / "nothere.pth")
    with pytest.raises(ValueError, match="no state dict"):
        load_checkpoint(tiny(), {"model": {"a": 1}})


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    assert torch.equal(torch.load(path)["model"]["w"], torch.ones(2))
