"""FSDP against DDP on 2 CPU processes: memory per process and quality, the real SmolLM2 and MiniLM recipes cut short.

    PYTHONPATH=. .venv/bin/python benchmarks/fsdp.py [OUT_DIR]     # ~30 min on 2 shared CPU cores

Each recipe runs twice, `peftkit run --processes 2` with train.distributed.strategy ddp then fsdp, in the precision
`auto` picks on this machine; the table (Markdown, for benchmarks/RESULTS.md) shows each process's peak resident
memory while loading and while training (metrics.json memory.per_process), the validation/test quality and the
wall time (the 2 cores are shared with other work: timings are indicative only).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = {  # recipe: overrides that cut it short
    "lm-lora": ["train.max_steps=10", "data.max_samples=200", "eval.before_training=false", "eval.batch_size=8"],
    "sentiment-lora": ["train.max_steps=60", "eval.every_steps=30", "data.max_samples=2000"],
}
METRIC = {"lm-lora": "perplexity", "sentiment-lora": "accuracy"}


def main(out: Path) -> None:
    rows = [
        "| recipe | strategy | peak RSS per process, load (MiB) | peak RSS per process, train (MiB) | "
        "validation | test | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, overrides in RUNS.items():
        for strategy in ("ddp", "fsdp"):
            folder = out / f"{recipe}-{strategy}"
            command = [
                sys.executable,
                "-m",
                "peftkit",
                "run",
                f"recipes/{recipe}.yaml",
                "--processes",
                "2",
                f"train.distributed.strategy={strategy}",
                f"export.output_dir={folder}",
                "--overwrite",
                *overrides,
            ]
            start = time.time()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.time() - start
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                continue
            metrics = json.loads((folder / "metrics.json").read_text())
            per = metrics["memory"]["per_process"]
            load = " / ".join(f"{p['load_peak']['peak_rss_mib']:.0f}" for p in per)
            train = " / ".join(f"{p['train_peak']['peak_rss_mib']:.0f}" for p in per)
            name = METRIC[recipe]
            rows.append(
                f"| {recipe} | {strategy} | {load} | {train} | {metrics['validation'][name]:.4f} | "
                f"{metrics['test'][name]:.4f} | {wall:.0f} |"
            )
            print(rows[-1], flush=True)
    print(f"\nprecision {metrics['precision']}\n" + "\n".join(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/peftkit-fsdp-bench"))
