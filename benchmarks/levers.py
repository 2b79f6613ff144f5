"""Speed levers for a LoRA training step on MiniLM (batch 32, 20-40 tokens, the demo's shape), each in a fresh
process, rounds alternating so machine drift hits every variant alike:

    .venv/bin/python benchmarks/levers.py [--rounds 2] [--variants base fused compile 1thread fast_dropout]
    .venv/bin/python benchmarks/levers.py --profile [--variants fast_dropout]   # where a step's time goes
    .venv/bin/python benchmarks/levers.py --variants qv all qv+bf16 all+bf16 all+unshared all+bf16+unshared
    .venv/bin/python benchmarks/levers.py --products    # LoRA's thin backward products, both operand orders
    .venv/bin/python benchmarks/levers.py --together 48 --variants qv all all+unfused   # one process, interleaved

base: torch's own dropout, SDPA, AdamW, the machine's threads (peftkit's loop with train.fast_dropout: false);
fused: AdamW(fused=True); compile: torch.compile(model, dynamic=True) (its compilation time is reported apart);
1thread: torch.set_num_threads(1), the share each process gets with `peftkit run --processes 2` on 2 cores;
fast_dropout: peftkit's fast CPU dropout installed (peftkit/dropout.py: what peftkit's loop does on a CPU by
default). Reports the median step time after 4 warm-up steps (which include compilation). --profile profiles
the base variant, or the first of --variants when given.

LoRA on every layer against query/value, variants joined with "+": qv or all (LoRA's targets:
query/value, or every linear layer, as peftkit's default), bf16 (the base held in bf16, the step under bf16
autocast, as peftkit's bf16 runs), unshared (the fast dropout without dropout.share_adapter_dropouts: each
adapted layer draws its own mask and peft casts its input to fp32), nodrop (LoRA's own dropout 0, peft's default;
the model's dropouts stay), unfused (peft's own LoRA forward, without lora.fuse_branches' addmm). qv and all
install the fast dropout and fuse the branches, as `peftkit run` does on a CPU.
"""

import argparse
import statistics
import subprocess
import sys
import time

LENGTHS = [20, 24, 28, 32, 36, 40, 28, 24]  # padded lengths of length-grouped batches of the demo's snippets
PROFILE_STEPS = 16  # steps torch.profiler records for --profile


# Operator families of a step (torch.profiler's self CPU time), in the order the report lists them.
FAMILIES = {
    "matmul (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "dropout's random numbers (bernoulli_; the fast dropout's random words)": (
        "aten::bernoulli_", "aten::random_", "peftkit::random_words"),  # fmt: skip
    "GELU forward + backward": ("aten::gelu", "aten::gelu_backward"),
    "layer norm forward + backward": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
    "softmax forward + backward": ("aten::_softmax", "aten::_softmax_backward_data"),
    "copies and layout (copy_, _to_copy, view, ...)": ("aten::copy_", "aten::_to_copy", "aten::view",
        "aten::reshape", "aten::transpose", "aten::t", "aten::as_strided", "aten::empty", "aten::empty_strided"),
}  # fmt: skip


def stepper(variant: str):
    """A function that trains one step of `variant`'s model at a given length and returns its seconds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from peftkit import assets

    kind = variant.removeprefix("profile-")  # "profile" alone: the base variant
    parts = set(kind.split("+"))
    if kind == "1thread":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    path = assets.resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    bf16 = "bf16" in parts
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, attn_implementation="eager" if bf16 else "sdpa", dtype=torch.bfloat16 if bf16 else None
    )
    targets = {"target_modules": "all-linear"} if "all" in parts else {}
    lora_dropout = 0.0 if "nodrop" in parts else 0.1
    config = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=lora_dropout, **targets)
    model = get_peft_model(model, config).train()
    for p in model.parameters():  # trained in fp32 (peftkit's trainable_in_fp32)
        if p.requires_grad:
            p.data = p.data.float()
    if kind == "fast_dropout" or parts & {"qv", "all"}:
        from peftkit import dropout

        if "unshared" in parts:
            dropout.replace_dropouts(model)
            dropout.wrap_attention(model)
        else:
            dropout.install(model)
    if parts & {"qv", "all"} and "unfused" not in parts:
        from peftkit.methods import lora_branch

        lora_branch.install(model)
        if "addmm" in parts:  # the branch as one addmm on the base layer's output, autograd for the rest
            for module in model.modules():
                if "forward" in module.__dict__:
                    module.forward = lambda x, m=module: lora_branch._fused(m, x, "default", m.scaling["default"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                  fused=kind == "fused")  # fmt: skip
    forward = torch.compile(model, dynamic=True) if kind == "compile" else model
    generator = torch.Generator().manual_seed(0)

    def step(length: int) -> float:
        ids = torch.randint(1000, 20000, (32, length), generator=generator)
        labels = torch.randint(0, 2, (32,), generator=generator)
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    return step


def worker(variant: str, steps: int = 24) -> str:
    step = stepper(variant)
    warm = sum(step(length) for length in LENGTHS[:4])
    if variant.startswith("profile"):
        return profile(lambda: [step(LENGTHS[i % len(LENGTHS)]) for i in range(PROFILE_STEPS)])
    median = statistics.median(step(LENGTHS[i % len(LENGTHS)]) for i in range(steps))
    return f"{warm:.1f} {median:.4f}"


def profile(run, steps: int = PROFILE_STEPS) -> str:
    """A Markdown table: the operator time per step (self CPU time, ms) and its share, per operator family."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        run()
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())

    def row(family: str, us: float) -> str:
        return f"| {family} | {us / steps / 1000:.1f} | {100 * us / total:.1f}% |"

    rows, rest = [], total
    for family, names in FAMILIES.items():
        share = sum(self_us.get(name, 0) for name in names)
        rest -= share
        rows.append(row(family, share))
    rows.append(row("everything else (elementwise ops, optimizer, autograd, Python)", rest))
    rows.append(row("**all operators**", total))
    return "| operator family | ms per step | share of step time |\n|---|---|---|\n" + "\n".join(rows)


