"""``python -m fastmae.profile``: where a pretraining step's time goes, measured with ``torch.profiler``.

It takes ``python -m fastmae.pretrain``'s flags (synthetic data by default), builds the same run,
lets the step warm up (compilation, CUDA graph capture), then profiles ``--steps`` steps, each
ended by a synchronization so that its device work falls inside it, and prints per step:

- host ms: the time the host spent issuing the step (the final synchronization excluded);
- step ms: the step from its start until the device finished it;
- busy: the fraction of the step in which the GPU ran a kernel (on a CPU: the fraction spent in ops);
- launches: kernel launches, copies and graph launches from the host (on a CPU: the ops dispatched
  by Python and the autograd engine, not counting the ops they call);
- time by category: GEMM, attention, norm/elementwise, casts, optimizer, MAE ops, communication,
  and what is left: idle GPU time, or on a CPU the host's own work (Python, autograd, dispatch).

``--trace FILE`` also writes the Chrome trace (chrome://tracing, Perfetto).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from fastmae.cli import cli_main, logger

# The first matching rule names the category of a kernel (or CPU op), matched against its name and
# the names of the ops and ranges it ran in ("aten::mm < AddmmBackward0 < ..."): an op's own name
# and its callers say what it is for, a kernel's name alone (inside a CUDA graph) what it does.
CATEGORIES = ("GEMM", "attention", "norm/elementwise", "casts", "optimizer", "MAE ops", "communication")
RULES = [
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|broadcast|c10d|gloo"),
    ("optimizer", r"Optimizer\.(step|zero_grad)|adam|\blamb\b|\blars\b|multi_tensor_apply|clip_grad|_foreach_norm"),
    ("MAE ops", r"fastmae|masked_pixel_loss|gather_visible|gather_patches|unshuffle|random_masking|argsort|aten::sort"),
    ("attention", r"scaled_dot_product|flash|fmha|attention|sdpa|_mha|cudnn.*mha"),
    ("casts", r"^aten::_to_copy|^aten::to\b|fused__to_copy_\d+$"),
    ("GEMM", r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear|convolution|_convolution|conv\w*)\b|gemm|cutlass|xmma|nvjet|cublas"),
]
_COMPILED_RULES = [(category, re.compile(pattern, re.IGNORECASE)) for category, pattern in RULES]
LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync", "cudaLaunchCooperativeKernel"}
SYNC_RANGE = "fastmae.profile.synchronize"


def categorize(names: list[str]) -> str:
    """The category of an op or kernel: ``names`` is its own name first, then its callers' (the
    innermost first). A name is tried against every rule before its callers' are."""
    for name in names:
        for category, pattern in _COMPILED_RULES:
            if pattern.search(name):
                return category
    return "norm/elementwise"


@dataclass
class StepProfile:
    host_ms: float
    step_ms: float
    busy_ms: float
    launches: int
    by_category: dict[str, float] = field(default_factory=dict)  # ms
    other_ms: float = 0.0  # GPU: idle; CPU: host work outside the ops

    @property
    def busy(self) -> float:
        return self.busy_ms / self.step_ms if self.step_ms else 0.0


def _chain(event) -> list[str]:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def summarize(events, device_type: str) -> list[StepProfile]:
    """Per profiled step, from ``torch.profiler``'s events (``prof.events()``)."""
    from torch.autograd import DeviceType
    steps = sorted((e for e in events if e.name.startswith("ProfilerStep")), key=lambda e: e.time_range.start)
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.name.startswith("ProfilerStep")]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    result = []
    for s in steps:
        start, end = s.time_range.start, s.time_range.end
        inside = [e for e in cpu if start <= e.time_range.start < end]
        sync_us = sum(e.time_range.elapsed_us() for e in inside if e.name == SYNC_RANGE)
        by_category = dict.fromkeys(CATEGORIES, 0.0)
        if device_type == "cuda":
            # the profiler attaches a kernel to the op it was launched in: its own name first, then
            # the ops it ran in, say what it is
            in_step = [k for k in kernels if start <= k.time_range.start < end]
            attached = Counter()
            for e in inside:
                for k in e.kernels:
                    by_category[categorize([k.name] + _chain(e))] += k.duration / 1e3
                    attached[k.name, k.duration] += 1
            # a CUDA graph's kernels belong to no op (a replay is not one): their names alone
            for k in in_step:
                key = (k.name, k.time_range.elapsed_us())
                if attached[key]:
                    attached[key] -= 1
                else:
                    by_category[categorize([k.name])] += key[1] / 1e3
            busy = _union_ms([(k.time_range.start, k.time_range.end) for k in in_step])
            launches = sum(e.name in LAUNCHES for e in inside)
            step_ms = (end - start) / 1e3
            other = max(step_ms - busy, 0.0)
        else:
            ops = [e for e in inside if _is_op(e)]
            for e in ops:
                by_category[categorize(_chain(e))] += e.self_cpu_time_total / 1e3
            busy = sum(by_category.values())
            launches = sum(e.cpu_parent is None or not _is_op(e.cpu_parent) for e in ops)  # dispatched from Python/autograd
            step_ms = (end - start - sync_us) / 1e3
            other = max(step_ms - busy, 0.0)
        result.append(StepProfile(host_ms=(end - start - sync_us) / 1e3, step_ms=step_ms, busy_ms=busy,
                                  launches=launches, by_category=by_category, other_ms=other))
    return result


