"""Where training stands across a resume: the client state a checkpoint carries (pure)."""

from __future__ import annotations

from kubetune_trainer import evaluation
from kubetune_trainer.progress import TrainState


def _state(patience: int | None = 2) -> TrainState:
    return TrainState(batches_per_epoch=10, early=evaluation.EarlyStopping(metric="f1", patience=patience))


def test_a_run_that_stopped_early_stays_stopped_after_a_resume() -> None:
    # Early stopping fires at step 30; the checkpoint of step 30 (or the final one finish() saves) is
    # resumed when publishing fails and the gang restarts: the resumed run must not train on.
    before = _state()
    for step, f1 in ((10, 0.8), (20, 0.7), (30, 0.6)):
        before.step, before.micro = step, step
        before.early.update({"f1": f1})
    assert before.early.should_stop
    before.stopped_early = True

    after = _state()
    after.restore(before.client_state())
    assert after.step == 30
    assert after.stopped_early, "the resumed run would train past the early-stopping evaluation"


def test_a_resume_before_patience_runs_out_keeps_training() -> None:
    before = _state()
    before.early.update({"f1": 0.8})
    before.early.update({"f1": 0.7})
    after = _state()
    after.restore(before.client_state())
    assert not after.stopped_early
    assert (after.early.best, after.early.bad_evaluations) == (0.8, 1)
