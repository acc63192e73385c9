"""``python -m kubetune_trainer --config FILE``: one training process (one rank)."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from kubetune_trainer.config import default_config_path, load_job
from kubetune_trainer.errors import TrainerError, write_termination
from kubetune_trainer.spec.plugins import load_plugins
from kubetune_trainer.spec.runtime import ExitCode


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, train, and return the exit code (never raises)."""
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help="trainer config (the FineTuneJob as JSON)")
    args = parser.parse_args(argv)
    try:
        load_plugins()  # before the job is validated: it may name a plugin's strategy
        job = load_job(args.config or default_config_path())
        from kubetune_trainer.loop import run

        return int(run(job))
    except TrainerError as error:
        print(f"kubetune: {error.reason}: {error.message}", file=sys.stderr, flush=True)
        write_termination(error.reason, error.message, error.exit_code)
        return int(error.exit_code)
    except Exception as error:
        traceback.print_exc()
        write_termination("Error", f"{type(error).__name__}: {error}", ExitCode.RETRYABLE)
        return int(ExitCode.RETRYABLE)


if __name__ == "__main__":
    sys.exit(main())
