"""Faults and hostile input: nothing hangs, nothing is lost, every failure is one line that says what to do."""

import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, SCRIPT, listing, load_pickle, server_args

OLD = b"an existing output that must survive\n"


def lines_file(tmp_path, count, name="in.txt"):
    """A file of ``count`` short lines that differ."""
    path = tmp_path / name
    path.write_text("".join(f"line {i} says hello hankcs\n" for i in range(count)), encoding="utf-8")
    return path


def with_existing_output(tmp_path):
    """An output path that already holds a file, and the directory listing to compare with after a failure."""
    out = tmp_path / "out.pkl"
    out.write_bytes(OLD)
    return out


def assert_untouched(tmp_path, before):
    """The directory holds exactly what it held: the old output, no temporary or partial file."""
    assert listing(tmp_path) == before


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---------------------------------------------------------------- servers that die, stall, or talk nonsense

def test_a_server_that_dies_mid_run_fails_within_the_timeout(tmp_path, uncased_server, run_cli):
    source = lines_file(tmp_path, 60)
    out = with_existing_output(tmp_path)
    before = listing(tmp_path)
    with uncased_server(max_seq_len=None, die_after=2) as srv:
        started = time.monotonic()
        status, _, err = run_cli([source, "-o", out, *server_args(srv), "--batch-size", "5", "--in-flight", "1",
                                  "--timeout", "2", "-q"])
        elapsed = time.monotonic() - started
    assert status == 1
    message = one_line(err)
    assert f"127.0.0.1:{srv.port}:{srv.port_out}" in message and "after 2 replies" in message
    assert "lines done" in message and "--resume" in message
    assert elapsed < 20
    assert_untouched(tmp_path, before)


@pytest.mark.slow   # 2.5 s; the fast subset has test_servers' test of a server lost mid-run
def test_surviving_servers_finish_the_work_of_a_dead_one(tmp_path, uncased_server, run_cli):
    source = lines_file(tmp_path, 80)
    with uncased_server(max_seq_len=None) as healthy, uncased_server(max_seq_len=None, die_after=1) as dying:
        status, _, err = run_cli([source, "-o", tmp_path / "two.pkl", *server_args(dying, healthy),
                                  "--batch-size", "4", "--timeout", "2"])
        assert status == 0, err
        assert "sent no reply for 2 s" in err and "re-sent after a server was lost" in err
        status, _, err = run_cli([source, "-o", tmp_path / "one.pkl", *server_args(healthy), "-q"])
        assert status == 0, err
    two, one = load_pickle(tmp_path / "two.pkl"), load_pickle(tmp_path / "one.pkl")
    assert len(two) == len(one) == 80
    for a, b in zip(two, one):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_slow_server_is_not_taken_for_a_dead_one(tmp_path, uncased_server, run_cli):
    source = lines_file(tmp_path, 8)
    with uncased_server(max_seq_len=None, delay=0.6) as srv:
        status, _, err = run_cli([source, "-o", tmp_path / "out.pkl", *server_args(srv), "--batch-size", "2",
                                  "--in-flight", "4", "--timeout", "1.5", "-q"])
    # Four batches of 0.6 s each, all sent at once, take 2.4 s: longer than the timeout, each reply well within it.
    assert status == 0, err
    assert len(load_pickle(tmp_path / "out.pkl")) == 8


def test_a_dropped_reply_fails_after_the_timeout(tmp_path, uncased_server, run_cli):
    source = lines_file(tmp_path, 10)
    out = with_existing_output(tmp_path)
    before = listing(tmp_path)
    with uncased_server(max_seq_len=None, drop_reply=2) as srv:
        status, _, err = run_cli([source, "-o", out, *server_args(srv), "--batch-size", "3", "--timeout", "1.5",
                                  "-q"])
    assert status == 1 and "sent no reply for 1.5 s" in one_line(err)
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("fault, words", [("wrong_shape_on", "malformed reply"),
                                          ("tokens_mismatch_on", "malformed reply")])
def test_a_malformed_reply_stops_the_run_and_names_the_request(tmp_path, uncased_server, run_cli, fault, words):
    source = lines_file(tmp_path, 20)
    out = with_existing_output(tmp_path)
    before = listing(tmp_path)
    with uncased_server(max_seq_len=None, hidden=8, **{fault: 2}) as srv:
        status, _, err = run_cli([source, "-o", out, *server_args(srv), "--batch-size", "4", "-q"])
    assert status == 1
    message = one_line(err)
    assert words in message and "request embed of 4 sentences" in message
    assert_untouched(tmp_path, before)


