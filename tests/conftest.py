"""Shared fixtures: stand-in servers, the command line run in-process or in a fresh process, the one pickle
loader, and the rows a correct tool must write.

The stand-in server (tests/standin_server.py) sends, for a piece at position ``pos`` of a
sentence (position 0 is [CLS]), the row ``piece_vector(piece, pos)``.  The helpers here
turn that into the rows a correct tool writes for a line: every token's pieces are the
pieces the stand-in makes of that token *alone*, and its row is the merge of those pieces'
rows.  For lines too long for one window, the positions are the tool's choice, so the
helpers check a token's row against every position it could legally have come from.
"""

import contextlib
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import bert_token_embed
from bert_token_embed import ServerUnicode, basic_tokens
from standin_server import VOCAB_UNCASED, StandinServer, make_cased_vocab

# torch (imported after this file, by the embedded-mode tests) starts a compute thread per core; on a small
# machine shared with other work the threads wait on each other, and the model tests took 3-4 times as long
# (48 s against 14 s for test_model.py on 2 busy cores). One thread, unless the caller chose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bert_token_embed.py"
SEPARATOR = "\t"  # what the tool joins a window's tokens with (bert_token_embed.SEPARATOR)
MERGES = bert_token_embed.MERGES   # every strategy the tool has

# "ci" (the default): 200 examples, the same ones every run (derandomized), about 550 random lines
# for the main property in tests/test_property.py. HYPOTHESIS_PROFILE=thorough: 1500 fresh ones.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------- servers

def _factory(vocab, do_lower_case):
    started = []

    def make(**options):
        """An unstarted StandinServer: use it as ``with make(max_seq_len=25) as srv:`` (entering starts it)."""
        srv = StandinServer(vocab=vocab, do_lower_case=do_lower_case, **options)
        started.append(srv)
        return srv

    return make, started


@pytest.fixture(scope="session")
def cased_vocab(tmp_path_factory):
    return make_cased_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="session")
def uncased_server():
    """Factory: ``with uncased_server(max_seq_len=None, hidden=16) as srv:`` runs a lowercasing stand-in."""
    make, started = _factory(VOCAB_UNCASED, True)
    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def cased_server(cased_vocab):
    """Factory: ``with cased_server(...) as srv:`` runs a cased stand-in (-cased_tokenization)."""
    make, started = _factory(cased_vocab, False)
    yield make
    for srv in started:
        srv.stop()


def free_port_pair():
    """Two consecutive ports nothing listens on (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def server_args(*servers):
    """``--server 127.0.0.1:PORT:PORT_OUT`` for each server."""
    args = []
    for srv in servers:
        args += ["--server", f"127.0.0.1:{srv.port}:{srv.port_out}"]
    return args


# ---------------------------------------------------------------- the command line

def _run_cli_process(args, stdin=None, timeout=60):
    """Run ``python bert_token_embed.py ARGS`` from the repository root; return (returncode, stdout, stderr).

    For what only a fresh process shows: signals, a real pipe or file on standard input,
    start-up through ``if __name__ == "__main__"``, missing modules, limits of the process.
    """
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def _show_warnings_as_a_fresh_python_would(stream):
    """Inside catch_warnings: Python's default filters (the script as __main__), printed to ``stream``."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="bert_token_embed")

    def show(message, category, filename, lineno, file=None, line=None):
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))
    warnings.showwarning = show


