"""Out-of-distribution capability decay (notebook 10): train on every language, drop one, keep
training on the rest, evaluate everything throughout; then put the dropped language back and
count the steps it takes to relearn it.

One call to ``run_stack`` trains a stack of models of one size side by side (see
``batched_transformer``); each ``ModelSpec`` says its condition (A, B, C, C-all, D), seed, dropped
language, weight decay and dropout.  Phases, all with a constant learning rate (after a short
warm-up) and the same batch size:

1. ``pretrain_steps`` on the full mix of the condition (``languages.mixture(..., "all")``);
2. ``decay_steps`` on the mix without the dropped language (``"drop"``), evaluating it;
3. ``relearn_steps`` on the full mix again, counting steps until the dropped language is back
   at ``target`` exact match.

A ``never_saw`` model trains on the dropped mix from step 0 (phases 1-2) and then learns the
language in phase 3: the baseline of a model of the same size and age that never saw it.  The
first phase of every model is "learning it from scratch in a fresh model of the same size".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lib.toys import batched_transformer as bt
from lib.toys import languages as lang
from lib.utils import progress


@dataclass(frozen=True)
class ModelSpec:
    condition: str
    seed: int
    dropped: int  # index of the dropped language (a{k} in A, the form b{k} otherwise)
    weight_decay: float = 0.0
    dropout: float = 0.0
    never_saw: bool = False


@dataclass(frozen=True)
class Protocol:
    pretrain_steps: int = 600
    decay_steps: int = 600
    relearn_steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 30
    eval_every: int = 20  # steps between evaluations in phases 1-2
    relearn_eval_every: int = 5
    target: float = 0.9  # exact match that counts as "learned" (relearning, scratch)
    translation_share: float = 0.5
    kept_per_task: int = 10  # eval examples per kept task / per translation pair
    data_seed: int = 0


GROUPS = ("dropped", "kept", "translations", "zero_shot")


def _eval_sets(u: lang.Universe, spec: ModelSpec, per_task: int, rng: np.random.Generator):
    """Indices into the bank and group ids for one model's evaluation examples."""
    starts = np.cumsum([0] + [len(t.tokens) for t in u.tasks])
    fam = "a" if spec.condition == "A" else "b"
    dropped = u.task_index(f"{fam}{spec.dropped}")
    idx = list(range(starts[dropped], starts[dropped + 1]))
    grp = [0] * len(idx)
    for i, t in enumerate(u.tasks):
        pick = starts[i] + rng.choice(len(t.tokens), per_task, replace=False)
        if t.family.lower() == fam and i != dropped:
            idx += list(pick); grp += [1] * per_task
        if t.family == "T" and spec.condition in ("C", "C-all", "D") and spec.dropped in (t.source, t.target):
            if spec.condition == "D" and {t.source, t.target} == {spec.dropped, lang.partner(spec.dropped)}:
                pick = starts[i] + np.arange(len(t.tokens))
                idx += list(pick); grp += [3] * len(pick)
            else:
                idx += list(pick); grp += [2] * per_task
    return idx, grp


def _steps_to(steps: np.ndarray, acc: np.ndarray, target: float) -> float:
    """First step at which ``acc`` reaches ``target`` (NaN if never)."""
    hit = np.nonzero(acc >= target)[0]
    return float(steps[hit[0]]) if len(hit) else float("nan")


def half_life(steps: np.ndarray, acc: np.ndarray, start: float, floor: float = 0.0) -> float:
    """Steps after the drop until accuracy first falls to half way between ``start`` and ``floor``,
    interpolated linearly between evaluations; NaN if it never does (censored at the horizon)."""
    level = floor + (start - floor) / 2
    below = np.nonzero(acc <= level)[0]
    if not len(below):
        return float("nan")
    i = below[0]
    if i == 0:
        return float(steps[0])
    s0, s1, a0, a1 = steps[i - 1], steps[i], acc[i - 1], acc[i]
    return float(s0 + (s1 - s0) * (a0 - level) / max(a0 - a1, 1e-12))


