"""The demo dataset: sentences made from a fixed vocabulary (nothing is
downloaded), written as parquet with an ``id`` and a ``text`` column.

``make run`` writes it under the service's data root
(``<root>/data/demo/sentences.parquet``); the README embeds it with MiniLM:

    mlmesh batch embed --input file://.../sentences.parquet --model minilm@champion
"""

from __future__ import annotations

import random
from pathlib import Path

SUBJECTS = [
    "the platform team",
    "a small robot",
    "my neighbour",
    "the weather service",
    "an old violin",
    "the city council",
    "a curious cat",
    "the night train",
    "our new intern",
    "the river",
    "a quiet library",
    "the search engine",
    "a red bicycle",
    "the orchestra",
    "the database",
    "a tired runner",
]
VERBS = [
    "plans",
    "watches",
    "repairs",
    "forgets",
    "describes",
    "paints",
    "measures",
    "follows",
    "questions",
    "celebrates",
    "builds",
    "ignores",
    "translates",
]
OBJECTS = [
    "the morning light",
    "every failed request",
    "a long list of numbers",
    "the harbour at dusk",
    "three cups of coffee",
    "the quarterly report",
    "a map of the mountains",
    "the broken clock",
    "an unfinished song",
    "the latency of each call",
    "a garden full of tomatoes",
    "the last chapter",
]
TAILS = [
    "",
    "before lunch",
    "with great care",
    "while it rains outside",
    "because nobody else will",
    "for the third time this week",
    "and then writes a short note about what went wrong and how to fix it",
    "in a language that only a few people in the valley still speak",
]


def sentences(count: int, seed: int = 7) -> list[str]:
    """``count`` sentences of 5 to about 40 words, the same for a seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            parts.append(rng.choice(TAILS))
        out.append(" ".join(p for p in parts if p).capitalize() + ".")
    return out


def write_sentences(path: Path, count: int, seed: int = 7, row_group_rows: int = 0) -> Path:
    """Writes ``count`` sentences as parquet (columns id, text); returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sentences(count, seed)
    table = pa.table({"id": [f"s{i:07d}" for i in range(count)], "text": texts})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    pq.write_table(table, partial, row_group_size=row_group_rows or None)
    partial.replace(path)
    return path


DEMO_ROWS = 2000


def write_demo(settings) -> Path:  # type: ignore[no-untyped-def]
    """The demo dataset under the service's data root (once)."""
    path = settings.roots()[0] / "demo" / "sentences.parquet"
    if not path.exists():
        write_sentences(path, DEMO_ROWS)
    return path