def together(variants: list[str], steps: int) -> str:
    """Every variant's model in this one process, their steps interleaved (the order reversed every other round),
    so that other load on the machine hits all alike: the robust way to compare step times on a shared machine.
    Variants that change the process (1thread, compile, fused) are for the separate-process mode."""
    steppers = {variant: stepper(variant) for variant in variants}
    for length in LENGTHS[:4]:  # warm-up
        for step in steppers.values():
            step(length)
    times = {variant: [] for variant in variants}
    for i in range(steps):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            times[variant].append(steppers[variant](LENGTHS[i % len(LENGTHS)]))
    first = statistics.median(times[variants[0]])
    rows = [f"| variant | step ms: min / median / max | median ÷ {variants[0]}'s |", "|---|---|---|"]
    for variant, seconds in times.items():
        low, median, high = (1000 * f(seconds) for f in (min, statistics.median, max))
        rows.append(f"| {variant} | {low:.0f} / {median:.0f} / {high:.0f} | {median / 1000 / first:.2f}x |")
    return "\n".join(rows)


def products() -> str:
    """A Markdown table: the backward products of LoRA's up-projection (T = 960 rows, r = 8) in autograd's operand
    order and transposed (the same sums), best of 3 x 100 calls each."""
    import torch

    def timed(f, n: int = 100) -> float:
        for _ in range(5):
            f()
        began = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - began) / n * 1e3

    rows = [
        "| layer (in -> out) | grad_W: g^T @ h | (h^T @ g)^T | grad_h: g @ W | (W^T @ g^T)^T |",
        "|---|---|---|---|---|",
    ]
    for out in (384, 1536):
        g, h, w = torch.randn(960, out), torch.randn(960, 8), torch.randn(out, 8)
        pairs = [
            lambda g=g, h=h: g.t() @ h,
            lambda g=g, h=h: (h.t() @ g).t(),
            lambda g=g, w=w: g @ w,
            lambda g=g, w=w: (w.t() @ g.t()).t(),
        ]
        best = [min(timed(f) for _ in range(3)) for f in pairs]
        rows.append(f"| 8 -> {out} | " + " | ".join(f"{ms:.3f} ms" for ms in best) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["base", "fused", "compile", "1thread", "fast_dropout"])
    parser.add_argument("--profile", action="store_true", help="profile base steps by operator family")
    parser.add_argument("--products", action="store_true", help="time LoRA's thin backward products alone")
    parser.add_argument("--together", type=int, metavar="STEPS", help="time the variants in one process, interleaved")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.products:
        print(products())
        return
    if args.profile:
        given = "--variants" in sys.argv
        print(worker(f"profile-{args.variants[0]}" if given else "profile"))
        return
    if args.together:
        print(together(args.variants, args.together))
        return
    if args.worker:
        print(worker(args.worker))
        return
    results = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            out = subprocess.run([sys.executable, __file__, "--worker", variant], capture_output=True, text=True,
                                 check=True).stdout.split()  # fmt: skip
            results[variant].append((float(out[-2]), float(out[-1])))
    print("| variant | warm-up s (incl. compilation) | step ms (median per round) | samples/s |\n|---|---|---|---|")
    for variant, runs in results.items():
        steps = [1000 * s for _, s in runs]
        print(
            f"| {variant} | {', '.join(f'{w:.0f}' for w, _ in runs)} | {', '.join(f'{s:.0f}' for s in steps)} | "
            f"{32000 / statistics.median(steps):.1f} |"
        )


if __name__ == "__main__":
    main()
