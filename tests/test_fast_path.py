"""The server-mode fast path (PieceCounter.spells) places pieces exactly as align does, or leaves them to it."""

import random

from bert_token_embed import PieceCounter, Sentence, align, entry_count, spelled_piece_counts

SOME = ["a", "b", "c", "é", "-", "#", " ", "\t"]
ODD = ["a", "b", "#", "##", " ", "", "[UNK]", "ab", "c", "\t", "é", "-", "a b"]


def some_pieces(rng, basic):
    """A plausible tokenization of the units' basic tokens (some split in two), then now and then a fault."""
    pieces = []
    for unit in basic:
        for word in unit:
            if len(word) > 1 and rng.random() < 0.3:
                cut = rng.randint(1, len(word) - 1)
                pieces += [word[:cut], "##" + word[cut:]]
            else:
                pieces.append(word)
    fault = rng.random()
    if fault < 0.2 and pieces:
        pieces[rng.randrange(len(pieces))] = rng.choice(ODD)
    elif fault < 0.3:
        pieces.insert(rng.randint(0, len(pieces)), rng.choice(ODD))
    elif fault < 0.35:
        pieces = [" ".join(pieces)]   # a piece with spaces must not pass for several
    return pieces


def some_units(rng):
    """One to four short units, none blank."""
    units = ["".join(rng.choice(SOME) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 4))]
    return [u for u in units if u.strip()] or ["a"]


def check_or_learn(counter, units, basic, pieces, got, estimates):
    """Assert that the fast path's counts, if it gave any, are align's; else learn what align placed, as server mode does. True if it gave counts."""
    expected = align(basic, pieces)
    if got is not None:
        assert got == expected and "[UNK]" not in pieces and all(basic), (units, pieces)
        return True
    if expected is not None and len(expected) == len(units) and "[UNK]" not in pieces:
        counter.learn(units, expected, estimates)
        counter.remember(units, expected, pieces)
    return False


def test_spells_agrees_with_align():
    """Whenever the fast path gives counts they are align's, with no [UNK] and no unit without a piece."""
    rng = random.Random(12)
    hits = 0
    for _ in range(3000):
        counter = PieceCounter(lowercase=rng.random() < 0.5)
        for _ in range(3):
            units = some_units(rng)
            basic, estimates = counter.look_up(units)
            pieces = some_pieces(rng, basic)
            hits += check_or_learn(counter, units, basic, pieces, counter.spells(units, pieces), estimates)
    assert hits > 1000   # the fast path was taken often


def test_known_pieces_and_new_words():
    """A unit's pieces from an earlier reply are expected again; a new word is expected as one piece."""
    counter = PieceCounter(lowercase=True)
    units = ["hankcs", "is", "here"]
    basic, estimates = counter.look_up(units)
    pieces = ["hank", "##cs", "is", "here"]
    assert counter.known["hankcs"] == "hankcs"   # the first guess: one piece per basic token
    assert counter.spells(units, pieces) is None   # hankcs is not one piece
    counts = align(basic, pieces)
    counter.remember(units, counts, pieces)         # before the count is learnt: the estimates stay as they are
    assert counter.known["hankcs"] == "hankcs"
    counter.learn(units, counts, estimates)         # as Sentence.accept does first
    assert counter.known["hankcs"] == 2
    counter.remember(units, counts, pieces)
    assert counter.known["hankcs"] == "hank ##cs"
    assert counter.spells(["here", "hankcs"], ["here", "hank", "##cs"]) == [1, 2]
    assert counter.spells(["hankcs", "now"], ["hank", "##cs", "now"]) == [2, 1]   # "now": new, one piece
    assert counter.spells(["now", "hankcs"], ["now", "hank", "##c", "##s"]) is None
    assert counter.spells(["hankcs"], ["[UNK]"]) is None


def test_a_wrong_guess_of_the_right_count_is_replaced_by_the_pieces_align_placed():
    counter = PieceCounter(lowercase=True)
    basic, estimates = counter.look_up(["naïve"])
    assert counter.known["naïve"] == "naive"
    pieces = ["nai", "##ve"]   # (as a server with other tables might split it)
    counts = align(basic, pieces)
    counter.learn(["naïve"], counts, estimates)
    counter.remember(["naïve"], counts, pieces)
    assert counter.spells(["naïve"], pieces) == [2]
    counter.remember(["naïve"], [2], ["na", "##ive"])   # the same count, other pieces: the reply's win
    assert counter.known["naïve"] == "na ##ive"
    assert counter.spells(["naïve"], ["na", "##ive"]) == [2]


