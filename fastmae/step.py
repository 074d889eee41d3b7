"""The training step: forward and backward of one batch and, on the last micro-batch of an
accumulation, gradient clipping and the optimizer update.

Three ways to run the same step (``STEP_MODES``):

- ``eager``: PyTorch op by op, the reference the other two are tested against. Under autocast its
  matmuls take low-precision working copies of their weights, refreshed after each update
  (:class:`fastmae.models.working_copies.WorkingCopies`), instead of casting them at every call.
- ``compiled``: the model through ``torch.compile`` (Inductor fuses the forward's and the
  backward's elementwise work, casts included, into few kernels); gradient clipping and the fused
  AdamW update are single multi-tensor kernels.
- ``graphed`` (CUDA): the compiled step captured as CUDA graphs -- one for a micro-batch that only
  accumulates, one for the micro-batch that also updates -- and replayed: a whole step, optimizer
  included, is one launch from the host. The first ``warmup`` updates run compiled (they compile
  and allocate the gradients); a batch of another shape than the captured one runs eagerly instead
  of being captured again.

Nothing here reads a device value back to the host: the loss stays on the device (the epoch loop
reads it when a log line is due), the learning rate is written into the optimizer's device tensor,
and with fp16 the gradient scaler checks for inf and updates its scale on the device, where the
fused AdamW skips an update with inf gradients by itself.
"""
from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Callable

import torch
from torch import nn

from fastmae.errors import UsageError
from fastmae.models.layers import resolve_attention
from fastmae.models.working_copies import WorkingCopies
from fastmae.sharding import is_sharded

logger = logging.getLogger("fastmae")

STEP_MODES = ("eager", "compiled", "graphed")
# Updates run compiled before the capture: the first compiles, the next ones find every lazily
# allocated buffer (gradients, optimizer state, cuBLAS workspaces) in place.
GRAPH_WARMUP_UPDATES = 2


def step_mode_unavailable_reasons(mode: str, device: torch.device, *, distributed: bool,
                                  fused_optimizer: bool = True) -> list[str]:
    """Why ``mode`` cannot run here (empty: it can)."""
    if mode not in STEP_MODES:
        return [f"unknown step mode {mode!r}; choose one of {STEP_MODES}"]
    reasons = []
    if mode == "graphed":
        if device.type != "cuda":
            reasons.append("CUDA graphs need a CUDA device")
        if distributed:
            # DDP's reducer can be captured (NCCL >= 2.9.6, 11 warmup iterations, no async error
            # handling), but that path has not been run yet
            reasons.append("CUDA graphs are not yet supported with several processes (DDP)")
        if not fused_optimizer:
            reasons.append("the optimizer is not torch's fused AdamW (its update would read values on the host)")
    return reasons


