"""Probe-fitting speed: ``lib.probes.LogisticProbe`` (Newton's method, as notebook 02 fits it)
against scikit-learn's ``LogisticRegression`` (lbfgs) on the same standardised activations,
measured in the same run.

    python benchmarks/probe_fit.py               # toy-4l, last-token residual stream, every layer
    python benchmarks/probe_fit.py --reps 1      # quicker

Both solve the same problem: L2-regularised logistic regression with an unpenalised bias,
``C = 1``, on activations standardised with the training rows' statistics.  The activations are
the residual stream at the last token of all the toy world's truth statements (about 10,000, as
many as the xor dataset of notebook 02), after every block of the model, and the features are
the statement's truth (weakly readable), whether it is negated, and whether it is about numbers
(separable).  Separable and
correlated features are what make lbfgs slow: the optimum sits far out and the problem is badly
conditioned; Newton's method takes the curvature into account and needs a dozen steps.

Reported per (layer, feature): the median seconds per fit of each solver over ``--reps`` runs
(one solver after the other), their ratio, lbfgs's iteration count, whether the two agree on every held-out
prediction, and the largest coefficient difference.  Ratios are measured in the same run, so the
machine's speed cancels.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib import xor  # noqa: E402
from lib.datasets import TRUTH_DATASETS, make_truth_dataset  # noqa: E402
from lib.models import load_model  # noqa: E402
from lib.probes import LogisticProbe, train_test_indices  # noqa: E402


def sklearn_fit(X: np.ndarray, y: np.ndarray, train: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    probe.fit(X[train], y[train])
    return probe


def timed(fn, reps: int):
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-4l")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)

    import pandas as pd

    frame = pd.concat([make_truth_dataset(n).assign(dataset=n) for n in TRUTH_DATASETS], ignore_index=True)
    frame["negated"] = frame["statement"].str.contains(" not ").astype(int)
    frame["numbers"] = frame["dataset"].isin(["larger_than", "smaller_than"]).astype(int)
    model = load_model(args.model, device="cpu")
    acts = xor.layer_activations(model, frame["statement"], dataset="bench_probe_fit", cache=False)
    split = train_test_indices(len(frame), seed=0)
    print(f"{args.model}: {len(frame)} statements, {len(split.train)} training rows, d_model {model.cfg.d_model}; "
          f"median of {args.reps} fits per solver")
    rows = []
    for layer, X in acts.items():
        X = X.astype(np.float64)
        for feature in ("label", "negated", "numbers"):
            y = frame[feature].to_numpy()
            t_sk, sk = timed(lambda: sklearn_fit(X, y, split.train), args.reps)
            t_nt, nt = timed(lambda: LogisticProbe(fit_bias=True, standardize=True, solver="newton")
                             .fit(X[split.train], y[split.train]), args.reps)
            agree = float((sk.predict(X[split.test]) == nt.predict(X[split.test])).mean())
            dw = float(np.abs(sk[-1].coef_[0] - nt.w_).max())
            rows.append({"layer": layer, "feature": feature, "lbfgs_s": t_sk, "newton_s": t_nt,
                         "speedup": t_sk / t_nt, "lbfgs_iter": int(sk[-1].n_iter_[0]), "newton_iter": nt.n_iter_,
                         "accuracy": float((nt.predict(X[split.test]) == y[split.test]).mean()),
                         "predictions_agree": agree, "max_coef_diff": dw})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    total_sk, total_nt = table["lbfgs_s"].sum(), table["newton_s"].sum()
    print(f"\nall {len(table)} fits: lbfgs {total_sk:.2f} s, Newton {total_nt:.2f} s -> {total_sk / total_nt:.1f}x; "
          f"held-out predictions identical in {int((table['predictions_agree'] == 1).sum())}/{len(table)} fits; "
          f"largest coefficient difference {table['max_coef_diff'].max():.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