def test_entries_taken_when_a_line_was_read_still_place_it_after_the_counts_changed():
    """A line's entries are taken when it is read and its reply comes later: an entry holds the pieces (and so their
    count), so an old one still places the line, and one with only a count sends it to the look-ups."""
    counter = PieceCounter(lowercase=True)
    units = ["hankcs", "is"]
    counter.learn(units, [2, 1], counter.look_up(units)[1])
    counter.remember(units, [2, 1], ["hank", "##cs", "is"])
    entries = counter.entries(units)                   # as Sentence takes them
    assert entries == ["hank ##cs", "is"]
    counter.learn(["hankcs"], [3], [2])                # a later reply changed the count: the pieces went with it
    assert counter.known["hankcs"] == 3
    assert counter.spells(units, ["hank", "##cs", "is"], entries) == [2, 1]
    assert counter.spells(units, ["hank", "##c", "##s", "is"], entries) is None
    fresh = counter.entries(units)                     # no pieces known for hankcs now: guessed, as basic tokens
    assert counter.spells(units, ["hankcs", "is"], fresh) == [1, 1] and counter.known["hankcs"] == "hankcs"


def test_entries_taken_when_lines_are_read_agree_with_align_whatever_order_the_replies_come_in():
    """As server mode runs it: each line's entries and estimates taken when it is read, its reply placed later, in
    any order, with the counts and pieces learnt from other replies in between, and clears of a small capacity."""
    rng = random.Random(7)
    hits = 0
    for _ in range(400):
        counter = PieceCounter(lowercase=rng.random() < 0.5, capacity=rng.choice([4, 1 << 18]))
        read = []
        for _ in range(8):
            units = some_units(rng)
            entries = counter.entries(units)
            read.append((units, entries, list(map(entry_count, entries))))
        rng.shuffle(read)
        for units, entries, estimate in read:
            basic = counter.look_up(units)[0]
            pieces = some_pieces(rng, basic)
            hits += check_or_learn(counter, units, basic, pieces, counter.spells(units, pieces, entries, estimate),
                                   estimate)
    assert hits > 500


def test_a_lines_spelled_pieces_tell_its_size_and_each_tokens_count():
    """Sentence.spelled joins pieces by a space and tokens by a tab: its size and the counts need no look at each token."""
    counter = PieceCounter(lowercase=True)
    units = ["hankcs", "e-mail", "is", "naïve"]
    counter.learn(units, [2, 3, 1, 1], counter.look_up(units)[1])
    counter.remember(units, [2, 3, 1, 1], ["hank", "##cs", "e", "-", "mail", "is", "naive"])
    line, empty, other = Sentence(1, units, counter), Sentence(2, [], counter), Sentence(3, ["is", "is"], counter)
    assert line.spelled == "hank ##cs\te - mail\tis\tnaive" and line.size == 7 and line.estimate == [2, 3, 1, 1]
    assert empty.spelled == "" and empty.size == 0
    assert list(spelled_piece_counts([line.spelled, empty.spelled, other.spelled])) == [2, 3, 1, 1, 1, 1]
    assert list(spelled_piece_counts([other.spelled, empty.spelled, line.spelled])) == [1, 1, 2, 3, 1, 1]
    assert list(spelled_piece_counts([])) == []
    counter.learn(["is"], [4], [1])   # a count without pieces: no spelled line, the size from the counts
    assert Sentence(4, ["is", "naïve"], counter).spelled is None and Sentence(4, ["is", "naïve"], counter).size == 5


def test_pieces_with_a_space_or_a_tab_are_not_remembered():
    """An entry's count is what its spaces say, so a (malformed) piece holding one is never an entry's."""
    counter = PieceCounter(lowercase=True)
    counter.look_up(["ab", "cd"])
    counter.remember(["ab", "cd"], [1, 1], ["a b", "c\td"])
    assert counter.known == {"ab": "ab", "cd": "cd"}