def run_stack(specs: list[ModelSpec], size: bt.Size, proto: Protocol, u: lang.Universe | None = None,
              desc: str = "train") -> dict:
    """Train the stack through the three phases; return curves and per-model summaries.

    Returns ``{"specs", "size", "n_params", "steps" [E], "acc" [M, 4, E] (GROUPS), "restricted"
    [M, E] (dropped language scored over its own alphabet only), "relearn_steps_axis" [R],
    "relearn_acc" [M, R], "summary": list of per-model dicts}``; step 0 of ``steps`` is the drop.
    """
    u = u or lang.build_universe()
    M, V = len(specs), u.vocab_size
    bank = torch.cat([t.tokens for t in u.tasks])
    counts = torch.tensor([len(t.tokens) for t in u.tasks])
    starts = torch.cumsum(counts, 0) - counts
    mixes = {ph: torch.stack([lang.mixture(u, s.condition, s.dropped, ph, proto.translation_share) for s in specs])
             for ph in ("all", "drop")}
    never = torch.tensor([s.never_saw for s in specs])
    rng = np.random.default_rng(proto.data_seed)
    sets = [_eval_sets(u, s, proto.kept_per_task, rng) for s in specs]
    n_eval = max(len(i) for i, _ in sets)
    ev_idx = torch.tensor([i + [0] * (n_eval - len(i)) for i, _ in sets])
    ev_grp = torch.tensor([g + [-1] * (n_eval - len(g)) for _, g in sets])
    ev_tok = bank[ev_idx]
    fam_task = [u.task_index(f"{'a' if s.condition == 'A' else 'b'}{s.dropped}") for s in specs]
    alphabet = torch.zeros(M, V, dtype=torch.bool)
    for m, t in enumerate(fam_task):
        alphabet[m, u.tasks[t].alphabet] = True
    drop_tok = torch.stack([u.tasks[t].tokens for t in fam_task])  # [M, 100, T]

    params = bt.init_params(size, V, lang.SEQ_LEN - 1, [s.seed for s in specs])
    opt = bt.AdamW(params, proto.lr, torch.tensor([s.weight_decay for s in specs]))
    p_drop = torch.tensor([s.dropout for s in specs])
    gen = torch.Generator().manual_seed(proto.data_seed)

    def train_step(w: torch.Tensor, step: int) -> None:
        task = torch.multinomial(w.float(), proto.batch_size, replacement=True, generator=gen)
        ex = starts[task] + (torch.rand(task.shape, generator=gen) * counts[task]).long()
        tok = bank[ex]
        logits = bt.forward(params, size, tok[:, :, :-1], lang.ANSWER_LEN, p_drop, gen)
        loss = F.cross_entropy(logits.reshape(-1, V), tok[:, :, -lang.ANSWER_LEN:].reshape(-1), reduction="sum")
        (loss / (proto.batch_size * lang.ANSWER_LEN)).backward()
        opt.lr = proto.lr * min(1.0, (step + 1) / proto.warmup)
        opt.step()

    @torch.no_grad()
    def evaluate(tok: torch.Tensor):
        logits = bt.forward(params, size, tok[:, :, :-1], lang.ANSWER_LEN)
        ans = tok[:, :, -lang.ANSWER_LEN:]
        return lang.exact_match(logits, ans), lang.exact_match(logits, ans, alphabet[:, None, :])

    def record():
        ok, ok_r = evaluate(ev_tok)
        acc = torch.stack([((ok & (ev_grp == g)).sum(1) / (ev_grp == g).sum(1).clamp(min=1)) for g in range(4)], 1)
        restricted = (ok_r & (ev_grp == 0)).sum(1) / (ev_grp == 0).sum(1)
        return acc.numpy(), restricted.numpy()

    total = proto.pretrain_steps + proto.decay_steps
    steps, accs, restr = [], [], []
    bar = progress(total=total + proto.relearn_steps, desc=desc)
    for step in range(total + 1):
        if step % proto.eval_every == 0:
            a, r = record()
            steps.append(step - proto.pretrain_steps); accs.append(a); restr.append(r)
        if step == total:
            break
        w = mixes["drop"] if step >= proto.pretrain_steps else torch.where(never[:, None], mixes["drop"], mixes["all"])
        train_step(w, step)
        bar.update()
    with torch.no_grad():  # how the dropped language fails at the end of the decay phase
        preds = bt.forward(params, size, drop_tok[:, :, :-1], lang.ANSWER_LEN).argmax(-1)
    failures = [error_analysis(u, preds[m], drop_tok[m, :, -lang.ANSWER_LEN:], fam_task[m]) for m in range(M)]
    r_steps, r_acc = [], []
    for step in range(proto.relearn_steps + 1):
        if step % proto.relearn_eval_every == 0:
            r_steps.append(step); r_acc.append(evaluate(drop_tok)[0].float().mean(1).numpy())
        if step == proto.relearn_steps:
            break
        train_step(mixes["all"], total + step)
        bar.update()
    bar.close()
    out = {"specs": specs, "size": size, "n_params": size.n_params(V, lang.SEQ_LEN - 1),
           "steps": np.array(steps), "acc": np.stack(accs, -1), "restricted": np.stack(restr, -1),
           "relearn_steps_axis": np.array(r_steps), "relearn_acc": np.stack(r_acc, -1)}
    out["summary"] = [summarise(out, m, proto) | failures[m] for m in range(M)]
    return out


