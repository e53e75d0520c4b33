#!/usr/bin/env python
"""A stand-in for bert-serving-server 1.10.0 that speaks its exact ZeroMQ wire protocol.

The real server needs TensorFlow 1, so tests run the real ``bert_serving.client.BertClient``
against this server over loopback instead.  It mirrors the real process layout with three
threads: a *ventilator* that owns the PULL socket, a single *worker* that tokenizes and
computes rows in arrival order, and a *sink* that owns the PUB socket.

Rows are deterministic (a random piece table plus a random position table) unless a Hugging
Face BERT model directory is given, in which case they are that model's hidden states.

Script mode::

    python tests/standin_server.py --port 5555 --port-out 5556 [options]

prints ``ready port=N port_out=M`` when listening and a JSON line of stats to stderr on exit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import queue
import random
import re
import signal
import string
import sys
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
import zmq

__all__ = ["StandinServer", "make_cased_vocab", "VOCAB_UNCASED", "POOLING_STRATEGIES"]

log = logging.getLogger("standin_server")

VOCAB_UNCASED = str(Path(__file__).resolve().parent / "data" / "vocab-uncased.txt")

MAX_POSITION_EMBEDDINGS = 512
MAX_BATCH_SIZE = 256  # the real ventilator splits larger requests into slices of this size
PYTHON_37 = "3.7.16 (default, May  9 2026, 07:31:42) \n[GCC 12.2.0]"   # sys.version as a real server reports it
CONFIG_REPLY_DELAY_S = 0.1  # the real sink's "dirty fix of slow-joiner"
PAIR_RE = re.compile(r"^(.*) \|\|\| (.*)$")  # the exact pattern of extract_features.read_examples
CLS, SEP, UNK = "[CLS]", "[SEP]", "[UNK]"

POOLING_STRATEGIES = {
    "NONE": 0, "REDUCE_MAX": 1, "REDUCE_MEAN": 2, "REDUCE_MEAN_MAX": 3,
    "FIRST_TOKEN": 4, "CLS_TOKEN": 4, "LAST_TOKEN": 5, "SEP_TOKEN": 5, "CLS_POOLED": 6,
}

TERMINATION, SHOW_CONFIG, SHOW_STATUS = b"TERMINATION", b"SHOW_CONFIG", b"SHOW_STATUS"


# ---------------------------------------------------------------------------
# Vocabulary and tokenization
# ---------------------------------------------------------------------------

def load_vocab(path) -> dict[str, int]:
    """Read vocab.txt the way BERT's load_vocab does: one stripped token per line, id = line number."""
    vocab = {}
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab[line.strip()] = index
    return vocab


def make_cased_vocab(directory) -> str:
    """Write a deterministic cased vocab (uncased plus upper-case single characters); return its path."""
    with open(VOCAB_UNCASED, encoding="utf-8") as f:
        entries = [line.rstrip("\n") for line in f]
    seen = set(entries)
    extra = []
    for entry in entries:
        prefix, char = ("##", entry[2:]) if entry.startswith("##") else ("", entry)
        if len(char) != 1:
            continue
        upper = char.upper()
        if upper != char and len(upper) == 1 and prefix + upper not in seen:
            extra.append(prefix + upper)
            seen.add(prefix + upper)
    for word in ("Hello", "World", "##ello"):
        if word not in seen:
            extra.append(word)
            seen.add(word)
    path = Path(directory) / "vocab-cased.txt"
    path.write_text("\n".join(entries + extra) + "\n", encoding="utf-8")
    return str(path)


# The characters whose general category in Unicode 11 (a Python 3.7 server) is not this Python's
# (Unicode 14 or 15), found by comparing Python 3.7's unicodedata with 3.11's: their Unicode 11 category.
CATEGORY_IN_UNICODE_11 = {"\u166d": "Po", "\u1734": "Mn", "\u1cf2": "Mc", "\u1cf3": "Mc", "\ua9bd": "Mc"}


# Characters HF tokenizers splits off as punctuation that are none to Python 3.7 (U+111C9 is a mark
# there; found against the real server): a letter no BERT vocabulary holds stands in for them, so
# that their word is one [UNK], as on the real server.
NOT_PUNCTUATION_TO_PYTHON = str.maketrans({"\U000111c9": "\u0800"})
ASCII = frozenset(map(chr, range(128)))


@lru_cache(maxsize=None)
def _unicode_age(char: str) -> tuple[int, int]:
    """The Unicode version that added the character; (99, 0) if none has yet."""
    import unicode_age
    try:
        return unicode_age.version(ord(char))
    except ValueError:   # unassigned
        return (99, 0)


