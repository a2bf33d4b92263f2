"""Sparse autoencoders: architectures, activation streaming, training, evaluation, SAELens I/O, splicing.

Modules (one job each, dictionary_learning style):

- ``base``: ``SAEConfig``, the ``SAE`` module (ReLU) and ``TopKSAE`` / ``JumpReLUSAE``; ``make_sae``.
- ``buffer``: shuffled activation batches for training, from harvested activations
  (``TensorSource``) or streamed from a model (``ActivationBuffer``), and token batches for the
  end-to-end objectives (``TokenSource``); the activation sources read activations
  through :func:`lib.activations.harvest`, the compendium's one activation path.
- ``trainer``: ``TrainConfig`` and ``Trainer`` (objectives local / e2e / e2e_ds; Adam, warm-ups, decay, dead-latent resampling,
  atomic checkpoints with resume, a live progress bar).
- ``metrics``: ``evaluate`` (our stated formulas) and ``compare_conventions`` (SAELens then and
  now, dictionary_learning).
- ``io``: ``save_sae`` / ``load_sae`` in SAELens's ``cfg.json`` + ``sae_weights.safetensors`` format.
- ``splice``: run a model with an SAE (or any replacement) spliced in at its hook; the end-to-end
  loss (``clean_pass``, ``e2e_loss``: KL to the clean output, + downstream residual MSE).
- ``recipe``: the setup notebooks 03-06 share (``prepare``: model, corpus documents, activations;
  ``SAEData.train`` / ``train_on``: an SAE trained on them).
- ``pitfalls``: the measurements behind notebook 03's before/after pairs.
- ``gated``: the gated SAE (three-term loss; ``aux=False`` for the ablation).
- ``shrinkage``: relative reconstruction bias gamma, closed forms and a numeric argmin.
- ``ito``: inference-time optimization (gradient / matching pursuit) for a fixed decoder.
- ``attribution``: exact patching, attribution patching and integrated gradients over latents.
- ``shared``: notebook 11: one SAE shared by every block trained with the LM (``JointObjective``), post-hoc
  per-block and multi-layer SAEs, splicing at every block, where latents fire across blocks.
- ``e2e``: notebook 08's protocol: local vs end-to-end SAEs along their L0-vs-CE-increase curves
  (``run_one``, ``matched``, ``across_seeds``) and the sharded sweep behind it (``python -m lib.sae.e2e``).
"""
from lib.sae.base import ARCHITECTURES, SAE, JumpReLUSAE, SAEConfig, TopKSAE, make_sae, register
from lib.sae.buffer import ActivationBuffer, BufferConfig, TensorSource, TokenSource
from lib.sae.io import load_sae, save_sae
from lib.sae.metrics import CONVENTIONS, collect, compare_conventions, evaluate, format_table, splice_check
from lib.sae.splice import clean_pass, e2e_loss, run_spliced, splice_hook
from lib.sae.trainer import Trainer, TrainConfig, train_sae
from lib.sae.recipe import SAEData, activation_scale, prepare, train_on
from lib.sae.gated import GatedSAE  # noqa: E402  (registers "gated" and "gated_noaux" with make_sae)

__all__ = [
    "ARCHITECTURES", "SAE", "JumpReLUSAE", "SAEConfig", "TopKSAE", "make_sae", "register",
    "ActivationBuffer", "BufferConfig", "TensorSource", "TokenSource", "clean_pass", "e2e_loss", "load_sae", "save_sae", "CONVENTIONS",
    "collect", "compare_conventions", "evaluate", "format_table", "splice_check", "run_spliced",
    "splice_hook", "Trainer", "TrainConfig", "train_sae", "GatedSAE", "SAEData", "activation_scale",
    "prepare", "train_on",
]