def error_analysis(u: lang.Universe, pred: torch.Tensor, answer: torch.Tensor, task: int) -> dict:
    """How a language's wrong answers are wrong: ``pred``, ``answer`` [N, ANSWER_LEN].

    ``wrong_in_other_language``: the fraction of wrong answers written entirely in the alphabet of
    one other language (the model answers, in the wrong language); ``right_in_other_language``: the
    fraction written in another B form's numerals that spell the right answer (same digit order as
    the dropped form, or that form's own order): the sum is known, the notation is lost.
    """
    owner = {}
    for i, t in enumerate(u.tasks[:2 * lang.N_FORMS]):
        for digit, tok in enumerate(t.alphabet):
            owner[tok] = (i, digit)
    wrong = ~(pred == answer).all(-1)
    n_wrong = int(wrong.sum())
    other = right = 0
    for p, a in zip(pred[wrong].tolist(), answer[wrong].tolist()):
        who = [owner.get(tok) for tok in p]
        if None in who or who[0][0] != who[1][0] or who[0][0] == task:
            continue
        other += 1
        want = [owner[tok][1] for tok in a]
        got = [w[1] for w in who]
        if u.tasks[task].family == "B" and u.tasks[who[0][0]].family == "B" and got in (want, want[::-1]):
            right += 1
    return {"n_wrong": n_wrong, "wrong_in_other_language": other / n_wrong if n_wrong else float("nan"),
            "right_in_other_language": right / n_wrong if n_wrong else float("nan")}


def summarise(run: dict, m: int, proto: Protocol) -> dict:
    """One model's numbers: accuracy at the drop, half-life, final dropped/kept accuracy, steps to
    ``target`` when first learned (``scratch_steps``) and when relearned (``relearn_steps``)."""
    steps, acc, spec = run["steps"], run["acc"][m], run["specs"][m]
    pre, post = steps <= 0, steps >= 0
    at_drop = float(acc[0, steps == 0][0])
    row = asdict(spec) | {"size": f"{run['size'].n_layers}x{run['size'].d_model}", "n_params": run["n_params"],
                          "acc_at_drop": at_drop, "kept_at_drop": float(acc[1, steps == 0][0])}
    if not spec.never_saw:
        row["half_life_steps"] = half_life(steps[post], acc[0, post], at_drop)
        row["scratch_steps"] = _steps_to(steps[pre] + proto.pretrain_steps, acc[0, pre], proto.target)
    row["final_dropped_acc"] = float(acc[0, -1])
    row["final_kept_acc"] = float(acc[1, -1])
    row["final_restricted_acc"] = float(run["restricted"][m, -1])
    if spec.condition in ("C", "C-all", "D"):
        row["final_translation_acc"] = float(acc[2, -1])
    if spec.condition == "D":
        row["zero_shot_at_drop"] = float(acc[3, steps == 0][0])
    row["relearn_steps"] = _steps_to(run["relearn_steps_axis"], run["relearn_acc"][m], proto.target)
    return row


# ---------------------------------------------------------------------------------------------
# Grids of stacks, per-condition statistics, the half-life scaling fit, and the command line.

def dropped_for(seed: int) -> int:
    """Each seed drops a different language (1, 4, 7 for seeds 0, 1, 2): the spread over seeds
    includes which language was dropped, not only the initialisation and data order."""
    return (3 * seed + 1) % lang.N_FORMS


