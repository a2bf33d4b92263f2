"""Effect on a metric of patching SAE latents from clean to corrupted values: exact, linear, integrated.

Setting.  An SAE is spliced at ``hook`` of ``model`` with its error term kept, so the clean run is
unchanged: the activation becomes ``decode(f) + err_clean`` with ``err_clean = a - sae(a)`` from the
clean run.  ``f_clean = encode(a_clean)`` and ``f_corr = encode(a_corrupt)`` come from the clean and
the corrupted prompts (same shape), at the positions ``positions`` [batch, pos] (default: all).
``m(v)`` is the batch mean of ``metric(logits)`` [batch] with the SAE's latent values ``v`` set.
A *node* is one latent ``i``, patched at every selected position of every prompt at once.

For node ``i`` with ``delta_i = v_corr_i - v_clean_i``:

- exact activation patching:  ``m(v_clean + delta_i e_i) - m(v_clean)``;
- attribution patching:       ``<grad m(v_clean), delta_i e_i>``  (first order, one backward pass);
- integrated gradients (k steps, midpoint rule, ``alpha_j = (j + 1/2) / k``):
  ``<mean_j grad m(v_clean + alpha_j D), delta_i e_i>`` where the path moves
  ``D = delta_i e_i`` (``path="single"``: each latent alone; tends to the exact effect as k grows
  wherever ``m`` is continuous along the path) or ``D = delta`` (``path="joint"``: all latents
  together, as in Marks et al. 2024; its attributions sum to ``m(v_corr) - m(v_clean)``,
  *completeness*, up to the quadrature error).

``space`` says what ``v`` is: ``"latent"`` (the latent activations ``f``: the model is smooth
in them, the decoder being linear) or ``"pre"`` (pre-activations ``z`` with ``f = act(z)``, for
SAEs with an elementwise ``activation``: ReLU, JumpReLU).  In pre-activation space a JumpReLU
latent whose path crosses its threshold makes ``m`` jump, and a gradient never sees the jump.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from lib.activations import batch_activations
from lib.sae.splice import replacement_hook

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [N, pos, vocab] -> [N]

ELEMENTWISE = ("relu", "jumprelu")


def logit_diff_metric(correct: torch.Tensor, wrong: torch.Tensor, pos: int | torch.Tensor = -1) -> Metric:
    """``logits[n, pos_n, correct_n] - logits[n, pos_n, wrong_n]`` for a batch of B prompts, also on
    batches of ``c * B`` rows (the prompts repeated c times). ``pos``: one index or one per prompt."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        n, B = logits.shape[0], len(correct)
        rep = n // B
        rows = torch.arange(n, device=logits.device)
        p = pos.repeat(rep).to(logits.device) if isinstance(pos, torch.Tensor) else torch.full_like(rows, pos)
        c, w = correct.repeat(rep).to(logits.device), wrong.repeat(rep).to(logits.device)
        last = logits[rows, p]
        return last[rows, c] - last[rows, w]

    return metric


