"""SAE evaluation with one stated formula per metric, and the same SAE scored under other libraries' conventions.

Our convention (``evaluate``).  ``T`` is the set of counted tokens: real (non-pad) positions,
minus the BOS position (``exclude=("bos", "pad")``, the default); ``x_t`` the activation at the
SAE's hook,
``x_hat_t`` the SAE's reconstruction, ``f_t`` its latents, ``e_t = x_hat_t - x_t``.

==================  =====================================================================
``mse``             ``(1/|T|) sum_t sum_d e_td^2``  (summed over the activation dimension)
``var_explained``   ``1 - sum_t ||e_t||^2 / sum_t ||x_t - xbar||^2``, ``xbar = mean_T x``
``l1``              ``(1/|T|) sum_t sum_i |f_ti|``
``l0``              ``(1/|T|) sum_t #{i : f_ti != 0}``
``frac_alive``      ``#{i : f_ti != 0 for some t in T} / d_sae``, over ``n_tokens = |T|`` tokens
``ce_clean``        mean next-token cross-entropy over targets that are real tokens
``ce_spliced``      the same with ``x_hat`` spliced in at every position of ``T``
``ce_zero_ablated`` the same with the activation zeroed at every position of ``T``
``loss_recovered``  ``(ce_zero_ablated - ce_spliced) / (ce_zero_ablated - ce_clean)``
``kl``              ``(1/|T|) sum_t KL(p_clean(t) || p_spliced(t))`` (with ``downstream=``)
``downstream_mse``  mean over later hooks of the spliced-vs-clean MSE averaged over elements
==================  =====================================================================

Padding never enters: not in ``T``, not as a CE target, not spliced.  The BOS position keeps its
clean activation in every run (splice and ablation touch the same positions, ``T``).

Other conventions (``collect(...).metrics(name)``, ``compare_conventions``), from the libraries'
public code:

- ``"saelens_now"`` (SAELens 6.x): tokens are those whose id is not BOS/EOS/PAD; ``mse`` and
  ``explained_variance`` as ours over that set; CE splices at those tokens but zero-ablates
  *every* position, and averages over positions whose *input* token is not special (so the
  prediction made at the last real token, whose target is a pad, is counted).
- ``"saelens_old"`` (before the 2026 fixes): as now, but ``mse`` is additionally divided by
  the number of tokens in the eval batch, and ``explained_variance`` is
  ``1 - mean_b E_t||e||^2 / (mean_b E_t||x||^2 - (mean_{b,d} E_t x_d^2)^2)``: the variance
  measured about zero (less a tiny scalar), not about the mean.
- ``"dictionary_learning"``: ``l2_loss = mean_t ||e_t||`` (unsquared); ``frac_variance_explained
  = 1 - sum_d var_t(e_d) / sum_d var_t(x_d)`` (so a constant offset in ``x_hat`` costs
  nothing); ``frac_alive`` over one batch (``DL_ALIVE_TOKENS`` tokens); loss recovered splices
  and zero-ablates at *every* position (BOS and pads included) and ignores only pad targets.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from lib.activations import TokenBatch, batch_activations, tokenize
from lib.sae.splice import (as_replacement, replacement_hook, run_spliced, sae_replacement, splice_hook,
                            zero_replacement)
from lib.utils import as_names

CONVENTIONS = ("ours", "saelens_old", "saelens_now", "dictionary_learning")
DL_ALIVE_TOKENS = 8192  # the seed: "whether neurons are alive on a (somewhat small) batch of 8192 tokens"


def token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos-1] cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (float32)."""
    lp = logits[:, :-1].float().log_softmax(-1)
    return -lp.gather(-1, tokens[:, 1:, None].to(lp.device)).squeeze(-1)


