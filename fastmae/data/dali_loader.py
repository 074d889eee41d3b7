"""The DALI loader: JPEG decoding fused with the random crop on the GPU (nvJPEG, ``device="mixed"``),
or in DALI's CPU mode when there is no GPU; resize (cubic), flip and normalization in the pipeline.

Two sources: an image list (an ImageFolder tree) read in the order :func:`epoch_order` gives, the
same order as the torchvision loader's; or tar shards (webdataset layout) split across ranks by DALI's
reader. A file that cannot be decoded stops the run with its path, or, with ``skip_unreadable``, is
replaced by a readable one and counted (image lists only: tar shards are read by DALI alone).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from fastmae.data.crops import ASPECT_RATIOS, CLAMPED_CROP_MODES, CROP_SCALES, eval_resize
from fastmae.data.order import batches_per_epoch, epoch_order
from fastmae.data.sources import UnreadableImageError, load_rgb
from fastmae.errors import UsageError

logger = logging.getLogger("fastmae")

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.plugin.pytorch import feed_ndarray

    DALI_IMPORT_ERROR = None
except ImportError as e:
    DALI_IMPORT_ERROR = f"{type(e).__name__}: {e}"

IMAGE_EXTENSIONS = "jpg;jpeg;png;webp;bmp"
PREFETCH = 2  # batches DALI prepares ahead; a decode error surfaces up to this many batches late


def dali_unavailable_reasons() -> list[str]:
    if DALI_IMPORT_ERROR:
        return [f"NVIDIA DALI is not installed (pip install 'fastmae[dali-cu12]' or 'fastmae[dali-cu13]'; {DALI_IMPORT_ERROR})"]
    return []


# augmentation modes: the random-crop area range, and whether RandAugment follows
CROP_AREA = {**CROP_SCALES, "train_randaug": CROP_SCALES["train"]}
MODES = (*CROP_AREA, "eval")


def _clamped_crop(encoded, *, scale, decode_device):
    """The original's linear-probing crop (``fastmae.data.crops.crop_box(clamp=True)``) drawn in the
    pipeline from the image's header: one area and aspect ratio, the box clamped to the image."""
    height_width = fn.peek_image_shape(encoded, dtype=types.FLOAT)
    height, width = height_width[0], height_width[1]
    target_area = height * width * fn.random.uniform(range=list(scale))
    aspect_ratio = dmath.exp(fn.random.uniform(range=[math.log(r) for r in ASPECT_RATIOS]))
    w = dmath.min(dmath.floor(dmath.sqrt(target_area * aspect_ratio) + 0.5), width)
    h = dmath.min(dmath.floor(dmath.sqrt(target_area / aspect_ratio) + 0.5), height)
    # (the min: inside the image even if a draw came out as the range's end)
    top = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (height - h + 1)), height - h)
    left = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * (width - w + 1)), width - w)
    # integer anchor and shape: absolute pixels, in the decoder's (x, y) order
    return fn.decoders.image_slice(encoded, fn.cast(fn.stack(left, top), dtype=types.INT32),
                                   fn.cast(fn.stack(w, h), dtype=types.INT32), device=decode_device,
                                   output_type=types.RGB)


