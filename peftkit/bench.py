"""The one place where throughput and memory are measured, so every number peftkit reports agrees."""

import resource
import sys
import time


class Throughput:
    """Samples and non-padding tokens per second over the steps it has seen."""

    def __init__(self):
        self.start = time.perf_counter()
        self.samples = 0
        self.tokens = 0

    def update(self, batch) -> None:
        self.samples += int(batch["input_ids"].shape[0])
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rates(self) -> dict:
        seconds = max(self.elapsed, 1e-9)
        return {"samples_per_s": self.samples / seconds, "tokens_per_s": self.tokens / seconds, "seconds": seconds}


def peak_memory(device) -> dict:
    """Peak memory in MiB: allocated/reserved on CUDA, resident set size of this process on CPU."""
    import torch

    if device.type == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_mib": rss / (2**20 if sys.platform == "darwin" else 2**10)}


def parameter_counts(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}
