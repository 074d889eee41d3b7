"""Render benchmark JSON files (pytest-benchmark's ``--benchmark-json``) as markdown, and optionally
a PNG chart: the visible-only speedup per preset (measured, predicted by FLOPs, the paper's) and the
kernels' achieved bandwidth.

    python benchmarks/summarize.py bench.json [more.json ...] [--png chart.png]

A ``.jsonl`` file (``FASTMAE_BENCH_ROWS``, one passed benchmark per line) stands in for the JSON of
a suite stopped before it ended.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

REFERENCE = {"attention": "math", "loader": "torchvision"}  # else "torch"


def results(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        try:
            if path.endswith(".jsonl"):  # the rows a suite stopped at its time limit had finished (conftest.py)
                benchmarks = [json.loads(line) for line in open(path) if line.strip()]
            else:
                benchmarks = json.load(open(path))["benchmarks"]
        except (OSError, ValueError, KeyError) as e:  # a suite stopped before it wrote its results
            print(f"skipping {path}: no pytest-benchmark results in it ({e})", file=sys.stderr)
            continue
        out += [b["extra_info"] for b in benchmarks if "op" in b.get("extra_info", {})]
    return out


def figures(info: dict) -> str:
    parts = []
    if info.get("gbps") is not None:
        parts.append(f"{info['gbps']:.0f} GB/s ({info['fraction_of_copy_bandwidth']:.0%} of copy)")
    if info.get("design_fraction_of_copy_bandwidth") is not None:
        parts.append(f"{info['design_fraction_of_copy_bandwidth']:.0%} of copy over the bytes its kernels move")
    if info.get("tflops") is not None:
        parts.append(f"{info['tflops']:.3g} TFLOP/s")
    if info.get("images_per_sec") is not None:
        parts.append(f"{info['images_per_sec']:.0f} images/s")
    if info.get("mfu") is not None:
        parts.append(f"MFU {info['mfu']:.1%}")
    if info.get("peak_memory_mib") is not None:
        parts.append(f"{info['peak_memory_mib'] / 1024:.1f} GiB peak")
    return ", ".join(parts)


def speedup_table(infos: list[dict]) -> list[str]:
    steps = defaultdict(dict)
    for i in infos:
        if i["op"] == "training_step":
            steps[(i["preset"], i["mode"])][i["provider"]] = i
    if not steps:
        return []
    out = ["### Visible-only encoder vs mask tokens in the encoder (one training step)", "",
           "| preset | decoder | visible-only ms | w/ [M] ms | speedup | FLOP ratio | paper (Table 2) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for (preset, mode), by in sorted(steps.items()):
        if len(by) < 2:
            continue
        vis, m = by["visible_only"], by["with_mask_tokens"]
        paper = m.get("paper_speedup")
        out.append(f"| {preset} | {mode.split('=')[1]} blocks | {vis['median_ms']:.1f} | {m['median_ms']:.1f} | "
                   f"{m['median_ms'] / vis['median_ms']:.2f}x | {m['flops_per_image'] / vis['flops_per_image']:.2f}x | "
                   f"{f'{paper}x' if paper else ''} |")
    return out + [""]


def e2e_tables(infos: list[dict]) -> list[str]:
    """fastmae against the original: the training step per preset and batch, and the host's cost."""
    out = []
    steps = [i for i in infos if i["op"] == "training_step_e2e"]
    if steps:
        out += ["### Pretraining step, side by side with the original", "",
                "| preset | batch | provider | step | precision | ms / step | images/s | MFU | peak GiB | vs original |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        original = {(i["preset"], i["batch"]): i for i in steps if i["provider"] == "original"}
        for i in sorted(steps, key=lambda i: (i["preset"], i["batch"], i["provider"])):
            o = original.get((i["preset"], i["batch"]))
            ratio = f"{i['images_per_sec'] / o['images_per_sec']:.2f}x" if o and o is not i else ""
            mfu = f"{i['mfu']:.1%}" if i.get("mfu") is not None else ""
            memory = f"{i['peak_memory_mib'] / 1024:.1f}" if i.get("peak_memory_mib") is not None else ""
            out.append(f"| {i['preset']} | {i['batch']} | {i['provider']} | {i['mode']} | {i['precision']} | "
                       f"{i['step_ms']:.1f} | {i['images_per_sec']:.0f} | {mfu} | {memory} | {ratio} |")
        out.append("")
    hosts = [i for i in infos if i["op"] == "host_cost"]
    if hosts:
        out += [f"### Host cost per step ({hosts[0]['model']})", "",
                "| provider | step | ms / step | ops dispatched / step | vs original |", "| --- | --- | --- | --- | --- |"]
        for i in sorted(hosts, key=lambda i: i["host_ms_per_step"]):
            ops_ = f"{i['ops_per_step']:.0f}" if i.get("ops_per_step") is not None else "(compiled)"
            ratio = f"{i['host_cost_vs_original']:.2f}x" if i.get("host_cost_vs_original") else ""
            out.append(f"| {i['provider']} | {i['mode']} | {i['host_ms_per_step']:.2f} | {ops_} | {ratio} |")
        out.append("")
    return out


def loader_table(infos: list[dict]) -> list[str]:
    """Each loader's images/s against fastmae's training step's (the same run): at 1.0 or more the
    loader is never what the step waits for."""
    loaders = [i for i in infos if i["op"] == "loader" and i["mode"] == "epoch" and i["provider"] != "synthetic"]
    steps = [i for i in infos if i["op"] == "training_step_e2e" and i["provider"] == "fastmae"]
    if not loaders:
        return []
    head = "".join(f" / step {i['preset'].replace('mae_vit_', '')} b{i['batch']} |" for i in steps)
    out = ["### Loaders against the training step", "", f"| loader | images/s | per worker |{head}",
           "| --- | --- | --- |" + " --- |" * len(steps)]
    for i in sorted(loaders, key=lambda i: -i["images_per_sec"]):
        per_core = i.get("images_per_sec_per_core")
        ratios = "".join(f" {i['images_per_sec'] / s_['images_per_sec']:.2f} |" for s_ in steps)
        out.append(f"| {i['provider']} | {i['images_per_sec']:.0f} | {f'{per_core:.0f}' if per_core else ''} |{ratios}")
    return out + [""]


def _ms(info: dict) -> float:
    return info.get("device_median_ms", info["median_ms"])


def table(infos: list[dict]) -> str:
    devices = sorted({f"{i['device']} (torch {i['torch']}, triton {i['triton']})" for i in infos})
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for i in infos:
        if i["op"] not in ("training_step_e2e", "host_cost"):
            groups[(i["op"], i["mode"], i["preset"])][i["provider"]] = i
    out = [f"Device: {'; '.join(devices)}", "", *e2e_tables(infos), *loader_table(infos), *speedup_table(infos),
           "### Every result", "",
           "Median ms: the device's time where it was taken (CUDA graph replay or events: the kernels' "
           "results on a GPU), else the host's wall time per call; host ms: the wall time per call, "
           "launches included.", "",
           "| op | mode | shape | provider | median ms | host ms | figures | speedup vs reference |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (op, mode, preset), by_provider in sorted(groups.items()):
        ref = by_provider.get(REFERENCE.get(op, "torch"))
        for provider, info in sorted(by_provider.items(), key=lambda kv: _ms(kv[1])):
            speedup = f"{_ms(ref) / _ms(info):.2f}x" if ref and info is not ref else ""
            out.append(f"| {op} | {mode} | {preset} | {provider} | {_ms(info):.3f} | {info['median_ms']:.3f} | "
                       f"{figures(info)} | {speedup} |")
    return "\n".join(out)


def chart(infos: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    rows = [(f"{i['preset'].replace('mae_vit_', '')}\n{i['mode'].split('=')[1]} dec", i) for i in infos
            if i["op"] == "training_step" and i.get("speedup")]
    for k, (label, i) in enumerate(rows):
        for j, (value, name) in enumerate([(i["speedup"], "measured"), (i["flop_ratio"], "FLOP ratio"),
                                           (i.get("paper_speedup") or 0, "paper")]):
            ax1.bar(k + 0.27 * (j - 1), value, 0.27, color=f"C{j}", label=name if k == 0 else None)
    ax1.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax1.set_ylabel("speedup of the visible-only encoder")
    ax1.set_title("MAE encoder without mask tokens vs with")
    ax1.legend()
    kernels = [i for i in infos if "fraction_of_copy_bandwidth" in i and i["mode"] == "fwd+bwd"]
    labels = sorted({f"{i['op']}\n{i['preset']}" for i in kernels})
    providers = sorted({i["provider"] for i in kernels})
    width = 0.8 / max(len(providers), 1)
    for j, provider in enumerate(providers):
        values = {f"{i['op']}\n{i['preset']}": i["gbps"] for i in kernels if i["provider"] == provider}
        ax2.bar([k + width * j for k in range(len(labels))], [values.get(lab, 0) for lab in labels], width, label=provider)
    if kernels:
        ax2.axhline(kernels[0]["copy_gbps"], color="k", ls="--", lw=1, label="copy bandwidth")
    ax2.set_xticks([k + 0.4 - width / 2 for k in range(len(labels))], labels, fontsize=7, rotation=30, ha="right")
    ax2.set_ylabel("GB/s (forward + backward)")
    ax2.set_title("kernels: achieved bandwidth")
    ax2.legend()
    fig.suptitle(", ".join(sorted({i["device"] for i in infos})))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", nargs="*")
    p.add_argument("--png", help="also draw the chart here (needs matplotlib)")
    args = p.parse_args()
    infos = results(args.json)
    print(table(infos))
    if args.png:
        try:
            chart(infos, args.png)
        except ImportError as e:  # the table above is the result; the chart is an extra
            print(f"no chart: {e} (pip install matplotlib)", file=sys.stderr)