def _exit_status(code, stderr):
    """The status a process exits with for ``sys.exit(code)`` (a message is printed, as Python does)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=stderr)
    return 1


def _run_cli_in_process(args, stdin=None, timeout=60):
    """Call ``bert_token_embed.main(ARGS)`` in this process, as ``_run_cli_process`` runs the script.

    Returns (returncode, stdout, stderr) like it: standard input is ``stdin`` (bytes or str)
    behind a fake ``sys.stdin`` whose ``.buffer`` is a BytesIO (and which has no file
    descriptor, so it counts as no pipe, like /dev/null: the "pipe without -" rule needs a
    real process); the working directory is the repository root during the call; warnings
    are printed to stderr as a fresh Python prints them; ``SystemExit`` (--help, --version)
    gives its status and an uncaught exception a traceback on stderr and status 1. A run
    longer than ``timeout`` gets SIGINT (the tool stops as on Ctrl-C) and raises
    subprocess.TimeoutExpired; a run the user stopped with Ctrl-C (status 130) raises
    KeyboardInterrupt, so that pytest stops as it does when a Ctrl-C reaches both processes.
    Must run in the main thread (the tool installs signal handlers).
    """
    argv = [str(arg) for arg in args]
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    out, err = io.StringIO(), io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8")
    expired, lock, running = threading.Event(), threading.Lock(), [True]

    def expire():
        with lock:
            if running[0]:
                expired.set()
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    timer = threading.Timer(timeout, expire)
    saved_stdin, saved_cwd, status = sys.stdin, os.getcwd(), None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            _show_warnings_as_a_fresh_python_would(err)
            sys.stdin = fake_stdin
            os.chdir(REPO)
            timer.start()
            try:
                status = bert_token_embed.main(argv)
            except SystemExit as exit_:
                status = _exit_status(exit_.code, err)
            except KeyboardInterrupt:
                if not expired.is_set():
                    raise
            except Exception:   # what Python prints for an uncaught exception
                traceback.print_exc()
                status = 1
            finally:
                with lock:
                    running[0] = False
                timer.cancel()
    except KeyboardInterrupt:   # the timeout's SIGINT, arrived after the tool put back the handlers
        if not expired.is_set():
            raise
    finally:
        sys.stdin = saved_stdin
        os.chdir(saved_cwd)
    if expired.is_set():
        raise subprocess.TimeoutExpired(argv, timeout, out.getvalue(), err.getvalue())
    if status == 128 + signal.SIGINT:
        raise KeyboardInterrupt(err.getvalue())
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(ARGS, stdin=None, timeout=60)`` -> (returncode, stdout, stderr): the command line, in this process."""
    return _run_cli_in_process


@pytest.fixture(scope="session")
def run_cli_process():
    """``run_cli_process(ARGS, stdin=None, timeout=60)``: the same, in a fresh ``python bert_token_embed.py``."""
    return _run_cli_process


def load_pickle(path):
    """The list that a .pkl output holds: one pickle, nothing after it."""
    with open(path, "rb") as f:
        data = pickle.load(f)
        assert f.read() == b"", f"{path}: one pickle, nothing after it"
    return data


def listing(directory):
    """{name: bytes} of the files in a directory (to show nothing changed and no temporary file is left)."""
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


# ---------------------------------------------------------------- expected rows

@lru_cache(maxsize=None)
def _reference(vocab_path, do_lower_case):
    """An unstarted stand-in with no length limit, used only for its tokenizer."""
    return StandinServer(vocab=vocab_path, do_lower_case=do_lower_case, max_seq_len=None, hidden=1)


@lru_cache(maxsize=1 << 16)
def word_groups(vocab_path, do_lower_case, token):
    """The stand-in's pieces of ``token`` alone, grouped by basic token (a group starts at each piece without ##)."""
    groups = []
    for piece in _reference(vocab_path, do_lower_case).tokenize(token)[1:-1]:
        if piece.startswith("##") and groups:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    return tuple(tuple(g) for g in groups)


def token_pieces(srv, token, limit=None):
    """The pieces that a token's row merges: its own pieces, each basic token cut to ``limit`` pieces if given.

    (A single basic token with more pieces than a window holds keeps only the pieces
    that fit; the tool reports it in its summary.)
    """
    groups = word_groups(srv.vocab_path, srv.do_lower_case, token)
    return [p for g in groups for p in (g if limit is None else g[:limit])]


def merge_reference(rows, how, hidden):
    """Plain-python per-row merge (float64 arithmetic), zero row for no rows."""
    rows = [np.asarray(r, dtype=np.float64) for r in rows]
    if not rows:
        return np.zeros(hidden)
    if how == "first":
        return rows[0]
    if how == "last":
        return rows[-1]
    out = rows[0].copy()
    for r in rows[1:]:
        out = np.maximum(out, r) if how == "max" else out + r
    return out / len(rows) if how == "mean" else out


def window_limit(srv):
    """Pieces a window holds: max_seq_len - 2 ([CLS] and [SEP]); 510 when max_seq_len is None."""
    return (srv.max_seq_len or 512) - 2


