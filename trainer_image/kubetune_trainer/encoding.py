"""Rows to token ids and labels, a batch at a time with the fast tokenizer (DESIGN §4.4).

An :class:`Encoder` turns a list of rows into one :class:`Encoded` block: the kept
examples as flat numpy arrays plus, per row, whether it was kept or why it was
dropped.  Modes (:func:`mode_for`):

* ``sequence`` — text (+ pair) and a class label;
* ``tokens`` — words and one tag per word (the first sub-token of a word carries it);
* ``prompt`` — causal-lm prompt/response rows, loss on the response only;
* ``chat`` — causal-lm conversations rendered with the chat template, loss on every assistant turn;
* ``text`` — causal-lm or masked-lm plain text (labels derived at collate time).

An example whose labels are all ignored after truncation to ``maxLength`` is dropped
and counted: ``truncated`` when truncation removed its trainable tokens,
``no_trainable_tokens`` when it never had any (a conversation without an assistant turn).
Every data error names the file, the line (or row) and the field.  Pure: picklable, so the
tokenizing processes each hold one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetune_trainer import chat
from kubetune_trainer.errors import InvalidData
from kubetune_trainer.spec import DatasetSpec, ModelSpec, Task

IGNORE_INDEX = -100
KEPT, TRUNCATED, NO_TRAINABLE = 0, 1, 2
STATUS_REASONS = {TRUNCATED: "truncated", NO_TRAINABLE: "no_trainable_tokens"}
Row = tuple[str, dict[str, Any]]  # (where: "FILE line N", row)


@dataclass
class Encoded:
    """The examples of a block of rows, columnar; ``status`` has one entry per row read."""

    lengths: np.ndarray  # int32, one per kept example
    input_ids: np.ndarray  # int32, flat
    status: np.ndarray  # int8, one per row: KEPT, TRUNCATED or NO_TRAINABLE
    labels: np.ndarray | None = None  # int32, flat (per-token labels)
    seq_labels: np.ndarray | None = None  # int64, one per kept example
    token_type_ids: np.ndarray | None = None  # int8, flat

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-example arrays that exist, by name."""
        found = {"input_ids": self.input_ids}
        for name in ("labels", "seq_labels", "token_type_ids"):
            value = getattr(self, name)
            if value is not None:
                found[name] = value
        return found


def mode_for(model: ModelSpec, dataset: DatasetSpec, first_row: dict[str, Any] | None) -> str:
    """How rows of this job are encoded (chat when a causal-lm row has the messages field)."""
    if model.task == Task.SEQUENCE_CLASSIFICATION:
        return "sequence"
    if model.task == Task.TOKEN_CLASSIFICATION:
        return "tokens"
    if model.task == Task.CAUSAL_LM and dataset.prompt_field:
        return "prompt"
    if model.task == Task.CAUSAL_LM and first_row is not None and dataset.messages_field in first_row:
        return "chat"
    return "text"


def label_names(model: ModelSpec) -> list[str] | None:
    """Label names in id order, or None for language models."""
    if model.labels is not None:
        return list(model.labels)
    if model.num_labels is not None:
        return [str(i) for i in range(model.num_labels)]
    return None


def _label_id(value: Any, names: list[str], *, where: str, field: str, explicit: bool) -> int:
    if isinstance(value, str) and value in names:
        return names.index(value)
    if not explicit and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            index = int(value)
        except ValueError:
            index = -1
        if 0 <= index < len(names):
            return index
    allowed = f"model.labels {names}" if explicit else f"0..{len(names) - 1} (model.numLabels)"
    raise InvalidData(f"{where}: {field} value {value!r} is not in {allowed}")


def _field(row: dict[str, Any], name: str, *, where: str, spec_field: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidData(f"{where}: missing field {name!r} ({spec_field})")
    return value


def _flat(lists: Sequence[Sequence[int]], dtype: Any) -> np.ndarray:
    total = sum(len(x) for x in lists)
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=total)