def test_a_server_with_a_max_seq_len_over_512_is_refused(tmp_path, uncased_server, run_cli):
    with uncased_server(max_seq_len=None, config_overrides={"max_seq_len": 600}) as srv:
        status, _, err = run_cli([REPO / "input.txt", "-o", tmp_path / "out.pkl", *server_args(srv), "-q"])
    assert status == 2 and "max_seq_len=600" in one_line(err) and "-max_seq_len NONE" in err
    assert listing(tmp_path) == {}


@pytest.mark.parametrize("config", [b"<html>", b"[1]", b"null"])
def test_a_configuration_that_is_not_a_json_object_is_refused_in_one_line(tmp_path, run_cli, config):
    """A server on the ports that answers SHOW_CONFIG with something else than bert-serving-server's JSON object."""
    import threading
    import zmq
    context = zmq.Context()
    pull, pub = context.socket(zmq.PULL), context.socket(zmq.PUB)
    port, port_out = pull.bind_to_random_port("tcp://127.0.0.1"), pub.bind_to_random_port("tcp://127.0.0.1")

    def answer():
        identity, _, request_id, _ = pull.recv_multipart()
        time.sleep(0.1)   # the real sink's wait for the client's subscription
        pub.send_multipart([identity, config, request_id])
    answering = threading.Thread(target=answer, daemon=True)
    answering.start()
    try:
        status, _, err = run_cli([REPO / "input.txt", "-o", tmp_path / "out.pkl",
                                  "--server", f"127.0.0.1:{port}:{port_out}", "-q"])
    finally:
        answering.join(5)
        context.destroy(linger=0)
    assert status == 2 and one_line(err).startswith(f"bert_token_embed: error: server 127.0.0.1:{port}:{port_out} "
                                                    "sent a configuration this tool cannot read (")
    assert listing(tmp_path) == {}


# ---------------------------------------------------------------- signals

