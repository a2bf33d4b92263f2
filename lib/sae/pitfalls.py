"""The seed's evaluation pitfalls, each as a measured (wrong, right) pair (notebook 03).

(a) MSE averaged over dimensions instead of summed; (b) variance without the mean subtracted:
both read off one :class:`~lib.sae.metrics.ReconStats` (:func:`reconstruction_pairs`).
(c) padding tokens counted in CE: :func:`padding_in_ce`.
(d) an SAE trained on short contexts evaluated on longer ones: :func:`context_length_rows`.
(e) MSE normalised by the batch variance makes the L1 weight depend on the activation scale:
:func:`scale_dependence`.
(f) splicing the original activations back must reproduce the clean CE: :func:`splice_identity`.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

import torch

from lib.activations import TokenBatch, batch_activations, tokenize
from lib.sae.base import SAEConfig
from lib.sae.buffer import TensorSource
from lib.sae.metrics import EvalStats, ReconStats, splice_check, token_ce
from lib.sae.splice import replacement_hook, run_spliced, sae_replacement, tensor_replacement, zero_replacement
from lib.sae.trainer import TrainConfig, train_sae


def reconstruction_pairs(stats: EvalStats) -> dict:
    """(a) and (b) from the counted tokens of one evaluation."""
    r = stats.recon["ours"]
    return {
        "a_mse_mean_vs_sum": {"wrong": r.mse_mean_over_dims, "right": r.mse, "ratio": r.mse / r.mse_mean_over_dims},
        "b_variance_without_mean": {"wrong": r.var_explained_about_zero, "right": r.var_explained},
    }


def variable_length_texts(docs: Sequence[str], seed: int = 0, min_sentences: int = 1, max_sentences: int = 4) -> list[str]:
    """Each document cut to its first 1..4 sentences: short, variable-length texts that need padding."""
    rng = random.Random(seed)
    out = []
    for doc in docs:
        sentences = [s for s in doc.replace("? ", ". ").split(". ") if s]
        n = rng.randint(min_sentences, max_sentences)
        out.append(". ".join(sentences[:n]).rstrip(".") + ".")
    return out


@torch.no_grad()
def padding_in_ce(sae, model, batch: TokenBatch, batch_size: int = 16, hook: str | None = None) -> dict:
    """(c) CE with padding counted (spliced and ablated everywhere, every target counted, as code
    that ignores the attention mask does) vs ours (pads neither spliced nor counted); at the
    SAE's hook unless ``hook`` says otherwise.  ``pad_target_ce``: the clean CE of the pad targets
    alone (counting pads lowers the clean CE exactly when it is below the real targets' CE);
    ``pad_id``: the id the batch is padded with (re-pad with :func:`lib.activations.pad` to try
    another, e.g. EOS as many pipelines do)."""
    hook = replacement_hook(sae, hook)
    fn = sae_replacement(sae)
    sums = {k: {"clean": 0.0, "spliced": 0.0, "zero": 0.0} for k in ("wrong", "right")}
    counts = {"wrong": 0, "right": 0}
    pad_ce, n_pad = 0.0, 0  # the clean CE of the pad targets alone
    device = next(model.parameters()).device
    for i in range(0, len(batch), batch_size):
        b = batch[i: i + batch_size]
        toks = b.tokens.to(device)
        clean = token_ce(run_spliced(model, toks, None), toks)
        runs = {
            "wrong": (token_ce(run_spliced(model, toks, fn, None, hook=hook), toks),
                      token_ce(run_spliced(model, toks, zero_replacement, None, hook=hook), toks),
                      torch.ones_like(b.attention_mask[:, 1:])),
            "right": (token_ce(run_spliced(model, toks, fn, b.counted_mask(), hook=hook), toks),
                      token_ce(run_spliced(model, toks, zero_replacement, b.counted_mask(), hook=hook), toks),
                      b.attention_mask[:, 1:]),
        }
        pads = ~b.attention_mask[:, 1:].to(clean.device)
        pad_ce += float(clean[pads].double().sum())
        n_pad += int(pads.sum())
        for k, (spliced, zero, mask) in runs.items():
            m = mask.to(clean.device)
            sums[k]["clean"] += float(clean[m].double().sum())
            sums[k]["spliced"] += float(spliced[m].double().sum())
            sums[k]["zero"] += float(zero[m].double().sum())
            counts[k] += int(m.sum())
    out = {}
    for k in ("wrong", "right"):
        c, s, z = (sums[k][n] / counts[k] for n in ("clean", "spliced", "zero"))
        out[k] = {"ce_clean": c, "ce_spliced": s, "ce_zero_ablated": z, "loss_recovered": (z - s) / (z - c),
                  "n_ce_tokens": counts[k]}
    out["pad_fraction"] = 1 - counts["right"] / counts["wrong"]
    out["pad_target_ce"] = pad_ce / n_pad if n_pad else float("nan")
    out["pad_id"] = int(batch.tokens[~batch.attention_mask][0]) if n_pad else None
    return out


@torch.no_grad()
def context_length_rows(sae, model, batch: TokenBatch, split: int = 128, batch_size: int = 16,
                        label: str = "", hook: str | None = None) -> list[dict]:
    """(d) Reconstruction and CE by position bucket: positions < ``split`` (the SAE's training
    context) and >= ``split``, with the SAE spliced at every counted position of long contexts."""
    hook = replacement_hook(sae, hook)
    fn = sae_replacement(sae)
    p = next(sae.parameters())
    device = next(model.parameters()).device
    buckets = {"< %d" % split: None, ">= %d" % split: None}
    recon = {k: ReconStats(sae.cfg.d_in, sae.cfg.d_sae) for k in buckets}
    ce = {k: {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "n": 0} for k in buckets}
    for i in range(0, len(batch), batch_size):
        b = batch[i: i + batch_size]
        toks = b.tokens.to(device)
        act = batch_activations(model, b, hook)[hook]
        counted = b.counted_mask()
        pos = torch.arange(toks.shape[1])[None].expand_as(counted)
        clean = token_ce(run_spliced(model, toks, None), toks)
        spliced = token_ce(run_spliced(model, toks, fn, counted, hook=hook), toks)
        zero = token_ce(run_spliced(model, toks, zero_replacement, counted, hook=hook), toks)
        for key, in_bucket in (("< %d" % split, pos < split), (">= %d" % split, pos >= split)):
            m = counted & in_bucket
            x = act[m.to(act.device)].to(p.device, p.dtype)
            x_hat, f = sae(x, output_features=True)
            recon[key].add(x, x_hat, f)
            tm = (b.attention_mask & in_bucket)[:, 1:].to(clean.device)  # targets in the bucket
            for name, v in (("clean", clean), ("spliced", spliced), ("zero", zero)):
                ce[key][name] += float(v[tm].double().sum())
            ce[key]["n"] += int(tm.sum())
    rows = []
    for key in buckets:
        c, s, z = (ce[key][n] / ce[key]["n"] for n in ("clean", "spliced", "zero"))
        rows.append({"model": label, "positions": key, "mse": recon[key].mse, "var_explained": recon[key].var_explained,
                     "l0": recon[key].l0, "ce_clean": c, "ce_spliced": s, "loss_recovered": (z - s) / (z - c)})
    return rows


def scale_dependence(acts: torch.Tensor, sae_cfg: SAEConfig, train_cfgs: dict[str, TrainConfig],
                     scales: Sequence[float] = (0.25, 1.0, 4.0), n_eval: int = 8192) -> list[dict]:
    """(e) Train the same SAE on ``scale * acts`` for each scale and each loss in ``train_cfgs``
    (``{label: TrainConfig}``, each with its own ``recon`` and coefficient); report L0 and the
    fraction of variance explained on held-out activations (the last ``n_eval`` rows).

    Training is made equivariant to the scale (bias learning rate times the scale, no gradient
    clipping; see :func:`lib.sae.trainer.param_groups`), so whatever changes with the scale is the
    loss's doing, not Adam's."""
    train, held = acts[:-n_eval], acts[-n_eval:]
    rows = []
    for label, tc in train_cfgs.items():
        for c in scales:
            tc_c = replace(tc, bias_lr_scale=tc.bias_lr_scale * c, grad_clip=None)
            source = TensorSource(train, tc.batch_size, seed=tc.seed, device=acts.device, scale=c)
            sae, _ = train_sae(sae_cfg, source, tc_c, device=acts.device)
            with torch.no_grad():
                x = c * held
                x_hat, f = sae(x, output_features=True)
            s = ReconStats(sae_cfg.d_in, sae_cfg.d_sae)
            s.add(x, x_hat, f)
            rows.append({"loss": label, "scale": c, "l0": s.l0, "var_explained": s.var_explained})
    return rows


@torch.no_grad()
def splice_identity(model, hook: str, texts: Sequence[str], context_size: int = 128) -> dict:
    """(f) Splice the original activations back in: exactly the clean CE ("right").  "wrong": the
    activations come from a run tokenised without BOS (what ``model.to_tokens(texts)`` gives for a
    GPT-NeoX model, whose ``default_prepend_bos`` is False), spliced position-aligned into the
    BOS-prefixed run, the kind of mismatch this check exists to catch."""
    right = splice_check(model, list(texts), hook=hook, context_size=context_size)
    with_bos = tokenize(model, texts, context_size, prepend_bos=True)
    no_bos = tokenize(model, texts, context_size - 1, prepend_bos=False)
    acts = batch_activations(model, no_bos, hook)[hook]
    aligned = batch_activations(model, with_bos, hook)[hook].clone()  # BOS position keeps its own value
    width = min(acts.shape[1], aligned.shape[1] - 1)
    aligned[:, 1: 1 + width] = acts[:, :width]
    wrong = splice_check(model, with_bos, tensor_replacement(aligned), hook=hook, batch_size=len(with_bos))
    return {"wrong": wrong["ce_spliced"], "right": right["ce_spliced"], "ce_clean": right["ce_clean"],
            "right_max_abs_logit_diff": right["max_abs_logit_diff"],
            "wrong_max_abs_logit_diff": wrong["max_abs_logit_diff"]}
