"""Refit _TOKEN_WEIGHTS (claude_proxy.py, section TOKENS) on fixtures/token_corpus*.json.

Calibration-time only: needs numpy and scipy.  Least squares on the relative error of every sample, each
category weighted equally, weights >= 0 except the "word after a space" discount; prints the rounded
weights and the accuracy table (the README's) that they give.
Run: python bench/fit_token_weights.py [--table]
"""

import collections
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import lsq_linear

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import claude_proxy as cp  # noqa: E402

FREE = {2, 17, 18, 19}  # feature indexes that may be negative (the last three: on top of "other 3-byte")
FIXED = {23: 0.9, 24: 1.0}  # scripts the corpus lacks: other 2-byte, other 3-byte (Bengali, Georgian, ...)


def load():
    rows = []
    for name in ("token_corpus.json", "token_corpus_i18n.json"):
        for s in json.loads((ROOT / "fixtures" / name).read_text(encoding="utf-8")):
            f = np.array(cp._token_features(s["text"]), float)
            rows.append((s["category"], s["source"], s["text"], s["cl100k"], f))
    return rows


def fit(rows):
    ncat = collections.Counter(r[0] for r in rows)
    k = len(rows[0][4])
    A = np.array([r[4] / r[3] / np.sqrt(ncat[r[0]]) for r in rows])
    b = np.array([1 / np.sqrt(ncat[r[0]]) for r in rows])
    lo = np.array([-np.inf if i in FREE else 0.0 for i in range(k)])
    hi = np.full(k, np.inf)
    for i, v in FIXED.items():
        lo[i], hi[i] = v - 1e-9, v + 1e-9
    return lsq_linear(A, b, bounds=(lo, hi)).x


def fit_minimax(rows, category_bound=0.07):
    """Smallest worst error over the samples of >= 2,000 characters, every category within category_bound."""
    from scipy.optimize import linprog

    k = len(rows[0][4])
    A, b = [], []
    for _cat, _src, text, cl, f in rows:
        if len(text) >= 2000:
            A += [list(f / cl) + [-1], list(-f / cl) + [-1]]
            b += [1, -1]
    cats = collections.defaultdict(lambda: [np.zeros(k), 0])
    for cat, _src, _text, cl, f in rows:
        cats[cat][0] += f
        cats[cat][1] += cl
    for f, cl in cats.values():
        A += [list(f / cl) + [0], list(-f / cl) + [0]]
        b += [1 + category_bound, -(1 - category_bound)]
    bounds = [(None, None) if i in FREE else (0, None) for i in range(k)] + [(0, None)]
    for i, v in FIXED.items():
        bounds[i] = (v, v)
    res = linprog(np.r_[np.zeros(k), 1], A_ub=np.array(A), b_ub=np.array(b), bounds=bounds, method="highs")
    return res.x[:k]


def table(rows, weights):
    ref, est, n, worst = collections.Counter(), collections.Counter(), collections.Counter(), {}
    for cat, src, text, cl, f in rows:
        e = max(1, round(float(f @ weights)))
        ref[cat] += cl
        est[cat] += e
        n[cat] += 1
        err = e / cl - 1
        if len(text) >= 2000 and abs(err) >= abs(worst.get(cat, (0, ""))[0]):
            worst[cat] = (err, src)
    for cat in ref:
        w, src = worst.get(cat, (0.0, "-"))
        print(
            f"| {cat} | {n[cat]} | {ref[cat]:,} | {est[cat]:,} | {100 * (est[cat] / ref[cat] - 1):+.1f}% "
            f"| {100 * w:+.1f}% ({src}) |"
        )


def main():
    rows = load()
    if "--table" in sys.argv:  # the table of the weights in claude_proxy.py
        table(rows, np.array(cp._TOKEN_WEIGHTS))
        return
    w = fit_minimax(rows) if "--minimax" in sys.argv else fit(rows)
    w = np.array([round(x, 2) for x in w])
    print("_TOKEN_WEIGHTS =", ", ".join(f"{x:g}" for x in w))
    table(rows, w)


if __name__ == "__main__":
    main()
