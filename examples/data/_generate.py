"""What the data generators share: drawing distinct labelled rows, writing them as TSV.

Not a generator itself; ``make_names.py`` and ``make_sentences.py`` import it from this folder.
"""

import os
import random


def distinct_rows(groups, per_label: int, draw, seed: int = 0):
    """``per_label`` distinct ``(label, draw(rng, groups[label]))`` rows per label, shuffled.

    One ``random.Random(seed)`` drives everything, so the rows are the same on every run.
    """
    rng = random.Random(seed)
    rows = []
    for label, parts in groups.items():
        seen = set()
        while len(seen) < per_label:
            item = draw(rng, parts)
            if item not in seen:
                seen.add(item)
                rows.append((label, item))
    rng.shuffle(rows)
    return rows


def write_tsv(filename: str, header, rows) -> None:
    """Write ``rows`` under ``header`` to ``filename`` in this folder (Unix newlines)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
    with open(path, "w", encoding="utf8", newline="\n") as f:
        for row in [header, *rows]:
            f.write("\t".join(row) + "\n")
    print(f"wrote {path}")
