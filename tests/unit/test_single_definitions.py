"""Each of these is stated once in ``operator/`` and ``trainer_image/``; a second definition fails here.

* the ``StorageUnavailable`` class (:mod:`kubetune_trainer.errors`);
* label and annotation keys (:mod:`kubetune_operator.names`);
* metric names (:mod:`kubetune_trainer.spec.catalog`);
* the checkpoint step layout ``step-<8 digits>`` (:mod:`kubetune_trainer.spec.layout`);
* the attempt naming ``<name>-a<attempt>`` (:mod:`kubetune_operator.names`).

The scan reads every module's syntax tree: string literals (and the literal parts of
f-strings) other than docstrings, and class definitions.  Comments and docstrings may
mention the names freely.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune_trainer.spec import API_VERSION

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (ROOT / "operator", ROOT / "trainer_image")

LABEL_KEY = re.compile(r"\b(app\.kubernetes\.io|batch\.kubernetes\.io|kueue\.x-k8s\.io|kubetune\.io)/[A-Za-z0-9._-]+")
METRIC_NAME = re.compile(r"\bkubetune_(trainer|operator)_[a-z0-9_]+")
STEP_LAYOUT = re.compile(r"step-(?:$|\d|\{|%)")

# Allowances while a file is being moved onto the single definitions: (rule, file) -> how many such
# literals it may still hold.  Empty now; an entry may only shrink or go.
PENDING: dict[tuple[str, str], int] = {}


@dataclass(frozen=True)
class Finding:
    """One literal (or class) that states a single-definition thing."""

    rule: str
    path: str
    line: int
    text: str


def _docstrings(tree: ast.AST) -> set[int]:
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _string_parts(tree: ast.AST) -> Iterator[tuple[ast.Constant, ast.AST | None]]:
    """Every string literal, with the f-string part that follows it (None when none does)."""
    docstrings = _docstrings(tree)
    inside_fstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for index, part in enumerate(node.values):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    inside_fstrings.add(id(part))
                    following = node.values[index + 1] if index + 1 < len(node.values) else None
                    yield part, following
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and id(node) not in inside_fstrings
        ):
            yield node, None


def findings_in(source: str, path: str) -> list[Finding]:
    """What ``source`` (the text of module ``path``) states that must be stated once."""
    tree = ast.parse(source)
    found: list[Finding] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "StorageUnavailable":
            found.append(Finding("StorageUnavailable", path, node.lineno, "class StorageUnavailable"))
    for constant, following in _string_parts(tree):
        text = str(constant.value)
        line = constant.lineno
        for match in LABEL_KEY.finditer(text):
            if match.group(0) != API_VERSION:
                found.append(Finding("label or annotation key", path, line, match.group(0)))
        found.extend(Finding("metric name", path, line, m.group(0)) for m in METRIC_NAME.finditer(text))
        if STEP_LAYOUT.search(text):
            found.append(Finding("step layout", path, line, text))
        attempt_suffix = text == "-a" or (text.endswith("-a") and isinstance(following, ast.FormattedValue))
        if attempt_suffix:
            found.append(Finding("attempt naming", path, line, text))
    return found


def _all_findings() -> list[Finding]:
    found: list[Finding] = []
    for root in SOURCES:
        for file in sorted(root.rglob("*.py")):
            found.extend(findings_in(file.read_text(), file.relative_to(ROOT).as_posix()))
    return found


OWNERS: dict[str, str] = {
    "StorageUnavailable": "trainer_image/kubetune_trainer/errors.py",
    "label or annotation key": "operator/kubetune_operator/names.py",
    "metric name": "trainer_image/kubetune_trainer/spec/catalog.py",
    "step layout": "trainer_image/kubetune_trainer/spec/layout.py",
    "attempt naming": "operator/kubetune_operator/names.py",
}


@pytest.mark.parametrize("rule", sorted(OWNERS))
def test_stated_only_by_its_owner(rule: str) -> None:
    elsewhere: dict[str, list[Finding]] = {}
    for finding in _all_findings():
        if finding.rule == rule and finding.path != OWNERS[rule]:
            elsewhere.setdefault(finding.path, []).append(finding)
    unexpected = {
        path: [f"{f.line}: {f.text!r}" for f in items]
        for path, items in elsewhere.items()
        if len(items) > PENDING.get((rule, path), 0)
    }
    assert unexpected == {}, f"{rule} is stated outside {OWNERS[rule]}: {unexpected}"


def test_storage_unavailable_is_one_class() -> None:
    classes = [f for f in _all_findings() if f.rule == "StorageUnavailable"]
    assert [f.path for f in classes] == [OWNERS["StorageUnavailable"]]
    from kubetune_trainer import errors, storage

    assert storage.StorageUnavailable is errors.StorageUnavailable


def test_the_pending_table_only_shrinks() -> None:
    """An allowance left over after its file was cleaned up must be removed (so it cannot hide a regression)."""
    counts: dict[tuple[str, str], int] = {}
    for finding in _all_findings():
        counts[(finding.rule, finding.path)] = counts.get((finding.rule, finding.path), 0) + 1
    stale = {key: allowed for key, allowed in PENDING.items() if counts.get(key, 0) < allowed}
    assert stale == {}, f"lower or remove these allowances: {stale} (found {[counts.get(k, 0) for k in stale]})"


@pytest.mark.parametrize(
    ("snippet", "rule"),
    [
        ('class StorageUnavailable(Exception):\n    """dup"""\n', "StorageUnavailable"),
        ('LABEL = "kubetune.io/job-name"\n', "label or annotation key"),
        ("path = f\"metadata.annotations['batch.kubernetes.io/job-completion-index']\"\n", "label or annotation key"),
        ('QUEUE = {"kueue.x-k8s.io/queue-name": q}\n', "label or annotation key"),
        ('Gauge("kubetune_trainer_step", "help")\n', "metric name"),
        ('expr = f"rate(kubetune_operator_reconcile_errors_total[{w}])"\n', "metric name"),
        ('tag = f"step-{step:08d}"\n', "step layout"),
        ('tag = "step-%08d" % step\n', "step layout"),
        ('name = f"{job}-a{attempt}"\n', "attempt naming"),
        ('SEPARATOR = "-a"\n', "attempt naming"),
    ],
)
def test_the_scan_finds_a_second_definition(snippet: str, rule: str) -> None:
    assert [f.rule for f in findings_in(snippet, "x.py")] == [rule]


@pytest.mark.parametrize(
    "snippet",
    [
        '"""Docstrings may say kubetune.io/job-name, kubetune_trainer_step and step-00000500."""\n',
        "# comments too: kubetune_trainer_loss, f'{name}-a{attempt}'\nx = 1\n",
        'API = "kubetune.io/v1alpha1"\n',
        'module = "kubetune_trainer.spec"\n',
        'word = "a step-wise schedule"\n',
    ],
)
def test_the_scan_leaves_other_text_alone(snippet: str) -> None:
    assert findings_in(snippet, "x.py") == []


def test_architecture_where_to_change_rows_name_at_most_two_existing_code_files() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Where to change X", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| to change")]
    assert len(rows) >= 5
    for row in rows:
        files = re.findall(r"`([\w./<>-]+\.py)`", row)
        assert len(files) <= 2, row
        for name in files:
            if "<" not in name:  # a new module's name is the one being added
                assert (ROOT / name).is_file(), name
