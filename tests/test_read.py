"""read_lines: bytes in, one str per line out; only b"\\n" ends a line."""

import io
import os

import pytest

from bert_token_embed import UsageError, read_lines


def lines(data, **kwargs):
    return list(read_lines(io.BytesIO(data), "in.txt", **kwargs))


def test_plain_lines_and_last_line_without_newline():
    assert lines(b"Hello World !\nI'm hankcs") == ["Hello World !", "I'm hankcs"]
    assert lines(b"Hello World !\nI'm hankcs\n") == ["Hello World !", "I'm hankcs"]


def test_empty_file_has_no_lines():
    assert lines(b"") == []


def test_blank_lines_are_kept():
    assert lines(b"\n\n  \na\n") == ["", "", "  ", "a"]


def test_bom_is_dropped_on_the_first_line_only():
    bom = "\ufeff".encode("utf-8")
    assert lines(bom + b"a b\n" + bom + b"c\n") == ["a b", "\ufeffc"]
    assert lines(bom) == [""]


def test_crlf(capsys):
    assert lines(b"a b\r\nc\r\n\r\nd") == ["a b", "c", "", "d"]
    assert capsys.readouterr().err == ""


def test_bom_and_crlf_together():
    assert lines(b"\xef\xbb\xbfHello World !\r\nI'm hankcs\r\n") == ["Hello World !", "I'm hankcs"]


def test_carriage_return_inside_a_line_is_kept_with_one_warning(capsys):
    assert lines(b"a\rb\nc\r\rd\r\n\re\n") == ["a\rb", "c\r\rd", "\re"]
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "line 1" in err and "carriage return" in err


def test_old_mac_file_is_one_line(capsys):
    assert lines(b"a\rb\rc\r") == ["a\rb\rc"]
    assert "line 1" in capsys.readouterr().err


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\x85", "\x0b", "\x0c"])
def test_other_line_breaks_stay_inside_their_line(separator):
    text = f"a{separator}b\nc"
    assert lines(text.encode("utf-8")) == [f"a{separator}b", "c"]


def test_non_utf8_raises_usage_error_naming_line_and_byte_offset():
    data = b"ok line\nab\xffc\n"
    with pytest.raises(UsageError) as info:
        lines(data)
    message = str(info.value)
    assert "in.txt" in message and "line 2" in message
    assert "byte 10 of the file" in message and data[10:11] == b"\xff"
    assert "--errors replace" in message and "--encoding" in message


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("errors", ["strict", "replace"])
def test_a_utf16_or_utf32_file_is_named_with_the_way_to_convert_it(encoding, errors):
    wide = encoding[:6].upper()
    data = ("\ufeffHello World !\nI'm hankcs\n").encode(encoding)
    with pytest.raises(UsageError) as info:
        lines(data, errors=errors)   # replace too: it would make tokens of NULs
    assert str(info.value) == (f"in.txt is {wide} (it starts with {wide}'s byte-order mark), which this tool cannot "
                               f"read: convert it to UTF-8 first (iconv -f {wide} -t UTF-8 IN > OUT)")


def test_byte_offset_counts_the_bom_and_crlf():
    data = b"\xef\xbb\xbfa\r\nb\xe9\n"
    assert data[7:8] == b"\xe9"
    with pytest.raises(UsageError, match=r"line 2 .*byte 7 of the file"):
        lines(data)
    data = b"\xef\xbb\xbfa\xe9\n"
    assert data[4:5] == b"\xe9"
    with pytest.raises(UsageError, match=r"line 1 .*byte 4 of the file"):
        lines(data)


def test_error_comes_only_when_the_bad_line_is_reached():
    stream = read_lines(io.BytesIO(b"good\n\xff\n"), "in.txt")
    assert next(stream) == "good"
    with pytest.raises(UsageError, match="line 2"):
        next(stream)


def test_truncated_multibyte_sequence_at_end_of_file():
    with pytest.raises(UsageError, match=r"line 2 .*byte 3 of the file"):
        lines(b"ok\n\xe4\xb8")


def test_errors_replace_and_ignore():
    assert lines(b"a\xffb\nc\n", errors="replace") == ["a\ufffdb", "c"]
    assert lines(b"a\xffb\nc\n", errors="ignore") == ["ab", "c"]


def test_other_encoding():
    assert lines("café\nnaïve\n".encode("latin-1"), encoding="latin-1") == ["café", "naïve"]


def test_reads_lazily():
    class Stream:
        def __init__(self):
            self.read = 0

        def __iter__(self):
            for raw in (b"a\n", b"b\n", b"c\n"):
                self.read += 1
                yield raw

    stream = Stream()
    gen = read_lines(stream, "in.txt")
    assert next(gen) == "a" and stream.read == 1


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 bytes: most lines begin in one read and end in another."""
    import bert_token_embed
    monkeypatch.setattr(bert_token_embed, "READ_BLOCK", 7)


def test_lines_across_blocks_are_the_same(small_blocks):
    data = "first line\nb\n\nnaïve café and a long line of many words\r\nlast".encode("utf-8")
    assert lines(data) == ["first line", "b", "", "naïve café and a long line of many words", "last"]
    assert lines(b"\xef\xbb\xbf" + data) == lines(data)
    assert lines(b"a\r\nb\r\n") == lines(b"a\nb\n") == ["a", "b"]


def test_error_in_a_later_block_names_its_line_and_byte(small_blocks):
    data = b"\xef\xbb\xbfok\r\nline two\nthree \xff\nfour\n"
    assert data[22:23] == b"\xff"
    stream = read_lines(io.BytesIO(data), "in.txt")
    assert [next(stream), next(stream)] == ["ok", "line two"]
    with pytest.raises(UsageError, match=r"line 3 .*byte 22 of the file"):
        next(stream)


def test_a_carriage_return_in_a_later_block_warns_once(small_blocks, capsys):
    assert lines(b"a b c d e\nf\rg\r\nh\ri\n") == ["a b c d e", "f\rg", "h\ri"]
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "line 2" in err


def test_a_pipe_is_read_as_lines_come(tmp_path):
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as pipe, open(write_end, "wb", buffering=0) as writer:
        gen = read_lines(pipe, "-")
        writer.write(b"first\nsec")
        assert next(gen) == "first"   # without waiting for a full block, or for the end
        writer.write(b"ond\n")
        assert next(gen) == "second"
        writer.close()
        assert list(gen) == []


@pytest.mark.parametrize("data, expected", [
    (b"a+AAo-b\nc\n", ["a\nb", "c"]),      # "+AAo-" is UTF-7 for "\n": inside its line, as when read line by line
    (b"x+AA0ACg-y\r\n", ["x\r\ny"]),
])
def test_only_the_byte_newline_ends_a_line_whatever_the_encoding_makes(data, expected):
    assert lines(data, encoding="utf-7") == expected
