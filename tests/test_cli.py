"""The command line end to end: `bert_token_embed.main(ARGS)` in this process (a few runs start
`python bert_token_embed.py` afresh), the real bert-serving-client, stand-in servers on loopback."""

import os
import re
import signal
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

from bert_token_embed import MERGES, __version__
from conftest import REPO, SCRIPT, free_port_pair, load_pickle, merge_reference

HELLO = "Hello World !\nI'm hankcs\n"


@pytest.fixture(scope="module")
def srv(uncased_server):
    """A lowercasing server with the server's default max_seq_len 25 (hidden 64, so positions can be solved for)."""
    with uncased_server(max_seq_len=25, hidden=64) as server:
        yield server


@pytest.fixture(scope="module")
def tables(srv, expect):
    return expect.Tables(srv)


@pytest.fixture
def embed(srv, run_cli, run_cli_process, tmp_path, expect):
    """Run the CLI on some text against ``srv`` (or given servers); return (arrays, stderr).

    ``stdin=True`` gives the text on standard input ("-"); ``process=True`` runs a fresh Python.
    """
    def embed_text(text, *args, servers=(), stdin=None, name="out.pkl", process=False):
        source = tmp_path / "in.txt"
        if isinstance(text, str):
            text = text.encode("utf-8")
        source.write_bytes(text)
        out = tmp_path / name
        rc, _, err = (run_cli_process if process else run_cli)(
            ["-" if stdin else source, "-o", out, *expect.server_args(*(servers or [srv])), *args],
            stdin=text if stdin else None)
        assert rc == 0, err
        return load_pickle(out), err
    return embed_text


def check_all(srv, tables, expect, text, arrays, how):
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    assert isinstance(arrays, list) and len(arrays) == len(lines)
    for line, array in zip(lines, arrays):
        expect.check_line(srv, tables, line, array, how)


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("how", MERGES)
def test_input_txt_every_merge_exact(srv, embed, expect, how):
    arrays, _ = embed(HELLO, "--merge", how)
    assert [a.shape for a in arrays] == [(3, 64), (2, 64)]
    assert all(a.dtype == np.float32 for a in arrays)
    v = srv.piece_vector
    # "Hello World !" -> hello world !, one piece each, at positions 1, 2, 3.
    np.testing.assert_allclose(arrays[0], np.stack([v("hello", 1), v("world", 2), v("!", 3)]), rtol=1e-6, atol=1e-6)
    # "I'm hankcs" -> i ' m | hank ##cs, positions 1-3 and 4-5.
    im = [v("i", 1), v("'", 2), v("m", 3)]
    hankcs = [v("hank", 4), v("##cs", 5)]
    np.testing.assert_allclose(arrays[1], np.stack([merge_reference(im, how, 64), merge_reference(hankcs, how, 64)]),
                               rtol=1e-5, atol=1e-6)
    for line, array in zip(HELLO.splitlines(), arrays):
        np.testing.assert_allclose(array, expect.line(srv, line, how), rtol=1e-5, atol=1e-6)


