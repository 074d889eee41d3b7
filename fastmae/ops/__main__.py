"""``python -m fastmae.ops``: which backends can run on this machine, and why the others cannot."""
from __future__ import annotations

import torch

from fastmae.ops.registry import AUTO, availability, resolve


def main() -> None:
    devices = ("cpu", "cuda")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for family, backends in availability(devices).items():
        print(f"\n{family}:")
        for name, per_device in backends.items():
            for device, reasons in per_device.items():
                state = "yes" if not reasons else "no: " + "; ".join(reasons)
                print(f"  {name:<10} {device:<5} {state}")
        for device in devices:
            try:
                print(f"  automatic on {device}: {resolve(family, AUTO, device)}")
            except RuntimeError as e:
                print(f"  automatic on {device}: none ({e})")


if __name__ == "__main__":
    main()
