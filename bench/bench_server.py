#!/usr/bin/env python3
"""Server-mode throughput: this tool against a re-creation of the original loop, on a simulated GPU server.

The stand-in server (tests/standin_server.py) sleeps for the compute a GPU would
spend (a fixed cost per padded position of each request, plus a small cost per
request; a request of up to 256 sentences is padded to its longest sentence, as
bert-serving-server does with -max_seq_len NONE) and returns real-sized rows.
Every figure below comes from one run of this script, side by side:

    python bench/bench_server.py                 # 4,000 and 40,000 lines
    python bench/bench_server.py --lines 2000    # one size only

Columns: wall seconds, peak RSS of the client process, the server's simulated
busy seconds, padded and useful positions, and the limit: the compute of the
useful positions alone. A 1-line run of the tool comes first: its wall time is the
fixed cost of any run (Python and numpy start-up, the server's configuration reply,
which bert-serving-server delays by 0.1 s, and shutting down).
"""

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time

from corpus import make_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "tests", "standin_server.py")


def start_server(cost_us, request_ms):
    """Start the stand-in in simulated-GPU mode on free ports; return (process, port, port_out)."""
    proc = subprocess.Popen([sys.executable, SERVER, "--port", "0", "--port-out", "0", "--max-seq-len", "NONE",
                             "--hidden", "768", "--simulate-gpu-us", str(cost_us),
                             "--simulate-request-ms", str(request_ms)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    fields = dict(part.split("=") for part in line[1:])
    return proc, int(fields["port"]), int(fields["port_out"])


def stop_server(proc):
    """Stop the stand-in and return the stats it prints on exit."""
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    return json.loads([line for line in err.splitlines() if line.startswith("{")][-1])


def timed(command, timeout=None):
    """Run a command; return (seconds, peak RSS in MiB, CPU seconds) of that child alone.

    A command still running after ``timeout`` seconds is killed and TimeoutError raised.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killer = threading.Timer(timeout, proc.kill) if timeout else None
    if killer:
        killer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if killer:
        killer.cancel()
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            raise TimeoutError(f"{command[1]} ran past {timeout} s")
    if status != 0:
        raise SystemExit(f"{command} failed: {proc.stderr.read().decode()}")
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def original_loop(corpus, output, port, port_out):
    """The original script's loop: blocking batches of 100 raw lines, lowercased buffer matching, one pickle at the end."""
    from bert_serving.client import BertClient
    bc = BertClient(port=port, port_out=port_out, check_length=False, check_version=False)
    tensors = []

    def embed_last_token(batch):
        embeddings, tokens = bc.encode(batch, show_tokens=True)
        for sent, tensor, pieces in zip(batch, embeddings, tokens):
            words, tid, buffer, valid = sent.lower().split(), 0, "", []
            for i, t in enumerate(pieces):
                if t in ("[CLS]", "[SEP]"):
                    continue
                buffer += t[2:] if t.startswith("##") else t
                if tid < len(words) and buffer == words[tid]:
                    valid.append(i)
                    buffer, tid = "", tid + 1
            tensors.append(tensor[valid, :])

    batch = []
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                batch.append(line)
            if len(batch) == 100:
                embed_last_token(batch)
                batch = []
    if batch:
        embed_last_token(batch)
    with open(output, "wb") as f:
        pickle.dump(tensors, f)


def measure(label, command, cost_us, request_ms):
    proc, port, port_out = start_server(cost_us, request_ms)
    try:
        seconds, rss, cpu = timed(command(port, port_out))
    finally:
        stats = stop_server(proc)
    limit = stats["useful_positions"] * cost_us / 1e6
    return dict(label=label, wall=seconds, rss=rss, cpu=cpu, busy=stats["busy_seconds"], padded=stats["padded_positions"],
                useful=stats["useful_positions"], limit=limit, requests=stats["requests"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, action="append", help="corpus sizes (default: 4000 and 40000)")
    parser.add_argument("--cost-us", type=float, default=5.0, help="simulated GPU microseconds per padded position")
    parser.add_argument("--request-ms", type=float, default=0.5, help="simulated GPU milliseconds per request")
    parser.add_argument("--original-loop", nargs=4, metavar=("CORPUS", "OUTPUT", "PORT", "PORT_OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.original_loop:
        corpus, output, port, port_out = args.original_loop
        original_loop(corpus, output, int(port), int(port_out))
        return
    # Output goes to memory-backed storage where there is some, so the disk's speed is not what is measured.
    rows = []
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as scratch:
        for lines in [1] + (args.lines or [4000, 40000]):
            corpus = os.path.join(scratch, f"corpus-{lines}.txt")
            make_corpus(corpus, lines)
            out = os.path.join(scratch, "out.pkl")
            tool = lambda port, port_out: [sys.executable, os.path.join(ROOT, "bert_token_embed.py"), corpus, "-o", out,
                                           "--merge", "last", "--port", str(port), "--port-out", str(port_out), "-q"]
            orig = lambda port, port_out: [sys.executable, __file__, "--original-loop", corpus, out, str(port),
                                           str(port_out)]
            rows.append((lines, measure("this tool", tool, args.cost_us, args.request_ms)))
            if lines > 1:
                rows.append((lines, measure("original loop", orig, args.cost_us, args.request_ms)))
            os.unlink(out)
    print(f"simulated GPU: {args.cost_us:g} us per padded position + {args.request_ms:g} ms per request; "
          f"768-d rows; server -max_seq_len NONE")
    print(f"{'lines':>6} {'client':<14} {'wall s':>7} {'CPU s':>6} {'RSS MiB':>8} {'busy s':>7} {'padded':>9} {'useful':>9} "
          f"{'pad/use':>7} {'limit s':>7} {'wall/limit':>10} {'requests':>8}")
    for lines, r in rows:
        print(f"{lines:>6} {r['label']:<14} {r['wall']:>7.2f} {r['cpu']:>6.2f} {r['rss']:>8.0f} {r['busy']:>7.2f} {r['padded']:>9} "
              f"{r['useful']:>9} {r['padded'] / r['useful']:>7.2f} {r['limit']:>7.2f} "
              f"{r['wall'] / r['limit']:>10.2f} {r['requests']:>8}")
    fixed = rows[0][1]["wall"]
    print(f"fixed cost of a run (the 1-line input): {fixed:.2f} s")
    for lines in sorted({n for n, _ in rows if n > 1}):
        tool, orig = (r for n, r in rows if n == lines)
        print(f"{lines} lines: this tool is {orig['wall'] / tool['wall']:.1f}x faster than the original loop, "
              f"at {tool['wall'] / tool['limit']:.2f}x the limit ({(tool['wall'] - fixed) / tool['limit']:.2f}x "
              f"after the fixed cost), padding {tool['padded'] / tool['useful']:.2f}x")


if __name__ == "__main__":
    main()
