"""peftkit's fast CPU dropout (peftkit/dropout.py) against F.dropout on one activation, forward and backward:

    .venv/bin/python benchmarks/dropout.py [--threads 2] [--shape 32 30 384]
    .venv/bin/python benchmarks/dropout.py --steps 20 [--threads 2]     # a LoRA training step, off vs on
    .venv/bin/python benchmarks/dropout.py --attention [--threads 2]    # SDPA's dropout vs peftkit's path

Rows: F.dropout; the fast dropout (16-bit words from numpy's SFC64 seeded by torch, a uint8 mask, p to 1/65536);
its first version (words from torch's own generator, a bool mask); the same mask from bytes (p to 1/256, the
resolution it did not take); the random draws alone. Each time is the minimum over many single calls (robust
to other processes on the machine), in fp32 and bf16, p = 0.1.

--attention: one attention of MiniLM's shape (32 x 12 heads x 30 x 30, head size 32, padding masked),
forward and backward: SDPA without dropout, SDPA with dropout_p 0.1 (torch's CPU math path, bernoulli_), and
what peftkit's attention wrapper runs instead (dropout._math_attention: the same maths, the fast dropout).

--steps: training steps of recipes/sentiment-lora.yaml's model (the real MiniLM, LoRA r 8 on query/value,
dropout 0.1, built as `peftkit run` builds it: base dtype and attention `auto`) at batch 32 x 20-40 tokens; two
copies in one process, one with torch's dropout and one with the fast dropout installed, their steps alternating
(so that other load on the machine hits both alike); in fp32, and in bf16 under autocast. Reports min and median
step ms.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from peftkit.cpu_kind import describe
from peftkit.dropout import BITS, fast_dropout, random_words, torch_words


def timed(function, calls: int = 60) -> float:
    for _ in range(3):
        function()
    best = float("inf")
    for _ in range(calls):
        began = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - began)
    return 1000 * best


def forward_and_backward(function, x: torch.Tensor) -> list[float]:
    leaf, grad = x.clone().requires_grad_(), torch.ones_like(x)
    return [timed(lambda: function(x)), timed(lambda: function(leaf).backward(grad))]


def byte_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """The 1/256 variant: one random byte per element."""
    dropped = round(p * 256)
    keep = random_words((x.numel() + 1) // 2).view(torch.uint8)[: x.numel()].view(x.shape) >= dropped
    return x.mul(keep.view(torch.uint8)).mul_(1 / (1 - dropped / 256))


def first_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """The fast dropout's first version: torch's words, and x times a bool mask (torch converts bool to a float
    type element by element)."""
    dropped = round(p * (1 << BITS))
    keep = torch_words(x.numel()).view(x.shape) >= -(1 << (BITS - 1)) + dropped
    return x.mul(keep).mul_(1 / (1 - dropped / (1 << BITS)))


LENGTHS = [20, 24, 28, 32, 36, 40, 28, 24]  # padded lengths of length-grouped batches of the demo's snippets


def steps(count: int) -> None:
    import statistics

    from peer import PEER_LORA  # the adapter this benchmark was measured with: r 8 on query/value, dropout 0.1

    from peftkit import dropout, loading
    from peftkit.methods import METHODS, base
    from peftkit.recipe import load_recipe
    from peftkit.tasks import TASKS

    recipe = load_recipe("recipes/sentiment-lora.yaml", PEER_LORA)
    task, method = TASKS[recipe.task.type], METHODS[recipe.method.name]
    print("| precision, attention | dropout | step ms, min | step ms, median | samples/s (median) |")
    print("|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        runs = {}
        for fast in (False, True):  # the model as `peftkit run` builds it (base dtype, attention `auto`)
            torch.manual_seed(0)
            _, model = loading.load_base(recipe, task, recipe.data.labels, torch.device("cpu"), precision)
            model = method.apply(model, recipe.method, loading.method_context(recipe, task, model))
            base.trainable_in_fp32(model)
            attention = model.config._attn_implementation
            if fast:
                dropout.install(model)
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            runs["fast" if fast else "torch"] = (model.train(), optimizer, [])
        generator = torch.Generator().manual_seed(0)
        for i in range(count + 2):  # the first two rounds warm up
            ids = torch.randint(1000, 20000, (32, LENGTHS[i % len(LENGTHS)]), generator=generator)
            labels = torch.randint(0, 2, (32,), generator=generator)
            for model, optimizer, times in runs.values():
                began = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if i >= 2:
                    times.append(1000 * (time.perf_counter() - began))
        for name, (_, _, times) in runs.items():
            median = statistics.median(times)
            print(f"| {precision}, {attention} | {name} | {min(times):.0f} | {median:.0f} | {32000 / median:.1f} |")


def attention() -> None:
    from peftkit import dropout

    q, k, v = (torch.randn(32, 12, 30, 32, requires_grad=True) for _ in range(3))
    mask = torch.ones(32, 1, 30, 30, dtype=torch.bool)
    mask[::2, :, :, 24:] = False  # half the rows padded
    rows = {
        "SDPA, no dropout": lambda: F.scaled_dot_product_attention(q, k, v, mask),
        "SDPA, dropout_p 0.1 (torch)": lambda: F.scaled_dot_product_attention(q, k, v, mask, 0.1),
        "the same with the fast dropout (peftkit)": lambda: dropout._math_attention(
            q, k, v, mask, 0.1, False, None, False
        ),
    }
    print("| attention, forward + backward | fp32 ms | bf16 autocast ms |\n|---|---|---|")
    for name, function in rows.items():
        cells = []
        for precision in ("fp32", "bf16"):

            def step(function=function, bf16=precision == "bf16"):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = function()
                out.float().sum().backward()

            cells.append(timed(step, 25))
        print(f"| {name} | {cells[0]:.2f} | {cells[1]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 30, 384])
    parser.add_argument("--steps", type=int, help="time this many LoRA training steps instead")
    parser.add_argument("--attention", action="store_true", help="time attention with dropout instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.attention:
        print(f"{describe()}, {args.threads} threads; ms, min of 25 calls")
        attention()
        return
    if args.steps:
        print(f"{describe()}, {args.threads} threads")
        steps(args.steps)
        return
    n = 1
    for size in args.shape:
        n *= size
    print(f"{describe()}, {args.threads} threads, shape {tuple(args.shape)}, p 0.1; ms, min of 60 calls")
    print("| dropout | fp32 forward | fp32 fwd+bwd | bf16 forward | bf16 fwd+bwd |\n|---|---|---|---|---|")
    rows = {
        "F.dropout (bernoulli_)": lambda x: F.dropout(x, 0.1, True),
        "fast, 16-bit words (p to 1/65536)": lambda x: fast_dropout(x, 0.1),
        "its first version (torch's words, bool mask)": lambda x: first_dropout(x, 0.1),
        "bytes (p to 1/256)": lambda x: byte_dropout(x, 0.1),
    }
    for name, function in rows.items():
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            cells += forward_and_backward(function, torch.randn(args.shape, dtype=dtype))
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    words = timed(lambda: random_words(n))
    bytes_ = timed(lambda: random_words((n + 1) // 2))
    torchs = timed(lambda: torch_words(n))
    print(f"\nrandom draws alone: 16-bit words {words:.3f} ms (torch's generator: {torchs:.3f} ms), bytes {bytes_:.3f}")


if __name__ == "__main__":
    main()
