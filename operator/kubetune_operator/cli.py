"""The ``kubetune`` command line: validate, crd, render, run, operator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="kubetune",
    help="Distributed fine-tuning of pretrained transformers on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="FineTuneJob YAML files (several documents each are fine).")],
) -> None:
    """Check FineTuneJob manifests; exit 1 with one line per problem."""
    from kubetune_operator.validate import validate_files

    problems = validate_files(files)
    for problem in problems:
        _err.print(str(problem), markup=False, soft_wrap=True)
    if problems:
        raise typer.Exit(code=1)
    _out.print(f"{len(files)} file(s) valid", markup=False)


@app.command()
def crd() -> None:
    """Print the FineTuneJob CustomResourceDefinition."""
    from kubetune_operator.crd import render_crd_yaml

    typer.echo(render_crd_yaml(), nl=False)


def main() -> None:
    """Entry point of the ``kubetune`` console script."""
    app()


if __name__ == "__main__":
    main()