@dataclass
class ReconStats:
    """Streaming float64 sums over a token set, from which every reconstruction metric follows."""

    d_in: int
    d_sae: int
    n: int = 0
    sse: float = 0.0  # sum_t ||e_t||^2
    sum_enorm: float = 0.0  # sum_t ||e_t||
    sum_x2: float = 0.0  # sum_t ||x_t||^2
    sum_l1: float = 0.0
    sum_l0: float = 0.0
    sum_x: torch.Tensor = None  # [d_in]
    sum_e: torch.Tensor = None  # [d_in]
    fired: torch.Tensor = None  # [d_sae] bool, over all tokens
    fired_first: torch.Tensor = None  # [d_sae] bool, over the first DL_ALIVE_TOKENS tokens
    n_first: int = 0
    per_batch: list = field(default_factory=list)  # (n_b, sse_b, sum_x2_b) for saelens_old
    density: torch.Tensor = None  # [d_sae] count of tokens on which each latent fired

    def __post_init__(self):
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64)
        self.sum_e = torch.zeros(self.d_in, dtype=torch.float64)
        self.fired = torch.zeros(self.d_sae, dtype=torch.bool)
        self.fired_first = torch.zeros(self.d_sae, dtype=torch.bool)
        self.density = torch.zeros(self.d_sae, dtype=torch.float64)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """x, x_hat: [n, d_in]; f: [n, d_sae]."""
        if len(x) == 0:
            return
        x, x_hat, f = x.double().cpu(), x_hat.double().cpu(), f.cpu()
        e = x_hat - x
        e2 = e.pow(2).sum(-1)
        active = f != 0
        self.n += len(x)
        self.sse += float(e2.sum())
        self.sum_enorm += float(e2.sqrt().sum())
        x2 = float(x.pow(2).sum())
        self.sum_x2 += x2
        self.sum_l1 += float(f.abs().double().sum())
        self.sum_l0 += float(active.sum())
        self.sum_x += x.sum(0)
        self.sum_e += e.sum(0)
        self.fired |= active.any(0)
        self.density += active.sum(0).double()
        room = DL_ALIVE_TOKENS - self.n_first
        if room > 0:
            self.fired_first |= active[:room].any(0)
            self.n_first += min(room, len(x))
        self.per_batch.append((len(x), float(e2.sum()), x2))

    # --- our definitions ---------------------------------------------------------------------
    @property
    def mse(self) -> float:
        return self.sse / self.n

    @property
    def total_variance(self) -> float:
        """``sum_t ||x_t - xbar||^2``."""
        return self.sum_x2 - float(self.sum_x.pow(2).sum()) / self.n

    @property
    def var_explained(self) -> float:
        return 1.0 - self.sse / self.total_variance

    @property
    def l1(self) -> float:
        return self.sum_l1 / self.n

    @property
    def l0(self) -> float:
        return self.sum_l0 / self.n

    @property
    def frac_alive(self) -> float:
        return float(self.fired.double().mean())

    @property
    def feature_density(self) -> torch.Tensor:
        """[d_sae]: fraction of counted tokens on which each latent is non-zero."""
        return self.density / self.n

    # --- the seed's mistakes, measured ---------------------------------------------------------
    @property
    def mse_mean_over_dims(self) -> float:
        """``(1/(|T| d)) sum_t sum_d e_td^2``: the MSE averaged over dimensions (pitfall a)."""
        return self.sse / (self.n * self.d_in)

    @property
    def var_explained_about_zero(self) -> float:
        """``1 - sum_t ||e_t||^2 / sum_t ||x_t||^2``: variance without the mean subtracted (pitfall b)."""
        return 1.0 - self.sse / self.sum_x2

    # --- other libraries ---------------------------------------------------------------------
    @property
    def saelens_old_mse(self) -> float:
        return sum(sse_b / n_b for n_b, sse_b, _ in self.per_batch) / self.n

    @property
    def saelens_old_explained_variance(self) -> float:
        res = sum(sse_b / n_b for n_b, sse_b, _ in self.per_batch) / len(self.per_batch)
        msq = sum(x2 / n_b for n_b, _, x2 in self.per_batch) / len(self.per_batch)
        return 1.0 - res / (msq - (msq / self.d_in) ** 2)

    @property
    def dl_l2_loss(self) -> float:
        return self.sum_enorm / self.n

    @property
    def dl_frac_variance_explained(self) -> float:
        resid = self.sse - float(self.sum_e.pow(2).sum()) / self.n
        return 1.0 - resid / self.total_variance

    @property
    def dl_frac_alive(self) -> float:
        return float(self.fired_first.double().mean())


