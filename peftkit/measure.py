"""The one place where throughput and memory are measured, so every number peftkit reports agrees."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

log = logging.getLogger("peftkit")


class Throughput:
    """Samples and non-padding tokens per second over the steps it has seen; time spent `paused()` (evaluation
    between epochs) does not count."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.samples = 0
        self.tokens = 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began

    def update(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.samples += int(batch["input_ids"].shape[0])
        mask = batch.get("attention_mask")
        # summed where the batch is (a tensor on a GPU): reading it every step would make the host wait for the
        # GPU each step; rates() reads it once per log interval
        self.tokens = self.tokens + (mask.sum() if mask is not None else batch["input_ids"].numel())

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def rates(self, accelerator: Accelerator | None = None) -> dict:
        """Rates of the whole job: with several processes, their samples and tokens are summed (a collective
        call: every process must make it) over the slowest one's time."""
        samples, tokens, seconds = self.samples, int(self.tokens), max(self.elapsed, 1e-9)
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            summed = accelerator.reduce(torch.tensor([samples, tokens], device=accelerator.device), "sum")
            samples, tokens = (int(v) for v in summed.tolist())
            seconds = accelerator.reduce(torch.tensor(seconds, device=accelerator.device), "max").item()
        return {
            "samples_per_s": samples / seconds,
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
            "tokens": tokens,
        }


def peak_memory(device: torch.device) -> dict:
    """Peak memory in MiB since the start or the last `reset_peak_memory`: allocated/reserved on CUDA, resident
    set size of this process on CPU."""
    import torch

    if device.type == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    hwm = _proc_status("VmHWM")  # Linux: resettable, unlike getrusage's lifetime maximum
    if hwm is not None:
        return {"peak_rss_mib": hwm}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_mib": rss / (2**20 if sys.platform == "darwin" else 2**10)}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: training's own, apart from loading (which briefly holds weights twice)."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # other systems: the peak stays the lifetime one
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def memory_now(device: torch.device) -> dict:
    """Memory in use right now (MiB): allocated on CUDA, resident set size on CPU (Linux)."""
    import torch

    if device.type == "cuda":
        return {"allocated_mib": torch.cuda.memory_allocated(device) / 2**20}
    rss = _proc_status("VmRSS")
    return {"rss_mib": rss} if rss is not None else {}


class MemoryTimeline:
    """This process's memory (memory_now: resident set on CPU, allocated on CUDA) sampled on a background thread
    from start() to stop(), with the run's phases marked as they begin: where a run's memory went, beside the peaks
    peak_memory() gives. Every `interval` seconds; when MAX_SAMPLES are taken, every other one is dropped and the
    interval doubles, so an hours-long run keeps a timeline of the same size as a minute's."""

    MAX_SAMPLES = 2000

    def __init__(self, device: torch.device, interval: float = 0.25) -> None:
        self.device, self.interval = device, interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.events: list[tuple[float, str]] = []  # (seconds since start, the phase that begins)
        self._start = time.perf_counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peftkit-memory", daemon=True)

    def start(self) -> MemoryTimeline:
        self._thread.start()
        return self

    def mark(self, phase: str) -> None:
        self.events.append((time.perf_counter() - self._start, phase))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            now = memory_now(self.device)
            if now:
                self.samples.append((time.perf_counter() - self._start, next(iter(now.values()))))
            if len(self.samples) >= self.MAX_SAMPLES:
                self.samples, self.interval = self.samples[::2], 2 * self.interval
            if self._done.wait(self.interval):
                return

    def save(self, path: Path, plot: Path) -> None:
        """The timeline as JSON at `path`, and as a PNG at `plot` where matplotlib is installed (the bench extra)."""
        kind = "allocated" if self.device.type == "cuda" else "resident set"
        record = {"memory": f"{kind}, MiB", "samples": self.samples, "events": self.events}
        path.write_text(json.dumps(record), encoding="utf-8")
        plt = pyplot("memory timeline")
        if plt is None:
            return
        figure, axes = plt.subplots(figsize=(9, 3.5))
        if self.samples:
            axes.plot(*zip(*self.samples), color="tab:blue", linewidth=1)
        named = set()
        for when, phase in self.events:
            axes.axvline(when, color="grey", linewidth=0.6, linestyle=":")
            if phase not in named:  # "training" again after each validation: named once
                axes.annotate(phase, (when, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", fontsize=7)
                named.add(phase)
        axes.set(xlabel="seconds", ylabel=f"{kind} (MiB)", title="memory during the run")
        axes.set_ylim(bottom=0)
        figure.tight_layout()
        figure.savefig(plot, dpi=100)
        plt.close(figure)


def pyplot(what: str) -> Any:
    """matplotlib's pyplot drawing to files only, or None (logged, naming `what`) where it is not installed: plots
    are extras (the bench extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        log.debug("%s: no plot (pip install 'peftkit[bench]' for matplotlib)", what)
        return None
    return plt


def model_mib(model: torch.nn.Module) -> float:
    """Size of the model's weights and buffers as loaded (an 8/4-bit base counts its packed bytes)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _proc_status(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**10  # kB -> MiB
    except OSError:
        pass
    return None


def parameter_counts(model: torch.nn.Module) -> dict:
    """Trainable and total parameters; a 4-bit weight counts as the matrix it stands for, not its packed bytes."""

    def count(p: torch.nn.Parameter) -> int:
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: numel() is the packed uint8 size
        return math.prod(state.shape) if state is not None else p.numel()

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / total}


def training_flops_per_token(model: torch.nn.Module) -> float:
    """Model FLOPs of one training token: 2 per weight of every matmul layer forward, 2 more backward for the
    input gradients, and 2 more for the weight gradients of trainable matmul weights only (a frozen base needs
    none): 4N + 2T, which is the usual 6N for full fine-tuning. Embedding lookups cost none; attention-score
    FLOPs are left out, as in most MFU figures (small at these sequence lengths)."""
    import torch

    total = trainable = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear):  # bitsandbytes' 8/4-bit layers are Linear subclasses
            size = module.in_features * module.out_features  # a 4-bit weight's numel is its packed size
        elif type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2's transposed linear
            size = weight.numel()
        else:
            continue
        total += size
        trainable += size if weight is not None and weight.requires_grad else 0
    return 4.0 * total + 2.0 * trainable


def matmul_peak_tflops(precision: str, device: torch.device, repeat: int = 5) -> float:
    """The machine's measured matmul rate (TFLOP/s) in the given precision: the denominator of model FLOPs
    utilisation. The matrix grows until one product takes 50 ms (up to 2048 on CPU, 8192 on GPU), so a precision
    the hardware only emulates (bf16 on CPUs without AMX: 90-400x slower here) is measured in seconds, not minutes; the
    best of `repeat` timed products is kept."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    largest = 8192 if device.type == "cuda" else 2048

    def seconds(a: torch.Tensor, b: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        seconds(a, b)  # warm-up
        if n >= largest or seconds(a, b) > 0.05:
            break
        n *= 2
    best = min(seconds(a, b) for _ in range(repeat))
    return 2 * n**3 / best / 1e12
