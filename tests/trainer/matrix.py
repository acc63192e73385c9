"""The strategy matrix shared by the CPU suite and the GPU suite (PEFT-style: one matrix, every method).

Every strategy × every task it supports × ZeRO-2 and ZeRO-3 (where the strategy runs
under it), plus variants for the regularized objective, merged adapters, packing and
gradient checkpointing.  :func:`build_matrix` trains every case in one launch
(``matrix_driver.py``: the imports cost more than 20 tiny steps) and reloads each
published output with plain transformers/peft in a fresh interpreter;
:func:`check_case` then checks one case:

* the run succeeded on every rank and wrote ``Succeeded`` to its termination log;
* the training loss fell over the 20 steps;
* the reported trainable-parameter count matches an independent expectation;
* frozen parameters are unchanged (bit-identical, or equal to the pretrained ones cast
  to the training precision), trained ones moved;
* the published output loads where kubetune cannot be imported and reproduces the
  trainer's evaluation logits.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.cpus import threads_per_rank
from kubetune_trainer.spec import Task, strategy_definitions
from tests.support.tiny_models import instruction_rows, lm_rows, ner_rows, sentiment_rows, write_jsonl
from tests.trainer.conftest import PYTHON, REPO, launch, trainer_env, write_job

STEPS = 20
LEARNING_RATE = {
    "full": 1e-2,
    "partial": 1e-2,
    "lora": 5e-2,
    "adalora": 5e-2,
    "ia3": 1e-1,
    "adapter": 2e-2,
    "prefix": 1e-1,
    "prompt": 1e-1,
}
MLM_LR_FACTOR = {"ia3": 5}  # IA3's scaling vectors barely move a pretrained MLM loss otherwise
# The new classification head learns at the strategy's rate too. With IA3 and adapters the frozen random
# backbone leaves it a weak signal, and above these rates their bf16 runs oscillate: the loss after 20
# steps was above its start (1.30 with IA3 on torch 2.11, the GPU image's torch), a failure by chance.
SEQUENCE_CLASSIFICATION_LR = {"ia3": 1e-2, "adapter": 5e-3}
SETTINGS: dict[str, dict[str, Any]] = {
    "partial": {"partial": {"trainableLayers": 1}},
    "lora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
    "adalora": {"adalora": {"initR": 6, "targetR": 4, "deltaT": 2, "tinitRatio": 0.1, "tfinalRatio": 0.2}},
    "prefix": {"prefix": {"numVirtualTokens": 4}},
    "prompt": {"prompt": {"numVirtualTokens": 4}},
    "adapter": {"adapter": {"reductionFactor": 4}},
}
TAGS = ["O", "B-PER", "B-LOC"]
# Trainer logits in bf16 against the published model's (reloaded, fp32 arithmetic on the CPU): a small
# floor for kernels that round differently where bf16 barely moves the reload, plus three times what
# bf16 does to the reload's logits (:func:`logits_tolerance`).  Over the 57 cases of the bf16 matrix
# on an AMD EPYC without native bf16, the trainer's diff was at most 1.8x that noise; the floor was
# 0.15 before the noise was measured, which let an adapter published with half its update pass there
# (diff 0.152 < 0.15 + 3 x 0.007).
BF16_LOGITS_ATOL = 0.05


@dataclass(frozen=True)
class Case:
    strategy: str
    task: str
    stage: int
    variant: str = ""

    @property
    def id(self) -> str:
        return "-".join(p for p in (self.strategy, self.task, self.variant, f"zero{self.stage}") if p)

    @property
    def backbone(self) -> str:
        return "gpt2" if self.task == Task.CAUSAL_LM else "bert"


ALL_CASES = [
    Case(strategy.name, task.value, stage)
    for strategy in strategy_definitions()
    for task in strategy.tasks
    for stage in ((2, 3) if strategy.zero3 else (2,))
] + [
    Case("lora", "causal-lm", 2, "prompt-response"),
    # The regularized objective end to end: L = CE(smoothed) + λ·MLM + λ·L2-SP, dropout override.
    Case("full", "sequence-classification", 2, "objective"),
    Case("lora", "token-classification", 2, "auxiliary"),
    Case("lora", "sequence-classification", 2, "merged"),  # output.mergeAdapter: true
    # LLM throughput settings end to end: packed rows, and recomputed activations under ZeRO-3.
    Case("full", "causal-lm", 2, "packed"),
    Case("lora", "causal-lm", 3, "checkpointing"),
]
# Spec sections a variant adds (merged into the case's spec).
VARIANT_SPEC: dict[str, dict[str, dict[str, Any]]] = {
    "packed": {"dataset": {"packing": True}},
    "checkpointing": {"training": {"gradientCheckpointing": True}},
}
OBJECTIVES: dict[str, dict[str, Any]] = {
    "objective": {
        "labelSmoothing": 0.1,
        "auxiliary": {"type": "mlm", "weight": 0.5},
        "regularization": {"weightDecay": 0.01, "l2sp": 0.01, "dropout": 0.0},
    },
    "auxiliary": {"auxiliary": {"type": "mlm", "weight": 0.5}, "regularization": {"weightDecay": 0.0}},
}


def learning_rate(case: Case) -> float:
    """The case's learning rate: the strategy's, but see ``MLM_LR_FACTOR`` and ``SEQUENCE_CLASSIFICATION_LR``."""
    if case.task == Task.SEQUENCE_CLASSIFICATION and case.strategy in SEQUENCE_CLASSIFICATION_LR:
        return SEQUENCE_CLASSIFICATION_LR[case.strategy]
    if case.task == Task.MASKED_LM:
        # The pretrained MLM head already fits; moving its loss in 20 steps takes a bolder step.
        return LEARNING_RATE[case.strategy] * MLM_LR_FACTOR.get(case.strategy, 2)
    return LEARNING_RATE[case.strategy]


def case_spec(case: Case, root: Path, backbones: dict[str, Path], *, precision: str) -> dict[str, Any]:
    """The FineTuneJob spec of one case."""
    data = root / "data"
    model: dict[str, Any] = {"source": f"file://{backbones[case.backbone]}", "task": case.task}
    dataset: dict[str, Any] = {"maxLength": 32}
    if case.task == Task.SEQUENCE_CLASSIFICATION:
        model["labels"] = ["negative", "positive"]
        dataset |= {"train": str(data / "sentiment-train.jsonl"), "validation": str(data / "sentiment-val.jsonl")}
    elif case.task == Task.TOKEN_CLASSIFICATION:
        model["labels"] = TAGS
        dataset |= {
            "train": str(data / "ner-train.jsonl"),
            "validation": str(data / "ner-val.jsonl"),
            "textField": "tokens",
            "labelField": "tags",
        }
    elif case.variant == "prompt-response":
        dataset |= {
            "train": str(data / "instructions-train.jsonl"),
            "validation": str(data / "instructions-val.jsonl"),
            "promptField": "prompt",
            "responseField": "response",
        }
    else:
        dataset |= {"train": str(data / "lm-train.jsonl"), "validation": str(data / "lm-val.jsonl")}
    spec = {
        "model": model,
        "dataset": dataset,
        "strategy": {"type": case.strategy, **SETTINGS.get(case.strategy, {})},
        "objective": OBJECTIVES.get(case.variant, {"regularization": {"weightDecay": 0.0}}),
        "training": {
            "maxSteps": STEPS,
            "learningRate": learning_rate(case),
            "scheduler": "constant",
            "microBatchSize": 8,
            "precision": precision,
            "logEverySteps": 1,
            "seed": 7,
        },
        "deepspeed": {"zeroStage": case.stage},
        "output": {"uri": f"file://{root / case.id / 'output'}", "mergeAdapter": case.variant == "merged"},
        # ZeRO-3 LoRA runs also checkpoint: DeepSpeed's own consolidation of that checkpoint is the
        # independent reference for the published adapter (test_zero3_lora_adapter_equals_gathered_weights).
        **(
            {"checkpoint": {"uri": f"file://{root / case.id / 'ckpt'}", "everySteps": STEPS, "asyncUpload": False}}
            if case.strategy == "lora" and case.stage == 3
            else {}
        ),
    }
    for section, values in VARIANT_SPEC.get(case.variant, {}).items():
        spec[section] = {**spec[section], **values}
    return spec


@dataclass
class Matrix:
    root: Path
    backbones: dict[str, Path]
    loaded: dict[str, Any]
    launch_output: str
    nproc: int


def build_matrix(
    root: Path,
    tiny_backbones: dict[str, Path],
    cases: list[Case],
    *,
    nproc: int,
    precision: str,
    env: dict[str, str] | None = None,
) -> Matrix:
    """Train every case in one launch of ``nproc`` ranks (``env``: extra trainer environment), then reload
    every published output."""
    data = root / "data"
    write_jsonl(data / "sentiment-train.jsonl", sentiment_rows(320, seed=1))
    write_jsonl(data / "sentiment-val.jsonl", sentiment_rows(48, seed=2))
    write_jsonl(data / "ner-train.jsonl", ner_rows(320, seed=3))
    write_jsonl(data / "ner-val.jsonl", ner_rows(48, seed=4))
    write_jsonl(data / "lm-train.jsonl", lm_rows(320, seed=5))
    write_jsonl(data / "lm-val.jsonl", lm_rows(48, seed=6))
    write_jsonl(data / "instructions-train.jsonl", instruction_rows(320, seed=7))
    write_jsonl(data / "instructions-val.jsonl", instruction_rows(48, seed=8))
    jobs = []
    for case in cases:
        directory = root / case.id
        directory.mkdir()
        config = write_job(directory / "job.json", case_spec(case, root, tiny_backbones, precision=precision))
        jobs.append({"config": str(config), "dir": str(directory)})
    (root / "jobs.json").write_text(json.dumps(jobs))
    driver = str(REPO / "tests" / "trainer" / "matrix_driver.py")
    result = launch([driver, str(root / "jobs.json")], env=trainer_env(**(env or {})), nproc=nproc, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]

    entries = []
    for case in cases:
        directory = root / case.id
        if (directory / "output" / "kubetune-metrics.json").exists():
            entries.append(
                {
                    "name": case.id,
                    "output": str(directory / "output"),
                    "base": str(tiny_backbones[case.backbone]),
                    "task": case.task,
                    "num_labels": {"sequence-classification": 2, "token-classification": 3}.get(case.task),
                    "sample": str(directory / "work" / "eval-sample.safetensors"),
                }
            )
            if case.variant == "merged":
                entries.append(entries[-1] | {"name": f"{case.id}/merged", "merged": True})
    return Matrix(root, tiny_backbones, reload_published(entries, root / "load.json"), result.stderr, nproc)


def reload_published(entries: list[dict[str, Any]], listing: Path) -> dict[str, Any]:
    """``load_published.py``'s results for ``entries`` (written to ``listing``), from a fresh interpreter."""
    listing.write_text(json.dumps(entries))
    loader = subprocess.run(
        [PYTHON, "-I", str(REPO / "tests" / "trainer" / "load_published.py"), str(listing)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=listing.parent,
        check=False,
    )
    assert loader.returncode == 0, loader.stderr[-4000:]
    results: dict[str, Any] = json.loads(loader.stdout.strip().splitlines()[-1])
    return results


def step_losses(log: Path) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"^step \d+/\d+ .*? loss ([0-9.eE+-]+|nan)", log.read_text(), re.M)]


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def expected_trainable(case: Case, matrix: Matrix, published: dict[str, Any]) -> int:
    """The trainable-parameter count each strategy should report, computed without the trainer."""
    import transformers

    from tests.support.tiny_models import vocab_size

    hidden, layers = 32, 2
    head = {"sequence-classification": hidden * 2 + 2, "token-classification": hidden * 3 + 3}.get(case.task, 0)
    if case.strategy == "full":
        auto = {
            "sequence-classification": transformers.AutoModelForSequenceClassification,
            "token-classification": transformers.AutoModelForTokenClassification,
            "causal-lm": transformers.AutoModelForCausalLM,
            "masked-lm": transformers.AutoModelForMaskedLM,
        }[case.task]
        kwargs = {"num_labels": head and (2 if case.task == "sequence-classification" else 3)} if head else {}
        model = auto.from_pretrained(str(matrix.backbones[case.backbone]), **kwargs)
        # The auxiliary MLM head (trained with full fine-tuning): transform dense + LayerNorm + output bias;
        # its decoder is tied to the shared word embeddings.
        aux_head = hidden * hidden + hidden + 2 * hidden + vocab_size() if case.variant == "objective" else 0
        return sum(p.numel() for p in model.parameters()) + aux_head
    # The tiny BERT checkpoint has no pooler: sequence classification initializes one, and PEFT
    # methods must train (and publish) it like the new head.
    new_modules = head + (hidden * hidden + hidden if case.task == "sequence-classification" else 0)
    if case.strategy in ("lora", "adalora"):
        # LoRA: A (r x in) + B (out x r); AdaLoRA adds E (r) and reports its initial rank.
        r, extra = (4, 0) if case.strategy == "lora" else (6, 6)
        if case.backbone == "gpt2":  # c_attn: Conv1D 32 -> 96
            return layers * (r * (hidden + 3 * hidden) + extra) + new_modules
        return layers * 2 * (r * (hidden + hidden) + extra) + new_modules  # query, value
    if case.strategy == "partial":
        if case.backbone == "gpt2":  # c_attn 32->96, c_proj, 2 LayerNorms, MLP 32->128->32; + final LayerNorm
            block = (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden) + 2 * (2 * hidden)
            block += hidden * 128 + 128 + 128 * hidden + hidden
            return block + 2 * hidden + head  # the lm head is tied to the frozen embeddings
        block = 4 * (hidden * hidden + hidden) + 2 * (2 * hidden)  # attention q,k,v,o + 2 LayerNorms
        block += hidden * 64 + 64 + 64 * hidden + hidden  # feed-forward 32 -> 64 -> 32
        pooler = hidden * hidden + hidden if case.task == "sequence-classification" else 0
        mlm_head = (hidden * hidden + hidden + 2 * hidden + vocab_size()) if case.task == "masked-lm" else 0
        return block + pooler + head + mlm_head
    if case.strategy == "adapter":  # 32 -> 8 -> 32 after each block, plus the new head (and pooler)
        return layers * ((hidden * 8 + 8) + (8 * hidden + hidden)) + new_modules
    # The other PEFT methods: every trainable tensor is what PEFT saves in the adapter.
    return sum(t.numel() for k, t in published.items() if "ranknum" not in k)


