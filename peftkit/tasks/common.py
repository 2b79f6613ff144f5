"""What several tasks share."""


def load_labelled_model(auto_class: str, path: str, labels: list[str], tokenizer, **kwargs):
    """A transformers `Auto...` model with a fresh head over `labels` (ids in their order)."""
    import transformers

    model = getattr(transformers, auto_class).from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **kwargs,
    )
    # Decoder models (GPT-2, Llama) need the pad id on the config, not only on the tokenizer: their classification
    # heads read it to find each row's last token, and refuse batches of more than one row without it.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model
