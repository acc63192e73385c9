"""Write the demo's small labeled dataset: short product and film reviews.

The sentences are composed from hand-written fragments (subjects, opinions,
reasons), seeded, so the files are reproducible; run from this folder to
rewrite ``reviews-train.jsonl`` and ``reviews-validation.jsonl``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    "the film",
    "this movie",
    "the sequel",
    "the documentary",
    "the series finale",
    "this phone",
    "the headphones",
    "the laptop",
    "this blender",
    "the hotel",
    "the restaurant",
    "the novel",
    "the concert",
    "the game",
    "this jacket",
    "the app",
    "the museum tour",
    "the coffee maker",
    "the soundtrack",
    "the delivery service",
]
POSITIVE = [
    "was a delight from start to finish",
    "exceeded every expectation I had",
    "is worth every penny",
    "made me smile the whole time",
    "works beautifully",
    "is the best I have tried in years",
    "felt warm, clever and honest",
    "left me genuinely impressed",
    "is a small masterpiece",
    "was thoughtful and moving",
    "runs fast and never crashes",
    "is comfortable and well made",
    "kept me hooked until the last page",
    "was friendly, quick and generous",
    "deserves all the praise",
]
NEGATIVE = [
    "was a complete waste of time",
    "fell apart after a week",
    "is overpriced and disappointing",
    "bored me to tears",
    "stopped working almost immediately",
    "is the worst purchase I have made",
    "felt lazy, loud and hollow",
    "left me angry and frustrated",
    "is a tedious mess",
    "was clumsy and forgettable",
    "is slow and crashes constantly",
    "is flimsy and badly stitched",
    "dragged on with nothing to say",
    "was rude, late and careless",
    "deserves none of the hype",
]
POSITIVE_TAILS = [
    "",
    " and I would happily recommend it",
    " and I will be back",
    " and the ending was perfect",
    " and support was excellent",
    " and my family loved it too",
]
NEGATIVE_TAILS = [
    "",
    " and I asked for a refund",
    " and I will not be back",
    " and the ending made no sense",
    " and support never answered",
    " and nobody I know liked it",
]
OPENERS = ["", "honestly, ", "to be fair, ", "in short, ", "after two weeks, ", "overall, "]


def sentence(rng: random.Random, positive: bool) -> str:
    """One review with its polarity."""
    opinion = rng.choice(POSITIVE if positive else NEGATIVE)
    tail = rng.choice(POSITIVE_TAILS if positive else NEGATIVE_TAILS)
    text = f"{rng.choice(OPENERS)}{rng.choice(SUBJECTS)} {opinion}{tail}."
    return text[0].upper() + text[1:]


def main() -> None:
    """Write 480 training and 120 validation reviews, balanced."""
    rng = random.Random(7)  # noqa: S311 (reproducible example data, not security)
    rows = []
    seen: set[str] = set()
    while len(rows) < 600:
        positive = len(rows) % 2 == 0
        text = sentence(rng, positive)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": "positive" if positive else "negative"})
    rng.shuffle(rows)
    here = Path(__file__).parent
    for name, part in (("reviews-train.jsonl", rows[:480]), ("reviews-validation.jsonl", rows[480:])):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
