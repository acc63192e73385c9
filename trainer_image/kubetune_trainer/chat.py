"""Chat conversations: validate them, render them with a chat template, find the assistant text.

Templates are Jinja, rendered by transformers' sandboxed environment
(``jinja2.sandbox.ImmutableSandboxedEnvironment``, through
``transformers.utils.chat_template_utils.render_jinja_template``): a template from a spec is
untrusted input and is never executed as Python.

Which characters are trained on (every assistant turn, nothing of the system, user
or tool turns):

* a template that marks assistant text with ``{% generation %}...{% endgeneration %}``
  says so exactly (the spans the sandbox records while rendering);
* any other template is rendered once per assistant turn more: the turn's text starts
  where ``messages[:i]`` rendered with the generation prompt ends and stops where
  ``messages[:i+1]`` ends (trailing whitespace left out).  A template that does not
  render conversations as growing prefixes cannot be read this way; the error says to
  add generation markers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

from kubetune_trainer.errors import InvalidData, InvalidSpec

Span = tuple[int, int]  # [start, end) character offsets in the rendered text

# ChatML (the format of Qwen, SmolLM, Hermes and others) with generation markers: the assistant's
# content and its <|im_end|> are trained on, the "<|im_start|>assistant\n" header is not.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
ASSISTANT = "assistant"


def resolve_template(tokenizer: Any, configured: str | None, source: str) -> str:
    """The Jinja source to render with: ``dataset.chatTemplate`` (a name or Jinja), else the tokenizer's own.

    InvalidSpec naming the model when neither exists.
    """
    if configured is not None:
        return NAMED_TEMPLATES.get(configured, configured)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise InvalidSpec(
            f"model.source {source}: the tokenizer has no chat template; set dataset.chatTemplate "
            f"(Jinja source, or one of {', '.join(NAMED_TEMPLATES)})"
        )
    return str(template)


def has_generation_markers(template: str) -> bool:
    """True when the template marks assistant text with ``{% generation %}``."""
    return bool(_GENERATION_TAG.search(template))


def check_conversation(value: Any, *, where: str, field: str) -> list[dict[str, Any]]:
    """The messages of one row, or InvalidData naming the row and the field."""
    expected = f"dataset.messagesField {field!r} must be a list of {{role, content}} messages"
    if not isinstance(value, list) or not value:
        raise InvalidData(f"{where}: {expected}, got {_shown(value)}")
    for number, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidData(f"{where}: {expected}; message {number} is {_shown(message)}")
        if "content" not in message or not isinstance(message["content"], str | list):
            raise InvalidData(f"{where}: {expected}; message {number} has no text content")
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _render(
    conversations: Sequence[list[dict[str, Any]]],
    template: str,
    variables: dict[str, Any],
    *,
    generation: bool,
    prompt: bool,
) -> tuple[list[str], list[list[Span]]]:
    """Render with transformers' compiled sandboxed template.

    Rows read from JSON, parquet or Arrow are plain data already, so the per-message copy that
    ``render_jinja_template`` makes for arbitrary Python objects is skipped (a quarter of the cost
    of a conversation); a transformers without these helpers goes through ``render_jinja_template``.
    """
    from transformers.utils import chat_template_utils as ctu

    compile_template = getattr(ctu, "_compile_jinja_template", None)
    render_tracked = getattr(ctu, "_render_with_assistant_indices", None)
    alias = getattr(ctu, "_alias_reasoning_fields", lambda chat: chat)
    if compile_template is None or render_tracked is None:
        rendered, spans = cast(Any, ctu.render_jinja_template)(
            conversations=list(conversations),
            chat_template=template,
            return_assistant_tokens_mask=generation,
            add_generation_prompt=prompt,
            **variables,
        )
        return list(rendered), [list(s) for s in spans] if generation else [[] for _ in rendered]
    compiled = compile_template(template)  # cached by the template's text
    texts: list[str] = []
    spans_of: list[list[Span]] = []
    for conversation in conversations:
        messages = alias(conversation)
        if generation:
            text, indices = render_tracked(compiled, messages, None, None, prompt, **variables)
            spans_of.append([tuple(pair) for pair in indices])
        else:
            text = compiled.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=prompt, **variables
            )
            spans_of.append([])
        texts.append(text)
    return texts, spans_of


def render_conversations(
    conversations: Sequence[list[dict[str, Any]]], template: str, variables: dict[str, Any], wheres: Sequence[str]
) -> tuple[list[str], list[list[Span]]]:
    """Rendered texts and, for each, the character spans of its assistant turns.

    ``variables`` are the template's extra names (the tokenizer's special tokens: ``bos_token``, ...).
    A conversation the template rejects (``raise_exception``) is InvalidData naming its row.
    """
    generation = has_generation_markers(template)
    try:
        texts, spans = _render(conversations, template, variables, generation=generation, prompt=False)
    except Exception:
        # Render one by one to name the row that fails.
        texts, spans = [], []
        for conversation, where in zip(conversations, wheres, strict=True):
            text, span = _render_one(conversation, template, variables, generation=generation, where=where)
            texts.append(text)
            spans.append(span)
    if not generation:
        spans = [
            _prefix_spans(c, t, template, variables, where)
            for c, t, where in zip(conversations, texts, wheres, strict=True)
        ]
    return texts, spans


def _render_one(
    conversation: list[dict[str, Any]], template: str, variables: dict[str, Any], *, generation: bool, where: str
) -> tuple[str, list[Span]]:
    try:
        texts, spans = _render([conversation], template, variables, generation=generation, prompt=False)
    except Exception as exc:
        raise InvalidData(f"{where}: the chat template cannot render this conversation ({exc})") from exc
    return texts[0], spans[0]


def _prefix_spans(
    conversation: list[dict[str, Any]], full: str, template: str, variables: dict[str, Any], where: str
) -> list[Span]:
    turns = [i for i, m in enumerate(conversation) if m["role"] == ASSISTANT]
    if not turns:
        return []
    try:
        before, _ = _render([conversation[:i] for i in turns], template, variables, generation=False, prompt=True)
        through, _ = _render(
            [conversation[: i + 1] for i in turns], template, variables, generation=False, prompt=False
        )
    except Exception as exc:
        raise InvalidData(f"{where}: the chat template cannot render part of this conversation ({exc})") from exc
    spans: list[Span] = []
    for head, upto in zip(before, through, strict=True):
        if not (upto.startswith(head) and full.startswith(upto)):
            raise InvalidSpec(
                "dataset.chatTemplate: the chat template does not render conversations as growing prefixes, so "
                "the assistant turns cannot be located; use a template that marks them with "
                "{% generation %}...{% endgeneration %}"
            )
        spans.append((len(head), len(upto.rstrip())))
    return spans


def assistant_mask_array(offsets: Any, spans: Sequence[Span]) -> Any:
    """Per token (``offsets``: an (n, 2) array of character ranges): does it overlap an assistant span?

    The rule of transformers' assistant masks, in numpy: a token is trained on when it has characters
    and overlaps a span.
    """
    import numpy as np

    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for low, high in spans:
        mask |= (ends > low) & (starts < high) & (ends > starts)
    return mask
