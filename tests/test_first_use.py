"""A newcomer's first minutes: no silent waits, no ignored input, one error prefix, input problems first."""

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, SCRIPT, free_port_pair, load_pickle, server_args

PREFIX = "bert_token_embed: error: "


def run(args, stdin=subprocess.DEVNULL, env=None, code=None, timeout=120):
    """Run the script (or ``code`` that runs it) in a subprocess; return (status, stderr, seconds).

    Only for what needs a fresh process: a real pipe or file on standard input, another
    environment, a module made missing before the script starts. The rest uses ``run_cli``.
    """
    command = [sys.executable, "-c", code] if code else [sys.executable, str(SCRIPT)]
    started = time.monotonic()
    proc = subprocess.run([*command, *map(str, args)], stdin=stdin, capture_output=True, timeout=timeout,
                          env=env, cwd=REPO)
    return proc.returncode, proc.stderr.decode("utf-8", "replace"), time.monotonic() - started


@pytest.fixture
def timed(run_cli):
    """``timed(ARGS)`` -> (status, stderr, seconds) of the command line in this process."""
    def run_timed(args):
        started = time.monotonic()
        status, _, err = run_cli(args)
        return status, err, time.monotonic() - started
    return run_timed


def test_piped_input_without_dash_is_never_ignored(tmp_path):
    status, err, _ = run(["-o", tmp_path / "o.pkl", "--model", "minilm"], stdin=subprocess.PIPE)
    assert status == 2
    assert err == (PREFIX + "no INPUT given, and standard input is a pipe or a file: give - to read it "
                            "(or name the file to read)\n")
    with open(REPO / "input.txt", "rb") as redirected:
        status, err, _ = run(["-o", tmp_path / "o.pkl"], stdin=redirected)
    assert status == 2 and "give - to read it" in err
    assert not list(tmp_path.iterdir())


def test_without_input_and_without_a_pipe_the_default_input_txt_is_read(tmp_path, run_cli, uncased_server):
    """Standard input that is no pipe nor file (here run_cli's, like /dev/null) leaves the default: input.txt."""
    with uncased_server(max_seq_len=None, hidden=4) as srv:
        status, _, err = run_cli(["-o", tmp_path / "o.pkl", *server_args(srv), "-q"])
    assert (status, err) == (0, "")
    assert [a.shape for a in load_pickle(tmp_path / "o.pkl")] == [(3, 4), (2, 4)]   # Hello World ! / I'm hankcs


def test_argparse_errors_have_the_one_prefix_and_one_line(tmp_path, timed):
    for args, words in [(["--bogus"], "unrecognized arguments: --bogus"),
                        (["--merge", "median"], "argument --merge: invalid choice: 'median'"),
                        (["--batch-size", "x"], "argument --batch-size: invalid int value: 'x'")]:
        status, err, _ = timed([REPO / "input.txt", "-o", tmp_path / "o.pkl", *args])
        assert status == 2
        assert err.startswith(PREFIX + words) and err.endswith("(see bert_token_embed.py -h)\n")
        assert err.count("\n") == 1


def test_no_server_says_where_it_connects_and_how_to_do_without_one(tmp_path, timed):
    port = free_port_pair()
    status, err, seconds = timed([REPO / "input.txt", "-o", tmp_path / "o.pkl", "--port", port, "--port-out", port + 1])
    note, error = err.splitlines()
    assert note == (f"bert_token_embed: connecting to bert-serving-server localhost:{port}:{port + 1} "
                    f"(waiting at most 15 s for its answer)")
    assert error == (PREFIX + f"no bert-serving-server at localhost:{port}:{port + 1} (localhost refuses connections "
                              f"on port {port}); start one with: bert-serving-start -model_dir MODEL_DIR "
                              f"-pooling_strategy NONE -show_tokens_to_client -max_seq_len NONE -port {port} "
                              f"-port_out {port + 1}; or run without a server: --model minilm")
    assert status == 2 and seconds < 10   # nothing listens: no 15 s wait


