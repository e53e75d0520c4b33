"""Generated corpora for the benchmarks: realistic, varied sentence lengths over BERT's own vocabulary."""

import os

import numpy as np

VOCAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "vocab-uncased.txt")


def make_corpus(path, lines, seed=0):
    """Write ``lines`` sentences of log-normal length (median ~20 tokens, at most 120) from the vocabulary's words."""
    rng = np.random.default_rng(seed)
    words = [w for w in open(VOCAB, encoding="utf-8").read().split("\n")
             if w.isalpha() and not w.startswith("[") and len(w) > 1]
    weights = 1.0 / np.arange(1, len(words) + 1)   # Zipf: frequent words first in BERT's vocab order
    weights /= weights.sum()
    invented = ["hankcs", "Zhongguancun", "Kazuhiro", "naïve", "Ñandú", "COVID-19", "1996-08-27", "e-mail"]
    with open(path, "w", encoding="utf-8") as f:
        for n in np.clip(rng.lognormal(np.log(20), 0.5, lines).astype(int), 1, 120):
            picks = [words[i] for i in rng.choice(len(words), size=n, p=weights)]
            for k in np.flatnonzero(rng.random(n) < 0.05):
                picks[k] = invented[rng.integers(len(invented))]
            f.write(" ".join(picks) + "\n")