def stack_specs(seeds=(0, 1, 2), conditions=lang.CONDITIONS, weight_decay: float = 0.0, dropout: float = 0.0,
                never_saw=("A", "B")) -> list[ModelSpec]:
    """One stack: every condition x seed, plus never-saw baselines for the conditions in ``never_saw``."""
    specs = [ModelSpec(c, s, dropped_for(s), weight_decay, dropout) for c in conditions for s in seeds]
    specs += [ModelSpec(c, s, dropped_for(s), weight_decay, dropout, never_saw=True) for c in never_saw for s in seeds]
    return specs


PROFILES = {
    # the notebook's default: one size, no regularisation, every condition (about 1-2 min of one core)
    "default": {"stacks": [(bt.Size(2, 32, 4), 0.0, 0.0)], "never_saw": ("A", "B"),
                "proto": Protocol(pretrain_steps=600, decay_steps=600, relearn_steps=100, eval_every=25)},
    # the dependence grid (about 5 min of one idle core): three sizes without regularisation, and at the
    # default size weight decay (0, 0.1, 1) x dropout (0, 0.1); conditions A and B, three seeds,
    # the default's protocol
    "full": {"stacks": [(bt.Size(2, d, 4), 0.0, 0.0) for d in (16, 32, 64)]
             + [(bt.Size(2, 32, 4), wd, p) for wd in (0.0, 0.1, 1.0) for p in (0.0, 0.1) if (wd, p) != (0.0, 0.0)],
             "never_saw": (), "conditions": ("A", "B"),
             "proto": Protocol(pretrain_steps=600, decay_steps=600, relearn_steps=100, eval_every=25)},
    # a smoke test of the code path (tests, quick notebook runs)
    "quick": {"stacks": [(bt.Size(1, 16, 2), 0.0, 0.0)], "never_saw": ("A",),
              "proto": Protocol(pretrain_steps=40, decay_steps=40, relearn_steps=10, eval_every=10)},
}


def compact(run: dict) -> dict:
    """A run as plain JSON-able data: per-model summaries and dropped/kept curves (rounded)."""
    r2 = lambda a: np.round(np.asarray(a, dtype=float), 4).tolist()  # noqa: E731
    return {"size": f"{run['size'].n_layers}x{run['size'].d_model}", "n_params": run["n_params"],
            "steps": run["steps"].tolist(), "summary": run["summary"],
            "dropped": r2(run["acc"][:, 0]), "kept": r2(run["acc"][:, 1]), "restricted": r2(run["restricted"]),
            "relearn_steps_axis": run["relearn_steps_axis"].tolist(), "relearn_acc": r2(run["relearn_acc"])}


def _run_job(job) -> dict:
    size, wd, p, proto, seeds, conditions, never_saw = job
    torch.set_num_threads(1)
    run = run_stack(stack_specs(seeds, conditions, wd, p, never_saw), size, proto,
                    desc=f"d{size.d_model} wd{wd} p{p}")
    return compact(run) | {"weight_decay": wd, "dropout": p}


def run_grid(profile: str = "full", seeds=(0, 1, 2), conditions=lang.CONDITIONS, jobs: int = 1,
             only: list[int] | None = None) -> list[dict]:
    """The (size, weight decay, dropout) stacks of a profile (those numbered in ``only``, if given),
    ``jobs`` processes side by side (each single-threaded); returns the ``compact`` runs in order."""
    prof = PROFILES[profile]
    stacks = [st for i, st in enumerate(prof["stacks"]) if only is None or i in only]
    conditions = prof.get("conditions", conditions)
    work = [(s, wd, p, prof["proto"], tuple(seeds), tuple(conditions), prof["never_saw"]) for s, wd, p in stacks]
    if jobs <= 1:
        return [_run_job(j) for j in work]
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_run_job, work, chunksize=1)


def rows_of(runs: list[dict]) -> list[dict]:
    """Every model's summary row from a list of ``compact`` runs."""
    return [row for run in runs for row in run["summary"]]


def _bounded(values, bound):
    """Censored values (NaN: not reached within the horizon) replaced by the horizon, a lower bound."""
    v = np.asarray(values, dtype=float)
    return np.where(np.isnan(v), bound, v), int(np.isnan(v).sum())