class BertWordPiece:
    """BERT's FullTokenizer (BasicTokenizer + WordPiece) built on HF tokenizers, with no special tokens."""

    def __init__(self, vocab: dict[str, int], do_lower_case: bool, cache_words: bool = False,
                 unicode_version: tuple[int, int] | None = None):
        from tokenizers import Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        self.do_lower_case = do_lower_case
        # A real server's Python has the Unicode tables of its version: BERT's cleaning deletes
        # every character they lack (category Cn is C*). None: the tables of HF tokenizers.
        self.unicode_version = unicode_version
        self._as_python = {}   # non-ASCII character -> what that Python's cleaning makes of it ("" if deleted)
        # word -> pieces, or None: BERT tokenizes each whitespace-separated word of the cleaned,
        # lower-cased text on its own, so a word's pieces can be remembered (the benchmark's
        # simulated GPU server keeps its own CPU time low this way).
        self._word_pieces = {} if cache_words else None
        # Cleaning and CJK spacing come first, as in BERT.
        self._clean = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
        # No added/special tokens on purpose: the real BasicTokenizer splits a literal "[SEP]" like any text.
        self._tokenizer = Tokenizer(WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=100))
        # Accents are stripped only when lower-casing, as in BERT.
        self._tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=False, handle_chinese_chars=False, strip_accents=do_lower_case, lowercase=False)
        self._tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    def pieces(self, texts: list[str]) -> list[list[str]]:
        """Return the word pieces of each text, without [CLS]/[SEP]."""
        texts = list(map(self._cleaned, texts))
        if self.do_lower_case:
            # Python's str.lower(), not Rust's char-wise lowercase: only it applies the final-sigma
            # rule ("ΟΣ" -> "ος") that the real server's tokenization.py gets from Python.
            texts = [t.lower() for t in texts]
        if self._word_pieces is None:
            return self._encode(texts)
        words = [t.split() for t in texts]
        known = self._word_pieces
        new = list(set().union(*words).difference(known))
        known.update(zip(new, self._encode(new)))
        return [list(itertools.chain.from_iterable(map(known.__getitem__, ws))) for ws in words]

    def _cleaned(self, text: str) -> str:
        """BERT's cleaning (whitespace to spaces, control characters out) and CJK spacing of one text."""
        spaced = text.replace("\t", " ")
        if spaced.isascii() and spaced.isprintable():   # most text, tab-separated tokens too: cleaning leaves it
            return spaced
        return self._clean.normalize_str(self._known_only(text))

    def _known_only(self, text: str) -> str:
        """The text without the characters newer than ``unicode_version``, nor those Python's BERT deletes.

        HF tokenizers' own tables are older than Unicode 11 for some characters: it keeps
        (as [UNK]) format characters such as U+08E2 and, when stripping accents, marks such
        as U+07FD, which a real server's Python deletes (found against the real server).
        """
        if self.unicode_version is None or text.isascii():   # ASCII is in every version's tables
            return text
        chars, as_python = set(text).difference(ASCII), self._as_python
        for char in chars.difference(as_python):   # each character is looked at once
            deleted = _unicode_age(char) > self.unicode_version or self._python_deletes(char)
            as_python[char] = "" if deleted else NOT_PUNCTUATION_TO_PYTHON.get(ord(char), char)
        changes = {ord(c): as_python[c] for c in chars if as_python[c] != c}
        return text.translate(changes) if changes else text

    def _python_deletes(self, char: str) -> bool:
        """True if Google's BasicTokenizer on Python 3.7 drops the character: category C*, or Mn when lowercasing."""
        category = CATEGORY_IN_UNICODE_11.get(char) or unicodedata.category(char)
        return category.startswith("C") or (self.do_lower_case and category == "Mn")

    def _encode(self, texts: list[str]) -> list[list[str]]:
        """The pieces of cleaned (and lower-cased) texts."""
        return [e.tokens for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


@dataclass
class Features:
    """Tokens and segment ids of one worker batch (a slice of at most MAX_BATCH_SIZE sentences)."""

    tokens: list[list[str]]
    type_ids: list[list[int]]
    seq_len: int  # the padded length T of this slice


class FeatureBuilder:
    """Turn a batch of strings (or pre-tokenized lists) into BERT features like extract_features.py."""

    def __init__(self, vocab: dict[str, int], do_lower_case: bool, max_seq_len: int | None,
                 max_position_embeddings: int = MAX_POSITION_EMBEDDINGS, cache_words: bool = False,
                 unicode_version: tuple[int, int] | None = None):
        self.vocab = vocab
        self.max_seq_len = max_seq_len
        self.max_position_embeddings = max_position_embeddings
        self._wordpiece = BertWordPiece(vocab, do_lower_case, cache_words, unicode_version)


    def mark_unk(self, tokens: list[str]) -> list[str]:
        """Replace every token that is not an exact vocab entry with [UNK] (FullTokenizer.mark_unk_tokens)."""
        return [t if t in self.vocab else UNK for t in tokens]

    def split_examples(self, batch: list) -> list[tuple[list[str], list[str]]]:
        """Split sentences into (pieces_a, pieces_b); empty strings are skipped, as read_examples does."""
        if all(isinstance(s, list) for s in batch):
            return [self._split_tokenized(s) for s in batch]
        pairs = []
        for line in batch:
            if not line:
                continue
            match = PAIR_RE.match(line.strip())
            pairs.append((match.group(1), match.group(2)) if match else (line.strip(), ""))
        # One batched call for all a and b sides: much faster than a call per sentence.
        pieces = self._wordpiece.pieces([text for pair in pairs for text in pair])
        return [(pieces[2 * i], pieces[2 * i + 1]) for i in range(len(pairs))]

    def _split_tokenized(self, tokens: list[str]) -> tuple[list[str], list[str]]:
        """Split a pre-tokenized sentence at its first '|||' element and mark unknown tokens."""
        if "|||" in tokens:
            j = tokens.index("|||")
            return self.mark_unk(tokens[:j]), self.mark_unk(tokens[j + 1:])
        return self.mark_unk(tokens), []

    def build(self, batch: list) -> Features:
        """Build the features of one slice, with the slice's own T when max_seq_len is dynamic."""
        examples = self.split_examples(batch)
        seq_len = self.max_seq_len
        if seq_len is None:
            if not examples:
                raise ServerDeath("worker", "max() of an empty slice (only empty strings)")
            seq_len = max(len(a) + len(b) for a, b in examples)
            seq_len += 3 if any(b for _, b in examples) else 2
            seq_len = min(seq_len, self.max_position_embeddings)
        tokens, type_ids = [], []
        for pieces_a, pieces_b in examples:
            toks, types = self._assemble(list(pieces_a), list(pieces_b), seq_len)
            tokens.append(toks)
            type_ids.append(types)
        return Features(tokens, type_ids, seq_len)

    @staticmethod
    def _assemble(pieces_a: list[str], pieces_b: list[str], seq_len: int) -> tuple[list[str], list[int]]:
        """Truncate and add [CLS]/[SEP] exactly as convert_lst_to_features does."""
        if pieces_b:
            truncate_seq_pair(pieces_a, pieces_b, seq_len - 3)
        else:
            pieces_a = pieces_a[:seq_len - 2]
        tokens = [CLS] + pieces_a + [SEP]
        type_ids = [0] * len(tokens)
        if pieces_b:  # may have been emptied by truncation, then the pair collapses to a single sequence
            tokens += pieces_b + [SEP]
            type_ids += [1] * (len(pieces_b) + 1)
        return tokens, type_ids


def truncate_seq_pair(tokens_a: list, tokens_b: list, max_length: int) -> None:
    """Pop the last token of the longer side (b on ties) until the pair fits, in place."""
    while len(tokens_a) + len(tokens_b) > max_length:
        (tokens_a if len(tokens_a) > len(tokens_b) else tokens_b).pop()


# ---------------------------------------------------------------------------
# Row backends
# ---------------------------------------------------------------------------

class TableRows:
    """Deterministic rows: piece_table[piece id] + position_table[position], padding exactly 0."""

    def __init__(self, vocab: dict[str, int], hidden: int, seed: int):
        self.vocab = vocab
        self.hidden = hidden
        rng = np.random.default_rng(seed)
        num_ids = max(vocab.values()) + 1
        self.piece_table = rng.standard_normal((num_ids, hidden), dtype=np.float32)
        self.position_table = np.float32(0.1) * rng.standard_normal(
            (MAX_POSITION_EMBEDDINGS + 8, hidden), dtype=np.float32)

    def piece_vector(self, piece: str, position: int) -> np.ndarray:
        """Return the row for one piece at one position."""
        return self.piece_table[self.vocab[piece]] + self.position_table[position]

    def rows(self, features: Features) -> np.ndarray:
        """Return [n, T, hidden] float32 rows for one slice."""
        ids, mask = ids_and_mask(features, self.vocab)
        out = self.piece_table[ids]
        out += self.position_table[:features.seq_len]
        out[~mask] = 0.0
        return out


class SimulatedRows(TableRows):
    """Rows for the simulated-GPU benchmark mode: real-sized and all zero.

    Their values do not matter there (padding must be zero, and is), and an array of
    untouched zero pages costs this process almost nothing to make and send, as a GPU
    server's host would spend its CPU on its own machine, not on the client's.
    """

    zeros = np.zeros(0, np.float32)   # never written: every reply is a view of the same zero pages

    def rows(self, features: Features) -> np.ndarray:
        shape = (len(features.tokens), features.seq_len, self.hidden)
        size = math.prod(shape)
        if self.zeros.size < size:
            self.zeros = np.zeros(size, np.float32)
            self.zeros.flags.writeable = False
        return self.zeros[:size].reshape(shape)


class ModelRows:
    """Rows from a Hugging Face BERT model: concatenated hidden states of pooling_layer, masked."""

    def __init__(self, model_path, pooling_layer: tuple[int, ...]):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
        self.vocab = dict(tokenizer.get_vocab())
        self.model = AutoModel.from_pretrained(str(model_path), local_files_only=True).eval()
        self.pooling_layer = tuple(pooling_layer)
        self.hidden = self.model.config.hidden_size * len(self.pooling_layer)
        self.max_position_embeddings = self.model.config.max_position_embeddings

    def rows(self, features: Features) -> np.ndarray:
        """Run the model on one padded slice and return [n, T, hidden] float32 rows."""
        torch = self._torch
        ids, mask = ids_and_mask(features, self.vocab)
        type_ids = np.zeros_like(ids)
        for i, types in enumerate(features.type_ids):
            type_ids[i, :len(types)] = types
        with torch.inference_mode():
            mask_t = torch.from_numpy(mask.astype(np.int64))
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=mask_t,
                             token_type_ids=torch.from_numpy(type_ids), output_hidden_states=True)
            layers = [out.hidden_states[hidden_state_index(l)] for l in self.pooling_layer]
            # Multiply by the mask like the real graph's mul_mask, so padding rows are exactly 0.
            x = torch.cat(layers, dim=-1) * mask_t.unsqueeze(-1).to(layers[0].dtype)
        return x.float().numpy()


