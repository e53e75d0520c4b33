"""Word pieces back to tokens: basic_tokens, align, counts_from_known_pieces, merge_segments, token_rows.

The pieces always come from the stand-in server's tokenizer (HF tokenizers' BERT
normalizer, pre-tokenizer and WordPiece over the real BERT vocabulary), so every case
here is a case a server really produces.
"""

import json

import numpy as np
import pytest

from bert_token_embed import (DONE, MERGES, SEPARATOR, PieceCounter, Sentence, Unit, align, basic_tokens,
                              counts_from_known_pieces, merge_segments, request_message, sendable,
                              token_rows)
from conftest import merge_reference

UNCASED, CASED = True, False


@pytest.fixture(scope="module")
def tokenizers(uncased_server, cased_server):
    """Unstarted stand-ins (no sockets): only their tokenizers are used. Keys: do_lower_case, long/short windows."""
    return {(UNCASED, None): uncased_server(max_seq_len=None), (CASED, None): cased_server(max_seq_len=None),
            (UNCASED, 25): uncased_server(max_seq_len=25), (CASED, 25): cased_server(max_seq_len=25)}


def server_pieces(srv, tokens):
    """The pieces the server returns for the tokens sent the way the tool sends them, without [CLS]/[SEP]."""
    return srv.tokenize(SEPARATOR.join(tokens))[1:-1]


def own_counts(srv, tokens):
    """Each token's piece count when the server tokenizes it alone."""
    return [len(srv.tokenize(t)[1:-1]) for t in tokens]


# Lines, and the basic tokens per token: (uncased, cased).
CASES = {
    "Hello World !": ([("hello",), ("world",), ("!",)], [("Hello",), ("World",), ("!",)]),
    "I'm hankcs": ([("i", "'", "m"), ("hankcs",)], [("I", "'", "m"), ("hankcs",)]),
    "Café naïve İstanbul": ([("cafe",), ("naive",), ("istanbul",)], [("Café",), ("naïve",), ("İstanbul",)]),
    "😀 ☃ x": ([("😀",), ("☃",), ("x",)], [("😀",), ("☃",), ("x",)]),
    "a😀b": ([("a😀b",)], [("a😀b",)]),
    "龘 䶵 𠀀 中": ([("龘",), ("䶵",), ("𠀀",), ("中",)], [("龘",), ("䶵",), ("𠀀",), ("中",)]),
    "a\u200bb \u200b": ([("ab",), ()], [("ab",), ()]),
    "\u200b": ([()], [()]),
    "x \u0301 y": ([("x",), (), ("y",)], [("x",), ("\u0301",), ("y",)]),
    "e\u0301te\u0301": ([("ete",)], [("e\u0301te\u0301",)]),
    "co\u00adoperate": ([("cooperate",)], [("cooperate",)]),
    "中国 人民": ([("中", "国"), ("人", "民")], [("中", "国"), ("人", "民")]),
    "1996-08-27": ([("1996", "-", "08", "-", "27")], [("1996", "-", "08", "-", "27")]),
    "a ||| b": ([("a",), ("|", "|", "|"), ("b",)], [("a",), ("|", "|", "|"), ("b",)]),
    "|||": ([("|", "|", "|")], [("|", "|", "|")]),
    "[CLS] [UNK] [SEP]": ([("[", "cls", "]"), ("[", "unk", "]"), ("[", "sep", "]")],
                          [("[", "CLS", "]"), ("[", "UNK", "]"), ("[", "SEP", "]")]),
    "a\tb\u00a0c\u3000d": ([("a",), ("b",), ("c",), ("d",)], [("a",), ("b",), ("c",), ("d",)]),
    "\ufeff \u2060x \x7f\x00 \ufffd": ([(), ("x",), (), ()], [(), ("x",), (), ()]),
    "ΟΣ": ([("ος",)], [("ΟΣ",)]),
    "JAKARTATown": ([("jakartatown",)], [("JAKARTATown",)]),
    "hello,world": ([("hello", ",", "world")], [("hello", ",", "world")]),
}


@pytest.mark.parametrize("line", list(CASES))
@pytest.mark.parametrize("lowercase", [UNCASED, CASED], ids=["uncased", "cased"])
def test_basic_tokens_and_align_agree_with_the_server(tokenizers, line, lowercase):
    srv = tokenizers[(lowercase, None)]
    tokens = line.split()
    expected = [basic_tokens(t, lowercase) for t in tokens]
    assert expected == CASES[line][0 if lowercase else 1]
    counts = align(expected, server_pieces(srv, tokens))
    assert counts == own_counts(srv, tokens)


