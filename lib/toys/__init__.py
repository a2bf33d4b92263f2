"""Small self-contained toy models (pure torch, no language model): ``compressed_computation``."""