def expected_line(srv, line, how):
    """The exact (tokens, hidden) array a correct tool writes for ``line`` when the line fits one window.

    Returns None when the line's pieces do not fit one window (use ``check_windowed_line``).
    """
    tokens = line.split()
    per_token = [token_pieces(srv, t) for t in tokens]
    flat = [p for pieces in per_token for p in pieces]
    if len(flat) > window_limit(srv):
        return None
    if tokens:
        # The stand-in tokenizes the sentence the tool sends exactly as the tokens one by one.
        assert srv.tokenize(SEPARATOR.join(tokens))[1:-1] == flat, line
    out, position = [], 1
    for pieces in per_token:
        rows = [srv.piece_vector(p, position + j) for j, p in enumerate(pieces)]
        out.append(merge_reference(rows, how, srv.hidden))
        position += len(pieces)
    return np.array(out, dtype=np.float64).reshape(len(tokens), srv.hidden)


class Tables:
    """A stand-in's rows split as piece part A[piece] and position part D[pos] (row = A + D, D[0] = 0)."""

    def __init__(self, srv):
        self.srv = srv
        self.limit = window_limit(srv)
        anchor = "[CLS]"
        base = srv.piece_vector(anchor, 0).astype(np.float64)
        self.D = np.array([srv.piece_vector(anchor, pos).astype(np.float64) - base
                           for pos in range(self.limit + 2)])
        self._A = {}

    def A(self, piece):
        if piece not in self._A:
            self._A[piece] = self.srv.piece_vector(piece, 0).astype(np.float64)
        return self._A[piece]


def check_token_row(tables, row, pieces, how, atol=1e-5):
    """Assert that ``row`` is the merge of exactly ``pieces`` at positions inside one or more windows.

    A token whose pieces fit one window must come from one contiguous run of positions
    1..limit, so every start is tried and one must give the row exactly.  A longer token
    was split over several windows: for mean and sum, the positions are solved for (the
    position rows are independent when hidden > limit) and must be whole counts adding
    up to the number of pieces; for first/last the row must be the first/last piece at
    some position; for max every component must be one piece's value at some position.
    """
    row = np.asarray(row, dtype=np.float64)
    n, limit, D = len(pieces), tables.limit, tables.D
    if n == 0:
        assert not row.any(), "a token with no pieces must get a zero row"
        return
    A = np.array([tables.A(p) for p in pieces])
    if n <= limit:
        best = np.inf
        for start in range(1, limit - n + 2):
            candidate = merge_reference(A + D[start:start + n], how, row.size)
            best = min(best, np.abs(candidate - row).max())
            if best <= atol * max(1.0, np.abs(row).max()):
                return
        raise AssertionError(f"row is not the {how} of pieces {pieces} at any run of positions in a window "
                             f"(closest differs by {best:.3g})")
    Dw = D[1:limit + 1]
    if how in ("mean", "sum"):
        assert row.size > limit, "need hidden > window length to solve for positions"
        target = (row * n if how == "mean" else row) - A.sum(0)
        counts, *_ = np.linalg.lstsq(Dw.T, target, rcond=None)
        whole = np.round(counts)
        assert np.abs(Dw.T @ whole - target).max() < 1e-3 * n, f"row is not the {how} of pieces {pieces}"
        assert np.abs(counts - whole).max() < 0.05 and (whole >= 0).all() and whole.sum() == n, counts
    elif how in ("first", "last"):
        piece_row = A[0] if how == "first" else A[-1]
        assert np.abs(piece_row + Dw - row).max(axis=1).min() < atol * 10, f"row is not the {how} piece of {pieces}"
    else:
        values = (A[:, None, :] + Dw[None, :, :]).reshape(-1, row.size)
        assert (np.abs(values - row).min(axis=0) < atol * 10).all(), f"row is no max of pieces {pieces}"


def estimate_is_no_more_than_the_pieces(srv, tokens):
    """True if no token has fewer pieces than the tool expects of it (one per basic token, as it sees them).

    Only then does a line whose pieces fit one window surely go out as one window: where the
    server deletes a character the tool keeps (its Unicode tables differ), the tool may
    expect more pieces than fit, and rightly plan several windows with context.
    """
    lacks = ServerUnicode(srv.unicode_version).lacks
    return all(len(token_pieces(srv, t)) >= len(basic_tokens(t, srv.do_lower_case, lacks)) for t in tokens)


