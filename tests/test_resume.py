"""Keep partial work (--resume): the line log's hash and the checkpoint's record, used directly with a real writer."""

import hashlib
import json

import numpy as np
import pytest

import bert_token_embed as tool
from conftest import load_pickle

SETTINGS = {"merge": "mean", "backend": {"hidden": 4}}
LINES = [["Hello", "World", "!"], [], ["I'm", "hankcs"], ["a b", "c"]]


def rows(n_tokens, value):
    return np.full((n_tokens, 4), value, dtype=np.float32)


def written_partially(tmp_path, lines_done):
    """A --resume run that wrote ``lines_done`` lines of LINES to out.pkl.partial and saved its record."""
    output = str(tmp_path / "out.pkl")
    writer = tool.PickleWriter(output, resume=True)
    checkpoint = tool.Checkpoint(output, SETTINGS, iter(LINES))
    writer.start(4)
    for k, tokens in zip(range(lines_done), checkpoint):
        writer.write(rows(len(tokens), k))
    writer.flush()
    checkpoint.save(writer)
    writer.give_up(keep=True)
    return output, writer.sizes


def test_the_line_log_hashes_each_sentence_as_its_tokens_joined_by_tabs():
    log = tool.LineLog(iter(LINES))
    assert list(log) == LINES
    expected = hashlib.sha256(b"Hello\tWorld\t!\n\nI'm\thankcs\n")
    assert log.digest_through(3) == expected.hexdigest()
    assert log.digest_through(4) == hashlib.sha256(b"Hello\tWorld\t!\n\nI'm\thankcs\na b\tc\n").hexdigest()


def test_skipping_reads_the_lines_without_passing_them_on():
    log = tool.LineLog(iter(LINES))
    assert log.skip(2) == (2, hashlib.sha256(b"Hello\tWorld\t!\n\n").hexdigest())
    assert list(log) == LINES[2:]
    assert tool.LineLog(iter(LINES)).skip(10)[0] == 4   # a shorter input reads what there is


def test_the_record_holds_the_settings_the_lines_their_hash_and_the_file_sizes(tmp_path):
    output, sizes = written_partially(tmp_path, 3)
    record = json.loads((tmp_path / "out.pkl.partial.json").read_text())
    assert record == {"settings": SETTINGS, "lines": 3, "sizes": sizes,
                      "sha256": hashlib.sha256(b"Hello\tWorld\t!\n\nI'm\thankcs\n").hexdigest()}
    assert (tmp_path / "out.pkl.partial").stat().st_size == sizes[0]


def test_resuming_skips_the_lines_done_and_continues_the_files(tmp_path):
    output, sizes = written_partially(tmp_path, 3)
    writer = tool.PickleWriter(output, resume=True)
    checkpoint = tool.Checkpoint(output, SETTINGS, iter(LINES))
    assert checkpoint.resume(writer, 4) == 3
    assert (writer.lines, writer.sizes) == (3, sizes)
    assert list(checkpoint) == LINES[3:]
    writer.write(rows(2, 3))
    writer.commit(4)
    arrays = load_pickle(output)
    assert [a.shape for a in arrays] == [(3, 4), (0, 4), (2, 4), (2, 4)]
    assert [float(a[0, 0]) for a in arrays if len(a)] == [0.0, 2.0, 3.0]


def test_other_lines_at_the_start_raise_input_changed(tmp_path):
    output, _ = written_partially(tmp_path, 3)
    changed = [["Hello", "World", "?"]] + LINES[1:]
    with pytest.raises(tool.InputChanged):
        tool.Checkpoint(output, SETTINGS, iter(changed)).resume(tool.PickleWriter(output, resume=True), 4)
    with pytest.raises(tool.InputChanged):   # fewer lines than the record says were done
        tool.Checkpoint(output, SETTINGS, iter(LINES[:2])).resume(tool.PickleWriter(output, resume=True), 4)


def test_other_settings_or_shorter_files_start_over_with_a_warning(tmp_path, capsys):
    output, sizes = written_partially(tmp_path, 3)
    other = tool.Checkpoint(output, {**SETTINGS, "merge": "last"}, iter(LINES))
    assert other.resume(tool.PickleWriter(output, resume=True), 4) == 0
    assert "made with other options" in capsys.readouterr().err
    with open(output + ".partial", "r+b") as f:
        f.truncate(sizes[0] - 1)
    assert tool.Checkpoint(output, SETTINGS, iter(LINES)).resume(tool.PickleWriter(output, resume=True), 4) == 0
    assert "describes more than the partial files hold" in capsys.readouterr().err


def test_no_record_or_an_unreadable_one_means_no_partial_work(tmp_path):
    output = str(tmp_path / "out.pkl")
    checkpoint = tool.Checkpoint(output, SETTINGS, iter(LINES))
    assert checkpoint.load() is None and checkpoint.resume(tool.PickleWriter(output, resume=True), 4) == 0
    (tmp_path / "out.pkl.partial.json").write_text("{not json")
    assert checkpoint.load() is None
    checkpoint.remove()
    assert not (tmp_path / "out.pkl.partial.json").exists()
