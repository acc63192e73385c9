"""PEFT-backed strategies: lora, adalora, ia3, prefix, prompt.

Each ``*_config`` is a pure mapping from our spec model to PEFT's config
object; :func:`apply_peft` wraps the model.  PEFT picks default target modules
per architecture when the spec leaves them out, adds the classification head
to ``modules_to_save`` for classification tasks, and writes an adapter that
plain ``peft`` loads.
"""

from __future__ import annotations

from typing import Any

from kubetune_trainer.errors import InvalidModel
from kubetune_trainer.spec import AdaLoraConfig, Ia3Config, LoraConfig, PrefixConfig, PromptConfig, Task
from kubetune_trainer.strategies.base import Prepared, StrategyContext


def task_type(task: Task) -> Any:
    """PEFT's task type for ours (masked-LM has none: PEFT then keeps the pretrained MLM head frozen)."""
    from peft import TaskType

    return {
        Task.SEQUENCE_CLASSIFICATION: TaskType.SEQ_CLS,
        Task.TOKEN_CLASSIFICATION: TaskType.TOKEN_CLS,
        Task.CAUSAL_LM: TaskType.CAUSAL_LM,
        Task.MASKED_LM: None,
    }[task]


def new_module_names(missing_keys: list[str]) -> tuple[str, ...]:
    """Module paths of freshly initialized parameters (``bert.pooler.dense.weight`` -> ``bert.pooler.dense``)."""
    return tuple(sorted({key.rsplit(".", 1)[0] for key in missing_keys if "." in key}))


def _targets(value: list[str] | None) -> list[str] | None:
    return list(value) if value is not None else None


def lora_config(settings: LoraConfig, ctx: StrategyContext) -> Any:
    """PEFT ``LoraConfig`` for ``strategy.lora``."""
    import peft

    return peft.LoraConfig(
        task_type=task_type(ctx.task),
        r=settings.r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT annotates int; any positive scale works
        lora_dropout=settings.dropout,
        target_modules=_targets(settings.target_modules),
        bias=settings.bias,
    )


def adalora_config(settings: AdaLoraConfig, ctx: StrategyContext) -> Any:
    """PEFT ``AdaLoraConfig`` for ``strategy.adalora`` (``total_step`` is the run's optimizer steps)."""
    import peft

    total = max(ctx.total_steps, 3)
    tinit = int(settings.tinit_ratio * total)
    tfinal = int(settings.tfinal_ratio * total)
    if tinit + tfinal >= total:  # PEFT requires a non-empty budgeting phase
        tinit, tfinal = 0, 0
    return peft.AdaLoraConfig(
        task_type=task_type(ctx.task),
        init_r=settings.init_r,
        target_r=settings.target_r,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT annotates int; any positive scale works
        lora_dropout=settings.dropout,
        target_modules=_targets(settings.target_modules),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=settings.delta_t,
        orth_reg_weight=settings.orth_reg_weight,
        total_step=total,
    )


def ia3_config(settings: Ia3Config, ctx: StrategyContext) -> Any:
    """PEFT ``IA3Config`` for ``strategy.ia3``."""
    import peft

    return peft.IA3Config(
        task_type=task_type(ctx.task),
        target_modules=_targets(settings.target_modules),
        feedforward_modules=_targets(settings.feedforward_modules),
    )


def prefix_config(settings: PrefixConfig, ctx: StrategyContext) -> Any:
    """PEFT ``PrefixTuningConfig`` for ``strategy.prefix``."""
    import peft

    return peft.PrefixTuningConfig(
        task_type=task_type(ctx.task),
        num_virtual_tokens=settings.num_virtual_tokens,
        prefix_projection=settings.projection,
    )


def prompt_config(settings: PromptConfig, ctx: StrategyContext) -> Any:
    """PEFT ``PromptTuningConfig`` for ``strategy.prompt`` (initialized from ``initText`` when given)."""
    import peft

    kwargs: dict[str, Any] = {}
    if settings.init_text:
        kwargs = {
            "prompt_tuning_init": peft.PromptTuningInit.TEXT,
            "prompt_tuning_init_text": settings.init_text,
            "tokenizer_name_or_path": ctx.backbone_path,
        }
    return peft.PromptTuningConfig(
        task_type=task_type(ctx.task), num_virtual_tokens=settings.num_virtual_tokens, **kwargs
    )


def apply_peft(model: Any, peft_config: Any, *, name: str) -> Any:
    """Wrap ``model`` with PEFT; an unfit architecture becomes :class:`InvalidModel`."""
    import peft

    try:
        return peft.get_peft_model(model, peft_config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise InvalidModel(f"strategy {name}: cannot apply to this model ({exc})") from exc


def _takes_past_key_values(module: Any) -> bool:
    import inspect

    return "past_key_values" in inspect.signature(module.forward).parameters


def _check_prefix_support(model: Any, task: Task) -> None:
    # PEFT's classification wrappers feed the prefix as past_key_values to the
    # model or, failing that, to its backbone, and only find out at the first
    # forward (a ValueError mid-run).  The same check up front makes it a
    # permanent, named model error.  Causal-LM wrappers always pass them on.
    if task not in (Task.SEQUENCE_CLASSIFICATION, Task.TOKEN_CLASSIFICATION) or _takes_past_key_values(model):
        return
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is not None and _takes_past_key_values(backbone):
        return
    raise InvalidModel(
        f"strategy prefix: {type(model).__name__} takes no past_key_values, which prefix tuning needs "
        "(transformers 5 encoders such as BERT do not); use lora or prompt, or a decoder backbone"
    )


def make(builder: Any, name: str) -> Any:
    """A strategy ``apply`` function for one PEFT method."""

    def apply(model: Any, settings: Any, ctx: StrategyContext) -> Prepared:
        if name == "prefix":
            _check_prefix_support(model, ctx.task)
        peft_config = builder(settings, ctx)
        if ctx.new_modules:
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | set(ctx.new_modules))
        wrapped = apply_peft(model, peft_config, name=name)
        virtual = getattr(settings, "num_virtual_tokens", 0) if name == "prompt" else 0
        # Prompt tuning prepends its virtual tokens to the sequence, so causal-LM
        # logits have that many extra leading positions.
        in_logits = virtual if ctx.task == Task.CAUSAL_LM else 0
        prepared = Prepared(
            model=wrapped, publish_as="peft", num_virtual_tokens=virtual, prefix_positions_in_logits=in_logits
        )
        if name == "adalora":
            from kubetune_trainer.strategies import adalora

            adalora.freeze_rank_counts(wrapped)
            if settings.orth_reg_weight > 0:
                prepared.extra_loss = adalora.weighted_orthogonality(settings.orth_reg_weight)
            prepared.step_hook = adalora.BudgetUpdate()
        return prepared

    apply.__doc__ = f"Wrap the model with PEFT {name}."
    return apply


apply_lora = make(lora_config, "lora")
apply_adalora = make(adalora_config, "adalora")
apply_ia3 = make(ia3_config, "ia3")
apply_prefix = make(prefix_config, "prefix")
apply_prompt = make(prompt_config, "prompt")
