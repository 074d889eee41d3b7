"""fastmae installs and its Triton kernels import wherever it is installed: a wheel, an editable
checkout, without build isolation, and with a setuptools too old for editable wheels (PEP 660), whose
``pip install -e`` puts the checkout itself on the path.

``kernels/`` and ``csrc/`` are where users expect them, at the top of the checkout;
``fastmae/kernels`` and ``fastmae/csrc`` are links to them, so every way of installing (and a checkout
on PYTHONPATH) finds them as ``fastmae.kernels`` and ``fastmae/csrc``."""
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD_SETUPTOOLS = "setuptools==63.4.3"  # before editable wheels (PEP 660, 64) and SPDX licenses (77)

# run from /, so that the checkout in the current directory cannot stand in for the install
PROBE = ("import fastmae, fastmae.kernels._launch as k; from fastmae.ops.native.build import sources_dir; "
         "print(fastmae.__file__); print(k.__file__); print(sources_dir())")

pytestmark = pytest.mark.slow


def _checkout_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    """The files git would check out (links kept), without build outputs."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    copy = tmp_path / "checkout"
    for name in files:
        source = ROOT / name
        if not os.path.lexists(source):  # deleted in the working tree
            continue
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return copy


def _venv(tmp_path: pathlib.Path, name: str, *, own_pip: bool = False) -> pathlib.Path:
    """An environment that sees this one's packages (torch, triton) but not its fastmae; with
    ``own_pip``, Python's own pip (ensurepip's) and setuptools in it, found first."""
    env_dir = tmp_path / name
    subprocess.run([sys.executable, "-m", "venv", *([] if own_pip else ["--without-pip"]), str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a .pth line adds a folder to the path (after the environment's own) without running that
    # folder's .pth files (this environment's editable fastmae is one)
    pathlib.Path(site, "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip(python: pathlib.Path, *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                             "--no-build-isolation", "-q", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _probe(python: pathlib.Path) -> list[str]:
    result = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_installed_kernels_import(tmp_path, editable):
    checkout = _checkout_copy(tmp_path)
    python = _venv(tmp_path, "env")
    _pip(python, *(["-e"] if editable else []), str(checkout))
    package, kernels, sources = _probe(python)
    where = checkout if editable else tmp_path / "env"
    assert package.startswith(str(where)) and kernels.startswith(str(where)), (package, kernels)
    assert pathlib.Path(sources, "fastmae_ops_cuda.cu").is_file()


def test_editable_install_with_an_old_setuptools(tmp_path):
    """An older machine: Python's own pip (ensurepip's) and setuptools 63, where ``pip install -e``
    without build isolation runs ``setup.py develop``, which puts the checkout on the path instead of
    mapping packages: fastmae.kernels must be a folder there."""
    checkout = _checkout_copy(tmp_path)
    python = _venv(tmp_path, "old", own_pip=True)
    for args in (["-q", OLD_SETUPTOOLS], ["-q", "--no-deps", "--no-build-isolation", "-e", str(checkout)]):
        result = subprocess.run([str(python), "-m", "pip", "install", *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    package, kernels, _ = _probe(python)
    assert package.startswith(str(checkout)) and kernels.startswith(str(checkout / "fastmae" / "kernels"))


def test_a_checkout_on_the_path_needs_no_install(tmp_path):
    """A checkout on PYTHONPATH imports as it is, kernels included (no laid-out copy needed)."""
    python = _venv(tmp_path, "env")
    result = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, cwd="/",
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1] == str(ROOT / "fastmae" / "kernels" / "_launch.py")