@pytest.mark.parametrize("lowercase", [UNCASED, CASED], ids=["uncased", "cased"])
def test_known_cases_have_the_piece_counts_of_the_original_examples(tokenizers, lowercase):
    srv = tokenizers[(lowercase, None)]
    assert server_pieces(srv, ["I'm", "hankcs"])[-2:] == ["hank", "##cs"]
    assert align([basic_tokens(t, lowercase) for t in ["I'm", "hankcs"]],
                 server_pieces(srv, ["I'm", "hankcs"])) == [3, 2]


@pytest.mark.parametrize("lowercase", [UNCASED, CASED], ids=["uncased", "cased"])
@pytest.mark.parametrize("length, pieces", [(101, ["[UNK]"]), (100, None)])
def test_a_word_over_100_characters_is_one_unk(tokenizers, lowercase, length, pieces):
    srv = tokenizers[(lowercase, None)]
    tokens = ["x", "a" * length, "y"]
    got = server_pieces(srv, tokens)
    if pieces is not None:
        assert got == ["x"] + pieces + ["y"]
    else:
        assert len(got) > 3  # 100 characters are still word-pieced
    assert align([basic_tokens(t, lowercase) for t in tokens], got) == own_counts(srv, tokens)


@pytest.mark.parametrize("lowercase", [UNCASED, CASED], ids=["uncased", "cased"])
def test_unk_cases(tokenizers, lowercase):
    srv = tokenizers[(lowercase, None)]
    tokens = ["😀", "☃", "龘", "x😀", "😀😀", "ǅ"]
    pieces = server_pieces(srv, tokens)
    assert pieces == ["[UNK]"] * 6
    assert align([basic_tokens(t, lowercase) for t in tokens], pieces) == [1] * 6


@pytest.mark.parametrize("lowercase", [UNCASED, CASED], ids=["uncased", "cased"])
def test_zero_piece_tokens_between_unks(tokenizers, lowercase):
    srv = tokenizers[(lowercase, None)]
    tokens = ["😀", "\u200b", "\ufeff", "☃", "\u200b\u200d", "x"]
    assert align([basic_tokens(t, lowercase) for t in tokens], server_pieces(srv, tokens)) == [1, 0, 0, 1, 0, 1]


def test_lone_combining_accent_has_pieces_only_when_cased(tokenizers):
    tokens = ["a", "\u0301", "b"]
    assert basic_tokens("\u0301", True) == ()
    assert align([basic_tokens(t, True) for t in tokens], server_pieces(tokenizers[(UNCASED, None)], tokens)) == [1, 0, 1]
    assert align([basic_tokens(t, False) for t in tokens], server_pieces(tokenizers[(CASED, None)], tokens)) == [1, 1, 1]


@pytest.mark.parametrize("lowercase", [UNCASED, CASED], ids=["uncased", "cased"])
def test_literal_special_tokens_are_text(tokenizers, lowercase):
    """The tool takes "[CLS]" in the input for text, as the server does (the stand-in's own test,
    test_literal_special_tokens_are_split_like_text, shows the server's pieces)."""
    srv = tokenizers[(lowercase, None)]
    tokens = ["[CLS]", "[SEP]"]
    expected = [basic_tokens(t, lowercase) for t in tokens]
    assert expected == ([("[", "cls", "]"), ("[", "sep", "]")] if lowercase else [("[", "CLS", "]"), ("[", "SEP", "]")])
    counts = align(expected, server_pieces(srv, tokens))
    assert counts == own_counts(srv, tokens)
    if lowercase:
        assert counts == [4, 3]   # "[", "cl", "##s", "]" and "[", "sep", "]"


@pytest.mark.parametrize("tokens", [["a", "|||", "b"], ["a ||| b", "c"], ["x", "", "|||"]])
def test_what_the_tool_sends_for_pipe_tokens_is_one_sentence_not_a_pair(tokenizers, tokens):
    """A server reads "A ||| B" as a sentence pair (the stand-in's test_sentence_pair_and_tab_separated_bars);
    the tool's text (the tokens joined by SEPARATOR, made sendable) never makes one, even for a token holding spaces."""
    srv = tokenizers[(UNCASED, None)]
    pieces = srv.tokenize(sendable(SEPARATOR.join(tokens)))
    assert pieces.count("[SEP]") == 1 and pieces.count("|") == 3 * sum(t.count("|||") for t in tokens)
    assert align([basic_tokens(t, True) for t in tokens], pieces[1:-1]) == own_counts(srv, map(sendable, tokens))


