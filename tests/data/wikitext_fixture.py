"""A small WikiText-style corpus (headings, blank " \\n" lines, spaced punctuation, @-@, non-ASCII)."""

from __future__ import annotations

import random

WORDS = ["the", "album", "was", "released", "in", "1998", ",", ".", "@-@", "@,@", "Boulter", "théâtre",
         "Kraków", "東京", "(", ")", "\"", "and", "of", "a", "song", "=", "–"]


def make_text(seed: int, n_articles: int = 3) -> str:
    rng = random.Random(seed)
    lines = []
    for a in range(n_articles):
        lines += [" \n", f" = Article {seed} {a} = \n", " \n"]
        for s in range(2):
            lines += [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + " \n", " \n"]
            lines += [f" = = Section {s} = = \n", " \n"]
        lines += [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + " \n"]
    return "".join(lines)


def make_splits() -> dict[str, str]:
    return {"train": make_text(1, 6), "valid": make_text(2), "test": make_text(3)}
