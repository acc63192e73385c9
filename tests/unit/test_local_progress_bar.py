"""`kubetune run`'s progress bar shows what the trainer has stated and keeps the rest."""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, TextColumn

from kubetune_operator.localrun import bar_fields, phase_of


def test_a_loading_trainer_changes_nothing_on_the_bar() -> None:
    assert bar_fields({"updated": "2026-01-02T00:00:00Z"}) == {}


def test_a_restored_trainer_moves_the_bar_without_a_loss_and_a_step_brings_one() -> None:
    console = Console(record=True, width=100, force_terminal=False)
    with Progress(TextColumn("{task.fields[steps]} steps loss {task.fields[loss]}"), console=console) as bar:
        task = bar.add_task("job", total=None, steps="-", loss="-")
        bar.update(task, **bar_fields({"step": 120, "totalSteps": 150, "loss": 0.25, "updated": "x"}))
        bar.update(task, **bar_fields({"updated": "y"}))  # the next attempt, loading: the bar keeps its values
        assert (bar.tasks[0].completed, bar.tasks[0].fields["loss"]) == (120, "0.2500")
        bar.update(task, **bar_fields({"step": 100, "totalSteps": 150, "updated": "z"}))  # resumed from step 100
        assert (bar.tasks[0].completed, bar.tasks[0].total, bar.tasks[0].fields) == (
            100,
            150,
            {"steps": "100/150", "loss": "0.2500"},
        )
    assert "100/150 steps loss 0.2500" in console.export_text()


def test_the_bar_says_what_the_job_is_doing_from_what_rank_0_states() -> None:
    assert phase_of(None) == "starting"  # endpoint not up: interpreters, DeepSpeed ops, rendezvous
    assert phase_of({"updated": "x"}) == "loading"  # up, no position yet: backbone, data, checkpoint
    assert phase_of({"step": 0, "totalSteps": 150, "updated": "x"}) == ""  # training: the steps say it
    assert phase_of({"step": 149, "totalSteps": 150, "loss": 0.1, "updated": "x"}) == ""
    assert phase_of({"step": 150, "totalSteps": 150, "updated": "x"}) == "finishing"  # final eval, publish