def logits_tolerance(loaded: dict[str, Any], atol: float) -> float:
    """How far the trainer's logits may be from the published model's fp32 ones.

    ``atol``, plus, for a bf16 run, three times what bf16 arithmetic alone does to the published
    model's logits (``bf16_noise``, measured on the reload): the trainer computed in bf16, on
    other kernels (a GPU's, or another CPU's), so its rounding lands elsewhere but is of that
    size.  A publishing bug (a head not saved, an adapter not applied) moves logits by far more.
    """
    return atol + 3 * float(loaded.get("bf16_noise", 0.0))


def check_case(matrix: Matrix, case: Case, *, logits_atol: float = 1e-4) -> None:
    """Every check of one case (see the module docstring); ``logits_atol`` bounds trainer vs published logits."""
    directory = matrix.root / case.id
    termination = json.loads((directory / "termination.json").read_text())
    assert termination["reason"] == "Succeeded", (termination, (directory / "train.log").read_text()[-3000:])
    for rank in range(matrix.nproc):
        assert (directory / f"exit-{rank}").read_text() == "0"

    if case.variant in OBJECTIVES:  # each component is reported on its own
        components = re.findall(
            r"\(task ([0-9.]+) aux ([0-9.]+) l2sp ([0-9.]+)\)", (directory / "train.log").read_text()
        )
        assert components
        assert all(float(aux) > 0 for _, aux, _ in components)
        assert all(float(l2sp) > 0 for _, _, l2sp in components[1:]) == (case.variant == "objective")
    losses = step_losses(directory / "train.log")
    assert len(losses) == STEPS
    if case.task != Task.MASKED_LM:
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"loss did not fall: {losses}"
    # Masked-LM training losses are dominated by which tokens each step masks; the
    # deterministic check is the held-out masked batch, before (pretrained) and after
    # (published model), in the fresh interpreter below.

    output = directory / "output"
    report = json.loads((output / "kubetune-metrics.json").read_text())
    assert report["evaluation"] == termination["evaluation"]
    # Without an OMP_NUM_THREADS of the caller's, the launcher gives each rank its share of the CPUs.
    assert report["cpuThreadsPerRank"] == int(os.environ.get("OMP_NUM_THREADS") or threads_per_rank(matrix.nproc))
    published_file = output / ("adapter_model.safetensors" if report["publishedAs"] == "peft" else "model.safetensors")
    published = tensors(published_file)
    assert published, "empty tensor in the published output"
    assert all(t.numel() > 0 for t in published.values()), "empty tensor in the published output"
    assert report["parameters"]["trainable"] == expected_trainable(case, matrix, published)

    pretrained = tensors(matrix.backbones[case.backbone] / "model.safetensors")
    if report["publishedAs"] in ("model", "remote-code"):
        shared = [k for k in published if k in pretrained]
        # Frozen weights come back as they were, in the training precision (bf16 on GPUs).
        changed = {k for k in shared if not bool((published[k] == pretrained[k].to(published[k].dtype)).all())}
        if case.strategy == "adapter":  # the whole backbone frozen; the adapters (new) moved off their zero init
            assert shared, sorted(changed)
            assert not changed, sorted(changed)
            assert any(bool(t.abs().sum() > 0) for k, t in published.items() if "kubetune_adapter.up" in k)
        elif case.strategy == "full":
            assert len(changed) >= len(shared) // 2
        else:  # partial, one trainable layer: lower layers and embeddings bit-identical, top layer moved
            lower = [
                k for k in shared if ".0." in k or "embed" in k or k.startswith(("transformer.wte", "transformer.wpe"))
            ]
            assert lower, sorted(changed & set(lower))
            assert not changed & set(lower), sorted(changed & set(lower))
            assert any(".1." in k for k in changed)

    loaded = matrix.loaded[case.id]
    assert "error" not in loaded, loaded
    assert loaded["max_abs_diff"] < logits_tolerance(loaded, logits_atol), loaded
    if case.task == Task.MASKED_LM:
        assert loaded["loss_after"] < loaded["loss_before"], (loaded, losses)
    if case.variant == "merged":  # the merged full weights give the same logits as base + adapter
        merged = matrix.loaded[f"{case.id}/merged"]
        assert "error" not in merged, merged
        assert merged["max_abs_diff"] < logits_tolerance(merged, logits_atol), merged


ZERO3_LORA = [c for c in ALL_CASES if c.strategy == "lora" and c.stage == 3]


def check_zero3_lora(matrix: Matrix, case: Case) -> None:
    """Under ZeRO-3 the published LoRA tensors are non-empty and equal DeepSpeed's consolidation of the checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = matrix.root / case.id
    termination = json.loads((directory / "termination.json").read_text())
    assert termination["checkpoint"]["step"] == STEPS
    consolidated = get_fp32_state_dict_from_zero_checkpoint(
        str(directory / "ckpt" / "checkpoints"), tag=f"step-{STEPS:08d}", exclude_frozen_parameters=True
    )
    published = tensors(directory / "output" / "adapter_model.safetensors")
    lora = {k: v for k, v in published.items() if "lora_" in k}
    assert lora, sorted(published)
    for key, tensor in lora.items():
        assert tensor.numel() > 0, key
        # PEFT drops the adapter name from saved keys: ...lora_A.weight <- ...lora_A.default.weight
        source = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        assert source in consolidated, (key, sorted(consolidated)[:5])
        assert bool((consolidated[source].float() == tensor.float()).all()), key
    assert any(bool(t.abs().sum() > 0) for k, t in lora.items() if "lora_B" in k)  # trained off its zero init
