#!/usr/bin/env python3
"""Server mode against the real bert-serving-server 1.10.0 (CPU, the packaged MiniLM): plain text vs emoji text.

    HF_HUB_OFFLINE=1 python bench/bench_realserver.py              # 500 lines
    HF_HUB_OFFLINE=1 python bench/bench_realserver.py --lines 1000

The server is the one the tests use (tests/realserver: a Python 3.7 venv and the MiniLM
converted to a TF checkpoint, built and cached on first use; it needs Python 3.7), started
with -cpu -num_worker 1 -pooling_strategy NONE -show_tokens_to_client -max_seq_len NONE.
The corpus is tweet-like (bench/corpus.py make_tweet_corpus: common emoji, about one line in
ten with an emoji newer than the server's Unicode 11, accented and CJK words among English);
the plain corpus is the same lines with a plain word in each emoji's place. Columns, from
one run: wall seconds of the client process and the server's data requests during it
(num_data_request), for this tool and a re-creation of the original loop (bench_server.py's).
The issue's goal: emoji within 1.3x of plain in wall time and 1.1x in requests.
"""

import argparse
import os
import sys
import tempfile

from bench_server import timed
from corpus import make_tweet_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from realserver.build import ensure_built  # noqa: E402
from realserver.server import RealServer  # noqa: E402


def data_requests(server):
    """The data requests the server has served so far."""
    from bert_serving.client import BertClient
    with BertClient(port=server.port, port_out=server.port_out, timeout=30000) as bc:
        return bc.server_status["statistic"]["num_data_request"]


def commands(corpus, out, server):
    """{client: its command line} for one corpus."""
    return {
        "this tool": [sys.executable, os.path.join(ROOT, "bert_token_embed.py"), corpus, "-o", out, "--merge", "last",
                      "--server", server.address, "-q"],
        "original loop": [sys.executable, os.path.join(ROOT, "bench", "bench_server.py"), "--original-loop", corpus,
                          out, str(server.port), str(server.port_out)],
    }


def measure(command, server, timeout):
    """(wall seconds, data requests) of one run; wall is None when it ran past TIMEOUT seconds."""
    before = data_requests(server)
    try:
        wall = timed(command, timeout)[0]
    except TimeoutError:
        wall = None
    return wall, data_requests(server) - before


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=500, help="lines per corpus (default 500)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is given up (default 600)")
    args = parser.parse_args()
    server = RealServer(ensure_built(), "bench").start().wait_ready()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for kind in ("plain", "emoji"):
                corpus = os.path.join(scratch, f"{kind}.txt")
                make_tweet_corpus(corpus, args.lines, emoji=kind == "emoji")
                for client, command in commands(corpus, os.path.join(scratch, "out.pkl"), server).items():
                    results[client, kind] = measure(command, server, args.timeout)
    finally:
        server.stop()
    show = lambda wall: f"{wall:.2f}" if wall is not None else f">{args.timeout:g}"   # noqa: E731
    print(f"real bert-serving-server 1.10.0, CPU, MiniLM-L6-H384, -max_seq_len NONE; {args.lines} tweet-like lines")
    print(f"{'client':<14} {'plain s':>8} {'emoji s':>8} {'ratio':>6} {'plain req':>9} {'emoji req':>9} {'ratio':>6}")
    for client in ("this tool", "original loop"):
        (pw, pr), (ew, er) = results[client, "plain"], results[client, "emoji"]
        wall_ratio = f"{ew / pw:.2f}" if ew is not None else "-"
        print(f"{client:<14} {show(pw):>8} {show(ew):>8} {wall_ratio:>6} {pr:>9} {er:>9} {er / pr:>6.2f}")
    print("goal (issue 9): this tool's emoji/plain within 1.3x in wall time and 1.1x in requests")


if __name__ == "__main__":
    main()
