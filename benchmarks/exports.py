"""Inference speed of an ONNX export (`peftkit export RUN --format onnx`) in onnxruntime against the same merged
model in torch, on this CPU:

    .venv/bin/python benchmarks/exports.py RUN ONNX_FOLDER [--threads 2] [--repeats 30]

Batches: 1 text and 32 texts of movie-review length (~20-40 tokens), padded to the longest, as `predict` would.
torch runs the merged model in fp32 (`merge_and_unload` of the run's adapter, eager and sdpa attention), and in
bf16 where this CPU computes it natively; onnxruntime the fp32 file with its default graph optimisations. The
variants alternate call by call (a shared machine's other load hits them alike); min / median ms over `repeats`
rounds after 3 warm-up rounds; also the max abs logit difference.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from peftkit.cpu_kind import cpu_bf16_native, describe
from peftkit.loading import load_trained

TEXTS = [
    "A quiet, moving film about a family that learns to live with loss.",
    "The plot is a mess and the jokes land with a thud; two hours I will not get back.",
    "Charming performances carry a script that never quite decides what it wants to be.",
    "It looks gorgeous, but the story is thin, the pacing is slack and the ending falls flat.",
]


def timed(calls: dict[str, object], repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (min ms, median ms)}: the calls alternate, one each per round, so that other load on a shared
    machine hits them alike; 3 warm-up rounds first."""
    times = {name: [] for name in calls}
    for round_ in range(3 + repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_ >= 3:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main(argv: list[str]) -> None:
    import onnxruntime
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("run", type=Path)
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(str(args.onnx / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    tokenizer = AutoTokenizer.from_pretrained(args.onnx)
    _, _, _, model, _ = load_trained(args.run, torch.device("cpu"))
    merged = model.merge_and_unload().float().eval()
    models = {"eager": copy.deepcopy(merged), "sdpa": merged}  # set once: switching per call costs time of its own
    for attention, each in models.items():
        each.set_attn_implementation(attention)
    print(f"# {describe()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads")
    print("| batch | tokens | torch fp32 eager | torch fp32 sdpa | torch bf16 sdpa | onnxruntime fp32 | diff |")
    print("|---|---|---|---|---|---|---|")
    for size in (1, 32):
        texts = (TEXTS * 8)[:size]
        pt = tokenizer(texts, padding=True, return_tensors="pt")
        feed = {n: pt[n].numpy() for n in names}

        def torch_call(attention: str, bf16: bool = False) -> object:
            def call() -> None:
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    models[attention](**pt)  # noqa: B023

            return call

        calls = {"eager": torch_call("eager"), "sdpa": torch_call("sdpa")}
        if cpu_bf16_native():
            calls["bf16"] = torch_call("sdpa", bf16=True)
        calls["ort"] = lambda: session.run(["logits"], feed)  # noqa: B023
        result = timed(calls, args.repeats)
        with torch.inference_mode():
            want = merged(**pt).logits
        diff = (want - torch.from_numpy(session.run(["logits"], feed)[0])).abs().max().item()
        cell = {name: f"{low:.1f} / {mid:.1f}" for name, (low, mid) in result.items()}
        print(
            f"| {size} | {pt['input_ids'].shape[1]} | {cell['eager']} | {cell['sdpa']} | "
            f"{cell.get('bf16', 'n/a (emulated)')} | {cell['ort']} | {diff:.2g} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
