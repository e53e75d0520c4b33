"""The two output formats: a streamed pickle that loads as one list, and NAME.npy + NAME.offsets.npy."""

import errno
import os
import pickle
import pickletools
import signal
import threading
import warnings

import numpy as np
import pytest

import bert_token_embed as tool
from conftest import load_pickle


@pytest.fixture(scope="module")
def srv(uncased_server):
    with uncased_server(max_seq_len=25, hidden=16) as server:
        yield server


WORDS = ["the", "hankcs", "I'm", "naïve", "中国", "😀", "\u200b", "|||", "1996-08-27", "x", "unaffable"]


def corpus(n, seed=1):
    """n lines of 0-40 tokens, some blank."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        k = int(rng.integers(0, 41)) if rng.random() > 0.05 else 0
        lines.append(" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), k)))
    return lines


@pytest.fixture(scope="module")
def text():
    return "\n".join(corpus(600)) + "\n"


@pytest.fixture(scope="module")
def outputs(srv, text, run_cli, tmp_path_factory, expect):
    """The same 600 lines written as .pkl and as .npy (more than two 256-array batches)."""
    directory = tmp_path_factory.mktemp("outputs")
    (directory / "in.txt").write_text(text, encoding="utf-8")
    for name in ("out.pkl", "out.npy"):
        rc, _, err = run_cli([directory / "in.txt", "-o", directory / name, "-q", *expect.server_args(srv)])
        assert rc == 0, err
    return directory


def test_streamed_pickle_is_one_list_of_the_lines(srv, text, outputs, expect):
    arrays = load_pickle(outputs / "out.pkl")
    lines = text.splitlines()
    assert type(arrays) is list and len(arrays) == len(lines) == 600
    tables = expect.Tables(srv)
    for line, array in zip(lines, arrays):
        expect.check_line(srv, tables, line, array, "mean")


def test_streamed_pickle_equals_a_plain_pickle_of_the_same_list(outputs):
    arrays = load_pickle(outputs / "out.pkl")
    again = pickle.loads(pickle.dumps(arrays))
    assert len(again) == len(arrays)
    for a, b in zip(arrays, again):
        np.testing.assert_array_equal(a, b)


def test_arrays_are_writable_float32(outputs):
    for array in load_pickle(outputs / "out.pkl"):
        assert type(array) is np.ndarray and array.dtype == np.float32 and array.ndim == 2
        assert array.flags.writeable and array.flags.c_contiguous
        array[...] = 0  # an ordinary array


def test_the_pickle_writer_takes_any_array_and_loads_it_as_writable_float32(tmp_path):
    """Views, read-only, float16 and empty arrays, over several batches: each item loads equal, as an ordinary array."""
    rng = np.random.default_rng(0)
    locked = rng.standard_normal((3, 8)).astype(np.float32)
    locked.flags.writeable = False
    arrays = [rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((4, 16)).astype(np.float32)[:, ::2],
              locked, rng.standard_normal((2, 8)).astype(np.float16), np.zeros((0, 8), np.float32),
              rng.standard_normal((300, 8)).astype(np.float32)[100:200]] * 100
    writer = tool.PickleWriter(str(tmp_path / "out.pkl"), resume=False)
    writer.start(8)
    for array in arrays:
        writer.write(array)
    writer.commit(8)
    loaded = load_pickle(tmp_path / "out.pkl")
    assert len(loaded) == len(arrays) == 600
    for array, back in zip(arrays, loaded):
        assert back.dtype == np.float32 and back.flags.writeable and back.flags.c_contiguous
        np.testing.assert_array_equal(back, array.astype(np.float32))


def test_the_pickle_is_protocol_4_with_names_numpy_1_and_2_both_import(outputs):
    """No opcode newer than protocol 4 (Python 3.4+, the server's own 3.7 too); numpy's rebuilder by its 1.x name."""
    data = (outputs / "out.pkl").read_bytes()
    assert data[:2] == b"\x80\x04"
    assert max(opcode.proto for opcode, _, _ in pickletools.genops(data)) == 4
    names = {arg for opcode, arg, _ in pickletools.genops(data) if opcode.name == "SHORT_BINUNICODE"}
    assert {"numpy.core.multiarray", "_reconstruct", "numpy", "ndarray", "dtype"} <= names
    assert not any(name.startswith("numpy._core") for name in names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # numpy 2 loads the old name without a DeprecationWarning
        assert len(pickle.loads(data)) == len(load_pickle(outputs / "out.pkl"))


@pytest.mark.parametrize("name", ["out.pkl", "out.npy"])
def test_a_batch_write_stopped_part_way_is_cut_off_and_not_counted(tmp_path, name):
    """Ctrl-C or a full disk in the middle of a batch: the writer still counts only whole lines, and the next
    write (leave_unfinished's last flush) starts where the last whole line ended."""
    writer_class = tool.NpyWriter if name.endswith(".npy") else tool.PickleWriter

    class StopsOnce(writer_class):
        stopped = False

        def write_batch(self, arrays):
            if not self.stopped:
                self.stopped = True
                super().write_batch(arrays[:3])   # part of the batch reaches the files
                raise tool.Interrupted(130)
            super().write_batch(arrays)

    writer = StopsOnce(str(tmp_path / name), resume=True)
    writer.start(4)
    arrays = [np.full((i % 3, 4), i, np.float32) for i in range(10)]
    for array in arrays:
        writer.write(array)
    with pytest.raises(tool.Interrupted):
        writer.flush()
    assert writer.lines == 0
    writer.flush()
    assert writer.lines == 10
    writer.commit(4)
    if name.endswith(".npy"):
        matrix, offsets = np.load(tmp_path / name), np.load(tmp_path / "out.offsets.npy")
        loaded = [matrix[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    else:
        loaded = load_pickle(tmp_path / name)
    assert len(loaded) == 10
    for array, back in zip(arrays, loaded):
        np.testing.assert_array_equal(back, array)


def numbered_lines(count):
    """``count`` one-row arrays whose values are their line numbers, from 0."""
    return [np.full((1, 4), i, np.float32) for i in range(count)]


def test_a_chunk_of_full_batches_waits_for_the_writer_thread_while_the_caller_goes_on(tmp_path, monkeypatch):
    """A chunk's lines are done together; the server loop hands them over and goes on sending, however slow the
    disk: up to WRITE_QUEUE_BATCHES batches wait, behind the one being written, and reach the file in order."""
    monkeypatch.setattr(tool, "WRITE_AT_ONCE_BYTES", 0)   # these small batches go to the thread too
    began, release = threading.Event(), threading.Event()

    class SlowDisk(tool.PickleWriter):
        def write_batch(self, arrays):
            began.set()
            release.wait(5)   # were write() to wait for the disk, it would be after this
            super().write_batch(arrays)

    writer = SlowDisk(str(tmp_path / "out.pkl"), resume=False)
    writer.start(4)
    n = tool.WRITE_BATCH_LINES
    arrays = numbered_lines((tool.WRITE_QUEUE_BATCHES + 1) * n + 7)
    for array in arrays[:n]:
        writer.write(array)
    assert began.wait(5)   # the writer thread holds the first batch
    for array in arrays[n:]:
        writer.write(array)
    assert writer.queued.qsize() == tool.WRITE_QUEUE_BATCHES and writer.lines == 0
    release.set()
    writer.commit(4)
    assert [int(array[0, 0]) for array in load_pickle(tmp_path / "out.pkl")] == list(range(len(arrays)))
    assert writer.writing is None   # the thread ended with the run


def test_a_batch_the_disk_refused_is_raised_to_the_caller_and_later_batches_are_dropped(tmp_path, monkeypatch):
    """ENOSPC on the writer thread: a later write raises it, the batches queued behind it are never written,
    and the files still end after the last whole batch."""
    monkeypatch.setattr(tool, "WRITE_AT_ONCE_BYTES", 0)
    class FullDisk(tool.PickleWriter):
        def write_batch(self, arrays):
            if self.lines:
                raise OSError(errno.ENOSPC, "No space left on device")
            super().write_batch(arrays)

    writer = FullDisk(str(tmp_path / "out.pkl"), resume=True)
    writer.start(4)
    n = tool.WRITE_BATCH_LINES
    with pytest.raises(OSError, match="No space"):
        for array in numbered_lines((tool.WRITE_QUEUE_BATCHES + 4) * n):
            writer.write(array)
    writer.stop()
    assert writer.lines == n and writer.writing is None and writer.queued.empty()
    assert writer.sizes == [writer.files[0].file.seek(0, 2)]


def test_small_batches_are_written_at_once_and_big_ones_behind_them_by_the_thread(tmp_path, monkeypatch):
    """A batch under WRITE_AT_ONCE_BYTES with nothing unwritten before it is written by the caller, with no thread;
    a big one goes to the thread, and a small one after it waits its turn there, so the file keeps the order."""
    n = tool.WRITE_BATCH_LINES
    monkeypatch.setattr(tool, "WRITE_AT_ONCE_BYTES", n * 4 * 4 + 1)   # a batch of numbered_lines is 16 bytes a line
    release = threading.Event()

    class SlowDisk(tool.PickleWriter):
        def write_batch(self, arrays):
            if threading.current_thread() is not threading.main_thread():
                release.wait(5)
            super().write_batch(arrays)

    writer = SlowDisk(str(tmp_path / "out.pkl"), resume=False)
    writer.start(4)
    small = numbered_lines(n)
    for array in small:
        writer.write(array)
    assert writer.lines == n and writer.writing is None   # written at once, by the caller
    big = [np.full((2, 4), n + i, np.float32) for i in range(n)]
    for array in big + numbered_lines(n):
        writer.write(array)
    assert (writer.lines, writer.handed_over, writer.taken) == (n, 2, 0)   # the small one waits behind the big one
    release.set()
    writer.commit(4)
    assert [int(array[0, 0]) for array in load_pickle(tmp_path / "out.pkl")] == list(range(2 * n)) + list(range(n))


class TruncateSpy:
    """A file object that records where each truncate() cut it."""

    def __init__(self, file):
        self.file, self.cuts = file, []

    def truncate(self):
        self.cuts.append(self.file.tell())
        return self.file.truncate()

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("name", ["out.pkl", "out.npy"])
def test_an_output_is_truncated_only_where_a_failed_write_left_bytes(tmp_path, name):
    """ext4 writes out a file that was truncated to 0 bytes whole when it is closed (auto_da_alloc), which held
    the end of a 2.7 GB run up by 0.9 s: a new file is never truncated, a cut back only cuts what is there."""
    writer = tool.open_writer(str(tmp_path / name), False, 1)
    for staged in writer.files:
        staged.file = TruncateSpy(staged.file)
    writer.start(4)
    for array in numbered_lines(300):
        writer.write(array)
    writer.flush()
    assert [staged.file.cuts for staged in writer.files] == [[]] * len(writer.files)
    writer.files[0].file.write(b"half a line")
    writer.cut_back()
    assert [staged.file.cuts for staged in writer.files] == [[writer.sizes[0]]] + [[]] * (len(writer.files) - 1)
    writer.commit(4)


def test_write_all_goes_on_after_short_writes(tmp_path, monkeypatch):
    """writev may write less than it was given (a signal, a pipe, a nearly full disk): the rest follows, in order."""
    real_writev = os.writev
    monkeypatch.setattr(tool.os, "writev", lambda fd, views: real_writev(fd, [bytes(views[0])[:5]]))
    path = tmp_path / "out.bin"
    parts = [b"0123456789", b"", b"abc", np.zeros((0, 3), dtype=np.float32), np.arange(4, dtype=np.float32)]
    with open(path, "wb") as f:
        tool.write_all(f.fileno(), parts, 10 + 3 + 16)
    assert path.read_bytes() == b"".join(part if isinstance(part, bytes) else part.tobytes() for part in parts)


def test_npy_and_offsets_equal_the_pickle(outputs, srv, text, expect):
    """The same lines in both formats: equal rows, except where a long line's windows fell otherwise in the other run
    (they follow the piece counts learnt from replies, which come in their own order): then both are right."""
    arrays = load_pickle(outputs / "out.pkl")
    matrix = np.load(outputs / "out.npy", mmap_mode="r")
    offsets = np.load(outputs / "out.offsets.npy", mmap_mode="r")
    assert isinstance(matrix, np.memmap)
    assert matrix.dtype == np.float32 and matrix.shape == (sum(len(a) for a in arrays), 16)
    assert offsets.dtype.kind == "i" and offsets.shape == (len(arrays) + 1,) and offsets[0] == 0
    assert (np.diff(offsets) >= 0).all() and offsets[-1] == len(matrix)
    tables = expect.Tables(srv)
    for line, array, start, end in zip(text.splitlines(), arrays, offsets, offsets[1:]):
        if not np.array_equal(matrix[start:end], array):
            for rows in (np.array(matrix[start:end]), array):
                expect.check_line(srv, tables, line, rows, "mean")


def test_npy_loads_fully_too(outputs):
    matrix = np.load(outputs / "out.npy")
    assert matrix.flags.writeable and matrix.dtype == np.float32
    assert len(matrix) == np.load(outputs / "out.offsets.npy")[-1]


@pytest.mark.parametrize("data, shapes", [("", []), ("\n", [(0, 16)]), ("\n \n", [(0, 16), (0, 16)]),
                                          ("a b\n\nc\n", [(2, 16), (0, 16), (1, 16)])])
def test_empty_and_blank_cases_in_both_formats(srv, run_cli, tmp_path, expect, data, shapes):
    (tmp_path / "in.txt").write_text(data)
    for name in ("out.pkl", "out.npy"):
        rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / name, "-q", *expect.server_args(srv)])
        assert rc == 0, err
    arrays = load_pickle(tmp_path / "out.pkl")
    assert [a.shape for a in arrays] == shapes
    matrix = np.load(tmp_path / "out.npy", mmap_mode="r")
    offsets = np.load(tmp_path / "out.offsets.npy")
    assert matrix.shape == (sum(s[0] for s in shapes), 16)
    assert offsets.tolist() == [0] + list(np.cumsum([s[0] for s in shapes], dtype=int))
    for i, array in enumerate(arrays):
        np.testing.assert_array_equal(matrix[offsets[i]:offsets[i + 1]], array)


def test_npy_output_leaves_only_its_two_files(srv, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text("a b\n")
    (tmp_path / "out").mkdir()
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out" / "vec.npy", "-q", *expect.server_args(srv)])
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vec.npy", "vec.offsets.npy"]


def test_a_wait_for_the_writer_thread_that_a_signal_cut_short_waits_again(tmp_path):
    """Ctrl-C while waiting for the writer thread, then the cleanup waits again: that second wait must last until the
    thread ends. (An interrupted Thread.join marks the thread stopped in Python 3.11: a second join returns at once,
    and the cleanup would write and record the files under the thread.)"""
    release, finished = threading.Event(), []

    def slow_write():
        release.wait(5)
        finished.append(True)

    call = tool.BackgroundCall(slow_write).start()

    def interrupt(number, frame):
        raise tool.Interrupted(130)

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(tool.Interrupted):
            call.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    threading.Timer(0.3, release.set).start()
    call.wait()
    assert finished == [True]


def test_buffers_go_out_in_calls_of_some_hundred_kb_and_survive_short_writes(tmp_path, monkeypatch):
    """write_buffers ends each writev at the buffer that takes it to WRITE_CALL_BYTES (or at WRITE_CALL_BUFFERS buffers); a short write goes on where it stopped."""
    rng = np.random.default_rng(3)
    buffers = []
    for n in rng.integers(1, 2000, 1500):   # headers and arrays, as the pickle writer hands them over
        buffers += [bytes(rng.integers(0, 256, 7, dtype=np.uint8)), rng.random(int(n), dtype=np.float32)]
    calls, real_writev = [], os.writev

    def short_writev(fd, chunk):
        sizes = [memoryview(b).nbytes for b in chunk]
        calls.append((len(chunk), sum(sizes)))
        whole = b"".join(bytes(memoryview(b).cast("B")) for b in chunk)
        return os.write(fd, whole[:max(1, len(whole) * 2 // 3)])   # two thirds of it at most

    monkeypatch.setattr(os, "writev", short_writev)
    staged = tool.StagedFile(str(tmp_path / "out.bin"), resume=False)
    staged.write_buffers(buffers)
    monkeypatch.setattr(os, "writev", real_writev)
    staged.commit()
    assert (tmp_path / "out.bin").read_bytes() == b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
    sizes = [memoryview(b).nbytes for b in buffers]
    first, expected = 0, []
    while first < len(buffers):   # the first call of each group, as the contract says
        end, total = first, 0
        while end < len(buffers) and total < tool.WRITE_CALL_BYTES and end - first < tool.WRITE_CALL_BUFFERS:
            total += sizes[end]
            end += 1
        expected.append((end - first, total))
        first = end
    at = 0
    for count, total in expected:   # each group's first call, then its rest, two thirds at a time
        assert calls[at] == (count, total)
        left = total - max(1, total * 2 // 3)
        while left:
            at += 1
            assert calls[at][1] == left
            left -= max(1, left * 2 // 3)
        at += 1
    assert at == len(calls)
