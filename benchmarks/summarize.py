"""Render pytest-benchmark JSON files as markdown tables, one per suite: each case's median time for
every provider, its derived figures (GB/s and fraction of copy bandwidth for the memory-bound
kernels; TFLOP/s and peak memory for attention), and the speedup over the reference provider.

    python benchmarks/summarize.py bench.json [more.json ...]
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

REFERENCE = {"attention": "math", "loader": "torchvision"}  # every other op: "torch"


def results(paths: list[str]):
    for path in paths:
        for b in json.load(open(path))["benchmarks"]:
            if "op" in b.get("extra_info", {}):
                yield b["extra_info"]


def figures(info: dict) -> str:
    parts = []
    if info.get("gbps") is not None:
        parts.append(f"{info['gbps']:.0f} GB/s ({info['fraction_of_copy_bandwidth']:.0%} of copy)")
    if info.get("tflops") is not None:
        parts.append(f"{info['tflops']:.3g} TFLOP/s")
    if info.get("images_per_sec") is not None:
        parts.append(f"{info['images_per_sec']:.0f} images/s")
    if info.get("peak_memory_mib") is not None:
        parts.append(f"{info['peak_memory_mib']:.0f} MiB peak")
    return ", ".join(parts)


def table(paths: list[str]) -> str:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    devices = set()
    for info in results(paths):
        devices.add(f"{info['device']} (torch {info['torch']}, triton {info['triton']})")
        groups[(info["op"], info["mode"], info["preset"])][info["provider"]] = info
    out = [f"Device: {'; '.join(sorted(devices))}", "",
           "| op | mode | shape | provider | median ms | figures | speedup vs reference |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for (op, mode, preset), by_provider in sorted(groups.items()):
        ref = by_provider.get(REFERENCE.get(op, "torch"))
        for provider, info in sorted(by_provider.items(), key=lambda kv: kv[1]["median_ms"]):
            speedup = f"{ref['median_ms'] / info['median_ms']:.2f}x" if ref and info is not ref else ""
            out.append(f"| {op} | {mode} | {preset} | {provider} | {info['median_ms']:.3f} | {figures(info)} | {speedup} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
