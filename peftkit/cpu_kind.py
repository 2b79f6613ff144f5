"""Does this CPU compute bf16 natively? The one place peftkit asks, and the switch that makes it act as the
other kind of CPU.

Three CPU kinds are seen among this project's machines, and they take different paths through peftkit and
bitsandbytes:

    CPU                              bf16 matmul vs fp32      peftkit `auto`      bitsandbytes 4-bit eval
    AMD EPYC, AVX2 only              emulated, 90-400x slower  fp32, SDPA          dequantise + fp32 matmul
    AMD EPYC with AVX512-BF16        native, ~1.8x faster      bf16, eager          repacked layout, bf16 kernel
    Intel Xeon with AMX              native, ~7x faster        bf16, eager          repacked layout, bf16 kernel

(the AMD ratios measured on 2 cores: benchmarks/RESULTS.md; the Intel one reported for that kind, not
measured in this repository). `PEFTKIT_CPU_BF16=native` or `=emulated` overrides the
detection, so that any machine runs the other kind's paths: the test suite uses it (CONTRIBUTING.md); on a
CPU without AVX512-BF16, `native` also turns on bitsandbytes' repacked 4-bit layout with a plain-torch copy of
its kernel (quant.py), slow but exact enough to test peftkit's side of it.
"""

import os

from peftkit.errors import UserError

ENV = "PEFTKIT_CPU_BF16"
CHOICES = ("native", "emulated")


def forced() -> str | None:
    """The override in PEFTKIT_CPU_BF16 ('native' / 'emulated'), or None to detect."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in CHOICES:
        raise UserError(f"{ENV}={value!r}: expected one of {', '.join(CHOICES)} (or unset it to detect the CPU)")
    return value


def cpu_bf16_native() -> bool:
    """True where the CPU computes bf16 matmuls in hardware (AMX, or AVX512-BF16), or PEFTKIT_CPU_BF16=native."""
    choice = forced()
    if choice is not None:
        return choice == "native"
    import torch

    # private but stable helpers (torch >= 2.2): the same checks oneDNN makes before taking its bf16 kernels
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


def describe() -> str:
    """One line for logs and benchmark reports: which kind peftkit takes this CPU for, and why."""
    choice = forced()
    native = cpu_bf16_native()
    kind = "bf16-native" if native else "bf16-emulated"
    return f"{kind} CPU ({ENV}={choice})" if choice else f"{kind} CPU (detected)"


if __name__ == "__main__":  # `python -m peftkit.cpu_kind [--other]`: this CPU's kind, or the other one's switch value
    import sys

    if "--other" in sys.argv[1:]:
        print("emulated" if cpu_bf16_native() else "native")
    else:
        print(describe())
