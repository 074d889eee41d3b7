"""The names the command lines offer, and the tables behind them, importable without torch: flags are
parsed and checked before any heavy import (``--help`` and a mistyped flag answer at once)."""
from __future__ import annotations

AUTO = "auto"

# Each op family's backends, in automatic order: (name, module, device types automatic selection may
# pick it on ("*": any), options passed to the module's functions). fastmae.ops.registry builds the
# backends from this table.
BACKEND_TABLE: dict[str, tuple[tuple[str, str, tuple[str, ...], dict], ...]] = {
    "kernels": (
        ("triton", "fastmae.ops.triton_backend", ("cuda",), {}),
        ("native", "fastmae.ops.native", ("cuda",), {}),
        ("torch", "fastmae.ops.reference", ("*",), {}),
    ),
    "attention": (
        ("xformers", "fastmae.ops.attention_xformers", ("cuda",), {}),
        ("sdpa", "fastmae.ops.attention_sdpa", ("*",), {}),
        ("sdpa_flash", "fastmae.ops.attention_sdpa", (), {"kernel": "flash"}),
        ("sdpa_efficient", "fastmae.ops.attention_sdpa", (), {"kernel": "efficient"}),
        ("sdpa_cudnn", "fastmae.ops.attention_sdpa", (), {"kernel": "cudnn"}),
        ("math", "fastmae.ops.attention_math", ("*",), {}),
    ),
    "norm": (
        ("apex", "fastmae.ops.norm_backends", (), {"impl": "apex"}),  # by name only: other numerics, no torch.compile
        ("torch", "fastmae.ops.norm_backends", ("*",), {"impl": "torch"}),
    ),
}


# backends renamed, by family: old name -> new (an old name is an error that gives the new one)
RENAMED_BACKENDS = {"kernels": {"cuda": "native"}}


def renamed_backend_message(family: str, name: str) -> str | None:
    new = RENAMED_BACKENDS.get(family, {}).get(name)
    if new is None:
        return None
    return (f"the {family} backend {name!r} is now named {new!r} (it is the native C++/CUDA backend, and runs on "
            f"CPUs too): use {new!r}")


def backend_flag(family: str):
    """An argparse ``type`` for a ``family`` backend flag: a renamed backend's old name is refused
    with its new one."""
    def parse(value: str) -> str:
        message = renamed_backend_message(family, value)
        if message:
            import argparse

            raise argparse.ArgumentTypeError(message)
        return value

    parse.__name__ = f"{family} backend"
    return parse


def backend_names(family: str) -> list[str]:
    return [row[0] for row in BACKEND_TABLE[family]]


def fsdp_precision_problem(precision: str) -> str | None:
    """Why ``--fsdp`` cannot train at ``precision`` (None: it can): checked by the command line before
    torch is imported, and by :func:`fastmae.sharding.fsdp_unavailable_reasons` for programmatic use."""
    if precision == "fp16":
        # GradScaler's inf check would stay per rank (each sees its own shard): ranks could disagree on a skip
        return ("fp16 with a gradient scaler is not supported sharded (each rank's scaler would see only its own "
                "shard's infs): use --precision bf16")
    return None


DATA_BACKENDS = ("auto", "dali", "nvjpeg", "torchvision", "synthetic")
PRECISIONS = ("bf16", "fp16", "fp32")  # autocast dtypes (fp32: none)
# optimizer name -> apex class (None: torch's fused AdamW)
OPTIMIZERS = {"adamw": None, "apex_adam": "FusedAdam", "apex_lamb": "FusedLAMB"}
FINETUNE_AA = "rand-m9-mstd0.5-inc1"  # the original's fine-tuning RandAugment
