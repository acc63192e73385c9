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
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocabulary())}, do_lower_case=True)
    tokenizer.save_pretrained(directory)


def vocabulary() -> list[str]:
    """The tiny WordPiece vocabulary in id order (special tokens first, no duplicates)."""
    return list(dict.fromkeys(SPECIAL + WORDS + PIECES + list("abcdefghijklmnopqrstuvwxyz")))


def vocab_size() -> int:
    """Number of entries in the tiny vocabulary."""
    return len(vocabulary())


def _pretrain(model: object, tokenizer: object, *, steps: int, seed: int) -> None:
    """A short "pre-training" of the encoder so that its features mean something.

    A randomly initialized encoder carries no information a frozen-backbone
    method (LoRA, IA3, prompts) could adapt in 20 steps; real checkpoints do.
    Joint objectives on the synthetic data (sentence polarity from [CLS], word
    classes per token, masked-LM) give the tiny encoder comparable features;
    the temporary heads are thrown away, only the encoder and MLM head are saved.
    """
    import torch

    hidden = model.config.hidden_size  # type: ignore[attr-defined]
    sentence_head = torch.nn.Linear(hidden, 2)
    token_head = torch.nn.Linear(hidden, len(TAGS))
    params = [*model.parameters(), *sentence_head.parameters(), *token_head.parameters()]  # type: ignore[attr-defined]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    sentences = sentiment_rows(steps * 16, seed=seed + 100)
    ner = ner_rows(steps * 16, seed=seed + 200)
    for step in range(steps):
        rows = sentences[step * 16 : (step + 1) * 16]
        enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")  # type: ignore[operator]
        out = model(**enc, output_hidden_states=True)  # type: ignore[operator]
        polarity = torch.tensor([1 if r["label"] == "positive" else 0 for r in rows])
        loss = torch.nn.functional.cross_entropy(sentence_head(out.hidden_states[-1][:, 0]), polarity)
        tagged = ner[step * 16 : (step + 1) * 16]
        enc = tokenizer([r["tokens"] for r in tagged], is_split_into_words=True, padding=True, return_tensors="pt")  # type: ignore[operator]
        targets = torch.full(enc["input_ids"].shape, -100)
        for row, r in enumerate(tagged):
            for position, word in enumerate(enc.word_ids(row)):
                if word is not None:
                    targets[row, position] = TAGS.index(r["tags"][word])  # type: ignore[index]
        labels = enc["input_ids"].clone()
        masked = enc["input_ids"].clone()
        pick = (torch.rand(masked.shape) < 0.15) & (enc["attention_mask"] == 1)
        masked[pick] = tokenizer.mask_token_id  # type: ignore[attr-defined]
        labels[~pick] = -100
        out = model(input_ids=masked, attention_mask=enc["attention_mask"], labels=labels, output_hidden_states=True)  # type: ignore[operator]
        token_logits = token_head(out.hidden_states[-1])
        loss = (
            loss
            + out.loss
            + torch.nn.functional.cross_entropy(token_logits.reshape(-1, len(TAGS)), targets.reshape(-1))
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def tiny_bert(directory: Path, *, seed: int = 0, pretrain_steps: int = 40) -> Path:
    """A 2-layer, 32-wide BERT with its masked-LM head, briefly pre-trained, saved with its tokenizer.

    The pre-trained checkpoint is deterministic, so it is built once per machine
    (keyed by this file's content, the seed and the steps) under the temp dir and
    copied; concurrent builders race harmlessly (atomic rename).
    """
    import hashlib
    import os
    import shutil
    import tempfile

    key = hashlib.sha256(Path(__file__).read_bytes() + f"{seed}-{pretrain_steps}".encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "kubetune-tiny-models" / f"bert-{key}"
    if not cache.is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".build-"))
        _build_tiny_bert(staging, seed=seed, pretrain_steps=pretrain_steps)
        try:
            os.replace(staging, cache)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(cache, directory, dirs_exist_ok=True)
    return directory


def _build_tiny_bert(directory: Path, *, seed: int, pretrain_steps: int) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

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
    model = BertForMaskedLM(config)
    write_tokenizer(directory)
    if pretrain_steps:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine
        try:
            _pretrain(model, AutoTokenizer.from_pretrained(directory), steps=pretrain_steps, seed=seed)
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(directory)


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


def tiny_llama(directory: Path, *, seed: int = 0) -> Path:
    """A 2-layer, 32-wide Llama (RoPE, grouped-query attention, RMSNorm) with the same tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    write_tokenizer(directory)
    return directory
