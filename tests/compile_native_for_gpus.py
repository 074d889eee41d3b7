"""Read the PTX of the native CUDA kernels without a GPU: ``csrc/fastmae_ops_cuda.cu`` compiled by nvcc
with the flags of the library's own build (read from the ``build.ninja`` that the build left in its
folder) for one architecture, and the width of each kernel's global loads and stores counted per
template instantiation. The kernels that move rows in ``V``-element vectors (their last template
argument) should do so 16 bytes at a time.

    python tests/compile_native_for_gpus.py BUILD_DIR [--arch 90] [--json PATH]   # prints the table
"""
import collections
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

# nvcc types its accesses (ld.global.nc.v4.u32, st.global.v2.f32, ...); Triton's PTX uses .b32
ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def access_widths(ptx_text: str) -> dict:
    """``{"ld": {bytes: count}, "st": {bytes: count}}`` of the global memory instructions."""
    widths = {"ld": collections.Counter(), "st": collections.Counter()}
    for kind, vec, bits in ACCESS.findall(ptx_text):
        widths[kind][int(vec or 1) * int(bits) // 8] += 1
    return {kind: dict(sorted(c.items())) for kind, c in widths.items()}


def ptx(build_dir: Path, arch: str) -> str:
    ninja = (build_dir / "build.ninja").read_text()
    variables = dict(re.findall(r"^(\w+) = (.*)$", ninja, re.M))
    flags = [f for f in shlex.split(variables["cuda_cflags"]) + shlex.split(variables["cuda_post_cflags"])
             if not f.startswith(("-gencode", "--generate-code"))]
    source = re.search(r"^build \S+: cuda_compile (\S+)$", ninja, re.M)[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ops.ptx"
        subprocess.run([variables["nvcc"], *flags, "-ptx", f"-arch=sm_{arch}", source, "-o", str(out)], check=True,
                       capture_output=True, text=True)
        return out.read_text()


def kernels(ptx_text: str) -> list[dict]:
    """One row per kernel instantiation: its demangled name, template arguments and access widths."""
    entries = [(m.start(), m[1]) for m in re.finditer(r"\.entry\s+(\w+)\(", ptx_text)]
    demangled = subprocess.run(["c++filt"], input="\n".join(n for _, n in entries), capture_output=True, text=True,
                               check=True).stdout.splitlines()
    rows = []
    for i, ((start, _), name) in enumerate(zip(entries, demangled)):
        body = ptx_text[start:entries[i + 1][0] if i + 1 < len(entries) else len(ptx_text)]
        name = re.sub(r"^void |fastmae::\(anonymous namespace\)::", "", name)
        name = re.sub(r"std::conditional<[^>]*>::type", "A", name).split("(")[0]
        template = re.fullmatch(r"(\w+)<(.*)>", name)
        rows.append(dict(kernel=template[1] if template else name,
                         args=[a.strip() for a in template[2].split(",")] if template else [],
                         **access_widths(body)))
    return rows


def main() -> int:
    build_dir = Path(sys.argv[1])
    arch = sys.argv[sys.argv.index("--arch") + 1] if "--arch" in sys.argv else "90"
    rows = kernels(ptx(build_dir, arch))
    print(f"| kernel (sm_{arch}) | template arguments | global loads (bytes: count) | global stores (bytes: count) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {', '.join(r['args'])} | {_fmt(r['ld'])} | {_fmt(r['st'])} |")
    if "--json" in sys.argv:
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(rows, indent=1))
    return 0


def _fmt(widths: dict) -> str:
    return ", ".join(f"{b}: {n}" for b, n in widths.items()) or "-"


if __name__ == "__main__":
    sys.exit(main())
