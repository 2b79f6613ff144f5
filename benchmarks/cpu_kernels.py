"""Which precision and attention kernel to use on this machine: the measurements behind `train.precision: auto`
and `model.attn_implementation: auto`.

    .venv/bin/python benchmarks/cpu_kernels.py          # prints a Markdown table; ~2 minutes on 2 CPU cores

Measures (1) the matmul rate in fp32 and bf16 (the peak `peftkit bench` computes MFU against), (2) LoRA
training and inference throughput of the real all-MiniLM-L6-v2 (batch 32 x 30 tokens) with eager vs SDPA
attention, in fp32 and, where the CPU computes bf16 natively, under bf16 autocast.
"""

import platform
import time

import torch

from peftkit import assets, devices, measure


def lora_model(attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    path = assets.resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=attn)
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS"))


def lora_rates(model, bf16: bool, steps=5) -> tuple[float, float]:
    model.train()
    ids, labels = torch.randint(1000, 20000, (32, 30)), torch.randint(0, 2, (32,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(steps + 2):
            if i == 2:
                start = time.perf_counter()
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        train_rate = 32 * steps / (time.perf_counter() - start)
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
            start = time.perf_counter()
            for _ in range(steps):
                model(input_ids=ids)
        eval_rate = 32 * steps / (time.perf_counter() - start)
    return train_rate, eval_rate


def main():
    cpu = torch.device("cpu")
    native_bf16 = devices.resolve_precision("auto", cpu) == "bf16"
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    peak = {p: measure.matmul_peak_tflops(p, cpu) for p in ("fp32", "bf16")}  # what `peftkit bench` divides by
    print(f"matmul: fp32 {peak['fp32']:.3f} TFLOP/s, bf16 {peak['bf16']:.4f} "
          f"TFLOP/s (native bf16: {native_bf16})\n")  # fmt: skip
    models = {attn: lora_model(attn) for attn in ("eager", "sdpa")}
    print("| precision | attention | train samples/s (min / median / max) | inference samples/s |\n|---|---|---|---|")
    for bf16 in [False, True] if native_bf16 else [False]:
        runs = {attn: [] for attn in models}
        for _ in range(3):  # alternate A B A B ... so that machine drift hits both alike
            for attn, model in models.items():
                runs[attn].append(lora_rates(model, bf16))
        for attn, rates in runs.items():
            train_rates = sorted(r[0] for r in rates)
            eval_rates = sorted(r[1] for r in rates)
            print(
                f"| {'bf16' if bf16 else 'fp32'} | {attn} | {' / '.join(f'{r:.0f}' for r in train_rates)} | "
                f"{eval_rates[1]:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
