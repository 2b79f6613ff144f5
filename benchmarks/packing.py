"""Packing against padding for chat tuning on the real SmolLM2 (recipes/chat-lora.yaml): training throughput and the
share of each batch spent on padding, plus a check that a packed batch of the real model scores as its
conversations one by one (fp32). The numbers of benchmarks/RESULTS.md's packing section.

    .venv/bin/python benchmarks/packing.py [--steps 24] [--rounds 2]     # ~10 minutes on 2 CPU cores

The same LoRA model (built as `peftkit run` builds it, fast dropout included) trains on the same conversations
three ways: packed rows of max_length tokens (task.packing), padded batches grouped by length (peftkit's default,
train.group_by_length), and padded batches in random order. Throughput counts real tokens (not padding) per
second of forward + backward + optimizer step; rounds alternate between the ways so machine drift hits all alike.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from peftkit import batches, data, devices, loading
from peftkit.recipe import load_recipe
from peftkit.tasks import TASKS

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "chat-lora.yaml"


def encoded(recipe, tokenizer, packing: bool):
    task = TASKS[recipe.task.type]
    recipe.task.packing = packing
    splits, _ = data.load(recipe.data, task)
    return task.preprocess(splits, tokenizer, recipe.task)["train"], task.collator(tokenizer)


def check_equivalence(model, tokenizer, recipe) -> float:
    """|packed batch loss - token-weighted mean of its conversations' losses| in fp32, eval mode."""
    packed, collate = encoded(recipe, tokenizer, True)
    single, collate_single = encoded(recipe, tokenizer, False)
    rows = [packed[i] for i in range(4)]
    batch = collate(rows)
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
        total, count = 0.0, 0
        for row in rows:  # the conversations of these rows, found by their restarting positions
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
            for a, b in zip(starts, starts[1:]):
                ids, labels = row["input_ids"][a:b], [-100, *row["labels"][a + 1 : b]]
                n = sum(x != -100 for x in labels[1:])
                out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
                total, count = total + out.loss.item() * n, count + n
    model.train()
    return abs(loss - total / count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    accelerator = devices.make_accelerator(recipe.train.precision, 1)
    precision = devices.precision_of(accelerator)
    task = TASKS[recipe.task.type]
    torch.manual_seed(0)
    tokenizer, model = loading.adapted_model(recipe, task, None, accelerator.device, "no", 100)
    print(
        f"packed loss - per-conversation loss (fp32, real SmolLM2): {check_equivalence(model, tokenizer, recipe):.2e}"
    )
    tokenizer, model = loading.adapted_model(recipe, task, None, accelerator.device, precision, 100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.train.lr)
    ways = {}
    for name, packing, grouped in [("packed", True, False), ("padded, grouped", False, True), ("padded", False, False)]:
        split, collate = encoded(recipe, tokenizer, packing)
        real: list[int] = []

        def counting(features: list[dict], collate=collate, real=real) -> dict:
            real.append(sum(len(f["input_ids"]) for f in features))  # the tokens before padding
            return collate(features)

        loader = batches.make_loader(split, counting, recipe.train.batch_size, True, grouped, 0)
        ways[name] = {"loader": loader, "real": real, "rows": len(split), "tokens": 0, "slots": 0, "seconds": []}
    print(f"{precision}, batch {recipe.train.batch_size}, max_length {recipe.task.max_length}")
    for _ in range(args.rounds):
        for way in ways.values():
            stream = iter(way["loader"])
            tokens = slots = 0
            start = time.perf_counter()
            for _ in range(args.steps):
                try:
                    batch = next(stream)
                except StopIteration:
                    stream = iter(way["loader"])
                    batch = next(stream)
                with accelerator.autocast():
                    loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                real = way["real"][-1]
                tokens, slots = tokens + real, slots + batch["input_ids"].numel()
            way["seconds"].append(time.perf_counter() - start)
            way["tokens"], way["slots"] = tokens, slots
    print("| batches | rows | real tokens / step | padding share | real tokens / s (median of rounds) |")
    print("|---|---|---|---|---|")
    for name, way in ways.items():
        rate = way["tokens"] / statistics.median(way["seconds"])
        print(
            f"| {name} | {way['rows']} | {way['tokens'] / args.steps:.0f} | "
            f"{1 - way['tokens'] / way['slots']:.1%} | {rate:.0f} |"
        )


if __name__ == "__main__":
    main()
