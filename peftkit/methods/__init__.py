"""Method registry: the recipe's `method.name` -> the module that implements it.

A method module follows `methods.base.Method` (Config, FORMAT, MERGEABLE, apply) and may define the optional
hooks and settings listed with their defaults in `methods.base.OPTIONAL` (AdaLoRA's step hook and training
state, the prompt methods' padding side, LoRA's own save, ...); tests/test_contracts.py checks every entry.
Heavy imports stay inside functions, so `peftkit validate` starts fast. The helpers a method's `apply` uses are
in methods/base.py; saving and loading adapters, in methods/storage.py.
Adding a method = one new file + one line here.
"""

from peftkit.methods import (
    adalora,
    bottleneck,
    full,
    ia3,
    loha,
    lokr,
    lora,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
    vera,
)
from peftkit.methods.base import Method

METHODS: dict[str, Method] = {
    "lora": lora,
    "ia3": ia3,
    "loha": loha,
    "lokr": lokr,
    "vera": vera,
    "adalora": adalora,
    "prompt_tuning": prompt_tuning,
    "p_tuning": p_tuning,
    "prefix_tuning": prefix_tuning,
    "bottleneck": bottleneck,
    "full": full,
}