def test_a_request_sends_tabs_for_spaces_and_nul_for_an_empty_text():
    assert json.loads(request_message(["New York\tcity", "", "a\tb", "\t"])) == ["New\tYork\tcity", "\0", "a\tb", "\t"]


# ---------------------------------------------------------------- align: mismatch and truncation

def test_align_returns_none_when_the_pieces_do_not_spell_the_tokens(tokenizers):
    uncased = tokenizers[(UNCASED, None)]
    tokens = ["Hello", "World"]
    # A cased expectation against an uncased server's pieces.
    assert align([basic_tokens(t, False) for t in tokens], server_pieces(uncased, tokens)) is None
    expected = [("hankcs",)]
    assert align(expected, ["hank", "##cs"]) == [2]
    assert align(expected, ["hank", "cs"]) is None           # continuation without ##
    assert align(expected, ["hank", "##xs"]) is None         # wrong text
    assert align(expected, ["hank", "##cs", "x"]) is None    # pieces left over
    assert align([("a",), ("b",)], ["a", "b", "[UNK]"]) is None
    assert align([("ab",)], ["a", "##"]) is None             # an empty continuation spells nothing
    assert align([(), ("b",)], ["[UNK]", "b"]) is None       # the server kept a character we drop


def test_align_empty():
    assert align([], []) == []
    assert align([()], []) == [0]


@pytest.mark.parametrize("lowercase", [UNCASED, CASED], ids=["uncased", "cased"])
@pytest.mark.parametrize("tokens", [
    ["hankcs"] * 15,                                      # cut inside a token
    ["I'm"] * 10,                                         # cut inside a token of several basic tokens
    ["a"] * 23 + ["b", "c"],                              # cut exactly at a token boundary
    ["a"] * 23 + ["\u200b", "b"],                         # a zero-piece token right after the cut
    ["😀"] * 30,
    ["!" * 60],                                           # one token longer than the window
], ids=["mid-token", "mid-basic-token", "boundary", "zero-piece-after-cut", "unk", "one-long-token"])
def test_align_counts_the_units_covered_before_the_pieces_ran_out(tokenizers, lowercase, tokens):
    short = tokenizers[(lowercase, 25)]
    pieces = server_pieces(short, tokens)
    assert len(pieces) == 23  # max_seq_len 25 minus [CLS] and [SEP]
    counts = align([basic_tokens(t, lowercase) for t in tokens], pieces)
    own = own_counts(tokenizers[(lowercase, None)], tokens)
    covered = 0
    while covered < len(own) and sum(own[:covered + 1]) <= len(pieces):
        covered += 1
    assert counts == own[:covered]
    assert len(counts) < len(tokens)


# ---------------------------------------------------------------- counts from known pieces

def test_counts_from_known_pieces():
    known = [("a",), (), ("hank", "##cs")]
    assert counts_from_known_pieces(known, ["a", "hank", "##cs"]) == [1, 0, 2]
    assert counts_from_known_pieces(known, ["a", "hank"]) == [1, 0]          # cut inside the last unit
    assert counts_from_known_pieces(known, ["a"]) == [1, 0]
    assert counts_from_known_pieces(known, ["a", "hank", "##cs", "x"]) is None
    assert counts_from_known_pieces(known, ["b", "hank", "##cs"]) is None
    assert counts_from_known_pieces(known, ["a", "hank", "##xx"]) is None


# ---------------------------------------------------------------- piece counts known before the server answers

def test_the_piece_counter_looks_up_basic_tokens_and_learnt_counts():
    counter = PieceCounter(lowercase=True)
    assert counter.look_up(["I'm", "hankcs", "I'm"]) == ([("i", "'", "m"), ("hankcs",), ("i", "'", "m")], [3, 1, 3])
    counter.learn(["I'm", "hankcs"], [3, 2], [3, 1])
    assert counter.look_up(["hankcs"]) == ([("hankcs",)], [2])


def test_a_count_learnt_after_the_counter_was_cleared_is_kept():
    """A reply for a sentence looked up before a clear teaches a count that a later look-up must not overwrite."""
    counter = PieceCounter(lowercase=True, capacity=1)
    counter.look_up(["hello", "world"])
    counter.look_up(["again"])                 # over capacity: cleared first
    counter.learn(["hello"], [5], [1])
    assert counter.look_up(["hello"]) == ([("hello",)], [5])


# ---------------------------------------------------------------- merging