def condition_stats(rows: list[dict], proto: Protocol) -> dict:
    """Per condition: mean and std over seeds of half-life, final dropped accuracy, relearning steps,
    scratch steps (the same language's first learning) and never-saw steps.  A half-life never
    reached counts as the decay horizon and a relearning never finished as the relearning horizon
    (lower bounds); ``*_censored`` says how many seeds that was."""
    out = {}
    for c in lang.CONDITIONS:
        trained = [r for r in rows if r["condition"] == c and not r["never_saw"]]
        if not trained:
            continue
        never = [r for r in rows if r["condition"] == c and r["never_saw"]]
        s = {"n_seeds": len(trained)}
        for key, bound in (("half_life_steps", proto.decay_steps), ("relearn_steps", proto.relearn_steps),
                           ("scratch_steps", proto.pretrain_steps)):
            v, n_cens = _bounded([r[key] for r in trained], bound)
            s[key], s[f"{key}_std"], s[f"{key}_censored"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, n_cens
        for key in ("acc_at_drop", "final_dropped_acc", "final_restricted_acc", "final_kept_acc"):
            v = np.array([r[key] for r in trained], dtype=float)
            s[key], s[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        if never:
            v, n_cens = _bounded([r["relearn_steps"] for r in never], proto.relearn_steps)
            s["never_saw_steps"], s["never_saw_steps_std"], s["never_saw_steps_censored"] = (
                float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, n_cens)
        if c == "D":
            v = np.array([r["zero_shot_at_drop"] for r in trained])
            s["zero_shot_at_drop"], s["zero_shot_at_drop_std"] = float(v.mean()), float(v.std(ddof=1))
        out[c] = s
    return out


def scaling_fit(rows: list[dict], proto: Protocol, condition: str, weight_decay: float = 0.0,
                dropout: float = 0.0) -> dict:
    """Least-squares fit of log(half-life) = a + b log(parameters) over every seed of every size
    (censored half-lives at the horizon, so ``b`` is biased towards 0 when many are censored)."""
    sel = [r for r in rows if r["condition"] == condition and not r["never_saw"]
           and r["weight_decay"] == weight_decay and r["dropout"] == dropout]
    hl, n_cens = _bounded([r["half_life_steps"] for r in sel], proto.decay_steps)
    x, y = np.log([r["n_params"] for r in sel]), np.log(np.maximum(hl, 1.0))
    if len(set(x.tolist())) < 2:  # one size: no slope to fit
        return {"condition": condition, "exponent": float("nan"), "prefactor": float("nan"), "n": len(sel),
                "censored": n_cens}
    b, a = np.polyfit(x, y, 1)
    return {"condition": condition, "exponent": float(b), "prefactor": float(np.exp(a)), "n": len(sel),
            "censored": n_cens}


def main(argv=None) -> None:
    import argparse
    import json
    from pathlib import Path

    from lib.results import atomic_write_text

    ap = argparse.ArgumentParser(description="Run a decay grid (see PROFILES) and write its runs as JSON; "
                                 "or merge the files of parts of one grid (--merge).")
    ap.add_argument("--profile", default="full", choices=sorted(PROFILES))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated indices of the profile's stacks to run")
    ap.add_argument("--merge", nargs="+", default=None, help="grid files of one profile to join into --out")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        meta = parts[0]["meta"] | {"command": " && ".join(p["meta"]["command"] for p in parts)
                                   + f" && python -m lib.toys.decay --merge PARTS --out FILE"}
        text = json.dumps({"meta": meta, "runs": [r for p in parts for r in p["runs"]]}, default=float)
        atomic_write_text(Path(args.out), text)
        print(f"merged {len(args.merge)} files into {args.out}")
        return
    only = [int(i) for i in args.only.split(",")] if args.only else None
    runs = run_grid(args.profile, jobs=args.jobs, only=only)
    prof = PROFILES[args.profile]
    meta = {"profile": args.profile, "protocol": asdict(prof["proto"]), "conditions": list(prof.get("conditions", lang.CONDITIONS)),
            "stacks": [asdict(s) | {"weight_decay": wd, "dropout": p} for s, wd, p in prof["stacks"]],
            "torch": torch.__version__,
            "command": f"python -m lib.toys.decay --profile {args.profile} --jobs {args.jobs}"
                       + (f" --only {args.only}" if args.only else "") + " --out FILE"}
    atomic_write_text(Path(args.out), json.dumps({"meta": meta, "runs": runs}, default=float))
    print(f"wrote {len(runs)} stacks to {args.out}")


if __name__ == "__main__":
    main()
