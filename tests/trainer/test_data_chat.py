"""Chat conversations: the label mask of a known template against a hand-computed one (no processes).

The tiny WordPiece tokenizer gets ChatML's two control tokens as special tokens, so a
rendered conversation tokenizes to a sequence that can be written down by hand: words
of the tiny vocabulary are one token each ("user" is u ##s ##er, "system" and "assistant"
are ``[UNK]``), newlines are whitespace.  Loss goes on every assistant turn (content and ``<|im_end|>``) and on
nothing else.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_trainer import chat
from kubetune_trainer.data import IGNORE_INDEX, encode_records
from kubetune_trainer.encoding import Encoder
from kubetune_trainer.errors import InvalidData, InvalidSpec
from kubetune_trainer.spec import DatasetSpec, ModelSpec, Task

MODEL = ModelSpec(source="file:///models/tiny-gpt", task=Task.CAUSAL_LM)
CONVERSATION = [
    {"role": "system", "content": "the film"},
    {"role": "user", "content": "alice visited paris"},
    {"role": "assistant", "content": "good"},
    {"role": "user", "content": "bob met carol"},
    {"role": "assistant", "content": "bad and sad"},
]
# Hand-computed: the tokens of the ChatML rendering, and whether each one is trained on.
EXPECTED = [
    ("<|im_start|>", False), ("[UNK]", False), ("the", False), ("film", False), ("<|im_end|>", False),
    ("<|im_start|>", False), ("u", False), ("##s", False), ("##er", False), ("alice", False), ("visited", False),
    ("paris", False), ("<|im_end|>", False),
    ("<|im_start|>", False), ("[UNK]", False), ("good", True), ("<|im_end|>", True),
    ("<|im_start|>", False), ("u", False), ("##s", False), ("##er", False), ("bob", False), ("met", False),
    ("carol", False), ("<|im_end|>", False),
    ("<|im_start|>", False), ("[UNK]", False), ("bad", True), ("and", True), ("sad", True), ("<|im_end|>", True),
]  # fmt: skip
# ChatML without generation markers: the assistant turns are found from growing prefixes.
CHATML_PLAIN = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from tests.support.tiny_models import write_tokenizer

    directory = tmp_path_factory.mktemp("chat-tokenizer")
    write_tokenizer(directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _labelled(tokenizer: Any, dataset: DatasetSpec, rows: list[dict[str, Any]]) -> list[list[tuple[str, bool]]]:
    examples = encode_records(
        list(enumerate(rows, start=1)), tokenizer=tokenizer, model=MODEL, dataset=dataset, display="chat.jsonl"
    )
    out = []
    for example in examples:
        assert isinstance(example.labels, list)
        tokens = tokenizer.convert_ids_to_tokens(example.input_ids)
        for token_id, label in zip(example.input_ids, example.labels, strict=True):
            assert label in (IGNORE_INDEX, token_id)  # a trained position predicts its own token
        out.append([(t, y != IGNORE_INDEX) for t, y in zip(tokens, example.labels, strict=True)])
    return out


@pytest.mark.parametrize("template", ["chatml", CHATML_PLAIN], ids=["generation-markers", "growing-prefixes"])
def test_multi_turn_loss_is_on_every_assistant_turn_only(tokenizer: Any, template: str) -> None:
    dataset = DatasetSpec(train="chat.jsonl", chat_template=template, max_length=64)
    (labelled,) = _labelled(tokenizer, dataset, [{"messages": CONVERSATION}])
    assert labelled == EXPECTED


def test_the_tokenizers_own_template_is_used(tokenizer: Any) -> None:
    own = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    own.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    own.chat_template = chat.CHATML
    (labelled,) = _labelled(own, DatasetSpec(train="c.jsonl", max_length=64), [{"messages": CONVERSATION}])
    assert labelled == EXPECTED


def test_a_tokenizer_without_template_is_invalid_spec_naming_the_model(tokenizer: Any) -> None:
    assert not tokenizer.chat_template
    with pytest.raises(InvalidSpec, match=r"model.source file:///models/tiny-gpt: the tokenizer has no chat template"):
        encode_records(
            [(1, {"messages": CONVERSATION})],
            tokenizer=tokenizer,
            model=MODEL,
            dataset=DatasetSpec(train="c.jsonl"),
            display="c.jsonl",
        )


def test_truncation_drops_and_counts_by_reason(tokenizer: Any) -> None:
    dataset = DatasetSpec(train="c.jsonl", chat_template="chatml", max_length=16)
    long_question = {"role": "user", "content": " ".join(["film"] * 20)}
    rows = [
        ("c.jsonl line 1", {"messages": CONVERSATION[:3]}),  # kept: "good" is token 16 of 17
        ("c.jsonl line 2", {"messages": [long_question, {"role": "assistant", "content": "good"}]}),
        ("c.jsonl line 3", {"messages": [{"role": "user", "content": "hi"}]}),  # nothing to learn from
    ]
    block = Encoder(tokenizer, MODEL, dataset, "chat", chat.CHATML).encode(rows)
    assert block.status.tolist() == [0, 1, 2]  # kept, truncated, no_trainable_tokens
    assert block.lengths.tolist() == [16]
    assert block.labels is not None
    assert (block.labels != IGNORE_INDEX).any()


def test_bad_messages_name_the_row_and_field(tokenizer: Any) -> None:
    dataset = DatasetSpec(train="c.jsonl", chat_template="chatml")
    encoder = Encoder(tokenizer, MODEL, dataset, "chat", chat.CHATML)
    with pytest.raises(InvalidData, match=r"c.jsonl line 7: dataset.messagesField 'messages' must be a list"):
        encoder.encode([("c.jsonl line 7", {"messages": "hello"})])
    with pytest.raises(InvalidData, match=r"c.jsonl line 8: .* message 1 is \{'content': 'x'\}"):
        encoder.encode([("c.jsonl line 8", {"messages": [{"role": "user", "content": "a"}, {"content": "x"}]})])


def test_a_template_runs_in_the_sandbox_never_as_python(tokenizer: Any, tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    escape = (
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        f"{{{{ c(['touch', '{marker}']) }}}}{{% endif %}}{{% endfor %}}"
    )
    dataset = DatasetSpec(train="c.jsonl", chat_template=escape)
    encoder = Encoder(tokenizer, MODEL, dataset, "chat", escape)
    with pytest.raises(InvalidData, match=r"c.jsonl line 1: the chat template cannot render this conversation"):
        encoder.encode([("c.jsonl line 1", {"messages": CONVERSATION})])
    assert not marker.exists()


def test_assistant_mask_matches_transformers(tokenizer: Any) -> None:
    """Our batched masks equal ``apply_chat_template(return_assistant_tokens_mask=True)`` on the same template."""
    reference = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=chat.CHATML, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    dataset = DatasetSpec(train="c.jsonl", chat_template="chatml", max_length=64)
    block = Encoder(tokenizer, MODEL, dataset, "chat", chat.CHATML).encode(
        [("c.jsonl line 1", {"messages": CONVERSATION})]
    )
    assert block.input_ids.tolist() == list(reference["input_ids"])
    assert block.labels is not None
    assert [int(y != IGNORE_INDEX) for y in block.labels.tolist()] == list(reference["assistant_masks"])
