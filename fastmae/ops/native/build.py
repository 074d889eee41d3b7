"""Building the native libraries from ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja).

Two shared libraries, each loaded with ``torch.ops.load_library``:

- ``fastmae_native`` (``csrc/fastmae_ops.cpp``): the op schemas and the CPU kernels; always built.
- ``fastmae_native_cuda_sm80_sm90`` (``csrc/fastmae_ops_cuda.cu``, named after its architectures):
  the CUDA kernels of the same ops; built only with a CUDA toolkit whose major version is PyTorch's.

A build is cached under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), in a
folder per PyTorch and Python version; ninja rebuilds only what changed, so a later process loads
the library in about a second. ``python -m fastmae.ops.native build`` builds ahead of time; the
first use of the ``native`` backend on a device builds otherwise. ``CUDA_HOME`` reaches
``torch.utils.cpp_extension`` through the environment (:func:`find_cuda_home`'s toolkit, exported
before it is imported).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from fastmae.errors import FastMAEError

logger = logging.getLogger("fastmae")

# A100 and H100, when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")


class BuildError(FastMAEError, RuntimeError):
    """A native library cannot be built or loaded here; the message says why."""


def sources_dir() -> Path:
    """``csrc/``: ``fastmae/csrc`` (installed, or the checkout's link to its ``csrc/``), or beside
    ``fastmae/`` in a checkout that lost the link."""
    package = Path(__file__).resolve().parents[2]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "fastmae_ops.cpp").is_file():
            return candidate
    raise BuildError(f"the native sources are missing: no csrc/fastmae_ops.cpp in {package} or {package.parent}")


def _cpp_extension():
    # cpp_extension fixes its CUDA_HOME (for nvcc, the CUDA headers and -lcudart) when it is first
    # imported, from the environment or its own guess (nvcc's grandparent folder, wrong where nvcc is
    # a wrapper script: the link fails with "cannot find -lcudart"): export the toolkit found by
    # find_cuda_home first. (Importing it also logs its guess on machines without a GPU: quieted.)
    if "torch.utils.cpp_extension" not in sys.modules and not os.environ.get("CUDA_HOME") and torch.version.cuda:
        try:
            os.environ["CUDA_HOME"] = str(find_cuda_home())
        except BuildError:
            pass  # no toolkit: CPU builds only
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def missing_build_tools(target: str) -> list[str]:
    """What building the ``cpu`` or ``cuda`` library would lack here, found without building: the
    sources, a C++ compiler, ninja, a CUDA toolkit."""
    problems = []
    try:
        sources_dir()
    except BuildError as e:
        problems.append(str(e))
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        problems.append(f"no C++ compiler ({compiler!r} is not on the PATH; set CXX)")
    if shutil.which("ninja") is None:
        problems.append("ninja is not installed (pip install ninja)")
    if target == "cuda":
        try:
            find_cuda_home()
        except BuildError as e:
            problems.append(str(e))
    return problems


def build_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _cpp_extension().get_default_build_root()
    version = f"fastmae-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / version.replace("+", "_")


# -- CUDA toolkit and architectures ---------------------------------------------------------------

def _toolkit_problem(home: Path, want: str) -> str | None:
    nvcc = home / "bin" / "nvcc"
    if not nvcc.is_file():
        return "no bin/nvcc"
    if not any((home / d / "libcudart.so").exists() for d in ("lib64", "lib")):
        return "no lib64/libcudart.so or lib/libcudart.so (the link needs it)"
    try:
        version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvcc --version failed: {e}"
    found = re.search(r"release (\d+)\.(\d+)", version)
    if not found:
        return "cannot read the CUDA version from nvcc --version"
    if found[1] != want.split(".")[0]:
        return f"nvcc is CUDA {found[1]}.{found[2]}, PyTorch was built with CUDA {want}"
    return None


def find_cuda_home() -> Path:
    """The CUDA toolkit to build with: ``CUDA_HOME`` (or ``CUDA_PATH``) when set, else the first of
    nvcc's toolkit on the PATH, ``/usr/local/cuda-<PyTorch's CUDA version>`` and ``/usr/local/cuda``
    that holds ``bin/nvcc`` and ``lib64/libcudart.so`` (or ``lib/``) of PyTorch's CUDA major version.

    PyTorch's own guess (nvcc's grandparent folder) is not used: where ``nvcc`` on the PATH is a
    wrapper script (``/usr/local/bin/nvcc``), it names a folder without ``libcudart.so`` and the
    link fails with ``cannot find -lcudart``."""
    want = torch.version.cuda
    if not want:
        raise BuildError(f"this PyTorch ({torch.__version__}) is built without CUDA")
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        candidates = [Path(explicit)]
    else:
        nvcc = shutil.which("nvcc")
        candidates = [Path(nvcc).resolve().parents[1]] if nvcc else []
        candidates += [Path(f"/usr/local/cuda-{want}"), Path("/usr/local/cuda")]
    problems = []
    for home in dict.fromkeys(candidates):  # in order, without repeats
        problem = _toolkit_problem(home, want)
        if problem is None:
            return home
        problems.append(f"{home}: {problem}")
    source = "CUDA_HOME/CUDA_PATH" if explicit else "nvcc on the PATH and /usr/local"
    raise BuildError(f"no CUDA {want.split('.')[0]}.x toolkit found (looked at {source}: {'; '.join(problems)}); "
                     f"set CUDA_HOME to the toolkit folder that holds bin/nvcc and lib64/libcudart.so")


def cuda_archs() -> list[str]:
    """The GPU architectures to build for: ``TORCH_CUDA_ARCH_LIST`` when set (e.g. ``8.0;9.0``),
    else the compute capabilities of the visible GPUs, else 8.0 and 9.0 (A100, H100)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return [a for a in re.split(r"[;\s]+", env) if a]
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return [f"{major}.{minor}" for major, minor in sorted(caps)]
    return list(DEFAULT_CUDA_ARCHS)