def _augment(encoded, *, mode: str, size: int, on_gpu: bool, mean, std):
    """The original's transforms. ``pretrain``: RandomResizedCrop(size, scale=(0.2, 1), bicubic) + flip;
    ``probe``: the original's linear-probing crop (scale (0.08, 1), one draw clamped to the image) +
    flip; ``train``: RandomResizedCrop(scale=(0.08, 1)) + flip, and ``train_randaug`` that +
    RandAugment(2 ops, magnitude 9 of 10) (fine-tuning); ``eval``: resize the shorter side to
    ``eval_resize(size)``, center crop. Random crops are fused into the decoder so only the crop is
    decoded. Then normalize, CHW."""
    decode_device = "mixed" if on_gpu else "cpu"
    mirror = 0
    if mode == "eval":
        images = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=eval_resize(size), interp_type=types.INTERP_CUBIC, antialias=True)
    else:
        if mode in CLAMPED_CROP_MODES:
            images = _clamped_crop(encoded, scale=CROP_AREA[mode], decode_device=decode_device)
        else:
            images = fn.decoders.image_random_crop(
                encoded, device=decode_device, output_type=types.RGB,
                random_area=list(CROP_AREA[mode]), random_aspect_ratio=list(ASPECT_RATIOS), num_attempts=10,
            )
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
        if mode == "train_randaug":
            images = fn.flip(images, horizontal=mirror)  # flip before RandAugment, as the torchvision order
            mirror = 0
            # magnitude 9 of 10 (timm's scale), filled with a mid grey
            images = rand_augment.rand_augment(images, n=2, m=9, num_magnitude_bins=11, fill_value=128)
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=(size, size),
        mean=[255 * m for m in mean], std=[255 * s for s in std], mirror=mirror,
    )


def _class_index(text: bytes, shards) -> int:
    try:
        return int(text.decode().strip())
    except ValueError:
        raise UsageError(f"a .cls file in the tar shards ({shards[0]}, ...) holds {text[:40]!r}, not a class index "
                         "(an integer from 0)") from None


def _list_pipeline(files, labels, *, mode, size, on_gpu, mean, std):
    encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True,
                                     name="reader", prefetch_queue_depth=PREFETCH)
    return _augment(encoded, mode=mode, size=size, on_gpu=on_gpu, mean=mean, std=std), label


def _tar_pipeline(shards, *, shard_id, num_shards, shuffle_seed, mode, size, on_gpu, mean, std):
    encoded, label = fn.readers.webdataset(
        paths=shards, ext=[IMAGE_EXTENSIONS, "cls"], shard_id=shard_id, num_shards=num_shards,
        random_shuffle=mode != "eval", initial_fill=1024, seed=shuffle_seed, pad_last_batch=True, name="reader",
        missing_component_behavior="error",
    )
    return _augment(encoded, mode=mode, size=size, on_gpu=on_gpu, mean=mean, std=std), label