def test_default_merge_is_mean(srv, embed, expect):
    arrays, _ = embed(HELLO)
    np.testing.assert_allclose(arrays[1], expect.line(srv, "I'm hankcs", "mean"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["mean", "last"])
def test_cased_server(cased_server, embed, expect, how):
    text = "Hello World !\nI'm hankcs\nCafé naïve İstanbul JAKARTATown\n"
    with cased_server(max_seq_len=None) as cased:
        arrays, _ = embed(text, "--merge", how, servers=[cased])
        assert cased.tokenize("Hello")[1:-1] == ["Hello"]
        for line, array in zip(text.splitlines(), arrays):
            np.testing.assert_allclose(array, expect.line(cased, line, how), rtol=1e-5, atol=1e-6)


HARD_LINES = [
    "Café naïve İstanbul",
    "😀 ☃ 龘 x",
    "a \u200b b \ufeff",
    "x \u0301 y",
    "co\u00adoperate 1996-08-27",
    "中国 人民 的",
    "a ||| b |||",
    "[CLS] [UNK] [SEP] [MASK]",
    "a\tb\u00a0c\u3000d",
    "a" * 101 + " " + "b" * 100,
    "a\u2028b c\x1cd e\x85f",
    "ΟΣ Σ ǅ ß",
]


@pytest.mark.parametrize("how", MERGES)
def test_hard_tokens_get_exactly_their_own_pieces(srv, tables, embed, expect, how):
    text = "\n".join(HARD_LINES) + "\n"
    arrays, _ = embed(text, "--merge", how)
    check_all(srv, tables, expect, text, arrays, how)
    assert arrays[2].shape[0] == 4 and not arrays[2][1].any() and not arrays[2][3].any()


def test_zero_piece_tokens_are_counted_in_the_summary(embed):
    _, err = embed("a \u200b b \ufeff\n\u200b\n")
    assert "3 with no word piece" in err


# ---------------------------------------------------------------- blank lines and line ends

def test_blank_and_whitespace_only_lines_keep_their_place(srv, tables, embed, expect):
    text = "a b\n\n   \n\t\nc\n\u3000\n"
    arrays, _ = embed(text)
    assert [a.shape for a in arrays] == [(2, 64), (0, 64), (0, 64), (0, 64), (1, 64), (0, 64)]
    check_all(srv, tables, expect, text, arrays, "mean")


def test_only_blank_lines(embed):
    arrays, _ = embed("\n\n")
    assert [a.shape for a in arrays] == [(0, 64), (0, 64)]


def test_empty_input_gives_an_empty_list(embed):
    arrays, err = embed("")
    assert arrays == []
    assert "0 lines" in err


def test_last_line_without_newline(srv, embed, expect):
    arrays, _ = embed("Hello World !\nI'm hankcs")
    assert len(arrays) == 2
    np.testing.assert_allclose(arrays[1], expect.line(srv, "I'm hankcs", "mean"), rtol=1e-5, atol=1e-6)


def test_crlf_and_bom_input_equal_plain_input(embed):
    plain, _ = embed(HELLO)
    crlf, err = embed(b"\xef\xbb\xbfHello World !\r\nI'm hankcs\r\n")
    assert "warning" not in err
    assert len(crlf) == 2
    for a, b in zip(plain, crlf):
        np.testing.assert_array_equal(a, b)


def test_carriage_return_inside_a_line_warns_and_is_whitespace(srv, tables, embed, expect):
    arrays, err = embed(b"a\rb c\n")
    assert "carriage return" in err and "line 1" in err
    assert arrays[0].shape == (3, 64)
    expect.check_line(srv, tables, "a\rb c", arrays[0], "mean")


def test_standard_input(embed):
    from_file, _ = embed(HELLO)
    from_stdin, _ = embed(HELLO, stdin=True)
    assert len(from_stdin) == 2
    for a, b in zip(from_file, from_stdin):
        np.testing.assert_array_equal(a, b)


def test_a_fresh_process_reads_a_real_pipe_and_writes_what_main_writes(embed):
    """End to end as a user runs it: ``python bert_token_embed.py - ...`` with a pipe on standard input."""
    in_process, _ = embed(HELLO)
    piped, err = embed(HELLO, stdin=True, process=True)
    assert err.strip().splitlines()[-1].startswith("2 lines, 5 tokens")
    assert len(piped) == 2
    for a, b in zip(in_process, piped):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- long lines (max_seq_len 25: 23 pieces a window)

def vocabulary_words(n, seed=0):
    words = ["the", "hankcs", "I'm", "1996-08-27", "naïve", "中国", "😀", "unaffable", "!", "\u200b", "|||", "x",
             "JAKARTATown", "[CLS]", "internationalization", "a-b-c-d"]
    rng = np.random.default_rng(seed)
    return [words[i] for i in rng.integers(0, len(words), n)]


@pytest.mark.parametrize("how", MERGES)
def test_long_lines_every_token_gets_its_row(srv, tables, embed, expect, how):
    lines = [
        " ".join(vocabulary_words(2000)),
        "!" * 60,                                   # one token longer than a window
        "x " + "!" * 60 + " y",
        "a-" * 30 + " b",                           # 60 basic tokens in one token
        " ".join(["hankcs"] * 12),                  # 24 pieces: cut inside the last token
        " ".join(["a"] * 23),                       # exactly one window
        " ".join(["a"] * 24),
        "q" * 90 + " z",                            # one word of many pieces: keeps the pieces that fit
        "中" * 40,
    ]
    text = "\n".join(lines) + "\n"
    arrays, err = embed(text, "--merge", how, "--batch-size", "16")
    check_all(srv, tables, expect, text, arrays, how)
    assert arrays[0].shape == (2000, 64)
    assert re.search(r"\b8 lines needed extra windows", err), err
    assert "; 1 word longer than a window kept only the pieces that fit" in err, err


def test_long_line_rows_come_from_windows_with_left_context(srv, embed):
    """Every token but the first sits after position 1 of its window: it has left context."""
    arrays, _ = embed(" ".join(["a"] * 200), "--merge", "first")
    positions = []
    for row in arrays[0]:
        distance = [np.abs(row - srv.piece_vector("a", p)).max() for p in range(1, 24)]
        assert min(distance) < 1e-5
        positions.append(1 + int(np.argmin(distance)))
    assert positions[0] == 1
    assert all(p > 1 for p in positions[1:]), positions


def test_line_of_many_short_windows_finishes(embed):
    arrays, _ = embed(" ".join(["hankcs"] * 20000) + "\n", "-q")
    assert arrays[0].shape == (20000, 64)


# ---------------------------------------------------------------- input errors

def test_non_utf8_input_exits_2_naming_the_line(srv, run_cli, tmp_path, expect):
    source = tmp_path / "in.txt"
    source.write_bytes(b"Hello World !\nab\xffc d\n")
    rc, _, err = run_cli([source, "-o", tmp_path / "out.pkl", *expect.server_args(srv)])
    assert rc == 2
    assert "line 2" in err and "byte 16 of the file" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out.pkl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


@pytest.mark.parametrize("errors, tokens", [("replace", ["abc", "d"]), ("ignore", ["abc", "d"])])
def test_errors_replace_goes_on(srv, embed, expect, errors, tokens):
    arrays, _ = embed(b"Hello World !\nab\xffc d\n", "--errors", errors)
    assert arrays[1].shape == (2, 64)
    line = "ab\ufffdc d" if errors == "replace" else "abc d"
    np.testing.assert_allclose(arrays[1], expect.line(srv, line, "mean"), rtol=1e-5, atol=1e-6)
    # U+FFFD is deleted by BERT's cleaning, so both give the same rows.
    np.testing.assert_allclose(arrays[1], expect.line(srv, "abc d", "mean"), rtol=1e-5, atol=1e-6)


def test_other_encoding(srv, embed, expect):
    arrays, _ = embed("Café naïve\n".encode("latin-1"), "--encoding", "latin-1")
    np.testing.assert_allclose(arrays[0], expect.line(srv, "Café naïve", "mean"), rtol=1e-5, atol=1e-6)


def test_missing_input_file(srv, run_cli, tmp_path, expect):
    rc, _, err = run_cli([tmp_path / "nope.txt", "-o", tmp_path / "out.pkl", *expect.server_args(srv)])
    assert rc == 2 and "nope.txt" in err and "Traceback" not in err


# ---------------------------------------------------------------- server checks



def test_no_server_exits_2_with_the_start_command(run_cli, tmp_path):
    (tmp_path / "in.txt").write_text(HELLO)
    port = free_port_pair()
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "--ip", "127.0.0.1", "--port", port,
                          "--port-out", port + 1, "--timeout", "1"], timeout=30)
    assert rc == 2
    assert "bert-serving-start" in err and "-pooling_strategy NONE" in err and "-show_tokens_to_client" in err
    assert str(port) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("options, flag", [
    ({"pooling_strategy": 2}, "-pooling_strategy NONE"),
    ({"pooling_strategy": 1}, "-pooling_strategy NONE"),
    ({"show_tokens_to_client": False}, "-show_tokens_to_client"),
])
def test_unsuitable_server_exits_2_naming_the_flag(uncased_server, run_cli, tmp_path, expect, options, flag):
    (tmp_path / "in.txt").write_text(HELLO)
    with uncased_server(**options) as bad:
        rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *expect.server_args(bad), "-q"])
    assert rc == 2, err
    assert flag in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_other_server_version_warns_and_works(uncased_server, embed, expect):
    with uncased_server(server_version="1.9.0", max_seq_len=None) as old:
        arrays, err = embed(HELLO, servers=[old])
        assert "warning" in err and "1.9.0" in err
        np.testing.assert_allclose(arrays[1], expect.line(old, "I'm hankcs", "mean"), rtol=1e-5, atol=1e-6)