def _gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        parsed = re.fullmatch(r"(\d+)\.(\d+)(a?)(\+PTX)?", arch)
        if not parsed:
            raise BuildError(f"cannot read the CUDA architecture {arch!r}: TORCH_CUDA_ARCH_LIST takes e.g. '8.0;9.0' "
                             f"or '9.0+PTX'")
        num = parsed[1] + parsed[2] + parsed[3]
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if parsed[4]:  # also PTX, which newer GPUs compile when they load the library
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_library_name(archs: list[str]) -> str:
    return "fastmae_native_cuda_" + "_".join("sm" + re.sub(r"\W", "", a.replace("+PTX", "ptx")) for a in archs)


# -- building -------------------------------------------------------------------------------------

def _summary(error: Exception) -> str:
    """The compiler's error lines out of a failed build's (long) message."""
    lines = str(error).splitlines()
    errors = [line.strip() for line in lines if re.search(r"error:|cannot find|undefined reference", line)]
    return " | ".join((errors or lines[-3:])[:4])


def _flock(held) -> bool:
    """Takes the ``flock`` of the open file ``held``, waiting for another process's; False where the
    file system has none (some NFS mounts)."""
    import fcntl

    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        logger.info("fastmae native library: waiting for another process's build (%s)", held.name)
    except OSError as e:
        logger.warning("fastmae native library: cannot lock %s (%s)", held.name, e)
        return False
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        return True
    except OSError as e:
        logger.warning("fastmae native library: cannot lock %s (%s)", held.name, e)
        return False


