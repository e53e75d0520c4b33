"""Windows for long sentences: Sentence.plan, accept, store and split, without a server."""

import numpy as np

from bert_token_embed import DONE, PENDING, RETRY_ALONE, RETRY_SPLIT, PieceCounter, Sentence, Window, token_rows


def sentence(tokens):
    """A line of these tokens, with lowercasing basic tokens and fresh estimates."""
    return Sentence(7, tokens, PieceCounter(lowercase=True))


def spans(windows):
    """(start, own, end, size) of each window."""
    return [(w.start, w.own, w.end, w.size) for w in windows]


def test_a_line_that_fits_is_one_window_and_its_reply_one_block():
    line = sentence(["a", "b", "c"])
    (window,) = line.plan(limit=8)
    assert spans([window]) == [(0, 0, 3, 3)] and window.units == ["a", "b", "c"] and line.in_flight == 1
    assert line.accept(window, [1, 2, 1], 4) == (0, 0, [1, 2, 1]) and line.units is None
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    line.store(0, [1, 2, 1], rows)
    assert line.done and token_rows(line, "mean", 2) is rows and list(line.token_counts()) == [1, 2, 1]


def test_an_empty_line_needs_no_window():
    line = sentence([])
    assert line.plan(limit=8) == [] and line.done and token_rows(line, "last", 3).shape == (0, 3)


def test_a_long_line_gets_windows_with_a_quarter_window_of_left_context():
    line = sentence([f"w{i}" for i in range(20)])
    assert spans(line.plan(limit=8)) == [(0, 0, 8, 8), (6, 8, 14, 8), (12, 14, 20, 8)]
    assert line.windows == line.in_flight == 3 and all(u.state == PENDING for u in line.units)


def test_a_window_the_server_cut_keeps_its_whole_units_and_the_rest_is_planned_again():
    line = sentence(["aa", "bb", "cc", "dd"])
    (window,) = line.plan(limit=8)
    # The server cut the window inside "cc": "aa" and "bb" came back whole, with 3 pieces each.
    assert line.accept(window, [3, 3], 8) == (0, 0, [3, 3])
    assert [u.state for u in line.units] == [DONE, DONE, PENDING, PENDING] and not line.done
    line.store(0, [3, 3], np.ones((6, 2), dtype=np.float32))
    # The learnt 3 pieces per estimated piece make "bb" too big for the 2 pieces of context allowed.
    assert spans(line.plan(limit=8)) == [(2, 2, 4, 6)]


def test_a_unit_that_does_not_come_back_after_context_is_sent_alone_then_split():
    line = sentence(["x", "a-b-c"])     # "a-b-c" has 5 basic tokens
    line.make_units()
    line.units[0].state = DONE          # "x" came back in an earlier window
    window = Window(line, 0, 1, 2, 6)
    line.in_flight = 1
    assert line.accept(window, [1], 6) is None and line.units[1].state == RETRY_ALONE
    (alone,) = line.plan(limit=8)
    assert (alone.start, alone.own, alone.end) == (1, 1, 2)
    assert line.accept(alone, [], 6) is None and line.units[1].state == RETRY_SPLIT
    split = line.plan(limit=2)
    assert [u.text for u in line.units] == ["x", "a", "-", "b", "-", "c"]
    assert [u.owner for u in line.units] == [0, 1, 1, 1, 1, 1]
    assert spans(split) == [(1, 1, 3, 2), (3, 3, 5, 2), (5, 5, 6, 1)]


def test_a_unit_too_long_even_alone_and_unsplittable_keeps_the_pieces_that_fit():
    line = sentence(["x", "y" * 50])
    line.make_units()
    line.in_flight = 1
    assert line.accept(Window(line, 1, 1, 2, 1), [], 6) == (1, 0, [6])
    assert line.units[1].state == DONE and line.units[1].pieces == 6 and line.truncated_units == 1


def test_the_rows_of_a_long_line_are_its_units_pieces_merged_per_token():
    line = sentence(["x", "a-b"])
    line.make_units()
    line.in_flight = 2
    first, second = Window(line, 0, 0, 1, 1), Window(line, 0, 1, 2, 3)
    assert line.accept(first, [1], 1) == (0, 0, [1])
    line.store(0, [1], np.array([[1.0, 1.0]], dtype=np.float32))
    assert line.accept(second, [1, 3], 4) == (1, 1, [3])
    line.store(1, [3], np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]], dtype=np.float32))
    assert line.done
    np.testing.assert_array_equal(token_rows(line, "max", 2), [[1, 1], [5, 9]])
    np.testing.assert_array_equal(token_rows(line, "mean", 2), [[1, 1], [3, 5]])
