"""Experiments over many runs: `peftkit bench` (a recipe x method x bits matrix) and `peftkit sweep` (a grid of
overrides), each run in a process of its own."""
