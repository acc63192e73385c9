"""Dashboard panel values under promtool on hand-written series: what a panel shows in a known situation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.prometheus import load_dashboards, promtool_binary, substitute

PROMTOOL = promtool_binary()
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (make system-deps)")

A1 = 'namespace="ml", job_name="demo", pod="demo-a1-0", job="kubetune-trainer"'
A2 = 'namespace="ml", job_name="demo", pod="demo-a2-0", job="kubetune-trainer"'
VARIABLES = {"namespace": "ml", "job": "demo", "__rate_interval": "1m", "datasource": "prometheus"}


def _panel_expr(panel_title: str, legend: str) -> str:
    model = load_dashboards()["kubetune / Training"]
    panel = next(p for p in model["panels"] if p["title"] == panel_title)
    target = next(t for t in panel["targets"] if t.get("legendFormat", "") == legend)
    return substitute(target["expr"], VARIABLES)


def _promtool_expr_test(tmp_path: Path, series: dict[str, str], expr: str, eval_time: str) -> str:
    """Run one promql_expr_test expecting no sample; '' when it passes, else promtool's output."""
    document = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "promql_expr_test": [{"expr": expr, "eval_time": eval_time, "exp_samples": []}],
            }
        ],
    }
    path = tmp_path / "panel-test.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
    return "" if result.returncode == 0 else result.stdout + result.stderr


# Attempt 1 stepped (and checkpointed) until 10m; its pod was replaced. Attempt 2's pod serves its metrics
# from 12m while it loads: every gauge reads 0 until it restores and steps.
REPLACED = {
    f"kubetune_trainer_last_step_timestamp_seconds{{{A1}}}": "0+60x10 stale",
    f"kubetune_trainer_checkpoint_timestamp_seconds{{{A1}}}": "0 60x9 stale",
    f"kubetune_trainer_last_step_timestamp_seconds{{{A2}}}": "_x12 0x10",
    f"kubetune_trainer_checkpoint_timestamp_seconds{{{A2}}}": "_x12 0x10",
}


@pytest.mark.parametrize(
    ("panel", "legend"), [("Time since last step", ""), ("Last checkpoint", "age (s)")], ids=["last-step", "checkpoint"]
)
def test_age_panels_show_no_unix_epoch_age_while_the_next_attempt_loads(
    tmp_path: Path, panel: str, legend: str
) -> None:
    """A gauge that reads 0 ("not yet") must not turn into time() - 0, an age of ~55 years."""
    expr = _panel_expr(panel, legend)
    failure = _promtool_expr_test(tmp_path, REPLACED, expr, "15m")
    # promtool's clock starts at 0, so time() - 0 reads 9E+02 here: in production, ~1.7e9 s (55 years)
    assert failure == "", f"Training / {panel}: {expr} shows time() - 0 while attempt 2 loads:\n{failure}"
