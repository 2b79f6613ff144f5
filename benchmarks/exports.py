"""Inference speed of an ONNX export (`peftkit export RUN --format onnx`) in onnxruntime against the same merged
model in torch, on this CPU:

    .venv/bin/python benchmarks/exports.py RUN ONNX_FOLDER [--threads 2] [--repeats 30]

Batches: 1 text and 32 texts of movie-review length (~20-40 tokens), padded to the longest, as `predict` would.
torch runs the merged model in fp32 (`merge_and_unload` of the run's adapter, eager and sdpa attention), and in
bf16 where this CPU computes it natively; onnxruntime the fp32 file with its default graph optimisations. Each
time is the median over `repeats` calls after 3 warm-up calls; also the max abs logit difference.
"""

import argparse
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


def median_ms(call: object, repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


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
    print(f"# {describe()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads")
    print("| batch | tokens | torch fp32 eager ms | torch fp32 sdpa ms | torch bf16 ms | onnxruntime fp32 ms | diff |")
    print("|---|---|---|---|---|---|---|")
    for size in (1, 32):
        texts = (TEXTS * 8)[:size]
        pt = tokenizer(texts, padding=True, return_tensors="pt")
        feed = {n: pt[n].numpy() for n in names}
        rows = {}
        for attention in ("eager", "sdpa"):
            merged.set_attn_implementation(attention)
            with torch.inference_mode():
                rows[attention] = median_ms(lambda: merged(**pt), args.repeats)  # noqa: B023
                want = merged(**pt).logits
        bf16 = "n/a (emulated)"
        if cpu_bf16_native():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = f"{median_ms(lambda: merged(**pt), args.repeats):.1f}"  # noqa: B023
        ort = median_ms(lambda: session.run(["logits"], feed), args.repeats)  # noqa: B023
        diff = (want - torch.from_numpy(session.run(["logits"], feed)[0])).abs().max().item()
        print(
            f"| {size} | {pt['input_ids'].shape[1]} | {rows['eager']:.1f} | {rows['sdpa']:.1f} | {bf16} | "
            f"{ort:.1f} | {diff:.2g} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
