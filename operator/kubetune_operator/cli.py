"""The ``kubetune`` command line: validate, crd, render, run, operator."""

from __future__ import annotations

import signal
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


@app.callback()
def _plugins() -> None:
    """Every command knows the platform's plugins (KUBETUNE_PLUGINS): their strategies validate and render."""
    from kubetune_trainer.spec.plugins import load_plugins

    try:
        load_plugins()
    except (ValueError, ImportError) as error:
        _err.print(f"kubetune: KUBETUNE_PLUGINS: {error}", markup=False)
        raise typer.Exit(code=2) from None


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


@app.command()
def render(
    file: Annotated[Path, typer.Argument(help="FineTuneJob manifests (several documents each are fine).")],
) -> None:
    """Print the objects the operator would create for each FineTuneJob (for review and GitOps)."""
    from kubetune_operator.render import render_manifests
    from kubetune_operator.settings import load_settings
    from kubetune_operator.validate import load_documents, validate_files

    problems = validate_files([file])
    for problem in problems:
        _err.print(str(problem), markup=False, soft_wrap=True)
    if problems:
        raise typer.Exit(code=1)
    settings = load_settings()
    documents = [document for _source, document in load_documents(file)]
    typer.echo(render_manifests(documents, settings), nl=False)


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="A FineTuneJob manifest.")],
    nodes: Annotated[int | None, typer.Option(min=1, help="Override spec.resources.nodes.")] = None,
    processes_per_node: Annotated[
        int | None, typer.Option(min=1, help="Override spec.resources.processesPerNode.")
    ] = None,
    storage: Annotated[
        Path | None, typer.Option(help="Directory for checkpoints and output (default ./runs/<name>).")
    ] = None,
) -> None:
    """Run a FineTuneJob on this machine: one local process group per node, as in a cluster."""
    from kubetune_operator.localrun import RunOptions, load_job, run_job

    problems, job = load_job(file)
    for problem in problems:
        _err.print(str(problem), markup=False, soft_wrap=True)
    if job is None:
        raise typer.Exit(code=1)
    options = RunOptions(nodes=nodes, processes_per_node=processes_per_node, storage=storage)
    # SIGTERM (a terminal closing, a CI timeout) stops the pods like Ctrl-C: checkpoint, then exit.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise typer.Exit(code=run_job(job, options, _out))


@app.command("operator")
def operator_command() -> None:
    """Run the operator (kopf) with settings from KUBETUNE_* environment variables."""
    from kubetune_operator.main import run_operator
    from kubetune_operator.settings import load_settings

    run_operator(load_settings())


def main() -> None:
    """Entry point of the ``kubetune`` console script."""
    app()


if __name__ == "__main__":
    main()