def test_server_with_max_seq_len_none(uncased_server, embed, expect):
    with uncased_server(max_seq_len=None) as dynamic:
        line = " ".join(vocabulary_words(100))
        arrays, err = embed(line + "\n" + HELLO, servers=[dynamic])
        np.testing.assert_allclose(arrays[0], expect.line(dynamic, line, "mean"), rtol=1e-5, atol=1e-6)
        assert re.search(r"\b0 lines needed extra windows", err), err


# ---------------------------------------------------------------- failures leave the output alone

def failure_cases(srv_port, srv_port_out):
    ok = ["--server", f"127.0.0.1:{srv_port}:{srv_port_out}"]
    return {
        "non-utf8": (b"Hello\n\xff\n", ok),
        "missing-input": (None, ok),
        "no-server": (HELLO.encode(), ["--ip", "127.0.0.1", "--port", str(free_port_pair()), "--timeout", "1"]),
        "bad-batch-size": (HELLO.encode(), ok + ["--batch-size", "0"]),
        "bad-encoding": (HELLO.encode(), ok + ["--encoding", "no-such-codec"]),
    }


@pytest.mark.parametrize("case", ["non-utf8", "missing-input", "no-server", "bad-batch-size", "bad-encoding",
                                  "pooling", "no-show-tokens"])
