"""peftkit: parameter-efficient fine-tuning from a short YAML recipe."""

__version__ = "0.1.0"
