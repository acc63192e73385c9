"""Publish the fine-tuned model to ``output.uri`` (DESIGN §4.8).

A PEFT adapter (``adapter_model.safetensors`` + ``adapter_config.json``) or full
safetensors weights, the tokenizer, and ``kubetune-metrics.json``; with
``mergeAdapter`` also full weights with the adapter merged, under ``merged/``.
Under ZeRO-3 the weights are gathered first, so a published tensor is never the
empty placeholder of a partitioned parameter (DeepSpeed #7900, PEFT #2892).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import StorageUnavailable

METRICS_FILE = "kubetune-metrics.json"


def _gathered(params: list[Any], zero_stage: int) -> Any:
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _base_name(source: str) -> str | None:
    # Recorded in adapter_config.json so AutoPeftModel can find a hub backbone.
    return source[len("hf://") :] if source.startswith("hf://") else None


def save_local(
    engine: Any,
    prepared: Any,
    tokenizer: Any,
    *,
    directory: Path,
    rank: int,
    zero_stage: int,
    merge_adapter: bool,
    source: str,
) -> None:
    """Write the model (and tokenizer) into ``directory`` on rank 0. Collective under ZeRO-3."""
    # With an auxiliary loss the engine holds TaskWithAuxiliary; only the task model is published.
    model = getattr(engine.module, "task_model", engine.module)
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    if prepared.publish_as == "peft":
        trainable = [p for p in model.parameters() if p.requires_grad]
        with _gathered(trainable, zero_stage):
            if rank == 0:
                base = _base_name(source)
                for cfg in model.peft_config.values():
                    cfg.base_model_name_or_path = base
                model.save_pretrained(str(directory), safe_serialization=True)
        if merge_adapter:
            # Merging changes the weights in place: this is the last use of the model.
            with _gathered(list(model.parameters()), zero_stage):
                if rank == 0:
                    merged = model.merge_and_unload()
                    merged.save_pretrained(str(directory / "merged"), safe_serialization=True)
                    tokenizer.save_pretrained(str(directory / "merged"))
    else:
        state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
        if state is not None and model is not engine.module:
            state = {k[len("task_model.") :]: v for k, v in state.items() if k.startswith("task_model.")}
        if rank == 0:
            if prepared.publish_as == "remote-code":
                _add_remote_code(model, directory)
            model.save_pretrained(str(directory), state_dict=state, safe_serialization=True)
    if rank == 0:
        tokenizer.save_pretrained(str(directory))


REMOTE_CODE_MODULE = "kubetune_bottleneck"
AUTO_CLASS_OF_HEAD = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "LMHeadModel": "AutoModelForCausalLM",
    "ForCausalLM": "AutoModelForCausalLM",
}


def _add_remote_code(model: Any, directory: Path) -> None:
    """Write the self-contained adapter modeling file and point ``auto_map`` at it (bottleneck adapters)."""
    from kubetune_trainer.strategies import adapter_modeling

    base = type(model)
    auto = next((a for suffix, a in AUTO_CLASS_OF_HEAD.items() if base.__name__.endswith(suffix)), None)
    if auto is None:
        raise ValueError(f"no Auto class known for {base.__name__}")
    name = f"{base.__name__}WithBottleneckAdapters"
    source = Path(adapter_modeling.__file__).read_text()
    source += f"\n\nimport transformers  # noqa: E402\n\n{name} = with_adapters(transformers.{base.__name__})\n"
    (directory / f"{REMOTE_CODE_MODULE}.py").write_text(source)
    model.config.auto_map = {auto: f"{REMOTE_CODE_MODULE}.{name}"}


def write_metrics_file(directory: Path, document: dict[str, Any]) -> None:
    """Write ``kubetune-metrics.json`` next to the model."""
    (directory / METRICS_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def upload(directory: Path, uri: str, *, endpoint: str | None, region: str | None) -> None:
    """Copy the published directory to ``uri`` through the storage interface."""
    from kubetune_trainer import storage

    try:
        store = storage.open_store(uri, endpoint=endpoint, region=region)
        store.upload_dir(directory, "")
    except storage.StorageUnavailable as exc:
        raise StorageUnavailable(f"output.uri {uri}: object storage unavailable ({exc})") from exc
