"""Start and stop a real bert-serving-server 1.10.0 (CPU, one worker) in a process group of its own."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

READY = "all set, ready to serve request!"
START_TIMEOUT = 600   # seconds; one start takes about 40 s alone, several on two cores take longer


def free_port():
    """A TCP port nothing listens on now (best effort)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealServer:
    """One bert-serving-start: ``start()`` launches it, ``wait_ready()`` waits for its ready line, ``kill()`` ends it all."""

    def __init__(self, built, name, max_seq_len=None, cased=False, log_dir=None):
        self.built, self.name = built, name
        self.max_seq_len, self.cased = max_seq_len, cased
        self.port, self.port_out = free_port(), free_port()
        self.scratch = Path(tempfile.mkdtemp(prefix=f"bte-realserver-{name}-"))   # the frozen graph, the log
        self.log_path = Path(log_dir or self.scratch) / f"realserver-{name}.log"
        self.proc = None

    def command(self):
        """The bert-serving-start command line."""
        command = [str(self.built.start), "-model_dir", str(self.built.model_dir), "-cpu", "-num_worker", "1",
                   "-pooling_strategy", "NONE", "-show_tokens_to_client",
                   "-max_seq_len", "NONE" if self.max_seq_len is None else str(self.max_seq_len),
                   "-port", str(self.port), "-port_out", str(self.port_out), "-graph_tmp_dir", str(self.scratch)]
        return command + (["-cased_tokenization"] if self.cased else [])

    def start(self):
        """Launch the server in a new session, so that its sink and worker processes share its process group."""
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)   # the tests' paths mean nothing to Python 3.7
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.scratch, env=env)
        return self

    def log(self):
        """The server's log so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout=START_TIMEOUT):
        """Block until the log says it is ready; RuntimeError (with the log's end) if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while READY not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else f"not ready in {timeout} s"
                self.kill()
                raise RuntimeError(f"bert-serving-start ({self.name}) {why}; log {self.log_path}:\n{self.log()[-3000:]}")
            time.sleep(0.5)
        return self

    @property
    def address(self):
        """The tool's --server value for this server."""
        return f"127.0.0.1:{self.port}:{self.port_out}"

    def group_alive(self):
        """True while any process of the server's group exists."""
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def kill(self, sig=signal.SIGKILL):
        """Send SIG to every process of the server's group and wait until the group is gone."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + 30
        while self.group_alive() and time.monotonic() < deadline:   # the sink and worker are not our children
            time.sleep(0.1)
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self):
        """Kill the whole group and remove the scratch folder (the log stays if it was written elsewhere)."""
        self.kill()
        shutil.rmtree(self.scratch, ignore_errors=True)
