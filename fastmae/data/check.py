"""``python -m fastmae.data.check DIR``: decode every image of a dataset in parallel before a long
run, and list the files no loader could read (and how many need converting to RGB, or scaling from
16 bits)."""
from __future__ import annotations

import argparse
import collections
import os
import sys
from concurrent.futures import ProcessPoolExecutor

from PIL import Image

from fastmae.data.sources import UnreadableImageError, image_folder_root, list_image_folder, load_rgb, pixel_depth


def inspect(path: str) -> tuple[str, str | None]:
    """``(kind, None)`` for a readable image (its format, PIL mode, and what the loaders do to its
    pixels), ``("", error)`` otherwise."""
    try:
        load_rgb(path)
        with Image.open(path) as img:
            depth = pixel_depth(img)
            return f"{img.format} {img.mode}" + (f"  ({depth} when loaded)" if depth else ""), None
    except UnreadableImageError as e:
        return "", str(e)


def dataset_folders(data_path: str) -> list[str]:
    """``DIR/train`` and ``DIR/val`` when they exist (the layout the entry points read), else ``DIR``."""
    root = image_folder_root(data_path)
    val = os.path.join(data_path, "val")
    return [root, val] if root != data_path and os.path.isdir(val) else [root]


def check(data_path: str, workers: int) -> tuple[dict[str, int], list[str]]:
    files = [f for root in dataset_folders(data_path) for f in list_image_folder(root)[0]]
    kinds: collections.Counter = collections.Counter()
    bad = []
    with ProcessPoolExecutor(workers) as pool:
        for kind, error in pool.map(inspect, files, chunksize=64):
            if error:
                bad.append(error)
            else:
                kinds[kind] += 1
    return dict(kinds), bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("python -m fastmae.data.check", description=__doc__)
    p.add_argument("data_path", help="ImageFolder root: DIR/train and DIR/val when they exist, else DIR")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    try:
        kinds, bad = check(args.data_path, args.workers)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{sum(kinds.values())} readable images:")
    for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {count:>9}  {kind}")
    print(f"{len(bad)} unreadable files{':' if bad else ''}")
    for line in bad:
        print(f"  {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
