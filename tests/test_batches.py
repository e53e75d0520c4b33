"""Batches of similar length, for both modes: batch_bounds and embed_requests."""

from bert_token_embed import SEPARATOR, PieceCounter, Sentence, batch_bounds, embed_requests


def test_a_batch_holds_at_most_the_batch_size():
    assert batch_bounds([5] * 7, 3) == [(0, 3), (3, 6), (6, 7)]


def test_a_batch_ends_where_padding_would_pass_ten_percent():
    # 10 + 10 + 11: padding to 11 costs 33 positions for 31 useful (6.5%); adding 12 would cost 48 for 43 (11.6%).
    assert batch_bounds([10, 10, 11, 12, 12], 100) == [(0, 3), (3, 5)]


def test_no_items_no_batches_and_one_item_one_batch():
    assert batch_bounds([], 4) == [] and batch_bounds([400], 4) == [(0, 1)]


def test_a_fixed_length_server_batches_by_size_only():
    lines = [Sentence(k, ["word"] * n, PieceCounter(True)) for k, n in enumerate([1, 5, 20, 21, 40], 1)]
    windows = [w for line in lines for w in line.plan(limit=510)]
    assert [len(r.texts) for r in embed_requests(windows, 2)] == [1, 1, 2, 1]   # padding ends batches
    fixed = embed_requests(windows, 2, padded_length=64)
    assert [len(r.texts) for r in fixed] == [2, 2, 1]
    assert fixed[0].texts == ["word", SEPARATOR.join(["word"] * 5)] and fixed[0].windows == tuple(windows[:2])
