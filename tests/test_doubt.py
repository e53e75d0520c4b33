"""Doubtful alignments: the server's Unicode tables from its Python version, and questions asked once, in batches.

The stand-in reports Python 3.7 and, like the real server on it, deletes every character
that Unicode 11.0 lacks; its request counter counts what the tool sends.
"""

import math
import unicodedata

import numpy as np
import pytest
import unicode_age

from bert_token_embed import (OUR_UNICODE, PieceCounter, PieceQuestions, Sentence, ServerUnicode, Window,
                              basic_tokens, unicode_of_python)
from conftest import load_pickle
from standin_server import PYTHON_37

PLAIN_WORDS = ["the", "cat", "sat", "on", "mat", "hankcs", "naive", "beijing", "lol", "today"]
EMOJI = ["😂", "❤️", "🔥", "🥺", "😭", "👍🏽", "🥱", "🫠", "café", "北京", "naïve"]   # 🥱 is Unicode 12, 🫠 14


def tweets(n, emoji, seed=3):
    """n lines of 5-25 tokens; about one in eight is an emoji (or accented/CJK word) where ``emoji``, else a plain word."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        tokens = [PLAIN_WORDS[i] for i in rng.integers(0, len(PLAIN_WORDS), int(rng.integers(5, 26)))]
        for k in np.flatnonzero(rng.random(len(tokens)) < 1 / 8):
            tokens[k] = EMOJI[rng.integers(0, len(EMOJI))] if emoji else PLAIN_WORDS[rng.integers(0, len(PLAIN_WORDS))]
        lines.append(" ".join(tokens))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the server's Unicode version

@pytest.mark.parametrize("reported, version", [
    ("3.7.16 (default, May  9 2026, 10:00:00) \n[GCC 12.2.0]", (11, 0)),
    ("3.6.15 (default)", (9, 0)),
    ("3.5.2", (8, 0)),
    ("3.10.13", (13, 0)),
    ("2.7.18", None),
    ("", None),
    (None, None),
    (37, None),
])
def test_the_unicode_version_follows_the_python_version(reported, version):
    assert unicode_of_python(reported) == version


def test_an_older_server_lacks_exactly_the_characters_newer_than_its_unicode():
    server = ServerUnicode((11, 0))

    def newer(cp):
        try:
            return unicode_age.version(cp) > (11, 0)
        except ValueError:   # unassigned even now
            return True

    for cp in [*range(0, 0x800), *range(0x1F300, 0x1FB00), *range(0x2B700, 0x2B830), 0xE0001, 0x10FFFF]:
        assert server.lacks(chr(cp)) == newer(cp), hex(cp)


def test_a_server_as_new_as_ours_lacks_nothing_and_doubts_nothing():
    server = ServerUnicode(OUR_UNICODE)
    assert not server.lacks("\U0001fae0") and not server.doubtful("\xad\u200b\u1734")


@pytest.mark.parametrize("unit, doubtful", [
    ("😂", False), ("🥺", False), ("🥱", False), ("café", False), ("北京", False),   # as here, or deleted there
    ("\xad", True),       # soft hyphen: punctuation (Pd) in Unicode 3.2, a format control now
    ("a\u200bb", True),   # zero-width space: a space in 3.2
    ("¶", True),          # a symbol in 3.2, punctuation now
    ("plain", False),
])
def test_an_older_server_doubts_only_characters_whose_class_for_bert_changed(unit, doubtful):
    assert ServerUnicode((11, 0)).doubtful(unit) == doubtful


def test_a_server_that_does_not_say_keeps_the_conservative_rule():
    server = ServerUnicode(None)
    assert server.doubtful("😂") and server.doubtful("\xad") and not server.doubtful("café")
    assert not server.lacks("\U0001fae0")


def test_a_newer_server_doubts_characters_unassigned_here():
    unassigned = next(chr(cp) for cp in range(0x1FB00, 0x20000) if unicodedata.category(chr(cp)) == "Cn")
    server = ServerUnicode((OUR_UNICODE[0] + 1, 0))
    assert server.doubtful("a" + unassigned) and not server.doubtful("\xad")


def test_basic_tokens_delete_what_the_server_lacks():
    lacks = ServerUnicode((11, 0)).lacks
    assert basic_tokens("🥱ok", True, lacks) == ("ok",)
    assert basic_tokens("🫠", True, lacks) == ()
    assert basic_tokens("🥺x", True, lacks) == ("🥺x",)
    assert basic_tokens("🥱ok", True) == ("🥱ok",)


# ---------------------------------------------------------------- questions: each unit once, in full requests

def window(tokens):
    """A window over all of a new sentence's tokens."""
    sentence = Sentence(1, tokens, PieceCounter(True))
    return Window(sentence, 0, 0, len(tokens), len(tokens))