def start_and_signal(source, out, srv, signum, **popen):
    """Start a run of slow lines, send ``signum`` once it is connecting; return (seconds to stop, status, stderr)."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(source), "-o", str(out),
                             *server_args(srv), "--batch-size", "5"], stderr=subprocess.PIPE, text=True, **popen)
    assert "connecting to" in proc.stderr.readline()   # the modules are loaded, the signals handled
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    return time.monotonic() - sent, proc.returncode, err


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_a_signal_stops_the_run_and_leaves_the_output_alone(tmp_path, uncased_server, signum, status):
    source = lines_file(tmp_path, 400)
    out = with_existing_output(tmp_path)
    before = listing(tmp_path)
    with uncased_server(max_seq_len=None, delay=0.2) as srv:
        seconds, returncode, err = start_and_signal(source, out, srv, signum)
    assert seconds < 5 and returncode == status
    assert err.splitlines()[-1].startswith("bert_token_embed: interrupted after") and "Traceback" not in err
    assert_untouched(tmp_path, before)


@pytest.mark.slow
def test_sigint_stops_a_run_within_2_s_on_a_busy_machine_even_when_it_came_ignored(tmp_path, uncased_server):
    # A shell without job control starts background commands with SIGINT ignored, which Python keeps: that
    # made a test suite run in the background wait for the whole run (18 s) instead of stopping.
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)   # noqa: E731
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        with uncased_server(max_seq_len=None, delay=0.2) as srv:
            seconds, returncode, err = start_and_signal(lines_file(tmp_path, 400), tmp_path / "out.pkl", srv,
                                                        signal.SIGINT, preexec_fn=ignore)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert returncode == 130 and "interrupted after" in err
    assert seconds < 2, f"{seconds:.2f} s"


# ---------------------------------------------------------------- output problems, found before any server work

def test_a_full_disk_fails_cleanly(tmp_path, uncased_server):
    source = lines_file(tmp_path, 300)
    out = with_existing_output(tmp_path)
    before = listing(tmp_path)

    def small_files():   # files of this process may not grow past 64 KiB: writes then fail like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    with uncased_server(max_seq_len=None, hidden=64) as srv:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(source), "-o", str(out), *server_args(srv), "-q"],
                              capture_output=True, text=True, preexec_fn=small_files, timeout=60)
    assert proc.returncode == 1
    assert "could not write" in one_line(proc.stderr)
    assert_untouched(tmp_path, before)


def test_an_output_path_that_is_a_directory_is_refused_before_any_server_work(tmp_path, run_cli):
    (tmp_path / "out.pkl").mkdir()
    status, _, err = run_cli([REPO / "input.txt", "-o", tmp_path / "out.pkl", "--port", "1", "--timeout", "1"])
    assert status == 2 and "is a directory" in one_line(err)


def test_npy_output_whose_offsets_path_is_a_directory_leaves_nothing_behind(tmp_path, run_cli):
    (tmp_path / "out.offsets.npy").mkdir()
    status, _, err = run_cli([REPO / "input.txt", "-o", tmp_path / "out.npy", "--port", "1", "--timeout", "1"])
    assert status == 2 and "is a directory" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.offsets.npy"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_directory_is_refused(tmp_path, run_cli):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    status, _, err = run_cli([REPO / "input.txt", "-o", locked / "out.pkl", "--port", "1", "--timeout", "1"])
    assert status == 2 and "cannot write in" in one_line(err)


# ---------------------------------------------------------------- input problems

def test_input_missing_or_a_directory(tmp_path, run_cli):
    status, _, err = run_cli([tmp_path / "nope.txt", "-o", tmp_path / "o.pkl"])
    assert status == 2 and "not found" in one_line(err)
    status, _, err = run_cli([tmp_path, "-o", tmp_path / "o.pkl"])
    assert status == 2 and "is a directory" in one_line(err)


@pytest.mark.parametrize("content, shapes", [
    (b"", []),
    (b"\n \n\t\n", [(0,), (0,), (0,)]),
    (b"a\x00b \x00 c\n", [(3,)]),
])
def test_empty_blank_and_nul_inputs(tmp_path, uncased_server, run_cli, content, shapes):
    source = tmp_path / "in.txt"
    source.write_bytes(content)
    with uncased_server(max_seq_len=None, hidden=4) as srv:
        status, _, err = run_cli([source, "-o", tmp_path / "out.pkl", *server_args(srv), "-q"])
    assert status == 0, err
    got = load_pickle(tmp_path / "out.pkl")
    assert [a.shape[:1] for a in got] == shapes
    assert all(a.shape[1:] == (4,) for a in got)
    if content.startswith(b"a\x00"):
        assert (got[0][1] == 0).all() and got[0][0].any()     # the token "\0" alone has no piece


@pytest.mark.slow
def test_a_one_megabyte_line(tmp_path, uncased_server, run_cli):
    tokens = [f"w{i % 977}x" for i in range(170_000)]
    source = tmp_path / "in.txt"
    source.write_text(" ".join(tokens) + "\nshort line\n", encoding="utf-8")
    assert source.stat().st_size > 1_000_000
    with uncased_server(max_seq_len=None, hidden=4) as srv:
        status, _, err = run_cli([source, "-o", tmp_path / "out.pkl", *server_args(srv)], timeout=300)
    assert status == 0, err
    got = load_pickle(tmp_path / "out.pkl")
    assert [a.shape for a in got] == [(170_000, 4), (2, 4)]
    assert not (got[0] == 0).all(axis=1).any()
    assert "1 line needed extra windows" in err


def test_carriage_return_line_ends_are_not_line_ends(tmp_path, uncased_server, run_cli):
    source = tmp_path / "in.txt"
    source.write_bytes(b"first line\rsecond line\rthird\r")
    with uncased_server(max_seq_len=None, hidden=4) as srv:
        status, _, err = run_cli([source, "-o", tmp_path / "out.pkl", *server_args(srv), "-q"])
    assert status == 0
    assert "carriage return" in err and "only \\n ends a line" in err
    assert [a.shape for a in load_pickle(tmp_path / "out.pkl")] == [(5, 4)]


# ---------------------------------------------------------------- resuming

def interrupted_run(source, out, srv):
    """Start a --resume run and SIGTERM it once its partial output holds some lines; return its stderr."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(source), "-o", str(out), *server_args(srv),
                             "--batch-size", "8", "--resume", "-q"], stderr=subprocess.PIPE, text=True)
    partial = out.parent / (out.name + ".partial")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (partial.exists() and partial.stat().st_size > 8192):
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    return err


