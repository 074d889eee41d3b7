"""``python -m fastmae.ops``: which backends can run on this machine, and why the others cannot."""
from __future__ import annotations

import torch

from fastmae.ops.registry import AUTO, availability, resolve
from fastmae.optim import OPTIMIZERS, optimizer_unavailable_reasons


def main() -> None:
    devices = ("cpu", "cuda")
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for family, backends in availability(devices).items():
        print(f"\n{family}:")
        for name, per_device in backends.items():
            for device, reasons in per_device.items():
                state = "yes" if not reasons else "no: " + "; ".join(reasons)
                print(f"  {name:<15} {device:<5} {state}")
        for device in devices:
            try:
                print(f"  automatic on {device}: {resolve(family, AUTO, device)}")
            except RuntimeError as e:
                print(f"  automatic on {device}: none ({e})")
    print("\noptimizers (python -m fastmae.pretrain --optimizer):")
    for name in OPTIMIZERS:
        for device in devices:
            reasons = (["no CUDA device is available"] if device == "cuda" and not torch.cuda.is_available()
                       else optimizer_unavailable_reasons(name, device))
            print(f"  {name:<15} {device:<5} {'yes' if not reasons else 'no: ' + '; '.join(reasons)}")


if __name__ == "__main__":
    main()
