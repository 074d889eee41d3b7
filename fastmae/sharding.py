"""``--fsdp``: parameters, gradients and optimizer state sharded across the ranks with PyTorch's
FSDP2 (``torch.distributed.fsdp.fully_shard``), for encoders whose optimizer state does not fit
beside the model on one GPU (ViT-H at 448 px, ViT-g).

Each transformer block (the encoder's and the decoder's) is one FSDP unit, the rest (embeddings,
final norms, the decoder's projections, the head) the root's: a block's parameters are gathered
just before its forward and backward and freed after, its gradients reduce-scattered as its
backward ends, overlapping the next block's compute. Gradients are reduced in fp32
(``MixedPrecisionPolicy``); the fp32 master weights and AdamW's state stay sharded: per GPU,
16 bytes per parameter / ranks, plus a few units' weights at a time
(:func:`training_state_per_rank`; ``python -m fastmae.sharding`` prints the table).

Parameters are gathered in fp32, and autocast casts the matmuls' operands to bf16 as it does under
DDP. Gathering in bf16 would halve the all-gathers' bytes but compute something else: the
position embeddings, the cls and mask tokens and the LayerNorm weights, which DDP keeps in fp32,
would be rounded to bf16, and with them the whole residual stream (measured: loss 2.5140 against
DDP's 2.5126 at initialization). So: the same training as DDP -- the same gradients, averaged over
the same global batch, within fp32 rounding of the reduction order (tested on the CPU with gloo, in
fp32 and under bf16 autocast).
"""
from __future__ import annotations

import torch
from torch import nn

from fastmae.config import fsdp_precision_problem
from fastmae.distributed import DistInfo


def fsdp_unavailable_reasons(dist: DistInfo, precision: str) -> list[str]:
    """Why ``--fsdp`` cannot run with these settings (empty: it can)."""
    reasons = []
    if not dist.enabled:
        reasons.append("it shards across processes: launch several with torchrun or srun")
    problem = fsdp_precision_problem(precision)
    return reasons + ([problem] if problem else [])


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units: the encoder's blocks, then the decoder's (an MAE's)."""
    return [*model.blocks, *getattr(model, "decoder_blocks", [])]


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``fully_shard`` each transformer block, then the root, over all ranks (in place; returns
    ``model``, now an ``FSDPModule``). Call before building the optimizer: its parameters become
    sharded DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    # cast_forward_inputs off: the images stay fp32 into the patch embedding, as autocast wants them
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def training_state_per_rank(model_name: str, ranks: int, sharded: bool) -> dict[str, int]:
    """Bytes of a pretraining run's model state on the most loaded rank, activations aside, for
    the preset ``model_name`` on ``ranks`` GPUs, by actually sharding it: the model is built on the
    ``meta`` device (no memory) and ``fully_shard``-ed over a fake process group of ``ranks``
    ranks (the default process group for the call's time: not inside a distributed run).

    Per parameter held: the fp32 weight, its fp32 gradient and AdamW's two fp32 moments (16 bytes).
    DDP holds every parameter, and the bf16 working copies of the matmul weights that the eager
    step keeps. FSDP holds its shards (dim 0 split ``ranks`` ways, padded; a parameter whose dim 0
    is 1, as ``pos_embed``'s, falls whole to rank 0, the most loaded), plus what is gathered at a
    time: the root unit's weights (FSDP keeps them between forward and backward) and two blocks'
    (the one computing and the one prefetched), gathered in fp32, with their fp32 unsharded
    gradients during the backward."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastmae.models import create_model

    with torch.device("meta"):
        model = create_model(model_name)
    trained = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in trained)
    if not sharded:
        matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        return {"fp32 weights, gradients, AdamW moments": 16 * numel, "bf16 working copies": 2 * matmul}
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    block = max(sum(p.numel() for p in b.parameters()) for b in transformer_blocks(model))
    root = numel - sum(p.numel() for b in transformer_blocks(model) for p in b.parameters() if p.requires_grad)
    shard_model(model, torch.device("cpu"))
    local = sum(p.to_local().numel() for p in model.parameters() if p.requires_grad)
    dist.destroy_process_group()
    return {"fp32 weights, gradients, AdamW moments": 16 * local,
            "gathered: root unit, 2 blocks, their gradients (fp32)": 4 * root + 2 * block * (4 + 4)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fastmae.models import create_model
    from fastmae.presets import PRESETS

    p = argparse.ArgumentParser("python -m fastmae.sharding", description="Model state per GPU (GiB, activations "
                                "aside) of pretraining a preset with DDP and with FSDP on so many GPUs.")
    p.add_argument("--model", nargs="+", default=["mae_vit_large_patch16", "mae_vit_huge_patch14",
                                                  "mae_vit_giant_patch14"], choices=list(PRESETS))
    p.add_argument("--ranks", nargs="+", type=int, default=[8, 64])
    args = p.parse_args(argv)
    gib = 2**30
    print("| model | parameters | DDP | " + " | ".join(f"FSDP, {n} GPUs" for n in args.ranks) + " |")
    print("|---|---:|---:|" + "---:|" * len(args.ranks))
    for name in args.model:
        with torch.device("meta"):
            params = sum(p.numel() for p in create_model(name).parameters() if p.requires_grad)
        ddp = sum(training_state_per_rank(name, 1, sharded=False).values())
        fsdp = [sum(training_state_per_rank(name, n, sharded=True).values()) for n in args.ranks]
        print(f"| {name} | {params / 1e6:.0f} M | {ddp / gib:.2f} | " + " | ".join(f"{b / gib:.2f}" for b in fsdp) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
