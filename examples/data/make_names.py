#!/usr/bin/env python
"""Writes ``names.tsv``: made-up names from three invented "languages", one a line with its label.

Each language has its own syllables, letter habits and endings, so a character-level model can
learn to tell them apart. Deterministic (fixed seed, no downloads): ``python
examples/data/make_names.py`` rewrites the committed file byte for byte.
"""

import os
import random

LANGUAGES = {
    "aldan": {  # soft, vowel-heavy, ends in -a/-ia/-el
        "syllables": ["la", "ri", "ae", "li", "na", "ve", "sil", "mir", "el", "thi", "ya", "lo"],
        "endings": ["a", "ia", "el", "iel", "wen", "is"],
    },
    "brokk": {  # consonant clusters, ends in -k/-dur/-grim
        "syllables": ["thr", "bor", "gun", "dra", "kaz", "dum", "grom", "bal", "dor", "uk", "thor"],
        "endings": ["k", "dur", "grim", "in", "ak", "rok"],
    },
    "sorai": {  # open syllables, doubled vowels, ends in -o/-u/-shi
        "syllables": ["ka", "mo", "to", "shi", "ra", "yu", "ki", "no", "sa", "hi", "ma", "ta"],
        "endings": ["o", "u", "shi", "ko", "ru", "ma"],
    },
}


def make_names(per_language: int = 150, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for label, parts in LANGUAGES.items():
        seen = set()
        while len(seen) < per_language:
            stem = "".join(rng.choice(parts["syllables"]) for _ in range(rng.randint(1, 3)))
            name = (stem + rng.choice(parts["endings"])).capitalize()
            if name not in seen:
                seen.add(name)
                rows.append((label, name))
    rng.shuffle(rows)
    return rows


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "names.tsv")
    with open(path, "w", encoding="utf8", newline="\n") as f:
        f.write("label\tname\n")
        for label, name in make_names():
            f.write(f"{label}\t{name}\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
