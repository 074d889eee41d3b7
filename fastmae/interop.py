"""Checkpoints of other libraries: Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` in (their
key names, as published and as transformers 5 names them; safetensors or .bin), a fastmae encoder
out as a timm ``vit_*`` state dict or a Hugging Face ``ViTMAEModel`` folder (config + weights).

fastmae's key names are the original's (timm's ViT names): a timm state dict is the encoder's keys
as they are. Hugging Face splits the fused qkv projection into query, key and value and names every
layer its own way; the tables below map one to the other.

    python -m fastmae.interop --checkpoint output_dir/checkpoint-9.pth --to timm --out vit.pth
    python -m fastmae.interop --checkpoint output_dir/checkpoint-9.pth --to hf --out vit-mae-hf/
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from fastmae.errors import MissingPathError, UsageError

# Hugging Face name (after the "vit." / "decoder." prefixes) -> fastmae's, for one transformer layer:
# transformers 4 (the published checkpoints) and 5. None: the q/k/v parts of fastmae's qkv.
_LAYER = [
    (r"attention\.attention\.(query|key|value)\.(weight|bias)", None),
    (r"attention\.(q|k|v)_proj\.(weight|bias)", None),
    (r"attention\.output\.dense\.(weight|bias)", r"attn.proj.\1"),
    (r"attention\.o_proj\.(weight|bias)", r"attn.proj.\1"),
    (r"intermediate\.dense\.(weight|bias)", r"mlp.fc1.\1"),
    (r"output\.dense\.(weight|bias)", r"mlp.fc2.\1"),
    (r"mlp\.(fc1|fc2)\.(weight|bias)", r"mlp.\1.\2"),
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
]
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
# a layer's index and the rest of its key: transformers 4's encoder.layer / decoder.decoder_layers, 5's
# layers, and what 5 writes for the decoder's (decoder.decoder_encoder.layer)
_LAYERS = re.compile(r"(?:encoder\.layer|layers|decoder\.decoder_layers|decoder\.decoder_encoder\.layer)\.(\d+)\.(.+)")
_QKV = {"query": 0, "q": 0, "key": 1, "k": 1, "value": 2, "v": 2}


def is_hugging_face(state: dict) -> bool:
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in state)


def from_hugging_face(state: dict) -> dict[str, torch.Tensor]:
    """A ``ViTMAEForPreTraining`` or ``ViTMAEModel`` state dict with fastmae's (the original's) names."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], list] = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        match = _LAYERS.fullmatch(key)
        if match is None:
            raise UsageError(f"a Hugging Face ViTMAE key fastmae does not know: {key}")
        blocks = "decoder_blocks" if key.startswith("decoder.") else "blocks"
        index, rest = match.groups()
        for pattern, target in _LAYER:
            m = re.fullmatch(pattern, rest)
            if m is None:
                continue
            if target is None:  # one of q, k, v: fastmae keeps them fused as qkv
                part, kind = m.groups()
                qkv.setdefault((f"{blocks}.{index}.attn.qkv.{kind}", kind), [None] * 3)[_QKV[part]] = value
            else:
                out[f"{blocks}.{index}.{m.expand(target)}"] = value
            break
        else:
            raise UsageError(f"a Hugging Face ViTMAE key fastmae does not know: {key}")
    for (name, _), parts in qkv.items():
        if any(p is None for p in parts):
            raise UsageError(f"{name}: the checkpoint lacks one of query, key and value")
        out[name] = torch.cat(parts, dim=0)
    return out


def to_hugging_face(state: dict) -> dict[str, torch.Tensor]:
    """fastmae's encoder as a ``ViTMAEModel`` state dict (the names of the published checkpoints,
    which transformers 4 and 5 both load); the decoder and the mask token are left out."""
    top = {v: k for k, v in _TOP.items() if not k.startswith("decoder.")}
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m is None:
            continue  # the decoder, the mask token
        i, rest = m.groups()
        prefix = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}attention.attention.{name}.{kind}"] = part.contiguous()
            continue
        names = {"attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
                 "norm1": "layernorm_before", "norm2": "layernorm_after"}
        module, kind = rest.rsplit(".", 1)
        out[f"{prefix}{names[module]}.{kind}"] = value
    return out