@pytest.mark.parametrize("name", ["out.pkl", "out.npy"])
def test_failure_leaves_existing_output_byte_identical(srv, uncased_server, run_cli, tmp_path, expect, case, name):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    previous = {name: b"previous output \x00\x01", "out.offsets.npy": b"previous offsets", "other.txt": b"keep"}
    for file_name, data in previous.items():
        (outputs / file_name).write_bytes(data)
    bad = None
    if case in ("pooling", "no-show-tokens"):
        bad = uncased_server(**({"pooling_strategy": 2} if case == "pooling" else {"show_tokens_to_client": False}))
        bad.start()
        data, server = HELLO.encode(), expect.server_args(bad)
    else:
        data, server = failure_cases(srv.port, srv.port_out)[case]
    try:
        if data is not None:
            (inputs / "in.txt").write_bytes(data)
        rc, _, err = run_cli([inputs / "in.txt", "-o", outputs / name, *server], timeout=30)
    finally:
        if bad is not None:
            bad.stop()
    assert rc == 2, err
    assert "Traceback" not in err
    assert expect.listing(outputs) == previous
    assert [p.name for p in inputs.iterdir()] == (["in.txt"] if data is not None else [])


def test_output_directory_missing(srv, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text(HELLO)
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "no" / "out.pkl", *expect.server_args(srv)])
    assert rc == 2 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "no").exists()


def test_output_is_a_directory(srv, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text(HELLO)
    (tmp_path / "out.pkl").mkdir()
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *expect.server_args(srv)])
    assert rc == 2 and "directory" in err and "Traceback" not in err
    assert list((tmp_path / "out.pkl").iterdir()) == []


def test_success_replaces_existing_output_and_leaves_no_temporary_file(srv, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text(HELLO)
    (tmp_path / "out.pkl").write_bytes(b"old")
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *expect.server_args(srv)])
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.pkl"]
    assert len(load_pickle(tmp_path / "out.pkl")) == 2


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_file_gets_the_usual_permissions(srv, run_cli, tmp_path, expect, umask):
    """Like any file the user creates (open(..., "w")): 0666 minus the umask, not mkstemp's private 0600."""
    (tmp_path / "in.txt").write_text(HELLO)
    before = os.umask(umask)   # the run is in-process: it sees this umask
    try:
        rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *expect.server_args(srv)])
    finally:
        os.umask(before)
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "out.pkl").st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------- messages

def test_summary_line_on_stderr(srv, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text(HELLO + "\n")
    rc, out, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *expect.server_args(srv)])
    assert rc == 0 and out == ""
    last = err.strip().splitlines()[-1]
    assert re.match(r"3 lines, 5 tokens \(0 with no word piece, zero rows\), 0 lines needed extra windows, "
                    r"[0-9.]+ s -> .*out\.pkl", last), last


def test_quiet_silences_everything(srv, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text(HELLO)
    rc, out, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "-q", *expect.server_args(srv)])
    assert rc == 0 and out == "" and err == ""


def test_help_exits_0(run_cli_process):
    """In a fresh process: argparse's exit, raised through ``command_line`` at the script's end."""
    rc, out, err = run_cli_process(["--help"])
    assert rc == 0 and err == ""
    for option in ("--merge", "--server", "--ip", "--port", "--port-out", "--batch-size", "--timeout", "-q",
                   "--input-format conllu", "--stack-layers", "--model minilm", "-o ud.hdf5"):
        assert option in out


