"""Tiny "pretrained" backbones and datasets built from configs, for fast CPU tests.

Nothing is downloaded: a WordPiece vocabulary is written from a fixed word
list, a BERT (encoder, with its masked-LM head) and a GPT-2 (decoder) with
hidden size 32 and 2 layers are initialized from a seed and saved in Hugging
Face format, exactly as a hub checkpoint would look.  The datasets are
synthetic but learnable (labels follow the words), so a loss must fall within
a few dozen steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "fine", "superb", "lovely", "bright", "happy", "nice"]
NEGATIVE = ["bad", "awful", "poor", "dull", "sad", "ugly", "weak", "grim"]
NEUTRAL = ["the", "a", "film", "movie", "plot", "was", "is", "very", "and", "story", "acting", "music", "of", "it"]
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]
PLACES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo"]
OTHER_WORDS = ["visited", "met", "saw", "in", "with", "today", "then", "went", "to", "said"]
# Pieces so that some words split into several sub-tokens (label alignment is exercised).
PIECES = ["##s", "##ed", "##ing", "##ly", "##er", "##a", "##o", "##i", "##e"]
WORDS = POSITIVE + NEGATIVE + NEUTRAL + PEOPLE + PLACES + OTHER_WORDS
TAGS = ["O", "B-PER", "B-LOC"]


def write_tokenizer(directory: Path) -> None:
    """Save a BERT WordPiece tokenizer over the tiny vocabulary into ``directory``."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS + PIECES + list("abcdefghijklmnopqrstuvwxyz")) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    tokenizer.save_pretrained(directory)


def vocab_size() -> int:
    """Number of entries in the tiny vocabulary."""
    return len(SPECIAL) + len(WORDS) + len(PIECES) + 26


def tiny_bert(directory: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with its masked-LM head, saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    BertForMaskedLM(config).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def tiny_gpt2(directory: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide GPT-2 (decoder) saved with the same WordPiece tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size(),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def _sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 7))]
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words)


def sentiment_rows(n: int, *, seed: int) -> list[dict[str, object]]:
    """Binary sentiment rows ``{"text", "label"}`` with labels ``negative``/``positive``."""
    rng = random.Random(seed)  # noqa: S311 (reproducible test data, not security)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        positive = rng.random() < 0.5
        rows.append({"text": _sentence(rng, positive), "label": "positive" if positive else "negative"})
    return rows


def ner_rows(n: int, *, seed: int) -> list[dict[str, object]]:
    """Token-classification rows ``{"tokens": [...], "tags": [...]}`` (people and places)."""
    rng = random.Random(seed)  # noqa: S311 (reproducible test data, not security)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        tokens: list[str] = []
        tags: list[str] = []
        for _ in range(rng.randint(4, 9)):
            kind = rng.random()
            if kind < 0.2:
                word, tag = rng.choice(PEOPLE), "B-PER"
            elif kind < 0.4:
                word, tag = rng.choice(PLACES), "B-LOC"
            else:
                word, tag = rng.choice(OTHER_WORDS + NEUTRAL), "O"
            if rng.random() < 0.15:
                word += rng.choice(["s", "ed"])  # sometimes split into sub-tokens
            tokens.append(word)
            tags.append(tag)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def lm_rows(n: int, *, seed: int) -> list[dict[str, object]]:
    """Plain-text rows ``{"text"}`` with strong regularities (a falling LM loss)."""
    rng = random.Random(seed)  # noqa: S311 (reproducible test data, not security)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        rows.append({"text": f"{person} visited {place} and {person} went to {place} today"})
    return rows


def instruction_rows(n: int, *, seed: int) -> list[dict[str, object]]:
    """Prompt/response rows for causal-lm with the loss on the response only."""
    rng = random.Random(seed)  # noqa: S311 (reproducible test data, not security)
    rows: list[dict[str, object]] = []
    for _ in range(n):
        positive = rng.random() < 0.5
        rows.append({"prompt": _sentence(rng, positive) + " is", "response": "good" if positive else "bad"})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    """Write ``rows`` as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
