"""`peftkit init`: a commented recipe designed from a data file and a model."""