@dataclass
class CEStats:
    """Sums of per-token CE under one convention's masks: clean, spliced, zero-ablated."""

    sums: dict = field(default_factory=lambda: {"clean": 0.0, "spliced": 0.0, "zero": 0.0})
    n: int = 0

    def add(self, clean: torch.Tensor, spliced: torch.Tensor, zero: torch.Tensor, mask: torch.Tensor) -> None:
        m = mask.to(clean.device)
        self.sums["clean"] += float(clean[m].double().sum())
        self.sums["spliced"] += float(spliced[m].double().sum())
        self.sums["zero"] += float(zero[m].double().sum())
        self.n += int(m.sum())

    def mean(self, key: str) -> float:
        return self.sums[key] / self.n

    @property
    def loss_recovered(self) -> float:
        z, s, c = self.mean("zero"), self.mean("spliced"), self.mean("clean")
        return (z - s) / (z - c)


@dataclass
class EvalStats:
    """Everything ``collect`` measured; ``metrics(convention)`` turns it into numbers."""

    recon: dict  # "ours" | "saelens" -> ReconStats
    ce: dict  # convention -> CEStats
    n_sequences: int
    downstream: "DownstreamStats | None" = None  # KL and downstream MSE of the spliced run (ours)

    def metrics(self, convention: str = "ours") -> dict[str, float]:
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        if convention not in self.ce:
            raise ValueError(f"{convention!r} was not collected; pass conventions=[..., {convention!r}] to collect")
        if convention in ("ours", "dictionary_learning"):
            r = self.recon["ours"]
        else:
            r = self.recon["saelens"]
        ce = self.ce[convention]
        if convention == "ours":
            out = {"mse": r.mse, "var_explained": r.var_explained, "l1": r.l1, "l0": r.l0,
                   "frac_alive": r.frac_alive, "n_tokens": r.n}
        elif convention == "saelens_now":
            out = {"mse": r.mse, "var_explained": r.var_explained, "l1": r.l1, "l0": r.l0,
                   "frac_alive": r.frac_alive, "n_tokens": r.n}
        elif convention == "saelens_old":
            out = {"mse": r.saelens_old_mse, "var_explained": r.saelens_old_explained_variance,
                   "l1": r.l1, "l0": r.l0, "frac_alive": r.frac_alive, "n_tokens": r.n}
        else:
            out = {"mse": r.dl_l2_loss, "var_explained": r.dl_frac_variance_explained, "l1": r.l1,
                   "l0": r.l0, "frac_alive": r.dl_frac_alive, "n_tokens": min(r.n, DL_ALIVE_TOKENS)}
        out.update({"ce_clean": ce.mean("clean"), "ce_spliced": ce.mean("spliced"),
                    "ce_zero_ablated": ce.mean("zero"), "loss_recovered": ce.loss_recovered,
                    "n_ce_tokens": ce.n})
        if convention == "ours" and self.downstream is not None:
            out.update(self.downstream.metrics())
        return out


