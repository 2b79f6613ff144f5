"""Method registry: the recipe's `method.name` -> the module that implements it.

A method module defines (heavy imports stay inside functions, so `peftkit validate` starts fast):
  Config                 its recipe section, with `name: Literal[...]` and its own options (defaults live there)
  MERGEABLE              whether the trained update folds into the base weights
  NOT_MERGEABLE_BECAUSE  when not: why, and what to do instead (shown by `peftkit merge`)
  apply(model, config, context) -> model    freeze the base, add the method; only it and the head train
  after_optimizer_step(model, step)         optional: called after each optimizer step (AdaLoRA)
  rewrites_base(config) -> bool
                         optional, default False: the method trains or rewrites the base's weights, which are
                         then held in fp32 (full fine-tuning; LoRA's PiSSA/OLoRA init)
  RESTORE_BEST_EPOCH     optional, default True: end on the best validation epoch's weights (else the last's)
  training_state(model) -> dict, load_training_state(model, state)
                         optional: training state outside the weights and the optimizer that checkpoints must
                         hold for a resumed run to match an uninterrupted one (AdaLoRA's importance scores)
Storage is shared (methods/base.py): peft's format for peft methods, peftkit's for its own.
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

METHODS = {
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
