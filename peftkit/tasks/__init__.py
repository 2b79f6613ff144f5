"""Task registry: the recipe's `task.type` -> the module that implements it.

A task module defines, with heavy imports kept inside its functions:
  Config            its recipe section (`type: Literal[...]` plus its own options)
  COLUMNS           roles it reads from the data (role -> required?); data.columns maps roles to source columns
  TEXT_ROLES        those of COLUMNS that hold text: an empty one fails or is dropped (data.empty_texts)
  LABEL_ROLE        the column that `data.labels` applies to (None when the task has no label set)
  LABELS_PER_TOKEN  whether that column holds one label per row or a list, one per token
  SPLIT_BY          a column whose rows must stay in one split when splits are cut (None: split row by row)
  METRICS           names of what `compute_metrics` returns; eval.metric_for_best must be one of them
  PEFT_TASK_TYPE    peft's task type, so a saved adapter loads with plain `PeftModel.from_pretrained`
  HEAD_MODULES      names the head may have (the ones the model has are trained in full and saved)
  load_model(path, labels, tokenizer, **kwargs), preprocess(splits, tokenizer, config), collator(tokenizer),
  eval_outputs(outputs, batch), compute_metrics(preds, refs, labels, config, features), predict(...)
Adding a task = one new file + one line here.
"""

from peftkit.tasks import causal_lm, classification, question_answering, token_classification

TASKS = {
    "classification": classification,
    "token_classification": token_classification,
    "question_answering": question_answering,
    "causal_lm": causal_lm,
}