@dataclass
class PatchingProblem:
    """Everything fixed across patchings: tokens, the clean error term, values at both ends."""

    model: object
    sae: object
    hook: str
    tokens: torch.Tensor  # [B, P] clean prompts
    metric: Metric
    positions: torch.Tensor  # [B, P] bool
    err: torch.Tensor  # [B, P, d_in] clean SAE error
    v_clean: torch.Tensor  # [B, P, d_sae]
    v_corr: torch.Tensor  # [B, P, d_sae] (equal to v_clean outside positions)
    space: str = "latent"

    @property
    def delta(self) -> torch.Tensor:
        return self.v_corr - self.v_clean

    def features(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.space == "latent" else self.sae.activation(v)

    def metric_at(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` [c*B, P, d_sae] (c copies of the batch) -> per-copy mean metric [c]."""
        B = self.tokens.shape[0]
        c = v.shape[0] // B
        recon = self.sae.decode(self.features(v)) + self.err.repeat(c, 1, 1)

        def hook(act, hook=None):  # noqa: ARG001
            return recon.to(act.dtype)

        logits = self.model.run_with_hooks(self.tokens.repeat(c, 1), fwd_hooks=[(self.hook, hook)],
                                           return_type="logits")
        return self.metric(logits).reshape(c, B).mean(1)

    def grad_at(self, v: torch.Tensor) -> torch.Tensor:
        """Gradient of the per-copy mean metric wrt ``v`` [c*B, P, d_sae] (same shape)."""
        v = v.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            m = self.metric_at(v)
            (g,) = torch.autograd.grad(m.sum(), v)
        return g


@torch.no_grad()
def build_problem(model, sae, clean_tokens: torch.Tensor, corrupt_tokens: torch.Tensor, metric: Metric,
                  positions: torch.Tensor | None = None, space: str = "latent", *,
                  hook: str | None = None) -> PatchingProblem:
    """Read clean and corrupted activations at the SAE's hook (or ``hook``) and set up the patching problem."""
    hook = replacement_hook(sae, hook)
    if clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(f"clean {tuple(clean_tokens.shape)} and corrupted {tuple(corrupt_tokens.shape)} prompts "
                         "must have the same shape (pick pairs with the same token count)")
    if space not in ("latent", "pre"):
        raise ValueError(f"space must be 'latent' or 'pre', got {space!r}")
    if space == "pre" and getattr(sae, "architecture", "") not in ELEMENTWISE:
        raise ValueError(f"space='pre' needs an elementwise activation ({ELEMENTWISE}); "
                         f"{getattr(sae, 'architecture', '?')!r} SAEs: use space='latent'")
    device = next(model.parameters()).device
    clean_tokens, corrupt_tokens = clean_tokens.to(device), corrupt_tokens.to(device)
    if positions is None:
        positions = torch.ones(clean_tokens.shape, dtype=torch.bool)
    positions = positions.to(device)
    p = next(sae.parameters())
    acts = {name: batch_activations(model, toks, hook)[hook].to(p.device, p.dtype)
            for name, toks in (("clean", clean_tokens), ("corrupt", corrupt_tokens))}
    a = acts["clean"]
    err = a - sae(a)

    def value(x):
        return sae.encode(x) if space == "latent" else sae.pre_acts(x)

    v_clean = value(a)
    v_corr = torch.where(positions[..., None], value(acts["corrupt"]), v_clean)
    return PatchingProblem(model, sae, hook, clean_tokens, metric, positions, err, v_clean, v_corr, space)


@dataclass
class AttributionResult:
    nodes: torch.Tensor  # [n] latent indices with a non-zero delta
    exact: torch.Tensor  # [n]
    attribution_patching: torch.Tensor  # [n]
    ig: dict = field(default_factory=dict)  # k -> [n]
    m_clean: float = 0.0
    m_corrupt: float = 0.0  # every latent patched

    def errors(self, estimate: torch.Tensor) -> dict[str, float]:
        """``corr`` (Pearson) and ``mae`` of an estimate against the exact effects."""
        e, x = estimate.double(), self.exact.double()
        corr = float(torch.corrcoef(torch.stack([e, x]))[0, 1]) if len(x) > 1 else float("nan")
        return {"corr": corr, "mae": float((e - x).abs().mean())}


def _one_hot_paths(prob: PatchingProblem, nodes: torch.Tensor) -> torch.Tensor:
    """[len(nodes)*B, P, d_sae]: delta restricted to one node per copy."""
    d = prob.delta
    out = torch.zeros((len(nodes),) + d.shape, dtype=d.dtype, device=d.device)
    out[torch.arange(len(nodes)), ..., nodes] = d[..., nodes].permute(2, 0, 1)
    return out.reshape((-1,) + d.shape[1:])


@torch.no_grad()
def exact_patching(prob: PatchingProblem, nodes: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """``m(v_clean + delta_i e_i) - m(v_clean)`` for each node (batched ``chunk`` nodes a pass)."""
    m0 = prob.metric_at(prob.v_clean)[0]
    out = []
    for i in range(0, len(nodes), chunk):
        sub = nodes[i: i + chunk]
        v = prob.v_clean.repeat(len(sub), 1, 1) + _one_hot_paths(prob, sub)
        out.append(prob.metric_at(v) - m0)
    return torch.cat(out) if out else prob.v_clean.new_zeros(0)


def attribution_patching(prob: PatchingProblem, nodes: torch.Tensor) -> torch.Tensor:
    """``<grad m(v_clean), delta_i e_i>`` for each node."""
    g = prob.grad_at(prob.v_clean)
    return (g * prob.delta)[..., nodes].sum((0, 1))


def integrated_gradients(prob: PatchingProblem, nodes: torch.Tensor, k: int, path: str = "joint",
                         chunk: int = 32) -> torch.Tensor:
    """IG with ``k`` midpoint steps from ``v_clean`` to the patched values (see the module docstring)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    alphas = (torch.arange(k, dtype=prob.v_clean.dtype, device=prob.v_clean.device) + 0.5) / k
    if path == "joint":
        out = torch.zeros(len(nodes), dtype=prob.v_clean.dtype, device=prob.v_clean.device)
        for i in range(0, k, chunk):
            a = alphas[i: i + chunk]
            v = (prob.v_clean[None] + a[:, None, None, None] * prob.delta[None]).reshape((-1,) + prob.v_clean.shape[1:])
            g = prob.grad_at(v).reshape((len(a),) + prob.v_clean.shape)
            out += (g.sum(0) * prob.delta)[..., nodes].sum((0, 1))
        return out / k
    if path != "single":
        raise ValueError(f"path must be 'joint' or 'single', got {path!r}")
    out = []
    per = max(1, chunk // k) if k < chunk else 1
    for i in range(0, len(nodes), per):
        sub = nodes[i: i + per]
        D = _one_hot_paths(prob, sub).reshape((len(sub),) + prob.v_clean.shape)  # [s, B, P, m]
        total = torch.zeros(len(sub), dtype=D.dtype, device=D.device)
        for j in range(0, k, chunk):
            a = alphas[j: j + chunk]
            v = prob.v_clean[None, None] + a[None, :, None, None, None] * D[:, None]  # [s, a, B, P, m]
            g = prob.grad_at(v.reshape((-1,) + prob.v_clean.shape[1:])).reshape(v.shape)
            total += (g.sum(1) * D).sum((1, 2, 3))
        out.append(total / k)
    return torch.cat(out) if out else prob.v_clean.new_zeros(0)


@torch.no_grad()
def finite_difference_ig(prob: PatchingProblem, nodes: torch.Tensor, k: int, path: str = "single",
                         chunk: int = 32) -> torch.Tensor:
    """IG with each gradient step replaced by the metric's own difference over the step, on the grid
    ``alpha_j = j / k`` (``j = 0..k``): no derivative, so a jump on the path is counted in full.

    ``path="single"``: node i's path alone, ``sum_j m(v_clean + alpha_{j+1} D_i) - m(v_clean + alpha_j D_i)``,
    which telescopes to the exact effect for every k (the point of the construction: whatever the
    discontinuities, it is exact patching computed in k pieces).  ``path="joint"``: at each point
    of the joint path ``v_j = v_clean + alpha_j delta``, node i's own step
    ``m(v_j + delta_i e_i / k) - m(v_j)``, summed over j: a derivative-free counterpart of joint IG
    (k = 1 gives exact patching; it does not telescope, and completeness holds only where the
    metric is additive over nodes).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if path not in ("single", "joint"):
        raise ValueError(f"path must be 'joint' or 'single', got {path!r}")
    alphas = torch.arange(k + 1, dtype=prob.v_clean.dtype, device=prob.v_clean.device) / k
    shape = prob.v_clean.shape
    out = torch.zeros(len(nodes), dtype=prob.v_clean.dtype, device=prob.v_clean.device)
    for i in range(0, len(nodes), chunk):
        sub = nodes[i: i + chunk]
        D = _one_hot_paths(prob, sub).reshape((len(sub),) + shape)  # [s, B, P, m]
        for j in range(k):
            if path == "single":
                lo = prob.v_clean[None] + alphas[j] * D
                hi = prob.v_clean[None] + alphas[j + 1] * D
                step = prob.metric_at(hi.reshape((-1,) + shape[1:])) - prob.metric_at(lo.reshape((-1,) + shape[1:]))
            else:
                base = prob.v_clean + alphas[j] * prob.delta
                hi = base[None] + D / k
                step = prob.metric_at(hi.reshape((-1,) + shape[1:])) - prob.metric_at(base)[0]
            out[i: i + len(sub)] += step
    return out


def active_nodes(prob: PatchingProblem) -> torch.Tensor:
    """Latents whose value changes somewhere between clean and corrupted (the others have no effect)."""
    return (prob.delta != 0).any(0).any(0).nonzero().squeeze(-1)


def compare_methods(prob: PatchingProblem, ks=(1, 2, 4, 8, 16, 32, 64), path: str = "joint",
                    nodes: torch.Tensor | None = None) -> AttributionResult:
    """Exact, attribution patching and IG at each ``k`` for ``nodes`` (default: every active latent)."""
    nodes = active_nodes(prob) if nodes is None else nodes
    with torch.no_grad():
        m_clean = float(prob.metric_at(prob.v_clean)[0])
        m_corr = float(prob.metric_at(prob.v_corr)[0])
    res = AttributionResult(nodes=nodes, exact=exact_patching(prob, nodes),
                            attribution_patching=attribution_patching(prob, nodes), m_clean=m_clean, m_corrupt=m_corr)
    for k in ks:
        res.ig[k] = integrated_gradients(prob, nodes, k, path=path)
    return res


@torch.no_grad()
def metric_along_path(prob: PatchingProblem, node: int, n_points: int = 101) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphas [n_points], m(v_clean + alpha delta_node e_node) [n_points])``: ``m`` along one latent's path."""
    alphas = torch.linspace(0, 1, n_points, dtype=prob.v_clean.dtype, device=prob.v_clean.device)
    D = _one_hot_paths(prob, torch.tensor([node], device=prob.v_clean.device))
    vals = []
    for i in range(0, n_points, 32):
        a = alphas[i: i + 32]
        v = prob.v_clean[None] + a[:, None, None, None] * D[None]
        vals.append(prob.metric_at(v.reshape((-1,) + prob.v_clean.shape[1:])))
    return alphas, torch.cat(vals)


# --------------------------------------------------------------------------------------------
# notebook 06's task and report
# --------------------------------------------------------------------------------------------
@dataclass
class PatchingTask:
    """Clean / corrupted prompt pairs with the metric that compares their answers."""

    clean: torch.Tensor  # [B, P]
    corrupt: torch.Tensor  # [B, P]
    metric: Metric
    pairs: list  # (clean city, corrupted city) per row
    correct: torch.Tensor | None = None  # [B] token id the clean prompt should get (the metric's plus side)
    wrong: torch.Tensor | None = None  # [B] the corrupted prompt's answer (its minus side)

    def subset(self, rows) -> "PatchingTask":
        """The task restricted to ``rows`` (a list or tensor of row indices), its metric rebuilt."""
        if self.correct is None or self.wrong is None:
            raise ValueError("this task keeps no answer ids (correct / wrong): build it with country_patching_task")
        r = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        return PatchingTask(self.clean[r], self.corrupt[r], logit_diff_metric(self.correct[r], self.wrong[r]),
                            [self.pairs[i] for i in r.tolist()], self.correct[r], self.wrong[r])


def country_patching_task(model, n_pairs: int, seed: int = 0) -> PatchingTask:
    """Pairs "The city of A is in" / "The city of B is in" (A, B in different countries, every
    prompt the same number of tokens), metric ``logit(country of A) - logit(country of B)``.

    Cities are those whose country is one token; the prompt length is the most common one among
    them, so no prompt needs padding.
    """
    import random

    from lib.activations import tokenize
    from lib.world import facts

    tok = model.tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def prompt(city) -> str:
        return f"The city of {city.name} is in"

    by_len: dict[int, list] = {}
    for c in facts.cities():
        if len(ids(" " + c.country)) == 1:
            by_len.setdefault(len(ids(prompt(c))), []).append(c)
    if not by_len or max(len({c.country for c in v}) for v in by_len.values()) < 2:
        raise ValueError(
            "country_patching_task needs cities of two countries whose names are single tokens (' France') and "
            f"whose prompts have equal length; under this tokenizer {len(by_len)} prompt lengths hold such cities "
            f"(countries: {sorted({c.country for v in by_len.values() for c in v})[:10]})")
    pool = max(by_len.values(), key=lambda v: (len({c.country for c in v}) >= 2, len(v)))
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n_pairs:
        a, b = rng.sample(pool, 2)
        if a.country != b.country:
            pairs.append((a, b))
    clean = tokenize(model, [prompt(a) for a, _ in pairs], 32).tokens
    corrupt = tokenize(model, [prompt(b) for _, b in pairs], 32).tokens
    correct = torch.tensor([ids(" " + a.country)[0] for a, _ in pairs])
    wrong = torch.tensor([ids(" " + b.country)[0] for _, b in pairs])
    return PatchingTask(clean, corrupt, logit_diff_metric(correct, wrong), pairs, correct, wrong)


def attribution_report(prob: PatchingProblem, ks, single_ks, n_top: int) -> tuple[AttributionResult, dict]:
    """Every method against exact patching on ``prob`` (:func:`compare_methods`, joint IG paths),
    and single-latent IG on the ``n_top`` latents with the largest exact effects.

    Returns the result and ``{"n_latents", "attribution_patching": errors, "ig": {k: errors},
    "top_latents": {"attribution_patching": errors, "ig_single_path": {k: errors}}}`` with
    ``errors`` as :meth:`AttributionResult.errors`.
    """
    res = compare_methods(prob, ks=ks, path="joint")
    top = res.exact.abs().argsort(descending=True)[:n_top]
    sub = AttributionResult(nodes=res.nodes[top], exact=res.exact[top], attribution_patching=res.attribution_patching[top])
    report = {"n_latents": len(res.nodes), "attribution_patching": res.errors(res.attribution_patching),
              "ig": {k: res.errors(v) for k, v in res.ig.items()},
              "top_latents": {"attribution_patching": sub.errors(sub.attribution_patching),
                              "ig_single_path": {k: sub.errors(integrated_gradients(prob, sub.nodes, k, path="single", chunk=64))
                                                 for k in single_ks}}}
    return res, report
