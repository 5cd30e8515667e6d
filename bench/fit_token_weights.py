"""Refit _TOKEN_WEIGHTS (claude_proxy.py, section TOKENS) on fixtures/token_corpus*.json.

Calibration-time only: needs numpy and scipy.  Least squares on the relative error of every sample, each
category weighted equally, weights >= 0 except the "word after a space" discount; prints the rounded
weights and the accuracy table (the README's) that they give.
Run: python bench/fit_token_weights.py [--table | --minimax | --tables TABLES.json | --tokens]
  --table: the README table of the weights in claude_proxy.py; --minimax: minimise the worst long sample instead;
  --tables: the packed vocabulary tables (_CL100K_ONE_CHAR, _CL100K_ACCENTED) from the output of
  `node bench/cl100k_tables.mjs TABLES.json`; --tokens: time count_text_tokens on 200 KB of text.
"""

import base64
import collections
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from scipy.optimize import lsq_linear

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import claude_proxy as cp  # noqa: E402

FREE = {2, 17, 18, 19, 28}  # may be negative: "word after a space", 3 scripts on top of "other 3-byte", vocab words
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


def pack(data: bytes, name: str) -> None:
    text = base64.b85encode(zlib.compress(data, 9)).decode()
    print(f"{name} = (")
    for i in range(0, len(text), 110):
        print(f'    "{text[i : i + 110]}"')
    print(")")


def tables(path):
    """Packed vocabulary tables: a bitmap of the one-token CJK ideographs then Hangul syllables; the words."""
    t = json.loads(Path(path).read_text(encoding="utf-8"))
    blob = bytearray()
    for chars, lo, hi in ((t["cjk"], 0x4E00, 0x9FFF), (t["hangul"], 0xAC00, 0xD7A3)):
        bits = bytearray((hi - lo + 8) // 8)
        for c in chars:
            i = ord(c) - lo
            bits[i >> 3] |= 1 << (i & 7)
        blob += bits
    pack(bytes(blob), "_CL100K_ONE_CHAR")
    pack(" ".join(t["accented"]).encode(), "_CL100K_ACCENTED")


def timing():
    """count_text_tokens on 200 KB: the first 200 KB of the multilingual corpus (as before) and an interleaved mix
    of every category of both corpora (code, prose in every script, CJK, emoji)."""
    corpora = [
        json.loads((ROOT / "fixtures" / n).read_text(encoding="utf-8"))
        for n in ("token_corpus.json", "token_corpus_i18n.json")
    ]
    by_cat = collections.defaultdict(list)
    for s in corpora[0] + corpora[1]:
        by_cat[s["category"]].append(s["text"])
    mixed, i = [], 0
    while sum(map(len, mixed)) < 200_000:
        mixed += [texts[i % len(texts)] for texts in by_cat.values()]
        i += 1
    cases = {
        "first 200 KB of token_corpus_i18n.json": "\n".join(s["text"] for s in corpora[1])[:200_000],
        "200 KB interleaved mix of all categories": "\n".join(mixed)[:200_000],
        "200 KB English prose + code (ASCII)": ("\n".join(s["text"] for s in corpora[0] if s["category"] != "cjk") * 2)[
            :200_000
        ],
    }
    for name, text in cases.items():
        cp.count_text_tokens(text[:1000])
        best = min(_timed(cp.count_text_tokens, text) for _ in range(20))
        print(f"{name}: {best * 1000:.2f} ms")


def _timed(fn, arg):
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def main():
    if "--tables" in sys.argv:
        tables(sys.argv[sys.argv.index("--tables") + 1])
        return
    if "--tokens" in sys.argv:
        timing()
        return
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