def _died_here(owner: list[str]) -> bool:
    """Whether ``owner`` (``host pid``, as written into fastmae.lock) is a process of this host that
    is gone."""
    if len(owner) != 2 or owner[0] != socket.gethostname() or not owner[1].isdigit():
        return False
    try:
        os.kill(int(owner[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


@contextmanager
def _no_stale_lock(directory: Path, cpp_extension):
    """Held around ``cpp_extension.load`` in ``directory``. Where torch's lock there is a file whose
    existence blocks (``FileBaton``: torch 2.11; 2.15 holds an ``flock`` instead), a build killed
    before its cleanup (SIGTERM, SIGKILL, a preempted job) leaves it behind, and every later load,
    cached or not, waits on it forever without a word. fastmae's own lock, ``fastmae.lock``, is an
    ``flock`` (the kernel releases it when its holder dies) whose file names its holder (host and
    pid): torch's lock file found while holding it is removed when the previous holder was a process
    of this host that is gone. Otherwise (another host's, on a file system whose ``flock`` is
    per-host; no ``flock`` at all) torch's lock is waited on, as before, and the wait says which file
    to delete if no build is running."""
    if not hasattr(cpp_extension, "FileBaton"):
        yield
        return
    import fcntl

    torch_lock = directory / "lock"
    with open(directory / "fastmae.lock", "a+") as held:
        locked = _flock(held)
        try:
            held.seek(0)
            previous = held.read().split()
            if locked:
                held.truncate(0)
                held.write(f"{socket.gethostname()} {os.getpid()}\n")
                held.flush()
            if torch_lock.exists():
                if locked and _died_here(previous):
                    logger.warning("fastmae native library: removing %s, left by a build that was killed "
                                   "(pid %s)", torch_lock, previous[1])
                    torch_lock.unlink(missing_ok=True)
                else:
                    logger.warning("fastmae native library: waiting for torch's build lock %s (last taken by %s); "
                                   "delete it if no build of fastmae is running", torch_lock,
                                   " ".join(previous) or "an unknown process")
            yield
        finally:
            if locked:
                fcntl.flock(held, fcntl.LOCK_UN)


def build_and_load(name: str, sources: list[str], *, cuda_home: Path | None = None, archs: list[str] | None = None,
                   verbose: bool = False) -> Path:
    """Builds (or finds up to date in the cache) the library ``name`` from ``csrc/sources`` and
    loads it into this process; returns its build folder."""
    cpp_extension = _cpp_extension()
    if cuda_home is not None and Path(cpp_extension.CUDA_HOME or "") != cuda_home:
        raise BuildError(f"the CUDA toolkit to build with is {cuda_home}, but torch.utils.cpp_extension was imported "
                         f"before fastmae could say so and uses {cpp_extension.CUDA_HOME}: export "
                         f"CUDA_HOME={cuda_home} before starting Python")
    csrc = sources_dir()
    directory = build_root() / name
    directory.mkdir(parents=True, exist_ok=True)
    cuda_flags = []
    if archs is not None:
        # --threads: nvcc compiles the architectures in parallel
        cuda_flags = ["-O3", f"--threads={min(len(archs), os.cpu_count() or 1)}", *_gencode_flags(archs)]
    built = (directory / f"{name}.so").exists()
    logger.info("fastmae native library %s: %s in %s", name,
                "checking the cached build" if built else "building (minutes, once)", directory)
    start = time.perf_counter()
    try:
        with _no_stale_lock(directory, cpp_extension):
            cpp_extension.load(
                name, [str(csrc / s) for s in sources],
                extra_cflags=["-O3", "-fopenmp"],  # OpenMP: at::parallel_for runs the rows on all cores
                extra_ldflags=["-fopenmp"],
                extra_cuda_cflags=cuda_flags,
                extra_include_paths=[str(csrc)],
                build_directory=str(directory),
                is_python_module=False,
                verbose=verbose,
            )
    except Exception as e:  # noqa: BLE001 - a compiler, linker or loader failure of any kind
        raise BuildError(
            f"building {name} failed: {_summary(e)} (full log: python -m fastmae.ops.native build --verbose)"
        ) from e
    logger.info("fastmae native library %s ready in %.1f s", name, time.perf_counter() - start)
    return directory