@dataclass
class DownstreamStats:
    """Sums over the counted tokens ``T`` of the spliced run's distance from the clean one.

    ``kl``: ``(1/|T|) sum_t KL(p_clean(t) || p_spliced(t))`` (nats; the end-to-end SAEs' training
    loss); ``downstream_mse``: the mean over the downstream hooks of ``(1/(|T| d)) sum_t sum_d
    (a_spliced - a_clean)^2`` (averaged over elements, as the e2e + downstream loss);
    ``downstream_mse_by_hook``: the same per hook."""

    hooks: list
    kl_sum: float = 0.0
    n: int = 0
    sse: dict = field(default_factory=dict)
    n_elements: dict = field(default_factory=dict)

    def add(self, clean_logits, spliced_logits, clean_acts: dict, spliced_acts: dict, counted) -> None:
        m = counted.to(clean_logits.device)
        lp, lq = clean_logits[m].double().log_softmax(-1), spliced_logits[m].double().log_softmax(-1)
        self.kl_sum += float((lp.exp() * (lp - lq)).sum())
        self.n += int(m.sum())
        for h in self.hooks:
            e = spliced_acts[h][m].double() - clean_acts[h][m].double()
            self.sse[h] = self.sse.get(h, 0.0) + float(e.pow(2).sum())
            self.n_elements[h] = self.n_elements.get(h, 0) + e.numel()

    def metrics(self) -> dict:
        by_hook = {h: self.sse[h] / self.n_elements[h] for h in self.hooks}
        out = {"kl": self.kl_sum / self.n}
        if self.hooks:
            out.update(downstream_mse=sum(by_hook.values()) / len(by_hook), downstream_mse_by_hook=by_hook)
        return out


def as_token_batch(model, tokens, attention_mask: torch.Tensor | None = None, context_size: int = 128,
                   prepend_bos: bool = True) -> TokenBatch:
    """Accept a :class:`TokenBatch`, a list of texts, or a token tensor (+ optional attention mask).

    For a bare tensor without a mask, padding is found by the tokenizer's pad id, which works only
    when the pad token differs from BOS; otherwise pass ``attention_mask``.
    """
    if isinstance(tokens, TokenBatch):
        return tokens
    if isinstance(tokens, (list, tuple)):
        return tokenize(model, tokens, context_size, prepend_bos=prepend_bos)
    tok = model.tokenizer
    if attention_mask is None:
        pad = tok.pad_token_id
        if pad is not None and pad == tok.bos_token_id and bool((tokens[:, 1:] == pad).any()):
            raise ValueError("The pad token is the BOS token, so padding cannot be told from BOS: pass attention_mask")
        attention_mask = tokens != pad if pad is not None else torch.ones_like(tokens, dtype=torch.bool)
        attention_mask[:, 0] = True
    has_bos = bool((tokens[:, 0] == tok.bos_token_id).all()) if tok.bos_token_id is not None else False
    return TokenBatch(tokens, attention_mask.bool(), has_bos)


def _special_ids(model) -> list[int]:
    tok = model.tokenizer
    return sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None})