def test_a_fresh_process_ends_with_the_status_main_returns_and_its_message_whole(run_cli_process, tmp_path):
    """``command_line`` ends the process at once (no teardown), after the streams are flushed: nothing is lost."""
    rc, out, err = run_cli_process([tmp_path / "missing.txt", "-o", tmp_path / "out.pkl"])
    assert (rc, out) == (2, "") and err.endswith("\n") and err.count("\n") == 1 and "missing.txt" in err
    assert not (tmp_path / "out.pkl").exists()


def test_a_fresh_process_without_stdout_or_under_a_profiler_still_ends_as_main_says(tmp_path):
    """stdout closed (sys.stdout is None), and cProfile, whose report is printed at its own end, after the run's."""
    missing = [str(tmp_path / "missing.txt"), "-o", str(tmp_path / "out.pkl")]
    closed = subprocess.run([sys.executable, str(SCRIPT), *missing], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=REPO, text=True, preexec_fn=lambda: os.close(1))
    assert closed.returncode == 2 and closed.stderr.count("\n") == 1, closed.stderr
    profiled = subprocess.run([sys.executable, "-m", "cProfile", str(SCRIPT), *missing], capture_output=True,
                              stdin=subprocess.DEVNULL, cwd=REPO, text=True)
    assert "missing.txt not found" in profiled.stderr and "function calls" in profiled.stdout   # cProfile exits 0


def test_version_exits_0(run_cli):
    assert run_cli(["--version"]) == (0, f"bert_token_embed.py {__version__}\n", "")


