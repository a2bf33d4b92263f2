"""Compressed computation: the residual MLP of APD (Braun et al. 2025), many copies trained at once.

One module a job (the problem is described in :mod:`.model`):

- ``model``: configuration, data, embeddings and mixing, the model in effective form, the naive
  baseline, the specs of the notebook's sweeps.
- ``train``: :func:`train_reference`, the plain dense training loop (the definition), and
  :func:`train_models`, the batched engine that computes the same thing fast; evaluation.
- ``sparse``: the engine's products over the present entries of a sparse batch.
- ``analysis``: what a trained MLP does, and parameter-component attributions.
- ``report``: notebook 07's tables and figures.
- ``sweep``: the committed sweep notebook 07 loads (``make cc-sweep``): every p and sigma, 3 seeds,
  10,000 steps, run job by job and resumable.

Everything public is importable from the package, e.g. ``cc.train_models``, ``cc.sweep_table``.
"""
from lib.toys.compressed_computation.analysis import (attribution_experiment, attribution_table, classify_features,
                                                      component_attributions, eigenspace_overlap, feature_fidelity,
                                                      feature_response, feature_summary, masked_sample_loss,
                                                      neuron_feature_counts)
from lib.toys.compressed_computation.model import (E_RELU_SQ, E_X_SQ, EMBEDDINGS, ModelSpec, TrainConfig, make_embedding,
                                                   make_mixing, matched_sigma, mlp_out, mlp_target, model_matrices,
                                                   naive_loss_analytic, naive_weights, num_threads, per_feature_loss,
                                                   sample_active_rows, sample_features, sample_sparse, sigma_specs,
                                                   sweep_specs)
from lib.toys.compressed_computation.report import (example_features, length_table, mlp_anatomy, naive_comparison,
                                                    paired_verdict, plot_curves, plot_loss_panels, plot_responses,
                                                    plot_sigma, plot_sweep, results_frame, results_record, sigma_table,
                                                    sweep_table)
from lib.toys.compressed_computation.sweep import load_sweep, run_sweep, sweep_plan
from lib.toys.compressed_computation.train import (TrainedModels, evaluate, evaluate_weights, naive_models,
                                                   train_models, train_reference)

__all__ = [
    "attribution_experiment", "attribution_table", "classify_features", "component_attributions",
    "eigenspace_overlap", "feature_fidelity", "feature_response", "feature_summary", "masked_sample_loss",
    "neuron_feature_counts", "E_RELU_SQ", "E_X_SQ", "EMBEDDINGS", "ModelSpec", "TrainConfig",
    "make_embedding", "make_mixing", "matched_sigma", "mlp_out", "mlp_target", "model_matrices",
    "naive_loss_analytic", "naive_weights", "num_threads", "per_feature_loss", "sample_active_rows",
    "sample_features", "sample_sparse", "sigma_specs", "sweep_specs", "example_features", "mlp_anatomy",
    "length_table", "naive_comparison", "paired_verdict", "load_sweep", "run_sweep", "sweep_plan",
    "plot_curves", "plot_loss_panels", "plot_responses", "plot_sigma", "plot_sweep", "results_frame",
    "results_record", "sigma_table", "sweep_table", "TrainedModels", "evaluate", "evaluate_weights", "naive_models",
    "train_models", "train_reference",
]
