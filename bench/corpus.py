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


COMMON_EMOJI = ["😂", "❤️", "🔥", "🥺", "😍", "👍", "🙏", "😭", "✨", "🎉", "💯", "😊"]
NEW_EMOJI = ["🥱", "🫠"]   # Unicode 12 and 14: newer than a Python 3.7 server's Unicode 11
ACCENTED = ["café", "naïve", "résumé", "São", "Zürich", "über", "fiancé"]
CJK = ["北", "京", "中", "国", "日", "本"]     # one word piece each, like every word here


def make_tweet_corpus(path, lines, emoji=True, words_per_line=None, seed=0):
    """Write tweet-like lines: common words, about one token in eight an emoji, some accented and CJK words.

    Every token is one word piece on an uncased BERT (common emoji are one [UNK]), so a
    line's piece count is its token count. About one line in ten holds a newer emoji
    (NEW_EMOJI). With ``emoji=False`` the same lines come out with a plain word in each
    emoji's place; ``words_per_line`` fixes the length (default: 6 to 30 tokens).
    """
    rng = np.random.default_rng(seed)
    words = [w for w in open(VOCAB, encoding="utf-8").read().split("\n")
             if w.isascii() and w.isalpha() and len(w) > 1][:8000]   # frequent whole words
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            n = words_per_line or int(rng.integers(6, 31))
            tokens = [words[i] for i in rng.integers(0, len(words), n)]
            for k, kind in enumerate(rng.random(n)):
                if kind < 0.04:
                    tokens[k] = ACCENTED[rng.integers(len(ACCENTED))]
                elif kind < 0.07:
                    tokens[k] = CJK[rng.integers(len(CJK))]
            slots = np.flatnonzero(rng.random(n) < 1 / 8)
            new = rng.random() < 0.1
            for j, k in enumerate(slots):
                replacement = NEW_EMOJI[rng.integers(len(NEW_EMOJI))] if new and j == 0 else \
                    COMMON_EMOJI[rng.integers(len(COMMON_EMOJI))]
                plain = words[rng.integers(len(words))]   # drawn either way: both corpora share the other words
                tokens[k] = replacement if emoji else plain
            f.write(" ".join(tokens) + "\n")