class DaliLoader:
    """Batches ``(images float32 [B, 3, size, size], labels int64 [B])`` on ``device``.

    Args:
        files, labels: an image list (ImageFolder order), or None with ``shards``.
        shards: tar shards (``<key>.<image ext>`` + ``<key>.cls`` holding the label as text).
        batch_size, image_size, device: per rank; CUDA devices decode on the GPU.
        rank, world_size, seed: sharding and shuffling (image lists: see ``epoch_order``).
        num_threads: DALI CPU threads per rank.
        skip_unreadable: replace undecodable files (image lists) instead of stopping.
        mode: the augmentation (see ``_augment``): pretrain, train, train_randaug or eval (which
            also reads in file order).
        drop_last: leave out each rank's incomplete last batch (see ``epoch_order``).
    """

    def __init__(self, files=None, labels=None, *, shards=None, batch_size: int, image_size: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, seed: int = 0, num_threads: int = 4,
                 skip_unreadable: bool = False, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 mode: str = "pretrain", drop_last: bool = False):
        reasons = dali_unavailable_reasons()
        if reasons:
            raise ImportError(reasons[0])
        if (files is None) == (shards is None):
            raise UsageError("give the DALI loader either files and labels or tar shards")
        if mode not in MODES:
            raise UsageError(f"unknown DALI augmentation mode {mode!r}; choose one of {MODES}")
        self.mode, self.drop_last = mode, drop_last
        self.files, self.labels, self.shards = files, labels, shards
        self.batch_size, self.image_size, self.device = batch_size, image_size, device
        self.rank, self.world_size, self.seed, self.num_threads = rank, world_size, seed, num_threads
        self.skip_unreadable, self.mean, self.std = skip_unreadable, mean, std
        self.epoch = self.start_batch = 0
        self.files_skipped = 0
        self._bad: set[int] = set()
        self._tar_reader_meta: dict | None = None  # the tar reader's metadata (sizes)
        self._pipe = None  # the pipeline of the epoch being read, and the sample it started at
        self._pipe_start = 0
        self._next_batch = 0
        self._resume: dict | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.files_skipped = 0  # replacements in this epoch

    # -- exact resume -----------------------------------------------------------------------------
    # DALI draws each sample's crop and flip from its operators' random streams, which a pipeline
    # built at a later position would start afresh: a checkpoint mid-epoch keeps the pipeline's own
    # checkpoint (its reader's position and its random states, as of the last batch returned), and
    # the resumed run rebuilds the same pipeline from it.

    def state_dict(self) -> dict | None:
        """Where this rank's reading stands mid-epoch (None between epochs: an epoch's pipeline
        starts from its seed)."""
        if self._pipe is None:
            return None
        return {"epoch": self.epoch, "next_batch": self._next_batch, "pipeline_start": self._pipe_start,
                "bad": sorted(self._bad), "dali": self._pipe.checkpoint()}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue from :meth:`state_dict`'s at the next :meth:`set_epoch` of that epoch and batch."""
        self._resume = state

    @property
    def num_samples(self) -> int:
        if self.files is None:
            return self._tar_meta()["epoch_size"]
        return len(self.files)

    @property
    def steps_per_epoch(self) -> int:
        if self.shards is not None:
            per_epoch = self._tar_meta()["epoch_size_padded"] / (self.world_size * self.batch_size)
            return math.floor(per_epoch) if self.drop_last else math.ceil(per_epoch)
        return batches_per_epoch(len(self.files), world_size=self.world_size, batch_size=self.batch_size,
                                 drop_last=self.drop_last)

    def __len__(self) -> int:  # the batches the next iteration yields
        return self.steps_per_epoch - self.start_batch

    def _tar_meta(self) -> dict:
        if self._tar_reader_meta is None:  # DALI indexes the shards: build a pipeline once to ask it
            self._tar_reader_meta = self._build_tar(seed=self.seed).reader_meta("reader")
        return self._tar_reader_meta

    def sample_positions(self, start: int, count: int, device: torch.device) -> torch.Tensor:
        """The dataset positions of this rank's samples ``start .. start + count - 1`` in reading
        order (evaluation counts each position once; ``num_samples`` or more: padding). Image lists
        are dealt round-robin (:func:`epoch_order`); DALI gives each rank of tar shards a contiguous
        range of the samples (``n * rank // ranks`` on), padded by repeating its last one."""
        j = start + torch.arange(count, device=device)
        if self.files is not None:
            return j * self.world_size + self.rank
        n = self.num_samples
        first, end = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return torch.where(j < end - first, first + j, n)

    # -- pipelines --------------------------------------------------------------------------------

    def _pipeline_kwargs(self, seed: int, checkpoint: bytes | None) -> dict:
        on_gpu = self.device.type == "cuda"
        return dict(batch_size=self.batch_size, num_threads=self.num_threads, seed=seed,
                    device_id=(self.device.index or 0) if on_gpu else None, prefetch_queue_depth=PREFETCH,
                    enable_conditionals=self.mode == "train_randaug",  # RandAugment branches per sample
                    enable_checkpointing=True, checkpoint=checkpoint)

    def _build_list(self, order: np.ndarray, seed: int, checkpoint: bytes | None = None):
        pipe = pipeline_def(_list_pipeline, **self._pipeline_kwargs(seed, checkpoint))(
            [self.files[i] for i in order], self.labels[order].tolist(), mode=self.mode, size=self.image_size,
            on_gpu=self.device.type == "cuda", mean=self.mean, std=self.std)
        pipe.build()
        return pipe

    def _build_tar(self, seed: int, checkpoint: bytes | None = None):
        pipe = pipeline_def(_tar_pipeline, **self._pipeline_kwargs(seed, checkpoint))(
            self.shards, shard_id=self.rank, num_shards=self.world_size, shuffle_seed=self.seed + self.epoch,
            mode=self.mode, size=self.image_size, on_gpu=self.device.type == "cuda", mean=self.mean, std=self.std)
        pipe.build()
        return pipe

    def _take_resume_state(self) -> dict | None:
        """The loaded state, if it is where this epoch starts."""
        state, self._resume = self._resume, None
        if state is None or self.start_batch == 0:
            return None
        if (state["epoch"], state["next_batch"]) != (self.epoch, self.start_batch):
            logger.warning("the DALI loader's saved state is at epoch %d batch %d, not at epoch %d batch %d: the "
                           "crops drawn from here on differ from an uninterrupted run's", state["epoch"],
                           state["next_batch"], self.epoch, self.start_batch)
            return None
        return state

    def _to_torch(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        dense = images.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        if self.shards is not None:  # label files hold text
            values = [_class_index(bytes(np.array(t)), self.shards) for t in labels]
        else:
            values = np.array(labels.as_tensor()).reshape(-1)
        return out, torch.as_tensor(np.asarray(values, dtype=np.int64)).to(self.device, non_blocking=True)

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self):
        try:
            yield from self._batches()
        finally:
            self._pipe = None

    def _batches(self):
        seed = hash((self.seed, self.rank, self.epoch)) % 2**31  # augmentation randomness
        resume = self._take_resume_state()
        self._next_batch = self.start_batch
        if self.shards is not None:
            pipe = self._pipe = self._build_tar(seed, resume and resume["dali"])
            if resume is None:
                for _ in range(self.start_batch):  # DALI's reader cannot seek: read past the batches done
                    pipe.run()
            for _ in range(len(self)):
                batch = self._to_torch(*pipe.run())
                self._next_batch += 1
                yield batch
            return
        order = epoch_order(len(self.files), epoch=self.epoch, seed=self.seed, rank=self.rank,
                            world_size=self.world_size, batch_size=self.batch_size, shuffle=self.mode != "eval",
                            drop_last=self.drop_last)
        pos = self.start_batch * self.batch_size
        if resume is not None:
            self._bad = set(resume["bad"])
        while pos < len(order):
            if resume is not None:  # the interrupted run's pipeline, from where it stood
                start, checkpoint, resume = resume["pipeline_start"], resume["dali"], None
            else:
                start, checkpoint = pos, None
            order[start:] = self._replace_bad(order[start:])
            pipe = self._pipe = self._build_list(order[start:], (seed + start) % 2**31, checkpoint)
            self._pipe_start = start
            try:
                while pos < len(order):
                    batch = self._to_torch(*pipe.run())
                    pos += self.batch_size
                    self._next_batch += 1
                    yield batch
            except RuntimeError as e:  # DALI stops the pipeline at the first undecodable file
                window = order[pos: pos + (PREFETCH + 1) * self.batch_size]
                bad = [i for i in dict.fromkeys(window.tolist()) if not self._readable(i)]
                if not bad:
                    raise
                if not self.skip_unreadable:
                    raise UnreadableImageError(
                        f"{self.files[bad[0]]}: unreadable image ({len(bad)} in this batch: "
                        f"{', '.join(self.files[i] for i in bad)}); run python -m fastmae.data.check on the "
                        f"dataset, or pass --skip_unreadable"
                    ) from e
                for i in bad:
                    logger.warning("skipping %s: unreadable image", self.files[i])
                self._bad.update(bad)  # replaced (and counted) when the pipeline restarts
            finally:
                self._pipe = None
                del pipe

    def _readable(self, i: int) -> bool:
        try:
            load_rgb(self.files[i])
            return True
        except UnreadableImageError:
            return False

    def _replace_bad(self, order: np.ndarray) -> np.ndarray:
        """Each known-bad index replaced by the next readable one (batch sizes and the number of
        batches stay the same on every rank)."""
        if not self._bad:
            return order
        order = order.copy()
        for j in np.flatnonzero(np.isin(order, list(self._bad))):
            k = (order[j] + 1) % len(self.files)
            self.files_skipped += 1  # each unreadable file passed over, as the torchvision loader counts
            while k in self._bad:
                k = (k + 1) % len(self.files)
                self.files_skipped += 1
            order[j] = k
        return order
