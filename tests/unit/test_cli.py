"""The ``kubetune`` command line on good and bad input: every shipped example renders without a cluster,
and no command prints a traceback for a user error (one line saying what is wrong, a non-zero exit)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
INVALID = ROOT / "tests" / "data" / "invalid" / "lora-r-zero.yaml"


def kubetune(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``kubetune ARGS`` as a user's shell would (the console script's ``main``)."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_") and k != "KUBECONFIG"}
    variables["PYTHONPATH"] = os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer_image")])
    variables.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "kubetune_operator.cli", *args],
        capture_output=True,
        text=True,
        env=variables,
        cwd=cwd or ROOT,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_renders_without_a_cluster(example: Path) -> None:
    result = kubetune("render", str(example))
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    assert [o["kind"] for o in objects][:3] == ["ConfigMap", "Service", "Job"]
    assert "Traceback" not in result.stderr


def test_render_says_when_it_used_the_placeholder_and_takes_the_real_prefix() -> None:
    example = str(ROOT / "examples" / "full-sequence-classification-zero3.yaml")  # no spec.checkpoint.uri
    placeholder = kubetune("render", example)
    assert "placeholder s3://kubetune-checkpoints-placeholder" in placeholder.stderr
    assert "s3://kubetune-checkpoints-placeholder/ml/topics-full" in placeholder.stdout
    real = kubetune("render", example, "--checkpoint-uri", "s3://team-ckpt")
    assert real.returncode == 0, real.stderr
    assert "placeholder" not in real.stderr
    assert "s3://team-ckpt/ml/topics-full" in real.stdout
    from_env = kubetune("render", example, env={"KUBETUNE_DEFAULT_CHECKPOINT_URI": "s3://operator-default"})
    assert "s3://operator-default/ml/topics-full" in from_env.stdout
    with_its_own = kubetune("render", str(ROOT / "examples" / "lora-sequence-classification.yaml"))
    assert with_its_own.returncode == 0, with_its_own.stderr
    assert "placeholder" not in with_its_own.stderr  # every job sets spec.checkpoint.uri: nothing to say


def _two_jobs(tmp: Path) -> Path:
    path = tmp / "two.yaml"
    text = (ROOT / "examples" / "lora-sequence-classification.yaml").read_text()
    path.write_text(text + "\n---\n" + text)
    return path


BAD_INPUT = [
    # (id, argv (with {tmp} and {invalid}), extra env, words the one-line error must contain)
    ("validate-missing-file", ["validate", "{tmp}/nope.yaml"], {}, "file not found"),
    ("validate-directory", ["validate", "{tmp}"], {}, "cannot read it"),
    ("validate-not-yaml", ["validate", "{tmp}/garbage.yaml"], {}, "not valid YAML"),
    ("validate-invalid-spec", ["validate", "{invalid}"], {}, "spec.strategy.lora.r"),
    ("render-missing-file", ["render", "{tmp}/nope.yaml"], {}, "file not found"),
    ("render-invalid-spec", ["render", "{invalid}"], {}, "spec.strategy.lora.r"),
    ("render-bad-prefix", ["render", "{example}", "--checkpoint-uri", "http://x"], {}, "--checkpoint-uri"),
    ("render-bad-settings", ["render", "{example}"], {"KUBETUNE_DEFAULT_IMAGE": "bad image"}, "KUBETUNE_DEFAULT_IMAGE"),
    ("run-missing-file", ["run", "{tmp}/nope.yaml"], {}, "file not found"),
    ("run-invalid-spec", ["run", "{invalid}"], {}, "spec.strategy.lora.r"),
    ("run-two-jobs", ["run", "{two}"], {}, "exactly one FineTuneJob"),
    ("run-zero-nodes", ["run", "{example}", "--nodes", "0"], {}, "--nodes"),
    ("operator-bad-settings", ["operator"], {"KUBETUNE_METRICS_PORT": "abc"}, "KUBETUNE_METRICS_PORT"),
    ("operator-no-cluster", ["operator"], {"KUBECONFIG": "{tmp}/missing-kubeconfig"}, "KUBECONFIG"),
    ("unknown-command", ["frobnicate"], {}, "No such command"),
    ("crd-extra-argument", ["crd", "extra"], {}, "unexpected extra argument"),
]


@pytest.mark.parametrize(("argv", "env", "words"), [case[1:] for case in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_no_command_prints_a_traceback_for_a_user_error(
    argv: list[str], env: dict[str, str], words: str, tmp_path: Path
) -> None:
    (tmp_path / "garbage.yaml").write_text("spec: [unclosed\n")
    values = {
        "tmp": str(tmp_path),
        "invalid": str(INVALID),
        "example": str(ROOT / "examples" / "lora-sequence-classification.yaml"),
        "two": str(_two_jobs(tmp_path)),
    }
    result = kubetune(
        *(arg.format(**values) for arg in argv),
        env={k: v.format(**values) for k, v in env.items()},
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert words in " ".join(output.split()), output


@pytest.mark.parametrize("gpus", ["2k", "500m"])
def test_a_gpu_count_with_a_unit_is_a_named_problem_not_a_traceback(gpus: str, tmp_path: Path) -> None:
    document = yaml.safe_load((ROOT / "examples" / "lora-sequence-classification.yaml").read_text())
    del document["spec"]["resources"]["processesPerNode"]
    document["spec"]["resources"]["requests"]["nvidia.com/gpu"] = gpus
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(document))
    for command in ("render", "validate"):
        result = kubetune(command, str(path))
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        assert result.returncode == 1, output
        assert "spec.resources.requests" in output, output


def test_run_names_the_storage_folder_when_its_path_cannot_be_a_checkpoint_uri(tmp_path: Path) -> None:
    """A folder with a space (``--storage``, or the default ./runs/<name> under such a working directory) is
    the user's choice on the command line, not a field of the manifest: the message says so."""
    project = tmp_path / "my project"
    project.mkdir()
    demo = str(ROOT / "examples" / "local" / "demo.yaml")
    for argv, cwd in (([demo, "--storage", str(project / "runs")], tmp_path), ([demo], project)):
        result = kubetune("run", *argv, cwd=cwd)
        output = " ".join((result.stdout + result.stderr).split())
        assert result.returncode == 2, output
        assert "Traceback" not in output, output
        assert "--storage" in output, output
        assert "my project" in output, output
        assert "spec.checkpoint.uri" not in output, output
