#!/usr/bin/env python
"""Writes ``sentences.tsv``: short English sentences labelled with one of four topics.

Deterministic (a fixed seed, no downloads), so the committed file can be regenerated and checked:
``python examples/data/make_sentences.py`` rewrites it byte for byte. The sentences come from
templates whose slots are filled with topic words and with words shared by all topics, so a model
must look at the topic words (not the sentence shape) to classify them.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _generate import distinct_rows, write_tsv  # noqa: E402 (shared with make_names.py)

TOPICS = {
    "sports": {
        "who": [
            "the striker",
            "our goalkeeper",
            "the coach",
            "the home team",
            "the champion",
            "a young sprinter",
            "the captain",
            "the referee",
        ],
        "did": ["scored", "won", "lost", "defended", "trained for", "celebrated", "missed"],
        "what": [
            "the final",
            "a penalty",
            "the match",
            "the league title",
            "the relay race",
            "a late goal",
            "the tournament",
            "the derby",
        ],
    },
    "weather": {
        "who": [
            "the forecast",
            "the storm",
            "a cold front",
            "the wind",
            "the morning fog",
            "heavy rain",
            "the heatwave",
            "a thunderstorm",
        ],
        "did": ["brought", "flooded", "cooled", "covered", "soaked", "warmed", "battered"],
        "what": [
            "the coast",
            "the valley",
            "the northern hills",
            "the harbour",
            "the old town",
            "the farmland",
            "the airport",
            "the ski slopes",
        ],
    },
    "food": {
        "who": [
            "the chef",
            "my grandmother",
            "the baker",
            "a street vendor",
            "the waiter",
            "our neighbour",
            "the cook",
            "a food critic",
        ],
        "did": ["baked", "served", "roasted", "tasted", "seasoned", "grilled", "stirred"],
        "what": [
            "the soup",
            "fresh bread",
            "a lemon cake",
            "the spicy noodles",
            "the curry",
            "garlic butter",
            "the pancakes",
            "a tomato salad",
        ],
    },
    "tech": {
        "who": [
            "the engineer",
            "our server",
            "the new laptop",
            "the startup",
            "the developer",
            "a robot",
            "the compiler",
            "the phone",
        ],
        "did": [
            "crashed",
            "updated",
            "compiled",
            "downloaded",
            "encrypted",
            "rebooted",
            "installed",
        ],
        "what": [
            "the software",
            "a security patch",
            "the database",
            "the network",
            "the app",
            "the firmware",
            "the code",
            "a large file",
        ],
    },
}

# Shared by every topic: they carry no label information.
WHEN = ["yesterday", "this morning", "last night", "on sunday", "again", "at last", "today", ""]
HOW = ["quietly", "suddenly", "slowly", "once more", "as expected", "without warning", ""]
TEMPLATES = [
    "{who} {did} {what} {when}",
    "{when} {who} {how} {did} {what}",
    "{who} {how} {did} {what}",
    "everyone said {who} {did} {what} {when}",
    "i heard that {who} {did} {what}",
]


def _draw_sentence(rng, words):
    sentence = rng.choice(TEMPLATES).format(
        who=rng.choice(words["who"]),
        did=rng.choice(words["did"]),
        what=rng.choice(words["what"]),
        when=rng.choice(WHEN),
        how=rng.choice(HOW),
    )
    return " ".join(sentence.split())


def make_sentences(per_topic: int = 200, seed: int = 0):
    return distinct_rows(TOPICS, per_topic, _draw_sentence, seed)


def main():
    write_tsv("sentences.tsv", ("label", "sentence"), make_sentences())


if __name__ == "__main__":
    main()
