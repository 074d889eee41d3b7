"""What every loader is (torchvision, nvjpeg, DALI, synthetic), as the epoch loop uses it."""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch


@runtime_checkable
class EpochLoader(Protocol):
    """Batches ``(images float32 [B, 3, S, S], labels int64 [B])`` on the training device, one
    epoch per iteration.

    - ``steps_per_epoch``: this rank's batches in a whole epoch (the same on every rank).
    - ``num_samples``: the dataset's images (evaluation counts each once).
    - ``set_epoch(epoch, start_batch=0)``: the next iteration reads ``epoch`` from its batch
      ``start_batch`` on (a resumed run), yielding ``len(loader) == steps_per_epoch - start_batch``
      batches, the same ones the uninterrupted iteration yields from there.
    - ``files_skipped``: unreadable files replaced in the current epoch (``--skip_unreadable``).

    A loader whose random draws are not seeded per sample (DALI's) also has ``state_dict()`` and
    ``load_state_dict(state)``, which checkpoints keep per rank.
    """

    files_skipped: int

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def num_samples(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
