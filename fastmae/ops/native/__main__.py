"""``python -m fastmae.ops.native build``: build the native libraries ahead of time (into the cache
that the ``native`` backend loads from; otherwise its first use builds them), and show which devices
each op has kernels for.

    python -m fastmae.ops.native build         # the CPU library; the CUDA one too where a toolkit is found
    TORCH_CUDA_ARCH_LIST="8.0;9.0" python -m fastmae.ops.native build --cuda   # the CUDA one is required
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from fastmae.ops import native
from fastmae.ops.native.build import build_root, cuda_archs, cuda_library_name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmae.ops.native", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="build", choices=["build"], help="build (the default)")
    parser.add_argument("--cuda", action="store_true", help="fail unless the CUDA library builds and loads too")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and their output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    print(f"build cache: {build_root()}")
    error = native.load("cpu", args.verbose)
    if error:
        print(f"CPU library: {error}", file=sys.stderr)
        return 1
    if torch.version.cuda or args.cuda:
        archs = cuda_archs()
        error = native.load("cuda", args.verbose)
        print(f"CUDA library {cuda_library_name(archs)} for {';'.join(archs)}: {error or 'loaded'}",
              file=sys.stderr if error else sys.stdout)
        if error and args.cuda:
            return 1
    for op in native.OP_NAMES:
        name = f"{native.NAMESPACE}::{op}"
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        print(f"{name}: {', '.join(keys)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
