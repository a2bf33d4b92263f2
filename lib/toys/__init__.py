"""Small self-contained toy models (pure torch, no language model): ``compressed_computation``,
``xor_clusters``, and for notebook 10 the sequence ``languages``, the ``batched_transformer`` they
train and the ``decay`` protocol (with ``decay_report`` for its tables and figures)."""
