"""Shared by the benchmark suites: device, sizes, synchronized timing, and what each result records.

``pytest benchmarks --benchmark-only`` runs the real MAE sizes on a GPU and reduced sizes on a CPU
(there, the Triton kernels would only run under the interpreter, so they are skipped). Every result
carries its device, versions, shapes, dtype and derived figures (GB/s, fraction of the measured copy
bandwidth) in ``extra_info``.
"""
from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass

import torch
import triton
import triton.testing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"


@dataclass(frozen=True)
class Preset:
    """The shapes one MAE training step feeds the kernels."""

    name: str
    batch: int
    img: int
    patch: int
    enc_dim: int
    dec_dim: int = 512
    chans: int = 3
    mask_ratio: float = 0.75

    @property
    def L(self) -> int:
        return (self.img // self.patch) ** 2

    @property
    def K(self) -> int:
        return int(self.L * (1 - self.mask_ratio))

    @property
    def P(self) -> int:
        return self.patch**2 * self.chans


PRESETS = (
    [Preset("vit_b16", 256, 224, 16, 768), Preset("vit_l16", 256, 224, 16, 1024)]
    if ON_GPU
    else [Preset("vit_b16_cpu", 8, 224, 16, 768)]
)


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def copy_bandwidth_gbps() -> float:
    """Achieved device copy bandwidth in GB/s (bytes read + written per second), the limit the
    memory-bound kernels are measured against."""
    n = (1 << 28) if ON_GPU else (1 << 24)
    src = torch.empty(n, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    times = []
    for _ in range(10):
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / sorted(times)[len(times) // 2] / 1e9


def measure(benchmark, fn, *, rounds: int | None = None, calls_per_round: int = 1, device_time: bool = False,
            **info) -> float:
    """Time ``fn`` and record ``info``; returns the median seconds per call. A round is
    ``calls_per_round`` calls and one synchronization, so that calls of a few microseconds are not
    timed as the synchronization's cost (pytest-benchmark's own table shows seconds per round): the
    host's time, launches included. With ``device_time`` on a GPU the returned time is the device's
    instead (:func:`device_seconds`), and both are recorded."""
    def run():
        for _ in range(calls_per_round):
            fn()
        sync()

    # with the device timed too, fewer host rounds: the run's time budget goes to both
    default_rounds = (10 if device_time else 50) if ON_GPU else 5
    benchmark.pedantic(run, rounds=rounds or default_rounds, warmup_rounds=3 if ON_GPU else 1, iterations=1)
    median = benchmark.stats.stats.median / calls_per_round
    benchmark.extra_info.update(
        device=device_name(), torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda if ON_GPU else None, median_ms=median * 1e3, calls_per_round=calls_per_round, **info,
    )
    if device_time and ON_GPU:
        seconds, how = device_seconds(fn)
        benchmark.extra_info.update(device_median_ms=seconds * 1e3, device_timing=how)
        return seconds
    return median


# The stream device timing captures on. Autograd runs a backward op on its forward's stream, so a
# benchmark that times a backward alone runs the forward it retains here too (see ``on_bench_stream``).
BENCH_STREAM = torch.cuda.Stream() if ON_GPU else None


def on_bench_stream():
    """A context running work on :data:`BENCH_STREAM` (after what the current stream queued)."""
    if not ON_GPU:
        return contextlib.nullcontext()
    BENCH_STREAM.wait_stream(torch.cuda.current_stream())
    return torch.cuda.stream(BENCH_STREAM)


def device_seconds(fn, replay_ms: float = 20.0, replays: int = 10) -> tuple[float, str]:
    """The GPU's median seconds per call of ``fn`` and how they were taken: about ``replay_ms`` of
    back-to-back calls captured in one CUDA graph, replayed ``replays`` times between CUDA events, so
    the host's launches leave no gaps; where ``fn`` cannot be captured, CUDA events around each call
    after an L2 flush (``triton.testing.do_bench``). The replays do not flush L2: an op whose
    tensors fit in it (tens of MB) reads them from there."""
    try:
        with on_bench_stream():
            for _ in range(2):  # warm-up: lazy initialization and allocations outside the capture
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
        torch.cuda.synchronize()
        # enough calls for replay_ms (at most 1000: a capture of microsecond calls stays quick)
        calls = min(1000, max(1, int(replay_ms / max(start.elapsed_time(end) / 5, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=BENCH_STREAM):
            for _ in range(calls):
                fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        times = sorted(start.elapsed_time(end) / calls for start, end in events)
        del graph
        return times[len(times) // 2] / 1e3, f"CUDA graph of {calls} back-to-back calls, median of {replays} replays"
    except Exception as e:  # noqa: BLE001 - any capture failure: time without a graph instead
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fn, rep=20, return_mode="median")
        return ms / 1e3, f"CUDA events per call after an L2 flush (do_bench; no graph: {type(e).__name__}: {e})"[:300]


def training_step(model, optimizer, imgs, autocast_dtype=torch.bfloat16):
    """The timed unit of the end-to-end suites: forward, backward, optimizer step."""
    def step():
        with torch.autocast(DEVICE.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _, _ = model(imgs, mask_ratio=0.75)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_memory_gib(fn) -> float | None:
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30
