"""Training throughput of every sentiment-*.yaml method on this machine, measured without noise from anything
else the runs do (data loading, evaluation): the speed column of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/methods.py [--steps 20] [--rounds 3]     # ~6 minutes on 2 CPU cores

Each recipe's model is built exactly as `peftkit run` builds it (load_base + the method's apply) and trained on
the same real batches (32 Rotten Tomatoes snippets each, the recipes' batch size). Rounds alternate between the
methods (A B C ... A B C ...) so that machine drift hits all alike; min / median / max over rounds.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from peftkit import batches, data, loading
from peftkit.methods import METHODS
from peftkit.recipe import load_recipe
from peftkit.tasks import TASKS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
METHOD_RECIPES = ["lora", "lora-all", "dora", "ia3", "adapter", "prefix", "prompt", "full"]


def build(name: str):
    recipe = load_recipe(RECIPES / f"sentiment-{name}.yaml")
    task, method = TASKS[recipe.task.type], METHODS[recipe.method.name]
    splits, labels = data.load(recipe.data, task)
    torch.manual_seed(0)
    tokenizer, model = loading.load_base(recipe, task, labels, torch.device("cpu"), "no")
    model = method.apply(model, recipe.method, loading.method_context(recipe, task, model))
    tokenizer.padding_side = getattr(model, "peftkit_padding_side", tokenizer.padding_side)
    encoded = task.preprocess(splits, tokenizer, recipe.task)
    loader = batches.make_loader(encoded["train"], task.collator(tokenizer), recipe.train.batch_size, True, True, 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.train.lr)
    return model, iter(loader), optimizer


def samples_per_second(model, batches, optimizer, steps: int) -> float:
    model.train()
    seen, start = 0, None
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            start, seen = time.perf_counter(), 0
        batch = next(batches)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += batch["input_ids"].shape[0]
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    built = {name: build(name) for name in METHOD_RECIPES}
    rates = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (model, loader, optimizer) in built.items():
            rates[name].append(samples_per_second(model, loader, optimizer, args.steps))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps x {args.rounds} rounds\n")
    print("| recipe | training samples/s (min / median / max) |\n|---|---|")
    for name, values in rates.items():
        low, mid, high = min(values), statistics.median(values), max(values)
        print(f"| sentiment-{name} | {low:.1f} / **{mid:.1f}** / {high:.1f} |")


if __name__ == "__main__":
    main()
