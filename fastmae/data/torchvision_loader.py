"""The torchvision loader: a map-style dataset decoded and augmented by DataLoader workers on the CPU."""
from __future__ import annotations

import atexit
import logging
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastmae.data.order import batches_per_epoch, epoch_order
from fastmae.data.sources import UnreadableImageError

logger = logging.getLogger("fastmae")


class ReplaceUnreadable(Dataset):
    """Items of ``dataset``, where an unreadable file is logged and replaced by the next readable
    item (so batches keep their size and ranks their step count); items are
    ``(image, label, files_skipped)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        for skipped in range(len(self.dataset)):
            try:
                image, label = self.dataset[(i + skipped) % len(self.dataset)]
                return image, label, skipped
            except UnreadableImageError as e:
                logger.warning("skipping %s", e)
        raise UnreadableImageError("no readable image in the dataset")


class SeededSamples(Dataset):
    """Items keyed ``(index, seed)``: the transform's random draws (torch's, Python's and NumPy's,
    which timm's transforms use) come from generators seeded for that sample, so augmentation
    depends on (run seed, epoch, sample) only, not on the worker, the number of ranks, or where a
    resumed run restarted. The generators' states are restored afterwards (a loader without workers
    runs this in the training process)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        python, numpy = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class _EpochBatches:
    """DataLoader batch sampler: the current epoch's batches from ``start_batch`` on, as
    ``(index, sample seed)`` keys."""

    def __init__(self, loader: "TorchvisionLoader"):
        self.loader = loader

    def __iter__(self):
        lo = self.loader
        order = epoch_order(len(lo.dataset), epoch=lo.epoch, seed=lo.seed, rank=lo.rank,
                            world_size=lo.world_size, batch_size=lo.batch_size, shuffle=lo.shuffle,
                            drop_last=lo.drop_last)
        base = (lo.seed * 1_000_003 + lo.epoch) * len(lo.dataset)
        for batch in order.reshape(-1, lo.batch_size)[lo.start_batch:].tolist():
            yield [(i, base + i) for i in batch]

    def __len__(self) -> int:
        return len(self.loader)


class TorchvisionLoader:
    """Batches ``(images, labels)`` on ``device`` from a dataset of ``(tensor image, label)``.

    Args:
        dataset: a map-style dataset (e.g. ``ImageFolder`` with the pretraining transform).
        batch_size, device: per rank.
        rank, world_size, seed, shuffle, drop_last: which samples this rank reads each epoch (see
            ``epoch_order``).
        num_workers, pin_memory: DataLoader settings (workers persist across epochs).
        skip_unreadable: replace unreadable files by the next readable one (counted in
            ``files_skipped``) instead of stopping with the file's path.
        collate_fn: the DataLoader's (its default: stacked tensors).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = False, num_workers: int = 2,
                 pin_memory: bool = True, skip_unreadable: bool = False, collate_fn=None):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.drop_last = drop_last
        self.skip_unreadable = skip_unreadable
        self.epoch = self.start_batch = 0
        self.files_skipped = 0
        self._loader = DataLoader(
            SeededSamples(ReplaceUnreadable(dataset) if skip_unreadable else dataset),
            batch_sampler=_EpochBatches(self), num_workers=num_workers,
            pin_memory=pin_memory and device.type == "cuda", persistent_workers=num_workers > 0,
            generator=torch.Generator(),  # its worker seeds must not draw from the global generator (masking's)
            worker_init_fn=_leave_stop_signals_to_the_main_process, collate_fn=collate_fn,
        )
        # before multiprocessing's own exit handler (atexit runs last-registered first), which would
        # end the workers with a SIGTERM that they ignore
        atexit.register(self.close)

    def close(self) -> None:
        """End the workers (they ignore the stop signals: see below)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            self._loader._iterator = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.files_skipped = 0  # replacements in this epoch

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def steps_per_epoch(self) -> int:
        return batches_per_epoch(len(self.dataset), world_size=self.world_size, batch_size=self.batch_size,
                                 drop_last=self.drop_last)

    def __len__(self) -> int:  # the batches the next iteration yields
        return self.steps_per_epoch - self.start_batch

    def __iter__(self):
        try:
            yield from self._batches()
        except UnreadableImageError as e:
            # a worker's error arrives as the worker's whole traceback: keep its last line, the file's
            raise UnreadableImageError(_worker_message(str(e))) from e

    def _batches(self):
        for batch in self._loader:
            if self.skip_unreadable:
                images, labels, skipped = batch
                self.files_skipped += int(skipped.sum())
            else:
                images, labels = batch
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def _worker_message(text: str) -> str:
    """The original message of an error re-raised from a DataLoader worker ("Caught ... Original
    Traceback ... module.ErrorType: message"), or ``text`` itself."""
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.partition(": ")[2] or last


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    # SLURM signals every process of the job: the main process stops the run at its next step and
    # then ends its workers (close()); a worker that died of the signal first would fail that step
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
