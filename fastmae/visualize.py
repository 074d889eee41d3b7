"""Reconstruction pictures: original | masked | reconstruction | reconstruction with the visible
patches pasted back, one row per image (as the original's demo notebook).

    python -m fastmae.visualize --checkpoint C --image I [--out reconstruction.png]

works with fastmae's checkpoints and the original's full ones (``mae_visualize_vit_large.pth``).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from fastmae.checkpoint import load_checkpoint, model_state_dict, read_checkpoint
from fastmae.data import IMAGENET_MEAN, IMAGENET_STD
from fastmae.data.sources import UnreadableImageError, load_rgb
from fastmae.errors import MissingPathError, UsageError
from fastmae.models import PRESETS, MaskedAutoencoderViT, create_model
from fastmae.numerics import NORM_PIX_EPS


@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float = 0.75,
                        seed: int = 0) -> np.ndarray:
    """uint8 [rows * H, 4 * W, 3] for normalized ``imgs`` [N, 3, H, W]. The masks come from their own
    generator seeded with ``seed`` (the same masks every time; training's random stream untouched)."""
    was_training = model.training
    model.eval()
    imgs = imgs.float()
    g = torch.Generator(device=imgs.device).manual_seed(seed)
    noise = torch.rand(imgs.shape[0], model.num_patches, device=imgs.device, generator=g)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:  # predictions are per-patch normalized: undo with each patch's own statistics
        target = model.patchify(imgs)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
    rec = model.unpatchify(pred)
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    panels = [imgs, imgs * (1 - removed), rec, imgs * (1 - removed) + rec * removed]
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    rows = torch.cat([((p * std + mean).clamp(0, 1) * 255).round() for p in panels], dim=3)  # [N, 3, H, 4W]
    return rows.permute(0, 2, 3, 1).reshape(-1, rows.shape[3], 3).byte().cpu().numpy()


# small images are enlarged (each pixel a square) until a tile is at least this tall
MIN_TILE = 128


def readable(grid: np.ndarray, tile: int) -> np.ndarray:
    """``grid`` of ``tile``-pixel tiles, enlarged by an integer factor to ``MIN_TILE``-pixel tiles."""
    factor = max(1, -(-MIN_TILE // tile))
    return grid.repeat(factor, axis=0).repeat(factor, axis=1)


def save_grid(grid: np.ndarray, tile: int, path: str) -> None:
    Image.fromarray(readable(grid, tile)).save(path)


def save_reconstructions(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float, path: str,
                         seed: int = 0) -> None:
    save_grid(reconstruction_grid(model, imgs, mask_ratio, seed=seed), imgs.shape[-2], path)


def model_for_checkpoint(state: dict, name: str | None, norm_pix_loss: bool) -> MaskedAutoencoderViT:
    """The preset ``name``, else the one whose encoder width and patch size match the weights."""
    if name is None:
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        matches = [n for n, cfg in PRESETS.items()
                   if cfg["embed_dim"] == width and cfg["patch_size"] == patch and "_dec512d8b" not in n]
        if len(matches) != 1:
            raise UsageError(f"cannot tell the preset of a {width}-wide, patch-{patch} checkpoint: pass --model")
        name = matches[0]
    grid = state["pos_embed"].shape[1] - 1
    return create_model(name, norm_pix_loss=norm_pix_loss, img_size=int(round(grid**0.5)) * state["patch_embed.proj.weight"].shape[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m fastmae.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a full MAE checkpoint (with the decoder)")
    p.add_argument("--image", required=True, nargs="+", help="image file(s), one row each")
    p.add_argument("--model", default=None, choices=sorted(PRESETS), help="preset (default: from the checkpoint)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="the checkpoint predicts normalized pixels (default: from its args, else no)")
    p.add_argument("--mask_ratio", default=0.75, type=float)
    p.add_argument("--seed", default=0, type=int, help="which patches are masked")
    p.add_argument("--out", default="reconstruction.png")
    args = p.parse_args(argv)
    if not 0 <= args.mask_ratio < 1:
        p.error(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    try:
        return draw(args)
    except (FileNotFoundError, UnreadableImageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def draw(args: argparse.Namespace) -> int:
    ckpt = read_checkpoint(args.checkpoint)
    saved = vars(ckpt.get("args", None) or argparse.Namespace())
    state = model_state_dict(ckpt)
    if "decoder_pred.weight" not in state:
        raise UsageError(f"{args.checkpoint} holds an encoder only; reconstructions need the decoder (a full MAE "
                         "checkpoint)")
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else bool(saved.get("norm_pix_loss", False))
    model = model_for_checkpoint(state, args.model or saved.get("model"), norm_pix)
    load_checkpoint(model, state, strict=True)
    model.len_keep(args.mask_ratio)  # a ratio that keeps no patch says so before the images are read
    size = model.patch_embed.img_size[0]
    tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for f in args.image:
        if not os.path.isfile(f):
            raise MissingPathError(f"image not found: {f}")
    imgs = torch.stack([tf(load_rgb(f)) for f in args.image])
    save_reconstructions(model, imgs, args.mask_ratio, args.out, seed=args.seed)
    print(f"wrote {args.out} ({len(args.image)} rows: original | masked | reconstruction | reconstruction + visible)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
