"""Datasets as Geometry of Truth-style CSVs (``statement``, ``label``, ...), one module a kind:

- ``files``: the CSV format: reading with validation and clear errors, atomic writing.
- ``truth``: the truth datasets (cities, translations, comparisons, their negations, conjunctions
  and disjunctions), generated from the toy world or read from a folder of the original CSVs;
  contrast pairs, and what each statement is about (``fact_keys``, ``object_tokens``).
- ``xor``: the XOR datasets of notebook 02 (``cities_alice``, ``cities_distractor`` and their
  negations from the toy world; ``xor`` sampled from a model).

The probing protocol built on them lives in :mod:`lib.truth` (notebook 01) and :mod:`lib.xor`
(notebook 02).  Everything public is importable from ``lib.datasets`` directly.
"""
from lib.datasets.files import (REQUIRED_COLUMNS, DatasetFormatError, available_truth_datasets, read_truth_csv,
                                validate_truth_frame, write_dataset_csv)
from lib.datasets.truth import (NEGATED, NEGATIONS, TRUTH_DATASETS, contrast_pairs, fact_keys, generate_truth_datasets,
                                load_truth_datasets, make_truth_dataset, negation_partner, object_features,
                                object_tokens)
from lib.datasets.xor import (CITY_XOR_DATASETS, XOR_SEP, XOR_WORDS, add_xor_columns, generate_xor_datasets,
                              make_cities_alice, make_cities_distractor, make_city_xor_dataset, make_xor_dataset,
                              xor_name)

__all__ = [
    "REQUIRED_COLUMNS", "DatasetFormatError", "available_truth_datasets", "read_truth_csv", "validate_truth_frame",
    "write_dataset_csv", "NEGATED", "NEGATIONS", "TRUTH_DATASETS", "contrast_pairs", "fact_keys",
    "generate_truth_datasets", "load_truth_datasets", "make_truth_dataset", "negation_partner", "object_features",
    "object_tokens", "CITY_XOR_DATASETS", "XOR_SEP", "XOR_WORDS", "add_xor_columns", "generate_xor_datasets",
    "make_cities_alice", "make_cities_distractor", "make_city_xor_dataset", "make_xor_dataset", "xor_name",
]