@torch.no_grad()
def collect(sae, model, tokens, *, hook: str | None = None, attention_mask: torch.Tensor | None = None,
            batch_size: int = 16, exclude: Collection[str] = ("bos", "pad"), context_size: int = 128,
            conventions: Sequence[str] = ("ours",), downstream: Sequence[str] | None = None) -> EvalStats:
    """Run the model over ``tokens`` in batches of ``batch_size`` sequences and gather the sums
    behind every metric of ``conventions`` (see the module docstring for the formulas).

    ``hook`` defaults to the SAE's own ``cfg.hook_name``; ``exclude`` is what the counted tokens
    ``T`` leave out (:meth:`lib.activations.TokenBatch.counted_mask`).  With ``downstream`` (hook
    names; ``[]`` for the KL alone) the "ours" splice also measures :class:`DownstreamStats`."""
    hook = replacement_hook(sae, hook)
    keep = None if downstream is None else as_names(downstream, "downstream")
    if keep is not None and "ours" not in conventions:
        raise ValueError("downstream statistics are measured on our splice: include 'ours' in conventions")
    conventions = as_names(conventions, "conventions")
    bad = [c for c in conventions if c not in CONVENTIONS]
    if bad:
        raise ValueError(f"unknown convention(s) {bad}; choose from {CONVENTIONS}")
    batch = as_token_batch(model, tokens, attention_mask, context_size)
    p = next(sae.parameters())
    special = torch.tensor(_special_ids(model), dtype=torch.long)
    pad_id = model.tokenizer.pad_token_id
    recon = {"ours": ReconStats(sae.cfg.d_in, sae.cfg.d_sae), "saelens": ReconStats(sae.cfg.d_in, sae.cfg.d_sae)}
    ce = {c: CEStats() for c in conventions}
    sae_fn, device = sae_replacement(sae), next(model.parameters()).device
    want_saelens = any(c.startswith("saelens") for c in conventions)
    ds = None if keep is None else DownstreamStats(keep)
    for i in range(0, len(batch), batch_size):
        b = batch[i: i + batch_size]
        toks = b.tokens.to(device)
        logits, acts = batch_activations(model, b, [hook, *(keep or [])], logits=True)
        act = acts[hook]
        ce_clean = token_ce(logits, toks)
        counted = b.counted_mask(exclude).to(act.device)
        x = act[counted].to(p.device, p.dtype)
        x_hat, f = sae(x, output_features=True)
        recon["ours"].add(x, x_hat, f)
        if "ours" in conventions:
            if ds is None:
                spliced_logits = run_spliced(model, toks, sae_fn, counted, hook=hook)
            else:
                spliced_logits, seen = run_spliced(model, toks, sae_fn, counted, hook=hook, keep=keep)
                ds.add(logits, spliced_logits, acts, seen, counted)
            spliced = token_ce(spliced_logits, toks)
            zero = token_ce(run_spliced(model, toks, zero_replacement, counted, hook=hook), toks)
            ce["ours"].add(ce_clean, spliced, zero, b.attention_mask[:, 1:])
        if want_saelens or "dictionary_learning" in conventions:
            zero_all = token_ce(run_spliced(model, toks, zero_replacement, None, hook=hook), toks)
        if want_saelens:
            real = ~torch.isin(b.tokens, special).to(act.device)
            xs = act[real].to(p.device, p.dtype)
            xs_hat, fs = sae(xs, output_features=True)
            recon["saelens"].add(xs, xs_hat, fs)
            spliced_sl = token_ce(run_spliced(model, toks, sae_fn, real, hook=hook), toks)
            for c in ("saelens_old", "saelens_now"):
                if c in conventions:
                    ce[c].add(ce_clean, spliced_sl, zero_all, real[:, :-1])
        if "dictionary_learning" in conventions:
            spliced_all = token_ce(run_spliced(model, toks, sae_fn, None, hook=hook), toks)
            ce["dictionary_learning"].add(ce_clean, spliced_all, zero_all, b.tokens[:, 1:] != pad_id)
    return EvalStats(recon=recon, ce=ce, n_sequences=len(batch), downstream=ds)


def evaluate(sae, model, tokens, *, hook: str | None = None, attention_mask: torch.Tensor | None = None,
             batch_size: int = 16, exclude: Collection[str] = ("bos", "pad"),
             context_size: int = 128, downstream: Sequence[str] | None = None) -> dict[str, float]:
    """Our metrics for ``sae`` over ``tokens`` (a TokenBatch, texts, or a token tensor), at its own
    hook unless ``hook`` says otherwise.

    Returns ``mse, var_explained, l1, l0, frac_alive, n_tokens, ce_clean, ce_spliced,
    ce_zero_ablated, loss_recovered, n_ce_tokens`` (formulas in the module docstring), and with
    ``downstream`` (hook names, ``[]`` for none) ``kl`` (+ ``downstream_mse``, ``downstream_mse_by_hook``).
    """
    stats = collect(sae, model, tokens, hook=hook, attention_mask=attention_mask, batch_size=batch_size,
                    exclude=exclude, context_size=context_size, downstream=downstream)
    return stats.metrics("ours")


# What each column of ``compare_conventions`` emulates: the library's formulas, run on *our* batch
# (right padding, a pad id distinct from BOS and EOS, every row BOS-first).
CONVENTION_SETTINGS = {
    "ours": "this module's formulas: BOS and pads neither counted nor spliced",
    "saelens_old": "SAELens before the 2026 fixes: eval MSE also / tokens per batch, variance about zero",
    "saelens_now": "SAELens 6.x evals: BOS/EOS/pad ids excluded; zero-ablation everywhere; the last real "
                   "token's prediction (target: a pad) counted",
    "dictionary_learning": "dictionary_learning's formulas with remove_bos=True (not its default): BOS not "
                           "counted in the reconstruction metrics; splice/ablate everywhere; pad targets ignored",
    "dictionary_learning_bos_kept": "dictionary_learning's default (remove_bos=False): as the column before, "
                                    "with the BOS activation counted in MSE, variance explained, L0 and alive",
}