def _is_op(event) -> bool:
    return "::" in event.name and not event.name.startswith(("autograd::", "cuda", "cu"))


def format_table(profiles: list[StepProfile], device_type: str) -> str:
    on_gpu = device_type == "cuda"
    other = "idle" if on_gpu else "host (Python, autograd)"
    header = ["step", "host ms", "step ms", "GPU busy" if on_gpu else "in ops", "launches" if on_gpu else "ops",
              *CATEGORIES, other]
    rows = []
    for i, p in enumerate(profiles + [_mean(profiles)] if len(profiles) > 1 else profiles):
        label = "mean" if i == len(profiles) else str(i)
        cells = [f"{p.by_category[c]:.2f} ({100 * p.by_category[c] / p.step_ms:.0f}%)" for c in CATEGORIES]
        rows.append([label, f"{p.host_ms:.2f}", f"{p.step_ms:.2f}", f"{100 * p.busy:.1f}%", f"{p.launches:.0f}", *cells,
                     f"{p.other_ms:.2f} ({100 * p.other_ms / p.step_ms:.0f}%)"])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    unit = "GPU ms" if on_gpu else "CPU ms"
    return f"Times in ms; categories: {unit} (share of the step).\n" + "\n".join(lines)


def _mean(profiles: list[StepProfile]) -> StepProfile:
    n = len(profiles)
    return StepProfile(
        host_ms=sum(p.host_ms for p in profiles) / n, step_ms=sum(p.step_ms for p in profiles) / n,
        busy_ms=sum(p.busy_ms for p in profiles) / n, launches=sum(p.launches for p in profiles) / n,
        by_category={c: sum(p.by_category[c] for p in profiles) / n for c in CATEGORIES},
        other_ms=sum(p.other_ms for p in profiles) / n,
    )


def get_args_parser() -> argparse.ArgumentParser:
    from fastmae.pretrain import get_args_parser as pretrain_parser

    p = pretrain_parser()
    p.prog, p.description = "python -m fastmae.profile", __doc__
    g = p.add_argument_group("profile")
    g.add_argument("--steps", default=3, type=int, help="optimizer steps profiled")
    g.add_argument("--warmup_steps", default=None, type=int,
                   help="optimizer steps run before (default: enough to compile and capture the step)")
    g.add_argument("--trace", default=None, help="also write the Chrome trace of the profiled steps here")
    p.set_defaults(data_backend="synthetic", epochs=1, output_dir="./output_dir_profile")
    return p


def main(args: argparse.Namespace) -> list[StepProfile]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    from fastmae.optim import lr_at, set_lr
    from fastmae.pretrain import build
    from fastmae.step import GRAPH_WARMUP_UPDATES
    from fastmae.training import build_step

    job = build(args)
    run, device = job.run, job.run.device
    step = build_step(run, args, job.model, job.optimizer, job.compute_loss, job.step_mode)
    warmup = args.warmup_steps
    if warmup is None:
        warmup = {"eager": 1, "compiled": 2, "graphed": GRAPH_WARMUP_UPDATES + 2}[job.step_mode]
    set_lr(job.optimizer, lr_at(0.5, lr=args.lr, min_lr=args.min_lr, warmup_epochs=0, epochs=1))
    job.model.train()
    batches = _batches(job.loader)
    accum = args.accum_iter

    def one_update():
        for micro in range(accum):
            imgs, labels = next(batches)
            step(imgs, labels, update=micro + 1 == accum)
        with record_function(SYNC_RANGE):
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    for _ in range(warmup):
        one_update()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=args.steps, repeat=1)) as prof:
        for _ in range(args.steps + 1):
            one_update()
            prof.step()
    if args.trace:
        prof.export_chrome_trace(args.trace)
        logger.info("trace: %s", args.trace)
    profiles = summarize(prof.events(), device.type)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nfastmae profile: {args.model}, batch {args.batch_size} x {accum} micro-batches, {run.precision}, "
          f"step {job.step_mode}, {where}, torch {torch.__version__}\n")
    print(format_table(profiles, device.type))
    return profiles


def _batches(loader):
    while True:
        yield from loader


def cli(argv: list[str] | None = None) -> int:
    from fastmae.pretrain import check_args

    return cli_main(get_args_parser(), main, check_args, argv)


if __name__ == "__main__":
    sys.exit(cli())
