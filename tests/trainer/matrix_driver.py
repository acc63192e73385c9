"""Run several trainer jobs in one torchrun launch (the strategy matrix test's worker).

Importing torch, DeepSpeed, transformers and PEFT costs far more than training a
tiny model for 20 steps, so the matrix launches 2 ranks once and calls the
trainer's real entry point (``python -m kubetune_trainer``'s ``main``) for each job in turn.
Per job the environment the operator would set (work dir, termination log) is
pointed at the job's own folder, and rank 0's log goes to ``train.log`` there.

Usage: ``python -m kubetune_trainer.launch --nproc-per-node 2 matrix_driver.py JOBS.json``
where JOBS.json is ``[{"config": PATH, "dir": PATH}, ...]``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
from pathlib import Path


def main() -> int:
    from kubetune_trainer.__main__ import main as trainer_main

    jobs = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    for entry in jobs:
        directory = Path(entry["dir"])
        os.environ["KUBETUNE_WORK_DIR"] = str(directory / "work")  # node-local: shared by the local ranks
        os.environ["KUBETUNE_TERMINATION_LOG"] = str(directory / "termination.json")
        log = directory / ("train.log" if rank == 0 else f"train-rank{rank}.log")
        with log.open("w") as handle, contextlib.redirect_stderr(handle):
            code = trainer_main(["--config", entry["config"]])
        (directory / f"exit-{rank}").write_text(str(code))
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
