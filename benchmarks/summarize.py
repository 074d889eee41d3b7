"""Render pytest-benchmark JSON files as a markdown table: each op, mode and preset with the
median time of every provider, its achieved GB/s and fraction of copy bandwidth, and the speedup of
the fastest non-reference provider over the ``torch`` reference.

    python benchmarks/summarize.py benchmarks/results/*.json
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def rows(paths: list[str]):
    for path in paths:
        data = json.load(open(path))
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "op" in info:
                yield info


def table(paths: list[str]) -> str:
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    devices = set()
    for info in rows(paths):
        devices.add(info["device"])
        groups[(info["op"], info["mode"], info["preset"])][info["provider"]] = info
    out = [f"Device: {', '.join(sorted(devices))}", "",
           "| op | mode | preset | provider | median ms | GB/s | of copy bw | speedup vs torch |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (op, mode, preset), by_provider in sorted(groups.items()):
        ref = by_provider.get("torch")
        for provider, info in sorted(by_provider.items()):
            speedup = f"{ref['median_ms'] / info['median_ms']:.2f}x" if ref and provider != "torch" else ""
            out.append(f"| {op} | {mode} | {preset} | {provider} | {info['median_ms']:.3f} | {info['gbps']:.0f} | "
                       f"{info['fraction_of_copy_bandwidth']:.0%} | {speedup} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