def hugging_face_config(state: dict, *, norm_pix_loss: bool = False, mask_ratio: float = 0.75) -> dict:
    """``config.json`` of a ``ViTMAEModel`` with ``state``'s (fastmae's) encoder."""
    weight = state["patch_embed.proj.weight"]
    width, channels, patch = weight.shape[0], weight.shape[1], weight.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    config = {
        "architectures": ["ViTMAEModel"], "model_type": "vit_mae", "hidden_size": width,
        "num_hidden_layers": depth, "num_attention_heads": None, "intermediate_size": state["blocks.0.mlp.fc1.weight"].shape[0],
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": 1e-6, "image_size": grid * patch, "patch_size": patch,
        "num_channels": channels, "qkv_bias": "blocks.0.attn.qkv.bias" in state, "mask_ratio": mask_ratio,
        "norm_pix_loss": norm_pix_loss,
    }
    if "decoder_embed.weight" in state:
        config.update(decoder_hidden_size=state["decoder_embed.weight"].shape[0],
                      decoder_num_hidden_layers=len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")}),
                      decoder_intermediate_size=state["decoder_blocks.0.mlp.fc1.weight"].shape[0])
    return config


def to_timm(state: dict) -> dict[str, torch.Tensor]:
    """fastmae's encoder (or fine-tuned classifier) as a timm ``VisionTransformer`` state dict: the
    same names, without the decoder and the mask token."""
    return {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}


def read_hugging_face(path: str) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face model folder (``model.safetensors`` or ``pytorch_model.bin``),
    or of a ``.safetensors`` file."""
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in
                                                  ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, f))]
    if not files:
        raise MissingPathError(f"{path}: no model.safetensors or pytorch_model.bin (a Hugging Face model folder)")
    if files[0].endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(files[0])
    return torch.load(files[0], map_location="cpu", weights_only=True)


def export(state: dict, to: str, out: str, *, heads: int, norm_pix_loss: bool = False) -> None:
    """Write ``state``'s encoder for timm (a state dict file) or Hugging Face (a folder)."""
    if to == "timm":
        torch.save(to_timm(state), out)
        return
    os.makedirs(out, exist_ok=True)
    config = hugging_face_config(state, norm_pix_loss=norm_pix_loss)
    config["num_attention_heads"] = heads
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    weights = to_hugging_face(state)
    try:
        from safetensors.torch import save_file

        save_file(weights, os.path.join(out, "model.safetensors"))
    except ImportError:
        torch.save(weights, os.path.join(out, "pytorch_model.bin"))


def main(argv: list[str] | None = None) -> int:
    from fastmae.checkpoint import model_state_dict, read_checkpoint
    from fastmae.models import ENCODERS, PRESETS

    p = argparse.ArgumentParser("python -m fastmae.interop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a fastmae (or the original's) checkpoint")
    p.add_argument("--to", required=True, choices=["timm", "hf"])
    p.add_argument("--out", required=True, help="timm: a file; hf: a folder")
    p.add_argument("--model", default=None, help="the preset (default: the checkpoint's)")
    args = p.parse_args(argv)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        state = model_state_dict(ckpt)
        saved = vars(ckpt.get("args") or argparse.Namespace())
        name = args.model or saved.get("model")
        presets = {**PRESETS, **ENCODERS}
        if name not in presets:
            raise UsageError(f"cannot tell the preset of {args.checkpoint} ({name!r}): pass --model")
        export(state, args.to, args.out, heads=presets[name]["num_heads"],
               norm_pix_loss=bool(saved.get("norm_pix_loss", False)))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({'timm state dict' if args.to == 'timm' else 'Hugging Face ViTMAEModel'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
