"""peftkit against what a user would otherwise write: a plain peft + transformers `Trainer` script as the peft
documentation shows it, on the same model (MiniLM), data (the Rotten Tomatoes rows peftkit trains on), LoRA
settings (r 8, alpha 16, dropout 0.1, query and value), batch size (32) and number of steps.

    .venv/bin/python benchmarks/peer.py [--steps 30] [--rounds 3] [--variants ...]   # ~10 minutes on 2 CPU cores

Variants: peftkit LoRA (`peftkit run recipes/sentiment-lora.yaml`), peftkit full fine-tuning, peftkit LoRA in 2
data-parallel processes (`--processes 2`; opt-in with --variants), the peer at its
defaults, and the peer tuned (length-grouped batches; bf16 only where the machine computes it natively — on a
CPU without AMX bf16 is emulated and ~50x slower, benchmarks/cpu_kernels.py). Every measurement is a fresh process
(its memory peak is its own); rounds alternate the variants (A B C D A B C D ...) so machine drift hits all
alike. Training samples/s: peftkit's metrics.json (training steps only), the peer's Trainer metrics
(train_samples_per_second). Peak memory: during training (reset when training starts), the resident set size on
a CPU, bytes reserved by torch on a GPU. On a machine with a GPU both sides train there (the peer's tuned bf16 on;
peftkit's bf16 run also holds the frozen base in bf16, model.dtype auto, where the peer keeps fp32 weights).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from peftkit.experiments.bench import peak_mib  # reserved on CUDA, resident set size on CPU

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "sentiment-lora.yaml"
# Both sides train on these rows (enough for 30 steps of 32 without repeating). No validation split: peftkit
# would score it after each epoch, inside its training-memory peak, and the peer evaluates nothing.
DATA = ["data.max_samples=1200", "data.splits={train: 0.8, validation: 0, test: 0.2}"]
# The peer's LoRA: r 8, alpha 16, dropout 0.1 on peft's default layers for BERT, query and value. The recipe has
# moved on since (now r 16 on every linear layer, no dropout), so peftkit's LoRA variants are told the
# peer's settings: the same adapter on both sides.
PEER_LORA = ["method.r=8", "method.alpha=16", "method.dropout=0.1", "method.target_modules=[query, value]"]
VARIANTS = ["peftkit-lora", "peer-default", "peer-tuned", "peftkit-full", "peftkit-lora-2proc"]


def peftkit(steps: int, full: bool, processes: int = 1) -> dict:
    """processes 2: `--processes 2` with 16 rows per process per step (the same 32 per step); its peak memory is
    one process's (the main one)."""
    with tempfile.TemporaryDirectory() as tmp:
        method = ["method={name: full}", "train.lr=5e-5"] if full else PEER_LORA
        parallel = ["--processes", str(processes), f"train.batch_size={32 // processes}"] if processes > 1 else []
        command = [sys.executable, "-m", "peftkit", "run", str(RECIPE), *DATA, *method, f"train.max_steps={steps}",
                   "eval.every_steps=null",  # the recipe's step evaluation needs the validation split cut away here
                   "eval.splits=[test]", f"export.output_dir={tmp}/run", *parallel]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True)
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    return {"samples_per_s": metrics["train"]["samples_per_s"], "peak_mib": peak_mib(metrics["memory"]["train_peak"])}


def peer(steps: int, tuned: bool) -> dict:
    """The peft documentation's recipe: get_peft_model + Trainer, nothing else changed unless `tuned`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,  # fmt: skip
        TrainingArguments,
    )

    from peftkit import assets, data, measure
    from peftkit import train as loop
    from peftkit.recipe import load_recipe
    from peftkit.tasks import TASKS

    recipe = load_recipe(RECIPE, DATA)
    splits, _ = data.load(recipe.data, TASKS["classification"])  # the very rows peftkit trains on
    path = assets.resolve_model(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = splits["train"].map(lambda b: tokenizer(b["text"], truncation=True, max_length=128), batched=True,
                                remove_columns=["text", data.ROW]).rename_column("label", "labels")  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    native_bf16 = loop.resolve_precision("auto", device) == "bf16"

    class PeakFromHere(TrainerCallback):  # training's peak, apart from loading
        def on_train_begin(self, *args, **kwargs):
            measure.reset_peak_memory(device)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=32, learning_rate=1e-3, warmup_steps=0.06, max_steps=steps,
            seed=42, save_strategy="no", logging_strategy="no", report_to="none", use_cpu=device.type == "cpu",
            **({"train_sampling_strategy": "group_by_length", "bf16": native_bf16} if tuned else {}),
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                          callbacks=[PeakFromHere()])  # fmt: skip
        result = trainer.train()
    return {"samples_per_s": result.metrics["train_samples_per_second"],
            "peak_mib": peak_mib(measure.peak_memory(device)), "bf16": tuned and native_bf16}  # fmt: skip


def measure(variant: str, steps: int) -> dict:
    """One measurement in a fresh process."""
    result = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(steps)],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS[:4])
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker = {"peftkit-lora": lambda: peftkit(args.steps, False), "peftkit-full": lambda: peftkit(args.steps, True),
                  "peer-default": lambda: peer(args.steps, False), "peer-tuned": lambda: peer(args.steps, True),
                  "peftkit-lora-2proc": lambda: peftkit(args.steps, False, processes=2)}  # fmt: skip
        print(json.dumps(worker[args.worker]()))
        return
    variants = ["peftkit-lora"] + [v for v in args.variants if v != "peftkit-lora"]  # the reference comes first
    results = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for variant in variants:
            results[variant].append(measure(variant, args.steps))
            print(f"round {round_ + 1} {variant}: {results[variant][-1]}", file=sys.stderr, flush=True)

    def spread(values) -> str:
        return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"

    ours = results["peftkit-lora"]
    print(f"\n{args.rounds} rounds x {args.steps} steps, batch 32; min / median / max\n")
    print("| variant | samples/s | peak memory (MiB) | peftkit LoRA's samples/s ÷ this | this peak ÷ peftkit LoRA's |")
    print("|---|---|---|---|---|")
    for variant, runs in results.items():
        speed = [o["samples_per_s"] / r["samples_per_s"] for o, r in zip(ours, runs)]  # paired within a round
        memory = [r["peak_mib"] / o["peak_mib"] for o, r in zip(ours, runs)]
        print(f"| {variant} | {spread([r['samples_per_s'] for r in runs])} | {spread([r['peak_mib'] for r in runs])} "
              f"| {spread(speed)} | {spread(memory)} |")  # fmt: skip


if __name__ == "__main__":
    main()
