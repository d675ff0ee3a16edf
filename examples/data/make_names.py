#!/usr/bin/env python
"""Writes ``names.tsv``: made-up names from three invented "languages", one a line with its label.

Each language has its own syllables, letter habits and endings, so a character-level model can
learn to tell them apart. Deterministic (fixed seed, no downloads): ``python
examples/data/make_names.py`` rewrites the committed file byte for byte.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _generate import distinct_rows, write_tsv  # noqa: E402 (shared with make_sentences.py)

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


def _draw_name(rng, parts):
    stem = "".join(rng.choice(parts["syllables"]) for _ in range(rng.randint(1, 3)))
    return (stem + rng.choice(parts["endings"])).capitalize()


def make_names(per_language: int = 150, seed: int = 0):
    return distinct_rows(LANGUAGES, per_language, _draw_name, seed)


def main():
    write_tsv("names.tsv", ("label", "name"), make_names())


if __name__ == "__main__":
    main()