def hidden_state_index(layer: int) -> int:
    """Map a bert-as-service encoder-layer index to HF hidden_states (whose entry 0 is the embeddings)."""
    return layer if layer < 0 else layer + 1


def ids_and_mask(features: Features, vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Return padded int64 ids ([PAD] = 0) and a boolean mask of shape [n, T]."""
    n, seq_len = len(features.tokens), features.seq_len
    ids = np.zeros((n, seq_len), dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=bool)
    for i, tokens in enumerate(features.tokens):
        ids[i, :len(tokens)] = [vocab[t] for t in tokens]
        mask[i, :len(tokens)] = True
    return ids, mask


def pool(rows: np.ndarray, lengths: list[int], strategy: int) -> np.ndarray:
    """Reduce [n, T, D] rows to [n, D'] with a pooling strategy (only needs to be well-formed)."""
    mask = np.arange(rows.shape[1])[None, :] < np.asarray(lengths)[:, None]
    real = mask[..., None]
    mean = np.where(real, rows, 0).sum(1) / np.maximum(np.asarray(lengths), 1)[:, None]
    big = np.where(real, rows, -np.inf).max(1)
    last = rows[np.arange(len(lengths)), np.maximum(np.asarray(lengths) - 1, 0)]
    by_strategy = {1: big, 2: mean, 3: np.concatenate([mean, big], axis=1),
                   4: rows[:, 0], 5: last, 6: np.tanh(rows[:, 0])}
    return np.ascontiguousarray(by_strategy[strategy], dtype=np.float32)


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class ServerDeath(Exception):
    """Raised inside a stand-in thread to emulate a real server component crashing."""

    def __init__(self, part: str, reason: str):
        super().__init__(reason)
        self.part = part


class StandinServer:
    """A bert-serving-server 1.10.0 stand-in on loopback, served by daemon threads."""

    def __init__(self, vocab=VOCAB_UNCASED, do_lower_case=True, max_seq_len=25, hidden=16,
                 pooling_strategy=0, show_tokens_to_client=True, server_version="1.10.0",
                 pooling_layer=(-2,), model=None, simulate_gpu=None, die_after=None, delay=0.0,
                 drop_reply=None, wrong_shape_on=None, tokens_mismatch_on=None,
                 config_overrides=None, seed=0, port=None, port_out=None, host="127.0.0.1",
                 max_batch_size=MAX_BATCH_SIZE,
                 python_version=PYTHON_37, unicode_version=(11, 0)):
        if max_seq_len is not None and max_seq_len <= 3:
            raise ValueError('"max_seq_len" must be > 3 (as bert-serving-start checks)')
        if model is not None and simulate_gpu is not None:
            raise ValueError("model mode and simulate_gpu are exclusive")
        self.do_lower_case = do_lower_case
        self.max_seq_len = max_seq_len
        self.pooling_strategy = int(pooling_strategy)
        self.show_tokens_to_client = show_tokens_to_client
        self.server_version = server_version
        self.python_version = python_version   # what SHOW_CONFIG reports; unicode_version, the tables it implies
        self.unicode_version = unicode_version
        self.pooling_layer = list(pooling_layer)
        self.model = str(model) if model is not None else None
        self.simulate_gpu = dict(simulate_gpu) if simulate_gpu else None
        self.die_after, self.delay, self.drop_reply = die_after, delay, drop_reply
        self.wrong_shape_on, self.tokens_mismatch_on = wrong_shape_on, tokens_mismatch_on
        self.config_overrides = dict(config_overrides or {})
        self.max_batch_size = max_batch_size
        self.host = host
        self.port, self.port_out = port, port_out
        self.vocab_path = str(vocab)

        if self.model is not None:
            self._rows = ModelRows(self.model, self.pooling_layer)
            max_positions = self._rows.max_position_embeddings
        else:
            if self.simulate_gpu:
                hidden = int(self.simulate_gpu.get("hidden", hidden))
            self._rows = (SimulatedRows if self.simulate_gpu else TableRows)(load_vocab(vocab), hidden, seed)
            max_positions = MAX_POSITION_EMBEDDINGS
        self.hidden = self._rows.hidden
        self._features = FeatureBuilder(self._rows.vocab, do_lower_case, max_seq_len, max_positions,
                                        cache_words=bool(self.simulate_gpu), unicode_version=unicode_version)

        self._lock = threading.Lock()
        self._stats = dict(requests=0, sentences=0, padded_positions=0, useful_positions=0,
                           computed_positions=0, busy_seconds=0.0, replies=0, config_requests=0,
                           idle_seconds=0.0)   # simulate_gpu: the device without work, from its first request on
        self._statistic = RequestStatistic()
        self.config_replies: list[tuple[float, float]] = []   # (asked, answered) perf_counter times of each config reply
        self._shutdown = threading.Event()
        self._dead_parts: set[str] = set()
        self._jobs: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._context = None
        self._encode_count = 0
        self._device_free_at = 0.0   # simulate_gpu: when the simulated device finishes its last request
        self._start_time = str(datetime.now())
        # Internal addresses as the real server reports them: libzmq's names for "ipc://*".
        self._ipc = [f"ipc://tmp{''.join(random.choices(string.ascii_letters + string.digits, k=6))}/socket"
                     for _ in range(10)]

    # -- public API ---------------------------------------------------------

    def start(self) -> "StandinServer":
        """Bind PULL and PUB (on free ports unless given) and start serving; returns self."""
        if self._context is not None:
            raise RuntimeError("server already started")
        self._context = zmq.Context()
        pull = self._bind(zmq.PULL, self.port)
        pub = self._bind(zmq.PUB, self.port_out)
        self.port = int(pull.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.port_out = int(pub.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        for name, target, arg in (("ventilator", self._ventilator_loop, pull),
                                  ("worker", self._worker_loop, None),
                                  ("sink", self._sink_loop, pub)):
            thread = threading.Thread(target=self._guard, args=(name, target, arg),
                                      name=f"standin-{name}-{self.port}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> None:
        """Stop all threads, close the sockets and the context (idempotent)."""
        self._shutdown.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._context is not None:
            # The socket-owning threads poll every 50 ms, so they are gone and term() cannot block.
            self._context.destroy(linger=0)
            self._context = None

    def wait(self, timeout=None) -> bool:
        """Block until the server shuts down (TERMINATION, stop(), or die_after); True if it did."""
        return self._shutdown.wait(timeout)

    @property
    def running(self) -> bool:
        """True while the server has not been shut down."""
        return self._context is not None and not self._shutdown.is_set()

    @property
    def dead(self) -> bool:
        """True once die_after (or an emulated crash of the whole server) has fired."""
        return {"ventilator", "worker", "sink"} <= self._dead_parts

    @property
    def stats(self) -> dict:
        """A snapshot of the counters."""
        with self._lock:
            return dict(self._stats)

    def tokenize(self, text: str) -> list[str]:
        """Return the tokens the server would send back for one sentence string."""
        if not text:
            raise ValueError("the real server skips empty strings, so they have no tokens")
        return self._features.build([text]).tokens[0]

    def piece_vector(self, piece: str, position: int) -> np.ndarray:
        """Return the row sent for a piece at a position (table mode only)."""
        if not isinstance(self._rows, TableRows):
            raise RuntimeError("piece_vector is only defined without a model")
        return self._rows.piece_vector(piece, position)

    def config(self, identity: bytes = b"", with_statistic: bool = False) -> dict:
        """Return the SHOW_CONFIG / SHOW_STATUS dict, in the real server's key order."""
        runtime = {
            "client": identity.decode("ascii"),
            "num_process": 2,  # the sink and one worker
            "ventilator -> worker": self._ipc[:8],
            "worker -> sink": self._ipc[8],
            "ventilator <-> sink": self._ipc[9],
            "server_current_time": str(datetime.now()),
            "device_map": [],
            "num_concurrent_socket": 8,
        }
        if with_statistic:
            runtime["statistic"] = self._statistic.value()
        args = {
            "ckpt_name": "bert_model.ckpt", "config_name": "bert_config.json", "cors": "*",
            "cpu": self.simulate_gpu is None, "device_map": [], "do_lower_case": self.do_lower_case,
            "fixed_embed_length": False, "fp16": False, "gpu_memory_fraction": 0.5,
            "graph_tmp_dir": None, "http_max_connect": 10, "http_port": None, "mask_cls_sep": False,
            "max_batch_size": self.max_batch_size, "max_seq_len": self.max_seq_len,
            "model_dir": self.model or str(Path(self.vocab_path).parent),
            "no_position_embeddings": False, "no_special_token": False, "num_worker": 1,
            "pooling_layer": self.pooling_layer, "pooling_strategy": self.pooling_strategy,
            "port": self.port, "port_out": self.port_out, "prefetch_size": 10,
            "priority_batch_size": 16, "show_tokens_to_client": self.show_tokens_to_client,
            "tuned_model_dir": None, "verbose": False, "xla": False,
        }
        static = {
            "tensorflow_version": ["1", "15", "5"],   # what pip installs for tensorflow==1.15.5
            "python_version": self.python_version,
            "server_version": self.server_version,
            "pyzmq_version": zmq.pyzmq_version(),
            "zmq_version": zmq.zmq_version(),
            "server_start_time": self._start_time,
        }
        return {**runtime, **args, **static, **self.config_overrides}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- threads ------------------------------------------------------------

    def _bind(self, kind: int, port: int | None):
        """Create a socket of a kind and bind it to the given port, or to a free one."""
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if port:
            sock.bind(f"tcp://{self.host}:{port}")
        else:
            sock.bind_to_random_port(f"tcp://{self.host}")
        return sock

    def _guard(self, name: str, loop, sock) -> None:
        """Run one thread's loop; an emulated crash kills that part, and the socket dies with it."""
        try:
            loop(sock) if sock is not None else loop()
        except ServerDeath as death:
            log.error("%s died: %s", death.part, death)
            self._kill(death.part)
        except Exception:  # a bug here must look like a crashed server part, not vanish silently
            log.exception("%s crashed", name)
            self._kill(name)
        finally:
            if sock is not None:
                # After die_after the last reply is already queued: let it reach the client.
                sock.close(linger=1000 if self.dead else 0)

    def _kill(self, *parts: str) -> None:
        """Mark server parts as dead; with all three gone the whole server is down."""
        with self._lock:
            self._dead_parts.update(parts)
        if self.dead:
            self._shutdown.set()

    def _alive(self, part: str) -> bool:
        """True while a part should keep serving."""
        return not self._shutdown.is_set() and part not in self._dead_parts

    def _ventilator_loop(self, pull) -> None:
        """Receive requests: answer control messages through the sink, queue encode jobs for the worker."""
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        while self._alive("ventilator"):
            if not poller.poll(50):
                continue
            request = pull.recv_multipart()
            if len(request) != 4 or not request[2].isdigit() or not request[3].isdigit():
                log.error("received a wrongly-formatted request (expected 4 frames, got %d): %r",
                          len(request), request[:4])
                continue
            identity, msg, req_id, msg_len = request
            self._statistic.update(identity, msg, int(msg_len))
            if msg == TERMINATION:
                log.info("TERMINATION received")
                self._shutdown.set()
            elif msg in (SHOW_CONFIG, SHOW_STATUS):
                self._queue_config(identity, msg, req_id)
            else:
                self._jobs.put((identity, msg, req_id, int(msg_len)))

    def _queue_config(self, identity: bytes, msg: bytes, req_id: bytes) -> None:
        """Hand a config reply to the sink; a non-ASCII identity crashes the real ventilator."""
        try:
            config = self.config(identity, with_statistic=msg == SHOW_STATUS)
        except UnicodeDecodeError:
            raise ServerDeath("ventilator", f"non-ASCII identity {identity!r} in {msg.decode()}")
        with self._lock:
            self._stats["config_requests"] += 1
        self._outbox.put(("config", [identity, json.dumps(config).encode(), req_id], time.perf_counter()))

    def _worker_loop(self) -> None:
        """Serve encode jobs one at a time in arrival order (a single worker)."""
        while self._alive("worker"):
            try:
                job = self._jobs.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                self._encode(*job)
            except ServerDeath as death:
                if death.part == "worker":
                    raise
                log.error("%s died: %s", death.part, death)  # another part's crash leaves the worker running
                self._kill(death.part)

    def _sink_loop(self, pub) -> None:
        """Publish replies; config replies first sleep 0.1 s like the real sink."""
        while self._alive("sink"):
            try:
                kind, frames, ready_at = self._outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if kind == "config":   # ready_at: when its request came
                time.sleep(CONFIG_REPLY_DELAY_S)
                pub.send_multipart(frames)
                with self._lock:
                    self.config_replies.append((ready_at, time.perf_counter()))
                continue
            if b"#" in frames[0] or b"@" in frames[0]:
                raise ServerDeath("sink", f"identity {frames[0]!r} breaks the job-id split")
            self._shutdown.wait(max(0.0, ready_at - time.perf_counter()))   # until the simulated device is done
            if self._die_after_reached():  # die_after=0: die instead of sending the first reply
                return
            pub.send_multipart(frames, copy=False)
            with self._lock:
                self._stats["replies"] += 1
            if self._die_after_reached():
                return

    def _die_after_reached(self) -> bool:
        """Kill the whole server once die_after encode replies have been sent."""
        if self.die_after is None or self.stats["replies"] < self.die_after:
            return False
        log.error("die_after=%d reached: the server goes away", self.die_after)
        self._kill("ventilator", "worker", "sink")
        return True

    # -- encoding -----------------------------------------------------------

    def _encode(self, identity: bytes, payload: bytes, req_id: bytes, msg_len: int) -> None:
        """Compute one encode request and queue its reply, applying the fault switches."""
        self._encode_count += 1
        ordinal = self._encode_count
        if self.max_seq_len is not None and self.max_seq_len > self._features.max_position_embeddings:
            # bert-serving-start does not clamp max_seq_len; the worker fails on its first batch (#283, #533).
            raise ServerDeath("worker", f"max_seq_len {self.max_seq_len} > max_position_embeddings "
                                        f"{self._features.max_position_embeddings}")
        batch = parse_batch(payload)
        reply = self._compute(batch)
        if len(reply.tokens) != msg_len:
            # The real sink waits for msg_len rows: fewer never complete, more crash its fill step.
            if len(reply.tokens) > msg_len:
                raise ServerDeath("sink", f"msg_len {msg_len} < {len(reply.tokens)} rows")
            log.error("msg_len %d != %d sentences: the request is never answered", msg_len,
                      len(reply.tokens))
            return
        if self.delay:
            self._shutdown.wait(self.delay)
        if ordinal == self.drop_reply:
            log.warning("drop_reply: not answering encode request %d", ordinal)
            return
        array, tokens = reply.array, reply.tokens
        if ordinal == self.wrong_shape_on:
            array = np.concatenate([array, np.zeros(array.shape[:-1] + (1,), array.dtype)], axis=-1)
        if ordinal == self.tokens_mismatch_on:
            tokens = [list(t) for t in tokens]
            del tokens[0][-2 if len(tokens[0]) > 2 else -1]
        header = {"dtype": str(array.dtype), "shape": list(array.shape),
                  "tokens": tokens if self.show_tokens_to_client else ""}
        self._outbox.put(("encode", [identity, json.dumps(header).encode(),
                                     np.ascontiguousarray(array), req_id], reply.ready_at))

    def _compute(self, batch: list) -> "Reply":
        """Build features per slice, compute rows, pad to the request's T and update the stats.

        With simulate_gpu the request also gets the time its reply is ready: one simulated
        device serves the requests in turn, each for its compute time, from when its
        features are built. The host work (tokenizing, building rows and replies) goes on
        meanwhile, as bert-serving-server's input pipeline feeds the GPU while it computes;
        the sink holds each reply until its time.
        """
        slices = [self._features.build(batch[i:i + self.max_batch_size])
                  for i in range(0, len(batch), self.max_batch_size)]
        slices = [s for s in slices if s.tokens]
        if not slices:
            return Reply(np.zeros((0, self.max_seq_len or 0, self.hidden), np.float32), [])
        tokens = [t for s in slices for t in s.tokens]
        seq_len = max(s.seq_len for s in slices)
        computed = sum(len(s.tokens) * s.seq_len for s in slices)
        parts = [self._rows.rows(s) for s in slices]
        if self.simulate_gpu:
            busy = (self.simulate_gpu.get("per_request_ms", 0.0) / 1e3
                    + self.simulate_gpu.get("per_position_us", 0.0) / 1e6 * computed)
            now = time.perf_counter()
            idle = max(0.0, now - self._device_free_at) if self._device_free_at else 0.0
            self._device_free_at = max(now, self._device_free_at) + busy
        else:
            busy = idle = 0.0
        if self.pooling_strategy == 0 and len(slices) == 1:
            array = parts[0]  # already [N, T, D]: skip the copy into the sink's zero buffer
        elif self.pooling_strategy == 0:
            array = np.zeros((len(tokens), seq_len, self.hidden), np.float32)
            offset = 0
            for s, rows in zip(slices, parts):
                array[offset:offset + len(s.tokens), :s.seq_len] = rows
                offset += len(s.tokens)
        else:
            array = np.concatenate([pool(rows, [len(t) for t in s.tokens], self.pooling_strategy)
                                    for s, rows in zip(slices, parts)])
        with self._lock:
            self._stats["requests"] += 1
            self._stats["sentences"] += len(tokens)
            self._stats["padded_positions"] += len(tokens) * seq_len
            self._stats["computed_positions"] += computed
            self._stats["useful_positions"] += sum(len(t) for t in tokens)
            self._stats["busy_seconds"] += busy
            self._stats["idle_seconds"] += idle
        return Reply(array, tokens, self._device_free_at if self.simulate_gpu else 0.0)


@dataclass
class Reply:
    """The array and per-sentence tokens of one encode request, and when it may be sent (perf_counter time)."""

    array: np.ndarray
    tokens: list[list[str]]
    ready_at: float = 0.0


def parse_batch(payload: bytes) -> list:
    """Decode an encode payload; anything the real worker would choke on kills the worker."""
    try:
        batch = json.loads(payload)
    except ValueError:
        raise ServerDeath("worker", f"payload is not JSON: {payload[:60]!r}")
    if not isinstance(batch, list) or not batch:
        raise ServerDeath("worker", "payload is not a non-empty JSON list")
    tokenized = all(isinstance(s, list) for s in batch)
    items = [t for s in batch for t in s] if tokenized else batch
    if not all(isinstance(t, str) for t in items):
        raise ServerDeath("worker", "payload must be a list of strings or a list of lists of strings")
    return batch


class RequestStatistic:
    """The real ServerStatistic for SHOW_STATUS: the same keys, computed the same way (without its 500-client cap)."""

    ACTIVE_S = 180   # a client is active while its last data request is this recent

    def __init__(self):
        self._lock = threading.Lock()
        self._requests_per_client: dict[bytes, int] = {}
        self._last_active: dict[bytes, float] = {}
        self._sizes: dict[int, int] = {}     # request size -> how many requests had it
        self._num_sys = 0
        self._last_time = time.perf_counter()
        self._intervals: list[float] = []    # the last 200 intervals between data requests

    def update(self, identity: bytes, msg: bytes, msg_len: int) -> None:
        """Count one well-formed request."""
        with self._lock:
            self._requests_per_client[identity] = self._requests_per_client.get(identity, 0) + 1
            if msg in (TERMINATION, SHOW_CONFIG, SHOW_STATUS):
                self._num_sys += 1
                return
            self._sizes[msg_len] = self._sizes.get(msg_len, 0) + 1
            now = time.perf_counter()
            self._last_active[identity] = now
            if len(self._intervals) < 200:
                self._intervals.append(now - self._last_time)
            else:   # as the real one: the oldest goes, the newest is not added
                self._intervals.pop(0)
            self._last_time = now

    def value(self) -> dict:
        """Return the counters with the real key names and meanings."""
        with self._lock:
            now = time.perf_counter()
            data = sum(self._sizes.values())
            value = {
                "num_data_request": data, "num_total_seq": sum(k * v for k, v in self._sizes.items()),
                "num_sys_request": self._num_sys, "num_total_request": data + self._num_sys,
                "num_total_client": len(self._requests_per_client),
                "num_active_client": sum(now - t < self.ACTIVE_S for t in self._last_active.values()),
            }
            value.update(min_max_avg("request_per_client", list(self._requests_per_client.values())))
            # Over the distinct sizes, as the real one (so num_min/num_max count sizes, not requests).
            value.update(min_max_avg("size_per_request", list(self._sizes),
                                     data and value["num_total_seq"] / data))
            value.update(min_max_avg("last_two_interval", self._intervals))
            value.update(min_max_avg("request_per_second", [1.0 / v for v in self._intervals if v > 0]))
            return value


def min_max_avg(name: str, values: list, avg=None) -> dict:
    """avg_/min_/max_/num_min_/num_max_NAME of the values, or nothing for no values (the real get_min_max_avg)."""
    if not values:
        return {}
    low, high = min(values), max(values)
    return {f"avg_{name}": sum(values) / len(values) if avg is None else avg, f"min_{name}": low,
            f"max_{name}": high, f"num_min_{name}": values.count(low), f"num_max_{name}": values.count(high)}


# ---------------------------------------------------------------------------
# Script mode
# ---------------------------------------------------------------------------

def parse_pooling_strategy(value: str) -> int:
    """Accept a pooling strategy as a name (NONE, REDUCE_MEAN, ...) or as its integer value."""
    return int(value) if value.lstrip("-").isdigit() else POOLING_STRATEGIES[value.upper()]


def parse_max_seq_len(value: str) -> int | None:
    """Accept an int or NONE for a dynamic max_seq_len."""
    return None if value.upper() == "NONE" else int(value)


def build_arg_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of script mode."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--port-out", type=int, default=5556)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--vocab", default=VOCAB_UNCASED)
    p.add_argument("--cased", action="store_true", help="use a generated cased vocab and do_lower_case=False")
    p.add_argument("--max-seq-len", type=parse_max_seq_len, default=25, help="an int or NONE")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--model", default=None, help="a Hugging Face BERT model directory")
    p.add_argument("--pooling-strategy", type=parse_pooling_strategy, default=0)
    p.add_argument("--pooling-layer", type=int, nargs="+", default=[-2])
    p.add_argument("--no-show-tokens", action="store_true")
    p.add_argument("--simulate-gpu-us", type=float, default=None, help="simulated microseconds per position")
    p.add_argument("--simulate-request-ms", type=float, default=0.0)
    p.add_argument("--server-version", default="1.10.0")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--die-after", type=int, default=None)
    p.add_argument("--drop-reply", type=int, default=None)
    p.add_argument("--wrong-shape-on", type=int, default=None)
    p.add_argument("--tokens-mismatch-on", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    """Run a stand-in server until SIGINT/SIGTERM, TERMINATION or die_after; print stats on exit."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="standin_server %(levelname)s %(message)s")
    vocab, do_lower_case = args.vocab, True
    scratch = tempfile.TemporaryDirectory(prefix="standin-vocab-")
    if args.cased:
        vocab, do_lower_case = make_cased_vocab(scratch.name), False
    simulate_gpu = None
    if args.simulate_gpu_us is not None:
        simulate_gpu = {"per_position_us": args.simulate_gpu_us,
                        "per_request_ms": args.simulate_request_ms, "hidden": args.hidden}
    srv = StandinServer(
        vocab=vocab, do_lower_case=do_lower_case, max_seq_len=args.max_seq_len, hidden=args.hidden,
        pooling_strategy=args.pooling_strategy, show_tokens_to_client=not args.no_show_tokens,
        server_version=args.server_version, pooling_layer=tuple(args.pooling_layer), model=args.model,
        simulate_gpu=simulate_gpu, die_after=args.die_after, delay=args.delay,
        drop_reply=args.drop_reply, wrong_shape_on=args.wrong_shape_on,
        tokens_mismatch_on=args.tokens_mismatch_on, seed=args.seed,
        port=args.port, port_out=args.port_out, host=args.host)
    stop_requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.set())
    srv.start()
    print(f"ready port={srv.port} port_out={srv.port_out}", flush=True)
    while not stop_requested.is_set() and not srv.wait(0.1):
        pass
    died = srv.dead
    srv.stop()
    scratch.cleanup()
    print(json.dumps(srv.stats), file=sys.stderr, flush=True)
    return 1 if died else 0


if __name__ == "__main__":
    sys.exit(main())
