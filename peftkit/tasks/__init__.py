"""Task registry: the recipe's `task.type` -> the module that implements it.

A task module follows `tasks.common.Task` (its constants, its recipe section, and load_model, preprocess,
collator, eval_outputs, compute_metrics, predict); tests/test_contracts.py checks every entry. Heavy imports stay
inside its functions. Adding a task = one new file + one line here.
"""

from peftkit.tasks import causal_lm, classification, question_answering, token_classification
from peftkit.tasks.common import Task

TASKS: dict[str, Task] = {
    "classification": classification,
    "token_classification": token_classification,
    "question_answering": question_answering,
    "causal_lm": causal_lm,
}