class TrainStep:
    """``step(imgs, labels, update)``: one micro-batch's forward and backward, plus, when ``update``,
    the optimizer step; returns the batch's loss (a detached fp32 device tensor, valid until the
    next call).

    Args:
        model: the module to train (DDP or not); what runs in ``eager`` mode and for odd-shaped
            batches in ``graphed`` mode.
        optimizer: its optimizer; ``graphed`` needs a fused one whose lr is a device tensor
            (:func:`fastmae.optim.build_optimizer` with ``capturable=True``).
        compute_loss: ``compute_loss(model, imgs, labels) -> loss``; in ``graphed`` mode it must draw
            its randomness on the device (a captured host draw would repeat at every replay).
        accum_iter: micro-batches per update (the loss of each is divided by it).
        autocast_dtype: bf16 / fp16 autocast, or None for full precision.
        clip_grad: max gradient norm, or None.
        scaler: a GradScaler (fp16), or None.
        mode: one of ``STEP_MODES``.
        compile_backend: ``torch.compile``'s backend (``aot_eager`` traces and runs the same graphs
            without Inductor's code generation: the tests' cheap stand-in).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        compute_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        accum_iter: int = 1,
        autocast_dtype: torch.dtype | None = None,
        clip_grad: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        mode: str = "eager",
        compile_backend: str = "inductor",
    ):
        device = next(model.parameters()).device
        reasons = step_mode_unavailable_reasons(mode, device, distributed=hasattr(model, "no_sync") or is_sharded(model),
                                                fused_optimizer=getattr(optimizer, "_step_supports_amp_scaling", False))
        if mode == "graphed" and not all(g.get("capturable") and torch.is_tensor(g["lr"]) for g in optimizer.param_groups):
            # a float lr would be baked into the captured update: the schedule would stop there
            reasons.append("the optimizer is not capturable with a device-tensor lr "
                           "(fastmae.optim.build_optimizer(..., capturable=True))")
        if reasons:
            raise UsageError(f"step mode {mode!r} cannot run here: {'; '.join(reasons)}")
        self.model, self.optimizer, self.compute_loss = model, optimizer, compute_loss
        self.accum_iter, self.clip_grad, self.scaler, self.mode = accum_iter, clip_grad, scaler, mode
        self.device = device
        self.autocast = partial(torch.autocast, device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext
        self.ddp = hasattr(model, "no_sync")
        self.fsdp = is_sharded(model)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # fallback_random: Inductor draws random numbers with torch's own generator, so the compiled
        # step masks the same patches as the eager one (and as a resumed run from the saved state)
        options = {"fallback_random": True} if compile_backend == "inductor" else None
        # dynamic=False: one static shape, as the captured graphs want (a batch of another shape runs
        # eagerly instead of compiling a dynamic-shape graph)
        if mode != "eager":
            resolve_attention(model, device.type)
        self.step_model = model if mode == "eager" else torch.compile(model, backend=compile_backend, options=options,
                                                                      dynamic=False)
        module = model.module if self.ddp else model
        # FSDP gathers the weights in the autocast dtype itself (and frees them after each block)
        self.working_copies = (WorkingCopies(module, autocast_dtype)
                               if mode == "eager" and autocast_dtype and not self.fsdp else None)
        self.first_call = True
        # graphed mode: the captured graphs by `update`, their static inputs and loss
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.static_loss: dict[bool, torch.Tensor] = {}
        self.static_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.warmup_left = GRAPH_WARMUP_UPDATES
        self.pool = None
        self.side_stream: torch.cuda.Stream | None = None
        self.warned_shape = False

    def describe(self) -> str:
        return {
            "eager": "eager (op by op)",
            "compiled": "compiled (torch.compile forward + backward, fused optimizer step)",
            "graphed": "compiled and replayed as CUDA graphs (forward, backward and optimizer in one launch)",
        }[self.mode]

    def __call__(self, imgs: torch.Tensor, labels: torch.Tensor, update: bool, *, reduce: bool | None = None) -> torch.Tensor:
        """One micro-batch; ``update``: the optimizer steps after it. ``reduce`` (default:
        ``update``): the ranks reduce the gradients after it -- also before an incomplete
        accumulation is discarded, so that the gradients are where ``discard_gradients`` clears
        them (FSDP keeps an unreduced accumulation in buffers of its own)."""
        reduce = update if reduce is None else reduce
        if self.mode != "eager" and self.first_call:
            return self._timed_first_call(imgs, labels, update, reduce)
        if self.mode == "graphed":
            return self._graphed(imgs, labels, update)
        return self._step(self.step_model, imgs, labels, update, reduce)

    def discard_gradients(self) -> None:
        """Drop an incomplete accumulation (the end of an epoch: its last micro-batch reduced)."""
        self._zero_grad()

    # -- the step itself ---------------------------------------------------------------------------

    def _step(self, model: nn.Module, imgs: torch.Tensor, labels: torch.Tensor, update: bool,
              reduce: bool) -> torch.Tensor:
        # DDP all-reduces (FSDP reduce-scatters) gradients in backward: only on the micro-batch that
        # ends an accumulation (or one about to be discarded)
        sync = self.model.no_sync() if self.ddp and not reduce else nullcontext()
        if self.fsdp:
            self.model.set_requires_gradient_sync(reduce)
        with sync:
            with self.autocast(), self.working_copies.enabled() if self.working_copies else nullcontext():
                loss = self.compute_loss(model, imgs, labels)
            scaled = loss / self.accum_iter if self.accum_iter > 1 else loss
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if update:
            if self.clip_grad is not None:
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.params, self.clip_grad)
            if self.scaler:
                self.scaler.step(self.optimizer)  # fused AdamW: the inf check stays on the device
                self.scaler.update()
            else:
                self.optimizer.step()
            self._zero_grad()
            if self.working_copies:
                self.working_copies.refresh()
        return loss.detach().float()

    def _zero_grad(self) -> None:
        if self.mode == "graphed":
            # the captured graphs accumulate into these very tensors
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _timed_first_call(self, imgs, labels, update, reduce) -> torch.Tensor:
        start = time.perf_counter()
        if self.mode == "graphed":
            loss = self._graphed(imgs, labels, update)
        else:
            loss = self._step(self.step_model, imgs, labels, update, reduce)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.first_call = False
        logger.info("step: the first %s step took %.1f s (torch.compile's compilation; later runs read its cache)",
                    self.mode, time.perf_counter() - start)
        return loss

    # -- graphed mode ------------------------------------------------------------------------------

    def _graphed(self, imgs: torch.Tensor, labels: torch.Tensor, update: bool) -> torch.Tensor:
        # the capture records the current device's streams: a run on cuda:1 without this would
        # capture an empty graph and replay nothing
        with torch.cuda.device(self.device):
            return self._graphed_on_device(imgs, labels, update)

    def _graphed_on_device(self, imgs: torch.Tensor, labels: torch.Tensor, update: bool) -> torch.Tensor:
        if self.static_batch is None:
            self.static_batch = (imgs.clone(), labels.clone())
        static_imgs, static_labels = self.static_batch
        if imgs.shape != static_imgs.shape or labels.shape != static_labels.shape or imgs.dtype != static_imgs.dtype:
            if not self.warned_shape:
                logger.info("step: a batch of shape %s (captured: %s) runs eagerly", tuple(imgs.shape),
                            tuple(static_imgs.shape))
                self.warned_shape = True
            with _uncaptured_optimizer():
                return self._step(self.model, imgs, labels, update, update)
        if self.warmup_left > 0:
            # real steps, on a side stream as CUDA graph capture wants its warmup
            side = self.side_stream = self.side_stream or torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), _uncaptured_optimizer():
                loss = self._step(self.step_model, imgs, labels, update, update)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warmup_left -= update
            return loss
        static_imgs.copy_(imgs, non_blocking=True)
        static_labels.copy_(labels, non_blocking=True)
        if update not in self.graphs:
            self._capture(update)
        self.graphs[update].replay()
        return self.static_loss[update]

    def _capture(self, update: bool) -> None:
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's threads (pinning memory, DALI's prefetch) keep using CUDA
        # during the capture, which the default "global" mode would turn into a capture error
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self.static_loss[update] = self._step(self.step_model, *self.static_batch, update, update)
        # both graphs draw on one memory pool: they never run at the same time
        self.pool = graph.pool()
        self.graphs[update] = graph
        logger.info("step: captured the %s micro-batch as a CUDA graph in %.1f s", "updating" if update else "accumulating",
                    time.perf_counter() - start)


@contextmanager
def _uncaptured_optimizer():
    """A capturable optimizer's step outside a capture (warmup, an odd batch) is meant: no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*capturable=True.*")
        yield