def reference_segments(rows, counts, how):
    """One row per segment of ``counts`` rows, each merged by conftest's merge_reference (a zero row for none)."""
    ends = np.cumsum(counts, dtype=int)
    return np.array([merge_reference(rows[end - count:end], how, rows.shape[1]) for count, end in zip(counts, ends)]
                    ).reshape(len(counts), rows.shape[1])


@pytest.mark.parametrize("how", MERGES)
@pytest.mark.parametrize("counts", [[1, 1, 1], [3, 2], [0, 2, 0, 0, 3, 1, 0], [0], [0, 0], [], [5], [1] * 40,
                                    [7, 0, 1, 12, 2, 0]])
def test_merge_segments_matches_the_per_row_reference(how, counts):
    rng = np.random.default_rng(len(counts) * 7 + sum(counts))
    rows = rng.standard_normal((sum(counts), 8)).astype(np.float32)
    got = merge_segments(rows, counts, how)
    assert got.dtype == np.float32 and got.shape == (len(counts), 8)
    np.testing.assert_allclose(got, reference_segments(rows, counts, how), rtol=1e-6, atol=1e-6)
    for k, count in enumerate(counts):
        if count == 0:
            assert not got[k].any()


@pytest.mark.parametrize("how", MERGES)
def test_merge_segments_of_a_negative_block_keeps_max_negative(how):
    rows = -np.arange(1, 7, dtype=np.float32).reshape(3, 2)
    got = merge_segments(rows, [0, 3, 0], how)
    expected = {"mean": [-3, -4], "sum": [-9, -12], "first": [-1, -2], "last": [-5, -6], "max": [-1, -2]}[how]
    np.testing.assert_array_equal(got, [[0, 0], expected, [0, 0]])


def finished_sentence(tokens, owner, unit_pieces, hidden=2):
    """A long line as token_rows sees it when all windows are back: unit k belongs to token owner[k] and has these pieces' rows."""
    sentence = Sentence(1, list(tokens), PieceCounter(lowercase=True))
    sentence.make_units()
    sentence.units = [Unit(f"unit{k}", (f"unit{k}",), 1, o) for k, o in enumerate(owner)]
    for unit, rows in zip(sentence.units, unit_pieces):
        unit.rows = np.asarray(rows, dtype=np.float32).reshape(-1, hidden)
        unit.pieces, unit.state = len(unit.rows), DONE
    return sentence


@pytest.mark.parametrize("how", MERGES)
def test_token_rows_merges_all_pieces_of_a_split_token_with_the_same_strategy(how):
    rng = np.random.default_rng(3)
    # Token 1 was split into 4 units (its basic tokens) with 1, 3, 0 and 2 pieces; tokens 0 and 2 have one piece each.
    counts = [1, 1, 3, 0, 2, 1]
    pieces = [rng.standard_normal((c, 4)).astype(np.float32) for c in counts]
    sentence = finished_sentence(["a", "long", "b"], [0, 1, 1, 1, 1, 2], pieces, hidden=4)
    assert sentence.done
    got = token_rows(sentence, how, 4)
    assert got.shape == (3, 4) and got.dtype == np.float32
    whole = np.concatenate(pieces[1:5])  # all pieces of the split token, in order
    expected = [pieces[0][0], reference_segments(whole, [len(whole)], how)[0], pieces[5][0]]
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-6, atol=1e-6)
    assert list(sentence.token_counts()) == [1, 6, 1]


def test_token_rows_mean_is_the_mean_of_all_the_pieces():
    sentence = finished_sentence(["t"], [0, 0], [[[1.0, 1.0]], [[1.0, 2.0], [1.0, 9.0], [2.0, 10.0]]])
    np.testing.assert_allclose(token_rows(sentence, "mean", 2), [[5 / 4, 22 / 4]])


@pytest.mark.parametrize("how", MERGES)
def test_token_rows_of_a_split_token_without_pieces_is_zero(how):
    sentence = finished_sentence(["a", "t"], [0, 1, 1], [[[1.0, 2.0]], [], []])
    np.testing.assert_array_equal(token_rows(sentence, how, 2), [[1.0, 2.0], [0.0, 0.0]])


def test_token_rows_without_split_is_the_unit_rows():
    sentence = finished_sentence(["a", "\u200b", "b"], [0, 1, 2], [[[1, 2]], [], [[3, 4]]])
    np.testing.assert_array_equal(token_rows(sentence, "last", 2), [[1, 2], [0, 0], [3, 4]])
    empty = Sentence(1, [], PieceCounter(lowercase=True))
    assert empty.plan(10) == [] and empty.done and token_rows(empty, "mean", 2).shape == (0, 2)
