"""Sharing adapters: `peftkit push` to the Hugging Face Hub or a local directory hub, pulling by name, model cards."""