def check_line(srv, tables, line, array, how, atol=1e-5):
    """Assert a written array is right for ``line``: exact values when the line surely went as one window, else per token."""
    tokens = line.split()
    assert isinstance(array, np.ndarray) and array.dtype == np.float32, type(array)
    assert array.shape == (len(tokens), srv.hidden), (array.shape, line)
    expected = expected_line(srv, line, how) if estimate_is_no_more_than_the_pieces(srv, tokens) else None
    if expected is not None:
        np.testing.assert_allclose(array, expected, rtol=1e-5, atol=atol, err_msg=repr(line))
        return
    for k, token in enumerate(tokens):
        try:
            check_token_row(tables, array[k], token_pieces(srv, token, tables.limit), how, atol)
        except AssertionError as err:
            raise AssertionError(f"line {line[:80]!r}…, token {k} {token[:40]!r}: {err}") from None


@pytest.fixture(scope="session")
def expect():
    """The helpers above, for tests: expect.line(srv, line, how), expect.check_line(...), expect.Tables(srv)."""
    class Expect:
        line = staticmethod(expected_line)
        check_line = staticmethod(check_line)
        check_token_row = staticmethod(check_token_row)
        token_pieces = staticmethod(token_pieces)
        merge = staticmethod(merge_reference)
        Tables = Tables
        server_args = staticmethod(server_args)
        listing = staticmethod(listing)
    return Expect


# ---------------------------------------------------------------- the real bert-serving-server (tests/test_realserver.py)

# Fixture name: (max_seq_len, cased). Only the servers that the selected tests use are started, all at once.
REAL_SERVERS = {
    "real_uncased": (None, False),   # uncased, -max_seq_len NONE
    "real_short": (25, False),       # uncased, -max_seq_len 25: long lines need windows
    "real_cased": (None, True),      # -cased_tokenization on the same uncased model
    "real_second": (None, False),    # a second server for the several-servers tests (they kill it)
    "real_doomed": (None, False),    # killed by the test of a run that loses its only server
}


@pytest.fixture(scope="session")
def real_build():
    """The real server's Python 3.7 venv and converted model (tests/realserver/build.py), built once and cached.

    Without Python 3.7 the real-server tests skip, except under CI=true, where they fail:
    CI must run them.
    """
    from realserver.build import NoPython37, ensure_built
    try:
        return ensure_built()
    except NoPython37 as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, so the real-server tests must run: {err}", pytrace=False)
        pytest.skip(str(err))


class RealServers:
    """The real servers of one test session: started together on first use, restarted if a test killed one."""

    def __init__(self, build, log_dir, names):
        from realserver.server import RealServer
        self.servers = {name: RealServer(build, name, *REAL_SERVERS[name], log_dir=log_dir) for name in names}
        started = time.monotonic()
        for server in self.servers.values():
            server.start()
        for server in self.servers.values():
            server.wait_ready()
        self.startup_s = time.monotonic() - started

    def get(self, name):
        """The named server, running (one that a test killed is started again)."""
        server = self.servers[name]
        if not server.group_alive():
            server.start().wait_ready()
        return server

    def stop(self):
        """Kill every server's whole process group."""
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def real_servers(request, real_build, tmp_path_factory):
    """The RealServers that the session's selected tests ask for (by fixture name), all started in parallel."""
    names = set()
    for item in request.session.items:   # a server is asked for by a fixture name or a parameter naming one
        params = getattr(item, "callspec", None)
        for name in [*getattr(item, "fixturenames", ()), *(params.params.values() if params else ())]:
            if isinstance(name, str) and name in REAL_SERVERS:
                names.add(name)
    servers = RealServers(real_build, tmp_path_factory.mktemp("realserver-logs"), sorted(names))
    print(f"\nreal servers {sorted(names)} ready in {servers.startup_s:.1f} s")
    yield servers
    servers.stop()


def _real_server_fixture(name):
    """A fixture named NAME: the running real server NAME."""
    @pytest.fixture(name=name)
    def fixture(real_servers):
        return real_servers.get(name)
    fixture.__doc__ = f"The real bert-serving-server {name}: max_seq_len, cased = {REAL_SERVERS[name]}."
    return fixture


for _name in REAL_SERVERS:
    globals()[f"_{_name}_fixture"] = _real_server_fixture(_name)