def test_a_server_that_accepts_but_never_answers_is_named_after_the_wait(tmp_path, timed):
    import socket
    with socket.socket() as listener:   # a TCP port that accepts connections and says nothing
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        status, err, seconds = timed([REPO / "input.txt", "-o", tmp_path / "o.pkl", "--server",
                                      f"127.0.0.1:{port}:{port}", "--timeout", "1", "-q"])
    assert status == 2 and seconds < 30
    assert err == (PREFIX + f"no bert-serving-server at 127.0.0.1:{port}:{port} (none answered within 1 s); start one "
                            f"with: bert-serving-start -model_dir MODEL_DIR -pooling_strategy NONE "
                            f"-show_tokens_to_client -max_seq_len NONE -port {port} -port_out {port}; or run without "
                            f"a server: --model minilm\n")


def test_input_problems_come_before_a_model_loads_or_a_server_is_asked(tmp_path, timed):
    (tmp_path / "in.txt").write_bytes(b"fine\n\xe9t\xe9\n")
    expected = PREFIX + f"{tmp_path / 'in.txt'}: line 2 is not valid utf-8 (byte 5 of the file): use --encoding to name " \
                        f"the file's encoding, or --errors replace to go on\n"
    port = free_port_pair()
    status, err, _ = timed([tmp_path / "in.txt", "-o", tmp_path / "o.pkl", "--port", port, "-q"])
    assert (status, err) == (2, expected)   # not the no-server error
    # Without torch (a fresh process where it is missing) a model cannot load at all: the input's problem still
    # comes first.
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['bert_token_embed.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    status, err, _ = run([tmp_path / "in.txt", "-o", tmp_path / "o.pkl", "--model", "minilm"], code=code)
    assert (status, err) == (2, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


@pytest.mark.slow
def test_a_hub_name_that_cannot_be_fetched_fails_in_one_line_within_seconds(tmp_path):
    port = free_port_pair()   # a hub that is not there, and an empty cache
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    status, err, seconds = run([REPO / "input.txt", "-o", tmp_path / "o.pkl", "--model", "bert-base-uncased"], env=env)
    assert status == 2
    assert err == (PREFIX + "cannot load model bert-base-uncased (it is neither a model directory nor in the Hugging "
                            "Face cache, and the hub cannot be reached); give a Hugging Face model directory, a hub "
                            "name where this machine may download, or --model minilm\n")
    assert seconds < 60   # torch's import is most of it; no download retries


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_the_command_line_starts_no_blas_threads_and_leaves_the_users_setting_for_later_libraries():
    """numpy's OpenBLAS starts a spinning thread per core for matrix products this tool never computes."""
    code = (f"import os, runpy, sys\nsys.argv = [{str(SCRIPT)!r}, '--version']\n"
            f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))")
    for given, left in ((None, "None"), ("3", "3")):
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
        if given:
            env["OPENBLAS_NUM_THREADS"] = given
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        assert out.split()[-2:] == ["1", left], out


def test_the_module_imports_where_sys_argv_is_empty():
    code = "import sys; sys.argv = []; import bert_token_embed; print(bert_token_embed.COMMAND_LINE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("module", ["zmq", "bert_serving"])
def test_server_mode_without_the_client_package_says_what_to_install(tmp_path, module):
    (tmp_path / "in.txt").write_text("hello world\n", encoding="utf-8")
    (tmp_path / "o.pkl").write_bytes(b"kept")
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = ['bert_token_embed.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    status, err, _ = run([tmp_path / "in.txt", "-o", tmp_path / "o.pkl", "--port", free_port_pair()], code=code)
    assert (status, err) == (2, PREFIX + "the bert-serving-client package is missing: pip install -r requirements.txt\n")
    assert (tmp_path / "o.pkl").read_bytes() == b"kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "o.pkl"]
