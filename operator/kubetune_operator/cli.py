"""The ``kubetune`` command line: validate, crd, render, run, operator.

A user error — a bad file, a bad option, a bad ``KUBETUNE_*`` variable, a job that cannot run here —
is one line on stderr and a non-zero exit, never a traceback (:func:`main`).
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kubetune_trainer.spec._base import STORAGE_URI_PATTERN

app = typer.Typer(
    name="kubetune",
    help="Distributed fine-tuning of pretrained transformers on Kubernetes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# What `kubetune render` uses for jobs without spec.checkpoint.uri when neither --checkpoint-uri nor the
# operator's KUBETUNE_DEFAULT_CHECKPOINT_URI says where checkpoints go (docs/cli.md).
PLACEHOLDER_CHECKPOINT_URI = "s3://kubetune-checkpoints-placeholder"
USER_ERROR_EXIT = 2
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
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


def _checkpoint_prefix(value: str | None) -> str | None:
    if value is not None and not re.match(STORAGE_URI_PATTERN, value):
        raise typer.BadParameter(f"{value!r} is not an s3://, pvc:// or file:// URI")
    return value


@app.command()
def render(
    file: Annotated[Path, typer.Argument(help="FineTuneJob manifests (several documents each are fine).")],
    checkpoint_uri: Annotated[
        str | None,
        typer.Option(
            help="The operator's default checkpoint prefix for jobs without spec.checkpoint.uri "
            "(<prefix>/<namespace>/<name>); default: $KUBETUNE_DEFAULT_CHECKPOINT_URI, else the placeholder "
            f"{PLACEHOLDER_CHECKPOINT_URI}.",
            callback=_checkpoint_prefix,
        ),
    ] = None,
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
    prefix = checkpoint_uri or settings.default_checkpoint_uri
    if prefix is None:
        prefix = PLACEHOLDER_CHECKPOINT_URI
    # Said only when a job takes the placeholder (one without spec.checkpoint.uri).
    if prefix == PLACEHOLDER_CHECKPOINT_URI and any(
        not ((document.get("spec") or {}).get("checkpoint") or {}).get("uri") for document in documents
    ):
        _err.print(
            f"note: jobs without spec.checkpoint.uri are rendered with the placeholder {prefix}; "
            "pass --checkpoint-uri (or set KUBETUNE_DEFAULT_CHECKPOINT_URI) for the real one",
            markup=False,
            soft_wrap=True,
        )
    settings = load_settings(default_checkpoint_uri=prefix)
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


def credentials_problem(env: dict[str, str]) -> str | None:
    """Why the operator could not log in to a cluster from here (None when it can try)."""
    if env.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_TOKEN.is_file():
        return None
    configs = [Path(p) for p in env.get("KUBECONFIG", "").split(os.pathsep) if p]
    if configs:
        missing = [str(p) for p in configs if not p.is_file()]
        return f"KUBECONFIG names no readable file: {', '.join(missing)}" if len(missing) == len(configs) else None
    if (Path.home() / ".kube" / "config").is_file():
        return None
    return "no Kubernetes credentials: not in a pod with a service account, no KUBECONFIG and no ~/.kube/config"


@app.command("operator")
def operator_command() -> None:
    """Run the operator (kopf) with settings from KUBETUNE_* environment variables."""
    from kubetune_operator.main import run_operator
    from kubetune_operator.settings import load_settings

    settings = load_settings()
    problem = credentials_problem(dict(os.environ))
    if problem is not None:
        _err.print(f"kubetune operator: {problem}", markup=False, soft_wrap=True)
        raise typer.Exit(code=USER_ERROR_EXIT)
    run_operator(settings)


def _user_error(error: BaseException) -> str | None:
    """The one line to print for an error the user can fix, or None for a bug (which keeps its traceback)."""
    from pydantic import ValidationError

    from kubetune_operator.localpods import PodSpecError
    from kubetune_operator.resolve import InvalidSpec
    from kubetune_operator.settings import SettingsError

    if isinstance(error, SettingsError | InvalidSpec | PodSpecError):
        return str(error)
    if isinstance(error, ValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    if isinstance(error, OSError):
        return f"{error.filename or ''}: {error.strerror or error}".lstrip(": ")
    return None


def main() -> None:
    """Entry point of the ``kubetune`` console script: a user error is one line and exit 2, never a traceback."""
    try:
        app()
    except Exception as error:
        message = _user_error(error)
        if message is None:
            raise
        _err.print(f"kubetune: error: {message}", markup=False, soft_wrap=True)
        raise SystemExit(USER_ERROR_EXIT) from None


if __name__ == "__main__":
    main()
