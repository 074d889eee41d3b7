"""The synthetic source: random batches made on the device once and replayed, to measure the model
without any input pipeline."""
from __future__ import annotations

import torch


class SyntheticLoader:
    """``batches_per_epoch`` batches of ``(images [B, 3, size, size], labels [B])`` on ``device``,
    cycling through a few pre-made random batches (normalized-pixel statistics: N(0, 1))."""

    def __init__(self, *, batch_size: int, image_size: int, device: torch.device, batches_per_epoch: int = 100,
                 num_classes: int = 1000, seed: int = 0, distinct_batches: int = 4):
        g = torch.Generator(device=device).manual_seed(seed)
        self.batches = [
            (torch.randn(batch_size, 3, image_size, image_size, device=device, generator=g),
             torch.randint(0, num_classes, (batch_size,), device=device, generator=g))
            for _ in range(distinct_batches)
        ]
        self.batches_per_epoch = batches_per_epoch
        self.start_batch = 0
        self.files_skipped = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start_batch = start_batch

    @property
    def num_samples(self) -> int:
        return self.batches_per_epoch * len(self.batches[0][1])

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch

    def __len__(self) -> int:  # the batches the next iteration yields
        return self.steps_per_epoch - self.start_batch

    def __iter__(self):
        for i in range(self.start_batch, self.batches_per_epoch):
            yield self.batches[i % len(self.batches)]
