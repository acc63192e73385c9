"""Resume at another world size: DeepSpeed's universal checkpoint conversion and loading.

A ZeRO-1/2/3 checkpoint partitions the optimizer state by data-parallel rank, so
it loads only at the world size that wrote it.  ``ds_to_universal`` rewrites it
as one folder per parameter (fp32 weights and optimizer moments), which the
engine loads at any world size when its ``load_universal_checkpoint`` switch is
on.  ZeRO-0 checkpoints hold the whole optimizer state and load anywhere as is.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def convert(full_dir: Path, universal_dir: Path) -> None:
    """Convert the DeepSpeed checkpoint in ``full_dir`` (one tag folder) into ``universal_dir`` (one tag folder)."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(universal_dir, ignore_errors=True)
    universal_dir.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(full_dir),
        output_folder=str(universal_dir),
        num_extract_workers=1,  # in-process: no worker pool inside a torchrun worker
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # kubetune's engines do not record universal_checkpoint_info; plain data parallelism needs none.
        inject_missing_state=True,
    )
    # The converter prints progress bars and banners; keep the worker's log readable.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


@contextlib.contextmanager
def universal_loading(engine: Any) -> Iterator[None]:
    """Switch the engine to loading universal checkpoints for the duration of one ``load_checkpoint``."""
    config = engine._config  # DeepSpeed reads this flag from its config object at load time
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before
