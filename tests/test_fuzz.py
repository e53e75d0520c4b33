"""Fuzzing the whole command line: any file either gives an output that keeps the contract, or exit 2 and one line."""

import codecs

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bert_token_embed as tool

pytestmark = pytest.mark.slow
from conftest import load_pickle, server_args, token_pieces

EXAMPLES = 150   # per casing: 300 generated files in all

LINE_ENDS = ["\n", "\r\n", "\r", "\u2028", "\x85", "\x1c"]
CHARACTERS = st.characters(codec="utf-8", exclude_categories=["Cs"])
WORDS = st.one_of(
    st.text(CHARACTERS, min_size=1, max_size=12),
    st.sampled_from(["Hello", "hankcs", "Café", "İstanbul", "中国", "|||", "[CLS]", "\u200b", "\u0301", "1996-08-27",
                     "😀", "☃", "naïve", "ΟΔΟΣ", "\ufeff", "a\u00adb"]),
    st.text(st.sampled_from("ab!.-中é"), min_size=90, max_size=140),       # huge tokens, many pieces
)
TEXT_FILES = st.builds(
    lambda lines, ends, bom: (codecs.BOM_UTF8 if bom else b"") + "".join(
        " ".join(words) + ends[i % len(ends)] for i, words in enumerate(lines)).encode("utf-8"),
    st.lists(st.lists(WORDS, max_size=10), max_size=8),
    st.lists(st.sampled_from(LINE_ENDS), min_size=1, max_size=3),
    st.booleans())
FILES = st.one_of(TEXT_FILES, st.binary(max_size=300))


def expected_lines(data):
    """The lines of a file under the contract, or None when it is not UTF-8."""
    if not data:
        return []
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    parts = [p[:-1] if p.endswith(b"\r") else p for p in parts]
    if parts and parts[0].startswith(codecs.BOM_UTF8):
        parts[0] = parts[0][len(codecs.BOM_UTF8):]
    try:
        return [p.decode("utf-8") for p in parts]
    except UnicodeDecodeError:
        return None


@pytest.fixture(scope="module", params=[True, False], ids=["uncased", "cased"])
def fuzz_server(request, uncased_server, cased_server):
    make = uncased_server if request.param else cased_server
    with make(max_seq_len=25, hidden=8) as srv:
        yield srv


def test_any_file_keeps_the_contract_or_fails_in_one_line(fuzz_server, tmp_path_factory, capsys):
    srv = fuzz_server
    directory = tmp_path_factory.mktemp("fuzz")
    seen = {"runs": 0, "ok": 0}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=FILES)
    def check(data):
        source, out = directory / "in.txt", directory / "out.pkl"
        source.write_bytes(data)
        if out.exists():
            out.unlink()
        capsys.readouterr()
        status = tool.main([str(source), "-o", str(out), *server_args(srv), "--timeout", "20", "-q"])
        err = capsys.readouterr().err
        seen["runs"] += 1
        lines = expected_lines(data)
        assert "Traceback" not in err
        if lines is None:
            assert status == 2, err
            errors = [line for line in err.splitlines() if not line.startswith("bert_token_embed: warning:")]
            assert len(errors) == 1 and "is not valid utf-8" in errors[0], err
            assert not out.exists()
            return
        assert status == 0, err
        seen["ok"] += 1
        arrays = load_pickle(out)
        assert len(arrays) == len(lines)
        for line, array in zip(lines, arrays):
            tokens = line.split()
            assert array.shape == (len(tokens), 8) and array.dtype == np.float32
            for token, row in zip(tokens, array):
                assert (not row.any()) == (not token_pieces(srv, token)), (token, line)
        assert sorted(p.name for p in directory.iterdir()) == ["in.txt", "out.pkl"]

    check()
    print(f"fuzz: {seen['runs']} files, {seen['ok']} embedded, {seen['runs'] - seen['ok']} refused as not UTF-8")
    assert seen["runs"] >= EXAMPLES * 0.9
