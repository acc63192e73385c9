"""The trainer's metrics endpoint serves every contract name over HTTP, with bounded labels."""

from __future__ import annotations

import re
import urllib.request

from kubetune_trainer.metrics import TrainerMetrics

CONTRACT = [
    "kubetune_trainer_step",
    "kubetune_trainer_total_steps",
    "kubetune_trainer_epoch",
    "kubetune_trainer_loss",
    "kubetune_trainer_learning_rate",
    "kubetune_trainer_grad_norm",
    "kubetune_trainer_samples_total",
    "kubetune_trainer_tokens_total",
    "kubetune_trainer_samples_per_second",
    "kubetune_trainer_tokens_per_second",
    "kubetune_trainer_model_flops_utilization",
    "kubetune_trainer_eta_seconds",
    "kubetune_trainer_step_seconds",
    "kubetune_trainer_last_step_timestamp_seconds",
    "kubetune_trainer_nonfinite_loss_total",
    "kubetune_trainer_eval",
    "kubetune_trainer_checkpoint_seconds",
    "kubetune_trainer_checkpoint_bytes_total",
    "kubetune_trainer_checkpoint_step",
    "kubetune_trainer_checkpoint_timestamp_seconds",
    "kubetune_trainer_checkpoint_fallbacks_total",
    "kubetune_trainer_accelerator_memory_bytes",
    "kubetune_trainer_trainable_parameters",
    "kubetune_trainer_parameters",
]


def test_endpoint_serves_the_contract_names() -> None:
    metrics = TrainerMetrics()
    port = metrics.serve(0)
    metrics.record_step(
        step=3,
        epoch=0.5,
        losses={"total": 0.7, "task": 0.6, "auxiliary": 0.5, "l2sp": 0.1},
        learning_rate=1e-3,
        grad_norm=2.0,
        samples=32,
        tokens=400,
        seconds=0.5,
        total_steps=10,
    )
    metrics.record_eval({"accuracy": 0.9, "f1": 0.8})
    metrics.model_flops_utilization.set(0.41)
    metrics.checkpoint_seconds.labels(phase="save").observe(1.0)
    metrics.checkpoint_fallbacks_total.inc(0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = set(re.findall(r"^(kubetune_trainer_[a-z_]+?)(?:_bucket|_count|_sum|_created)?(?:\{| )", body, re.M))
    missing = [n for n in CONTRACT if n not in names]
    assert not missing, missing
    assert 'kubetune_trainer_loss{component="l2sp"} 0.1' in body
    assert "kubetune_trainer_step 3.0" in body
    assert "kubetune_trainer_samples_total 32.0" in body
    assert 'kubetune_trainer_eval{metric="accuracy"} 0.9' in body
    assert "kubetune_trainer_eta_seconds 3.5" in body
    assert 'kubetune_trainer_examples_dropped_total{reason="truncated"} 0.0' in body
    # Bounded labels only: component, metric, phase, kind, reason (and the histogram's le).
    labels = set(re.findall(r"[{,]([a-z_]+)=", body))
    assert labels <= {"component", "metric", "phase", "kind", "reason", "le"}, labels


def test_a_starting_trainer_exports_no_loss_and_no_position_until_it_states_them() -> None:
    metrics = TrainerMetrics()
    port = metrics.serve(0)

    def body() -> str:
        return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())

    loading = body()
    assert "kubetune_trainer_loss{" not in loading  # no loss of 0 before the first step
    assert "kubetune_trainer_total_steps 0.0" in loading  # not yet placed: readers ignore the step
    metrics.record_start(step=40, epoch=1.25, total_steps=96)  # resumed from the checkpoint of step 40
    placed = body()
    assert "kubetune_trainer_step 40.0" in placed
    assert "kubetune_trainer_epoch 1.25" in placed
    assert "kubetune_trainer_total_steps 96.0" in placed
    assert "kubetune_trainer_loss{" not in placed