def test_a_unit_is_asked_about_once_however_many_windows_wait_for_it():
    questions = PieceQuestions(limit=510)
    first, second = window(["a", "b"]), window(["b", "c", "b"])
    questions.park(first, ["a", "b"], None, [None, None])
    questions.park(second, ["b", "c", "b"], None, questions.known(second.units))
    assert list(questions.unsent) == ["a", "b", "c"]
    assert questions.take_unsent(2, everything=False) == ["a", "b"]    # one full batch; "c" waits for more
    assert questions.take_unsent(2, everything=False) == []
    assert questions.take_unsent(2, everything=True) == ["c"]
    assert questions.answer(["a", "b"], [["[CLS]", "a", "[SEP]"], ["[CLS]", "b", "##x", "[SEP]"]]) \
        and [p.window for p in questions.answer(["c"], [["[CLS]", "c", "[SEP]"]])] == [second]
    assert questions.known(["b", "c", "d"]) == [["b", "##x"], ["c"], None]


def test_answers_arrive_in_any_order_and_release_each_window_once():
    questions = PieceQuestions(limit=510)
    w = window(["x", "y"])
    questions.park(w, ["x", "y"], None, [None, None])
    assert questions.answer(["y"], [["[CLS]", "y", "[SEP]"]]) == []
    (parked,) = questions.answer(["x"], [["[CLS]", "x", "[SEP]"]])
    assert parked.known_pieces() == [["x"], ["y"]] and not questions.waiters


# ---------------------------------------------------------------- request counts against the stand-in

@pytest.fixture(scope="module")
def standin(uncased_server):
    with uncased_server(max_seq_len=None, hidden=8) as srv:
        yield srv


def run_counted(srv, run_cli, tmp_path, text, *extra):
    """Embed ``text`` through ``srv``; return (arrays, requests, sentences the server got, stderr)."""
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    before = srv.stats
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl",
                          "--server", f"127.0.0.1:{srv.port}:{srv.port_out}", *extra])
    assert rc == 0, err
    after = srv.stats
    return (load_pickle(tmp_path / "out.pkl"), after["requests"] - before["requests"],
            after["sentences"] - before["sentences"], err)


def test_emoji_text_costs_no_more_requests_than_plain_text(standin, run_cli, tmp_path, expect):
    emoji_text, plain_text = tweets(500, emoji=True), tweets(500, emoji=False)   # one chunk: the same batches every run
    arrays, requests, sentences, err = run_counted(standin, run_cli, tmp_path, emoji_text, "--merge", "mean")
    _, plain_requests, plain_sentences, _ = run_counted(standin, run_cli, tmp_path, plain_text)
    # No question about a unit alone: the server got each line once. With -max_seq_len NONE a batch also ends
    # where padding would pass 10%, so the batches differ a little as the texts' lengths do.
    assert sentences == plain_sentences == 500 + 1 and requests <= plain_requests + 2, (requests, plain_requests)
    assert "re-aligned" not in err
    tables = expect.Tables(standin)
    for line, array in zip(emoji_text.splitlines(), arrays):
        expect.check_line(standin, tables, line, array, "mean")


