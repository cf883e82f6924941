"""A real-looking English corpus: words drawn with their real frequencies (wordfreq).

Real frequencies matter: "the" is ~5% of English text, so a word count has hot keys that land
on one partition, like production data does. The draw is seeded, so the same arguments give the
same lines everywhere (tests and the demo check counts against a direct count of these lines).
"""

from __future__ import annotations

import random
from collections import Counter
from functools import lru_cache


@lru_cache(maxsize=4)
def vocabulary(size: int = 5000) -> tuple[list[str], list[float]]:
    from wordfreq import top_n_list, word_frequency

    words = [w for w in top_n_list("en", size * 2) if w.isalpha()][:size]
    return words, [word_frequency(w, "en") for w in words]


def generate_lines(count: int, *, seed: int = 7, vocab_size: int = 5000) -> list[str]:
    """``count`` lines of 4..14 words (mixed case, so lower-casing is part of the job)."""
    rng = random.Random(seed)
    words, weights = vocabulary(vocab_size)
    lengths = [rng.randint(4, 14) for _ in range(count)]
    drawn = rng.choices(words, weights=weights, k=sum(lengths))
    lines, i = [], 0
    for n in lengths:
        chunk = drawn[i : i + n]
        i += n
        if rng.random() < 0.3:
            chunk[0] = chunk[0].capitalize()
        lines.append(" ".join(chunk))
    return lines


def count_words(lines: list[str]) -> Counter[str]:
    """The direct count the streaming job must reproduce."""
    c: Counter[str] = Counter()
    for line in lines:
        c.update(line.lower().split())
    return c
