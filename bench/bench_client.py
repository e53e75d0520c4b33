#!/usr/bin/env python3
"""Server mode's own work, in one process: the CPU a version of the tool spends per token with no server and no network.

bench_server.py times the tool against a stand-in server on the same cores, so its
figure for the Python work per token moves with whatever else the machine does. Here
the tool's server loop (``TokenEmbedder.arrays``, as the API and the command line run
it) talks to a pool that answers each request at once, in order: with the pieces the
stand-in's tokenizer gives each text (worked out and cached before the clock starts,
and handed over as the JSON a real reply carries) and zero rows of the right shape.
What is timed is the rest, set up as the command line sets it up (its OpenBLAS on one
thread, the objects that exist before the run frozen for the cycle collector, glibc
keeping freed memory): reading the file and splitting its lines with the tool's own
reader, the look-ups, planning, requests (their JSON too), placing the pieces, merging,
handing lines out and, with ``--write``, pickling them to a file. Each version runs in
a process of its own, the versions take turns, and each figure is the median of the
rounds:

    python bench/bench_client.py                          # this version
    python bench/bench_client.py --tool OLD.py --write    # OLD.py, then this version, side by side
"""

import argparse
import collections
import gc
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from corpus import make_corpus


class InstantServer:
    """What the server loop reads of a server: its requests in flight."""

    name = "instant"

    def __init__(self):
        self.in_flight = {}

    @property
    def sentences(self):
        return sum(len(request.texts) for request in self.in_flight.values())


def instant_pool(tool, replies, hidden):
    """A pool (a tool Backend) that answers every request at once, in order, from ``replies`` (text -> JSON of its pieces)."""

    # What a server is sent; a version older than request_message sent its texts as they were.
    message = getattr(tool, "request_message", json.dumps)

    class InstantPool(tool.Backend):
        lowercase, limit, padded_length = True, 510, None

        def __init__(self):
            self.hidden = hidden
            self.unicode = tool.ServerUnicode(tool.unicode_of_python(sys.version))
            self.orphans, self.servers, self.waiting, self.sent = collections.deque(), [InstantServer()], \
                collections.deque(), 0
            self.rows = None

        def embed(self, sentences, how, batch_size, stats):
            yield from tool.embed_via_servers(sentences, self, how, batch_size, tool.CHUNK_LINES, stats)

        @property
        def busy(self):
            return bool(self.waiting)

        def has_room(self):
            return self.servers[0].sentences < 3 * 128   # --in-flight 3 at the default --batch-size

        def submit(self, request):
            self.sent += 1
            message(request.texts)   # what sending costs
            self.servers[0].in_flight[self.sent] = request
            self.waiting.append(self.sent)

        def receive(self, wait=True):
            if not self.waiting:
                return None
            request = self.servers[0].in_flight.pop(self.waiting.popleft())
            tokens = json.loads("[" + ",".join(map(replies.__getitem__, request.texts)) + "]")
            shape = (len(tokens), max(map(len, tokens)), hidden)
            if self.rows is None or self.rows.size < shape[0] * shape[1] * hidden:
                self.rows = tool.np.zeros(shape[0] * shape[1] * hidden * 2, tool.np.float32)
            return self.servers[0], request, self.rows[:shape[0] * shape[1] * hidden].reshape(shape), tokens

    return InstantPool()


def worker(tool_path, corpus, replies_path, hidden, output):
    """Run one version once over the corpus; print its CPU seconds and the tokens."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bert_token_embed", tool_path)
    tool = importlib.util.module_from_spec(spec)
    sys.modules["bert_token_embed"] = tool
    spec.loader.exec_module(tool)
    with open(replies_path, "rb") as f:
        replies = pickle.load(f)
    embedder = tool.TokenEmbedder.__new__(tool.TokenEmbedder)
    embedder.backend, embedder.merge, embedder.batch_size = instant_pool(tool, replies, hidden), "last", 128
    embedder.hidden = hidden
    tool.keep_freed_memory()
    gc.freeze()
    started = time.process_time()
    writer = tool.PickleWriter(output, False) if output else None
    if writer:
        writer.start(hidden)
    tokens = 0
    with open(corpus, "rb") as f:
        for array in embedder.arrays(tool.read_sentences(tool.read_lines(f, corpus), "plain", corpus), tool.Stats()):
            tokens += len(array)
            if writer:
                writer.write(array)
    if writer:
        writer.commit(hidden)
    print(json.dumps({"cpu": time.process_time() - started, "tokens": tokens}))


def replies_of(corpus, path):
    """Work out, once, the stand-in's pieces for every text the tool may send (a line's tokens joined by tabs)."""
    from standin_server import StandinServer
    tokenize = StandinServer(max_seq_len=None, hidden=16).tokenize
    with open(corpus, encoding="utf-8") as f:
        replies = {text: json.dumps(tokenize(text)) for text in {"\t".join(line.split()) for line in f} if text}
    with open(path, "wb") as f:
        pickle.dump(replies, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tool", action="append", default=[],
                        help="another bert_token_embed.py to time before this one (repeatable)")
    parser.add_argument("--lines", type=int, default=40000, help="generated lines (default: 40000)")
    parser.add_argument("--hidden", type=int, default=64, help="row width (default: 64, where bytes cost little)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median (default: 3)")
    parser.add_argument("--write", action="store_true", help="also pickle the rows to a file in a temporary directory")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tool_path, corpus, replies, hidden, output = args.worker
        worker(tool_path, corpus, replies, int(hidden), output if output != "-" else None)
        return
    tools = [os.path.abspath(path) for path in args.tool] + [os.path.join(ROOT, "bert_token_embed.py")]
    with tempfile.TemporaryDirectory() as scratch:
        corpus, replies = os.path.join(scratch, "corpus.txt"), os.path.join(scratch, "replies.pkl")
        make_corpus(corpus, args.lines)
        replies_of(corpus, replies)
        output = os.path.join(scratch, "out.pkl") if args.write else "-"
        cpu = {tool: [] for tool in tools}
        for _ in range(args.rounds):
            for tool in tools:
                result = subprocess.run([sys.executable, __file__, "--worker", tool, corpus, replies,
                                         str(args.hidden), output], capture_output=True, text=True,
                                        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
                if result.returncode:
                    raise SystemExit(f"{tool} failed:\n{result.stderr}")
                measured = json.loads(result.stdout)
                cpu[tool].append(measured["cpu"])
                tokens = measured["tokens"]
    print(f"{args.lines} lines, {tokens} tokens, {args.hidden}-d, --merge last, "
          f"{'rows pickled to a file' if args.write else 'rows not written'}; CPU seconds per round, and the median:")
    base = statistics.median(cpu[tools[0]])
    for tool, seconds in cpu.items():
        middle = statistics.median(seconds)
        print(f"  {tool}: {' '.join(f'{s:.3f}' for s in seconds)}  median {middle:.3f} s, "
              f"{middle / tokens * 1e6:.3f} us per token, {middle / base:.2f}x the first")


if __name__ == "__main__":
    main()