@pytest.mark.slow
def test_resume_continues_an_interrupted_run(tmp_path, uncased_server, run_cli):
    source = lines_file(tmp_path, 3000)
    out = tmp_path / "out.npy"
    with uncased_server(max_seq_len=None, hidden=4, delay=0.02) as srv:
        err = interrupted_run(source, out, srv)
        assert "run the same command on the same input again to continue it" in err
        assert {"out.npy.partial", "out.offsets.npy.partial", "out.npy.partial.json"} <= set(listing(tmp_path))
        kept = re.search(r"the partial work \((\d+) lines\)", err).group(1)
        status, _, err = run_cli([source, "-o", out, *server_args(srv), "--batch-size", "64", "--resume"])
        assert status == 0, err
        assert f"continued after the {kept} lines" in err   # the message said what was kept
        status, _, err = run_cli([source, "-o", tmp_path / "whole.npy", *server_args(srv), "--batch-size", "64", "-q"])
        assert status == 0, err
    assert set(listing(tmp_path)) == {"in.txt", "out.npy", "out.offsets.npy", "whole.npy", "whole.offsets.npy"}
    np.testing.assert_array_equal(np.load(tmp_path / "out.offsets.npy"), np.load(tmp_path / "whole.offsets.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), np.load(tmp_path / "whole.npy"), atol=1e-6)


def test_an_input_error_after_kept_work_says_where_the_partial_work_is(tmp_path, uncased_server, run_cli):
    source = tmp_path / "in.txt"
    source.write_bytes(b"".join(b"line %d\n" % k for k in range(3000)) + b"bad \xff\n")
    out = tmp_path / "out.pkl"
    with uncased_server(max_seq_len=None, hidden=4) as srv:
        status, _, err = run_cli([source, "-o", out, *server_args(srv), "--resume", "-q"])
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "line 3001 is not valid utf-8" in err
    assert re.search(r"the partial work \((\d+) lines\) is in .*out\.pkl\.partial: run the same command", err), err
    assert "out.pkl.partial.json" in set(listing(tmp_path))


def test_other_lines_on_standard_input_keep_the_partial_work_for_the_same_input(tmp_path, uncased_server, run_cli):
    good = b"".join(b"line %d\n" % k for k in range(3000))
    out = tmp_path / "out.pkl"
    with uncased_server(max_seq_len=None, hidden=4) as srv:
        status, _, err = run_cli(["-", "-o", out, *server_args(srv), "--resume", "-q"], stdin=good + b"bad \xff\n")
        assert status == 2 and "the partial work" in err, err
        kept = listing(tmp_path)
        status, _, err = run_cli(["-", "-o", out, *server_args(srv), "--resume", "-q"], stdin=b"other\n" + good)
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "standard input does not start with the lines" in err and "to start over" in err
    assert "run the same command on the same input again to continue it" in err
    assert listing(tmp_path) == kept


@pytest.mark.slow
def test_resume_starts_over_when_the_input_changed(tmp_path, uncased_server, run_cli):
    source = lines_file(tmp_path, 3000)
    out = tmp_path / "out.pkl"
    with uncased_server(max_seq_len=None, hidden=4, delay=0.02) as srv:
        interrupted_run(source, out, srv)
        source.write_text("a changed first line\n" + source.read_text(encoding="utf-8"), encoding="utf-8")
        status, _, err = run_cli([source, "-o", out, *server_args(srv), "--resume"])
        assert status == 0, err
        assert "changed since" in err and "starting over" in err and "continued after" not in err
        got = load_pickle(out)
    assert len(got) == 3001 and got[0].shape == (4, 4)


@pytest.mark.slow
def test_resume_from_standard_input_that_changed_is_refused(tmp_path, uncased_server, run_cli):
    source = lines_file(tmp_path, 3000)
    out = tmp_path / "out.pkl"
    with uncased_server(max_seq_len=None, hidden=4, delay=0.02) as srv:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "-", "-o", str(out), *server_args(srv),
                                 "--batch-size", "8", "--resume", "-q"], stdin=open(source, "rb"),
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60   # a busy machine starts Python slowly: wait for lines done, not a fixed time
        while srv.stats["replies"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        status, _, err = run_cli(["-", "-o", out, *server_args(srv), "--resume", "-q"], stdin="other text\n" * 3000)
    assert status == 2 and "delete" in one_line(err)
    assert "out.pkl.partial" in listing(tmp_path)
