"""DeepSpeed's native ops, built just in time on this machine: loaded before the ranks meet, and never
waited on forever because a killed process left its build lock behind.

torch builds an extension in ``<TORCH_EXTENSIONS_DIR>/<python/CUDA tag>/<op>/`` and guards the build,
and every later load of the built op, with a ``lock`` file that it removes when done
(``torch.utils.file_baton.FileBaton``).  A process killed while it holds that file (Ctrl-C or a
preemption's SIGKILL during the first run's minute-long build, the OOM killer) leaves it there, and every
later process that loads the op spins on it forever without a word: `kubetune run` then hangs at start.

So the ops a job needs are loaded here while holding a kernel lock (``fcntl.flock``, which the kernel
releases when its holder dies, however it dies), and, holding it, a ``lock`` file that no live process
holds open is removed first.  DeepSpeed keeps a loaded op for the rest of the process, so its own
loads later never touch the file.  This runs before ``deepspeed.init_distributed``: a rank never holds
the kernel lock inside a collective that its node-mates, waiting for that lock, cannot reach.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# The kernel lock every kubetune process on the machine takes before it touches a build lock.
GUARD_NAME = ".kubetune-ops.flock"
# Without /proc no process's open files can be read: a build lock is then judged abandoned by its age
# (building one op takes minutes, never this long).
ABANDONED_AFTER_S = 30 * 60
# A load that took longer than this built the op: worth a line in the log.
BUILD_NOTICE_S = 5.0

# Builder class names (DeepSpeed's ``create_op_builder``) of the ops kubetune's jobs load.
SHARED_MEMORY_COMM = "ShareMemCommBuilder"  # CPU ranks' intra-node all-reduce, loaded by init_distributed
CPU_ADAM = "CPUAdamBuilder"  # ZeRO-Offload's optimizer


def extensions_root() -> Path:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR`` (an op's folder right under it), else
    ``~/.cache/torch_extensions`` (an op's folder under a Python/CUDA tag, e.g. ``py311_cpu``)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def open_files(proc: Path = Path("/proc")) -> set[Path] | None:
    """Every file some visible process holds open, or None when ``proc`` cannot tell (no procfs)."""
    if not (proc / "self" / "fd").is_dir():
        return None
    held: set[Path] = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            links = list(fd_dir.iterdir())
        except OSError:  # the process exited, or is another user's
            continue
        for link in links:
            try:
                held.add(Path(os.readlink(link)))
            except OSError:
                continue
    return held


def build_locks(root: Path) -> list[Path]:
    """The build locks under ``root``, in its op folders (``TORCH_EXTENSIONS_DIR``) or its tagged ones."""
    return sorted([*root.glob("*/lock"), *root.glob("*/*/lock")])


def abandoned_build_locks(root: Path, held: set[Path] | None, now: float | None = None) -> list[Path]:
    """The build locks under ``root`` that no live process holds: open by none of ``held``, or, when
    ``held`` is None (unknown), older than :data:`ABANDONED_AFTER_S`."""
    now = time.time() if now is None else now
    abandoned = []
    for lock in build_locks(root):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            continue
        if (held is None and age > ABANDONED_AFTER_S) or (held is not None and lock.resolve() not in held):
            abandoned.append(lock)
    return abandoned


@contextmanager
def machine_wide_build_lock(root: Path, log: Callable[[str], None]) -> Iterator[bool]:
    """Hold the kernel lock that serializes kubetune's op loads on this machine; yields whether it is
    held: not where ``root`` cannot hold the lock's file (a read-only cache, whose ops can then only be
    prebuilt or already built)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        guard = (root / GUARD_NAME).open("a")
    except OSError as error:
        log(f"cannot lock {root} for DeepSpeed's op builds ({error}); loading them without that lock")
        yield False
        return
    with guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies holding it
        try:
            yield True
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def remove_abandoned_build_locks(root: Path, log: Callable[[str], None]) -> None:
    """Remove the build locks under ``root`` no live process holds (call it holding
    :func:`machine_wide_build_lock`, so that no kubetune process is taking one meanwhile)."""
    if not build_locks(root):
        return  # the usual case: no need to read every process's open files
    for lock in abandoned_build_locks(root, open_files()):
        try:
            lock.unlink(missing_ok=True)
        except OSError as error:  # another user's op folder: torch will wait on it, as before
            log(f"cannot remove {lock}, a build lock no live process holds: {error}")
            continue
        log(f"removed {lock}: a build lock left by a process that was killed while it built or loaded that op")


def load_native_ops(builder_names: Sequence[str], log: Callable[[str], None]) -> None:
    """Load (building on first use) the ops among ``builder_names`` that this accelerator has.

    An op DeepSpeed would not load here (no builder on this accelerator, or not compatible with this
    machine) is skipped: DeepSpeed skips it too, or raises its own error where it needs it.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    builders = [accelerator.create_op_builder(name) for name in builder_names]
    wanted = [b for b in builders if b is not None and deepspeed.ops.__compatible_ops__.get(b.NAME, False)]
    if not wanted:
        return
    root = extensions_root()
    with machine_wide_build_lock(root, log) as held:
        if held:
            remove_abandoned_build_locks(root, log)
        started = time.monotonic()
        for builder in wanted:
            builder.load(verbose=False)
        took = time.monotonic() - started
    if took > BUILD_NOTICE_S:
        names = ", ".join(b.NAME for b in wanted)
        log(f"built DeepSpeed's {names} for this machine in {took:.0f} s, once: later runs load it from {root}")