def compare_conventions(sae, model, tokens, **kwargs):
    """One SAE, five columns (a DataFrame): ours, SAELens as it was, SAELens now, dictionary_learning
    with ``remove_bos=True``, and dictionary_learning's default that keeps BOS
    (``CONVENTION_SETTINGS`` says what each emulates).  Neither dictionary_learning column pads as
    its shipped pipeline does (on the left, EOS as pad): they read ``tokens`` as given."""
    import pandas as pd

    if "exclude" in kwargs:
        raise ValueError("compare_conventions sets the counted tokens per column; do not pass exclude")
    stats = collect(sae, model, tokens, conventions=CONVENTIONS, **kwargs)
    table = {c: stats.metrics(c) for c in CONVENTIONS}
    kept = collect(sae, model, tokens, conventions=("dictionary_learning",), exclude=("pad",), **kwargs)
    table["dictionary_learning_bos_kept"] = kept.metrics("dictionary_learning")
    return pd.DataFrame(table)


@torch.no_grad()
def splice_check(model, tokens, replacement=None, *, hook: str | None = None, attention_mask=None,
                 batch_size: int = 16, context_size: int = 128,
                 exclude: Collection[str] = ("bos", "pad")) -> dict[str, float]:
    """Splice ``replacement`` (an SAE, a function ``a -> a'``, or None for the identity) at its hook
    (``hook``, or the SAE's / function's own ``hook_name``) over the counted positions of
    ``tokens`` and compare CE with the clean run.

    Returns ``ce_clean``, ``ce_spliced`` (over real targets) and ``max_abs_logit_diff``; with the
    identity both CEs are equal to the last bit.
    """
    hook = replacement_hook(replacement, hook)
    batch = as_token_batch(model, tokens, attention_mask, context_size)
    device = next(model.parameters()).device
    fn = (lambda a: a) if replacement is None else as_replacement(replacement)
    s_clean = s_spliced = 0.0
    n, max_diff = 0, 0.0
    for i in range(0, len(batch), batch_size):
        b = batch[i: i + batch_size]
        toks = b.tokens.to(device)
        clean = model(toks, return_type="logits")
        spliced = model.run_with_hooks(toks, fwd_hooks=[(hook, splice_hook(fn, b.counted_mask(exclude)))],
                                       return_type="logits")
        m = b.attention_mask[:, 1:].to(device)
        s_clean += float(token_ce(clean, toks)[m].double().sum())
        s_spliced += float(token_ce(spliced, toks)[m].double().sum())
        n += int(m.sum())
        real = b.attention_mask.to(device)
        max_diff = max(max_diff, float((clean - spliced)[real].abs().max()))
    return {"ce_clean": s_clean / n, "ce_spliced": s_spliced / n, "max_abs_logit_diff": max_diff}


def format_table(rows: list[dict], digits: int = 3):
    """The seed's table: Layer | MSE | % Var explained | L1 | L0 | % alive | CE reconstructed."""
    import pandas as pd

    return pd.DataFrame([{
        "hook": r["hook"],
        "MSE": round(r["mse"], digits),
        "% Var explained": round(100 * r["var_explained"], 1),
        "L1": round(r["l1"], digits),
        "L0": round(r["l0"], 1),
        "% alive": round(100 * r["frac_alive"], 1),
        "CE clean": round(r["ce_clean"], digits),
        "CE reconstructed": round(r["ce_spliced"], digits),
        "CE zero-abl.": round(r["ce_zero_ablated"], digits),
        "% loss recovered": round(100 * r["loss_recovered"], 1),
    } for r in rows]).set_index("hook")