def test_doubtful_units_are_asked_once_each_in_full_requests(standin, run_cli, tmp_path, expect):
    """Every line holds a soft hyphen alone (no piece; punctuation in Unicode 3.2), so every line is checked.

    500 lines are one chunk, so both runs send the same embed requests.
    """
    text = "".join(f"{line} \xad w{i % 300}\n" for i, line in enumerate(tweets(500, emoji=False).splitlines()))
    units = {t for line in text.splitlines() for t in line.split()}
    arrays, requests, sentences, err = run_counted(standin, run_cli, tmp_path, text, "--merge", "last",
                                                   "--batch-size", "256")
    _, plain_requests, _, _ = run_counted(standin, run_cli, tmp_path, text.replace(" \xad", ""), "--batch-size", "256")
    assert requests - plain_requests <= math.ceil(len(units) / 256)
    assert sentences == 500 + 1 + len(units)   # each distinct unit asked about exactly once
    assert "500 lines re-aligned" in err
    tables = expect.Tables(standin)
    for line, array in zip(text.splitlines(), arrays):
        expect.check_line(standin, tables, line, array, "last")


def test_a_fixed_length_server_gets_full_batches(uncased_server, run_cli, tmp_path):
    """It pads every sentence to max_seq_len anyway, so only the batch size ends a request."""
    rng = np.random.default_rng(9)
    text = "".join(" ".join(rng.choice(PLAIN_WORDS, int(rng.integers(1, 11)))) + "\n" for _ in range(1000))
    with uncased_server(max_seq_len=25, hidden=8) as srv:
        arrays, requests, sentences, _ = run_counted(srv, run_cli, tmp_path, text, "--batch-size", "256")
    assert len(arrays) == 1000 and sentences == 1000 + 1
    assert requests == math.ceil(1000 / 256) + 1   # chunks of 512 and 488 lines: 2 + 2 requests, and the probe


def test_a_doubtful_first_line_does_not_end_a_long_run_early(standin, run_cli, tmp_path):
    """Output waits for the first line's answer until two chunks of lines are open; reading goes on after it."""
    text = "\xad the cat\n" + "the cat sat\n" * 2999
    arrays, _, _, err = run_counted(standin, run_cli, tmp_path, text)
    assert len(arrays) == 3000 and [a.shape[0] for a in arrays[:2]] == [3, 3] and "3000 lines" in err


def test_servers_on_pythons_with_other_unicode_tables_are_refused(uncased_server, run_cli, tmp_path):
    (tmp_path / "in.txt").write_text("a b\n")
    with uncased_server(max_seq_len=None, hidden=4) as old, \
            uncased_server(max_seq_len=None, hidden=4, python_version="3.6.15 (default)", unicode_version=(9, 0)) as older:
        rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "-q",
                              "--server", f"127.0.0.1:{old.port}:{old.port_out}",
                              "--server", f"127.0.0.1:{older.port}:{older.port_out}"])
    assert rc == 2 and err.count("\n") == 1 and f"different Unicode tables (3.6.15, {PYTHON_37.split()[0]})" in err
    assert not (tmp_path / "out.pkl").exists()


def test_the_next_windows_of_lines_a_reply_left_unfinished_go_out_together(uncased_server, run_cli, tmp_path):
    """Long lines through max_seq_len 25: words of several pieces cut windows short, and the rest follow in shared requests."""
    rng = np.random.default_rng(4)
    words = PLAIN_WORDS + ["unaffable", "hankcs", "zhongguancun"]   # several pieces each
    text = "".join(" ".join(rng.choice(words, int(rng.integers(30, 60)))) + "\n" for _ in range(200))
    with uncased_server(max_seq_len=25, hidden=8) as srv:
        arrays, requests, sentences, _ = run_counted(srv, run_cli, tmp_path, text, "--batch-size", "32")
    assert len(arrays) == 200 and sentences > 3 * 200
    assert requests <= math.ceil(sentences / 32) + 1 + 8, (requests, sentences)
