"""Memory of full-precision LoRA vs LoRA on an 8-bit and a 4-bit base (and full fine-tuning), on the real MiniLM
and SmolLM2-135M recipes: the quantisation table of benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/memory.py [--steps 20]          # ~10 minutes on 2 CPU cores

Each variant is a real `peftkit run` of the recipe, capped at a few optimizer steps, in its own process so that
its peaks are its own. The numbers are the ones every run writes into metrics.json (peftkit/bench.py): the
loaded model's weights, resident memory after loading, the peak while loading, and the peak during training.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # recipe -> {variant: overrides}
    "sentiment-lora": {
        "fp32": [], "8-bit": ["quantization.bits=8"], "4-bit": ["quantization.bits=4"], "full (fp32)": ["method={name: full}"],
    },
    "lm-lora": {"fp32": [], "8-bit": ["quantization.bits=8"], "4-bit": ["quantization.bits=4"]},
}  # fmt: skip


def measure(recipe: str, overrides: list[str], steps: int, out: Path) -> dict:
    command = [sys.executable, "-m", "peftkit", "run", str(ROOT / "recipes" / f"{recipe}.yaml"), *overrides,
               f"train.max_steps={steps}", "data.max_samples=400", "eval.splits=[validation]",
               f"export.output_dir={out}", "--overwrite"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print("| recipe | base | weights loaded (MiB) | RSS after load (MiB) | peak while loading (MiB) "
          "| peak while training (MiB) | trainable | samples/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, variants in VARIANTS.items():
            for name, overrides in variants.items():
                m = measure(recipe, overrides, args.steps, Path(tmp) / "run")
                mem = m["memory"]
                print(f"| {recipe} | {name} | {mem['model_mib']:.0f} | {mem['after_load']['rss_mib']:.0f} "
                      f"| {mem['load_peak']['peak_rss_mib']:.0f} | {mem['train_peak']['peak_rss_mib']:.0f} "
                      f"| {m['trainable_params']:,} | {m['train']['samples_per_s']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