@dataclass
class Encoder:
    """Encodes rows of one job: the tokenizer, what the spec says about the data, and the mode."""

    tokenizer: Any
    model: ModelSpec
    dataset: DatasetSpec
    mode: str
    template: str | None = None  # chat mode: the Jinja source
    names: list[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.names = label_names(self.model)

    def encode(self, rows: Sequence[Row]) -> Encoded:
        """Validate and tokenize a block of rows (InvalidData names the first bad row and field)."""
        method = {
            "sequence": self._sequence,
            "tokens": self._tokens,
            "prompt": self._prompt,
            "chat": self._chat,
            "text": self._text,
        }[self.mode]
        return method(rows)

    # -- per mode

    def _sequence(self, rows: Sequence[Row]) -> Encoded:
        ds, names = self.dataset, self.names
        assert names is not None
        explicit = self.model.labels is not None
        texts, pairs, labels = [], [], []
        for where, row in rows:
            texts.append(str(_field(row, ds.text_field, where=where, spec_field="dataset.textField")))
            if ds.text_pair_field:
                pairs.append(str(_field(row, ds.text_pair_field, where=where, spec_field="dataset.textPairField")))
            if row.get(ds.label_field) is None:
                raise InvalidData(f"{where}: missing field {ds.label_field!r} (dataset.labelField)")
            labels.append(_label_id(row[ds.label_field], names, where=where, field=ds.label_field, explicit=explicit))
        enc = self.tokenizer(texts, pairs or None, truncation=True, max_length=ds.max_length)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids")
        return Encoded(
            lengths=np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids)),
            input_ids=_flat(ids, np.int32),
            status=np.zeros(len(rows), dtype=np.int8),
            seq_labels=np.asarray(labels, dtype=np.int64),
            token_type_ids=_flat(types, np.int8) if types is not None else None,
        )

    def _tokens(self, rows: Sequence[Row]) -> Encoded:
        ds, names = self.dataset, self.names
        assert names is not None
        explicit = self.model.labels is not None
        words_of, tags_of = [], []
        for where, row in rows:
            words = _field(row, ds.text_field, where=where, spec_field="dataset.textField")
            tags = row.get(ds.label_field)
            if tags is None:
                raise InvalidData(f"{where}: missing field {ds.label_field!r} (dataset.labelField)")
            words = words.split() if isinstance(words, str) else list(words)
            tags = tags.split() if isinstance(tags, str) else list(tags)
            if len(words) != len(tags):
                raise InvalidData(
                    f"{where}: {ds.text_field!r} has {len(words)} words but {ds.label_field!r} has {len(tags)} tags"
                )
            tag_ids = [_label_id(t, names, where=where, field=ds.label_field, explicit=explicit) for t in tags]
            words_of.append([str(w) for w in words])
            tags_of.append(tag_ids)
        enc = self.tokenizer(words_of, is_split_into_words=True, truncation=True, max_length=ds.max_length)
        labels: list[list[int]] = []
        for index, tag_ids in enumerate(tags_of):
            row_labels, previous = [], None
            for word_id in enc.word_ids(index):
                # Only the first sub-token of a word carries its tag; the rest and specials are ignored.
                row_labels.append(IGNORE_INDEX if word_id is None or word_id == previous else tag_ids[word_id])
                previous = word_id
            labels.append(row_labels)
        types = enc.get("token_type_ids")
        return self._keep(enc["input_ids"], labels, [bool(t) for t in tags_of], types)

    def _prompt(self, rows: Sequence[Row]) -> Encoded:
        ds, tok = self.dataset, self.tokenizer
        assert ds.prompt_field is not None
        assert ds.response_field is not None
        prompts = [str(_field(r, ds.prompt_field, where=w, spec_field="dataset.promptField")) for w, r in rows]
        responses = [str(_field(r, ds.response_field, where=w, spec_field="dataset.responseField")) for w, r in rows]
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tok(responses, add_special_tokens=False)["input_ids"]
        ids_of, labels_of = [], []
        for head, tail in zip(prompt_ids, response_ids, strict=True):
            head = ([bos] if bos is not None else []) + list(head)
            tail = list(tail) + ([eos] if eos is not None else [])
            ids_of.append(head + tail)
            labels_of.append([IGNORE_INDEX] * len(head) + tail)
        return self._keep(ids_of, labels_of, [True] * len(rows), None)

    def _chat(self, rows: Sequence[Row]) -> Encoded:
        assert self.template is not None
        ds, tok = self.dataset, self.tokenizer
        wheres = [where for where, _ in rows]
        conversations = [
            chat.check_conversation(row.get(ds.messages_field), where=where, field=ds.messages_field)
            for where, row in rows
        ]
        texts, spans = chat.render_conversations(conversations, self.template, _template_variables(tok), wheres)
        ids_of, labels_of, had = [], [], []
        for ids, offsets, row_spans in zip(*_encode_with_offsets(tok, texts), spans, strict=True):
            mask = chat.assistant_mask_array(offsets, row_spans)
            ids_of.append(ids)
            labels_of.append(np.where(mask, ids, IGNORE_INDEX).astype(np.int32))
            had.append(bool(mask.any()))
        return self._keep(ids_of, labels_of, had, None)

    def _text(self, rows: Sequence[Row]) -> Encoded:
        ds = self.dataset
        texts = [str(_field(r, ds.text_field, where=w, spec_field="dataset.textField")) for w, r in rows]
        enc = self.tokenizer(texts, truncation=True, max_length=ds.max_length)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids")
        return Encoded(
            lengths=np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids)),
            input_ids=_flat(ids, np.int32),
            status=np.zeros(len(rows), dtype=np.int8),
            token_type_ids=_flat(types, np.int8) if types is not None else None,
        )

    # -- truncation and dropping

    def _keep(
        self,
        ids_of: Sequence[Sequence[int] | np.ndarray],
        labels_of: Sequence[Sequence[int] | np.ndarray],
        had_targets: Sequence[bool],
        types_of: Sequence[Sequence[int]] | None,
    ) -> Encoded:
        """Cut every example to ``maxLength``; drop (and count) those left without a trainable token."""
        limit = self.dataset.max_length
        status = np.zeros(len(ids_of), dtype=np.int8)
        kept_ids, kept_labels, kept_types = [], [], []
        for index, (ids, labels) in enumerate(zip(ids_of, labels_of, strict=True)):
            cut = np.asarray(labels[:limit], dtype=np.int32)
            if not (cut != IGNORE_INDEX).any():
                status[index] = TRUNCATED if had_targets[index] else NO_TRAINABLE
                continue
            kept_ids.append(np.asarray(ids[:limit], dtype=np.int32))
            kept_labels.append(cut)
            if types_of is not None:
                kept_types.append(np.asarray(types_of[index][:limit], dtype=np.int8))
        return Encoded(
            lengths=np.fromiter((len(x) for x in kept_ids), dtype=np.int32, count=len(kept_ids)),
            input_ids=_concat(kept_ids, np.int32),
            status=status,
            labels=_concat(kept_labels, np.int32),
            token_type_ids=_concat(kept_types, np.int8) if types_of is not None else None,
        )


def _concat(arrays: Sequence[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)


def _encode_with_offsets(tokenizer: Any, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids and character offsets of rendered chats, as arrays.

    A fast tokenizer's backend encodes the batch directly (what ``tokenizer(texts,
    add_special_tokens=False)`` does, less the conversion of every encoding to Python
    lists); the chat templates write the special tokens themselves.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: through its own call
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return (
            [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]],
            [np.asarray(x, dtype=np.int64).reshape(-1, 2) for x in enc["offset_mapping"]],
        )
    backend.no_truncation()  # truncation comes after the masks, and counts what it cuts
    backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return (
        [np.asarray(e.ids, dtype=np.int32) for e in encodings],
        [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encodings],
    )


def _template_variables(tokenizer: Any) -> dict[str, Any]:
    """What a chat template may use besides the messages: the special tokens (``bos_token``, ...)."""
    return {k: v for k, v in dict(tokenizer.special_tokens_map).items() if isinstance(v, str)}