@pytest.mark.parametrize("args, status, stream, text", [
    (["--version"], 0, "stdout", f"bert-token-embed {__version__}\n"),
    (["--bogus"], 2, "stderr", "bert_token_embed: error: unrecognized arguments: --bogus (see bert-token-embed -h)\n"),
    (["--help"], 0, "stdout", "  bert-token-embed input.txt --model minilm "),
])
def test_the_installed_command_calls_itself_by_its_name(args, status, stream, text):
    """What pip's bert-token-embed script runs: command_line, with sys.argv[0] the script's path."""
    code = (f"import sys; sys.argv = ['/somewhere/bin/bert-token-embed'] + {args!r}; sys.path.insert(0, {str(REPO)!r}); "
            "from bert_token_embed import command_line; sys.exit(command_line())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    shown = getattr(proc, stream)
    assert proc.returncode == status and (shown == text or args == ["--help"] and text in shown), proc
    assert "python bert_token_embed.py" not in shown


def test_a_run_stopped_by_sigint_in_process_says_so_and_puts_back_the_signal_handlers(run_cli, tmp_path):
    """The runner's timeout sends SIGINT: main stops as on Ctrl-C and leaves the handlers it found."""
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with socket.socket() as listener:   # accepts connections and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(subprocess.TimeoutExpired) as caught:
            run_cli([REPO / "input.txt", "-o", tmp_path / "o.pkl", "--server", f"127.0.0.1:{port}:{port}",
                     "--timeout", "30"], timeout=1)
    assert caught.value.stderr.splitlines()[-1] == (f"bert_token_embed: interrupted after 0 lines; {tmp_path / 'o.pkl'} "
                                                    f"was left as it was; --resume keeps partial work of long runs")
    assert {number: signal.getsignal(number) for number in before} == before
    assert not list(tmp_path.iterdir())


def test_bad_option_exits_2(run_cli):
    rc, _, err = run_cli(["--merge", "median"])
    assert rc == 2 and "median" in err


# ---------------------------------------------------------------- the server's Unicode tables differ from ours

def test_unk_token_cut_by_the_window_is_not_taken_as_whole(srv, tables, embed, expect):
    """U+166D is punctuation to a server on Python 3.7 (before Unicode 12) and a symbol to us.

    "😀᙭" is one basic token ([UNK]) to the tool and two ([UNK] [UNK]) to the server. With
    22 tokens before it the window is cut after its first [UNK]: the 23 pieces look
    like 23 whole tokens; the token must not keep just one of its two pieces.
    """
    text = "a " * 22 + "😀\u166d\n" + "a " * 22 + "😀\u166d b c\n"
    assert expect.token_pieces(srv, "😀\u166d") == ["[UNK]", "[UNK]"]
    arrays, _ = embed(text)
    check_all(srv, tables, expect, text, arrays, "mean")


def test_opposite_unicode_surprises_do_not_shift_rows(srv, tables, embed, expect):
    """The server strips U+1734 (a combining mark before Unicode 14) and splits U+166D off.

    The tool expects [UNK] for "᜴" (none on the server) and one [UNK] for "᙭᙭" (two on
    the server): the counts add up, yet "᜴" must not get 😀's row nor 😀 the next one.
    """
    text = "\u1734 😀 \u166d\u166d\nx \u1734 😀 \u166d\u166d y\n"
    assert expect.token_pieces(srv, "\u1734") == []
    arrays, _ = embed(text)
    check_all(srv, tables, expect, text, arrays, "mean")


def test_unicode_surprises_are_resolved_by_asking_the_server(srv, tables, embed, expect):
    """Surprises that do not cancel out: the tool re-aligns per token and says so."""
    text = "a᙭b x\n\u1734 y\nx \ufa6e y\n😀 \u1734 😀\n"
    arrays, err = embed(text)
    check_all(srv, tables, expect, text, arrays, "mean")
    assert "re-aligned" in err


@pytest.mark.parametrize("how", ["mean", "sum"])
def test_token_longer_than_a_window_keeps_all_its_pieces_when_checked_with_the_server(srv, tables, embed, expect, how):
    """A unit asked about alone ("pieces" request) comes back cut at max_seq_len like any sentence.

    Here the tool asks (U+00AD and U+200B were other categories in Unicode 3.2, 😀 did not
    exist), so the server's answer for the 30-piece token is its first 23 pieces; they
    must not be taken as the whole token (7 pieces lost, and not even counted as cut).
    """
    text = ("\xad " + "a-" * 15 + " A\n"
            "\u200b " + "a-" * 15 + "\n"
            "😀" + "a-" * 15 + "\n"
            + "😀-" * 20 + " x\n")
    assert len(expect.token_pieces(srv, "a-" * 15)) == 30
    arrays, _ = embed(text, "--merge", how)
    check_all(srv, tables, expect, text, arrays, how)


# ---------------------------------------------------------------- option checks

@pytest.mark.parametrize("args, words", [
    (["--timeout", "inf"], "--timeout inf"),
    (["--timeout", "nan"], "--timeout nan"),
    (["--timeout", "0"], "--timeout 0"),
    (["--in-flight", "0"], "--in-flight must be at least 1"),
    (["--layer", "-1"], "goes with --model"),
    (["--max-seq-len", "64"], "goes with --model"),
    (["--encoding", "utf-16"], "iconv -f utf-16 -t utf-8"),
])
def test_options_that_cannot_work_are_one_line_before_any_work(run_cli, tmp_path, args, words):
    (tmp_path / "in.txt").write_text(HELLO)
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *args])
    assert rc == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_utf8_sig_drops_only_the_leading_bom(uncased_server, run_cli, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"\xef\xbb\xbfa b\n\xef\xbb\xbf c\n")
    with uncased_server(max_seq_len=None, hidden=4) as srv:
        rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "--encoding", "utf-8-sig", "-q",
                              "--server", f"127.0.0.1:{srv.port}:{srv.port_out}"])
    assert rc == 0, err
    assert [a.shape for a in load_pickle(tmp_path / "out.pkl")] == [(2, 4), (2, 4)]   # line 2 is "\ufeff c": two tokens


def test_progress_bar_counts_lines_in_bulk_and_shows_tokens_per_second(capsys):
    """The server loop counts a run of finished lines at once: the bar moves by all of them, and its rate shows whenever it passes a multiple of 64 lines."""
    from bert_token_embed import ProgressBar, Stats
    bar = ProgressBar(total=200)
    stats = Stats(on_lines=bar.lines_done)
    stats.add(60, 600)
    assert (bar.bar.n, bar.tokens, bar.bar.postfix) == (60, 600, None)
    stats.add(10, 100, empty_tokens=2, long_lines=1)
    assert (bar.bar.n, bar.tokens) == (70, 700) and bar.bar.postfix.endswith("tokens/s")
    assert (stats.lines, stats.tokens, stats.empty_tokens, stats.long_lines) == (70, 700, 2, 1)
    bar.close()
    assert "70/200" in capsys.readouterr().err
