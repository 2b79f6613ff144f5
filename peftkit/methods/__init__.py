"""Method registry: the recipe's `method.name` -> the module that implements it.

A method module defines `Config` (its recipe section, with `name: Literal[...]`), `MERGEABLE`, and
`apply(model, config, head_modules, peft_task_type) -> model`. Heavy imports stay inside `apply` so that
`peftkit validate` starts fast. Adding a method = one new file + one line here.
"""

from peftkit.methods import lora

METHODS = {
    "lora": lora,
}
