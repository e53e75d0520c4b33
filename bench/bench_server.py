#!/usr/bin/env python3
"""Server mode on a simulated GPU server: the tool's wall time against the compute limit, its CPU against the floor of its bytes.

The stand-in server (tests/standin_server.py) sleeps for the compute a GPU would
spend (a fixed cost per padded position of each request, plus a small cost per
request; a request of up to 256 sentences is padded to its longest sentence, as
bert-serving-server does with -max_seq_len NONE) and returns real-sized rows.
Every figure below comes from one run of this script, side by side:

    python bench/bench_server.py                 # the goals of issue 12
    python bench/bench_server.py --rounds 3      # three rounds of every run, the goals judged on the medians
    python bench/bench_server.py --memory        # and peak RSS at 40,000 vs 200,000 lines
    python bench/bench_server.py --original      # and the original loop at 4,000 and 40,000 lines
    python bench/bench_server.py --tool OLD.py   # another version of bert_token_embed.py instead
    python bench/bench_server.py --compare OLD.py --rounds 3   # OLD.py and this one in turn, each round, side by side

Runs (``--merge last``, output pickled to a real file, in a temporary directory on
disk; ``--output-dir`` chooses another):

* a 1-line run: its wall and CPU time are the fixed cost of any run (Python and
  numpy start-up, the server's configuration reply, which bert-serving-server
  delays by 0.1 s, and shutting down);
* 40,000 lines at 1 µs per padded position + 0.5 ms per request, 768-d (a modern
  accelerator): wall / limit, where the limit is the compute of the useful
  positions alone, and client CPU / floor, where the floor is measured here in the
  same run: a process of its own receives the same bytes over ZeroMQ (as many
  messages as the run's requests, of the same total size), takes the kept rows out
  of each message with one numpy gather, and writes them to a file on the same
  disk; its CPU time for that work alone (not its start-up) is the floor;
* 40,000 and 4,000 lines at 5 µs per position: wall / limit, fixed cost included;
* 40,000 lines at 1 µs, 64-d, where bytes cost little: Python work per token,
  (client CPU - the 1-line run's CPU - the floor of this run's bytes) / tokens;
* with ``--memory``: peak RSS at 40,000 and 200,000 lines (1 µs, 64-d: per-line
  state that is never freed shows most where rows are small).

Besides the times, the table shows the stand-in's own CPU time during the run (srv CPU:
tokenizing, building replies, sending them), the simulated device's busy time and its
idle time between its first request and its last (the tool leaving it without work); the
rest of the wall is the run's start (configuration, first chunk) and end (the last
lines written). The client's and the stand-in's CPU together, spread over all cores,
bound the wall from below; the 1 us run's bound is printed with it.

Before each timed run the page cache is written back (``sync``), so that no run pays
for an earlier one's output going to disk, and a process touches 4 GB of memory: a
virtual machine hands freed memory back to its host, and the first touch of each page
after that costs several times its use. Without these, the same run varied by 2x.

Server and client share this machine's cores, so the figures are pessimistic for a
server on its own GPU machine.
"""

import argparse
import json
import os
import pickle
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from corpus import make_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "tests", "standin_server.py")
WARM_UP_BYTES = 4 << 30   # memory touched before each timed run: more than its output (2.7 GB) and replies in flight
GOALS = {"wall_1us": 3.0, "cpu_floor": 1.5, "wall_5us_40k": 1.25, "wall_5us_4k": 2.0, "python_us": 1.0, "rss": 1.10}


def start_server(cost_us, request_ms, hidden=768):
    """Start the stand-in in simulated-GPU mode on free ports; return (process, port, port_out)."""
    proc = subprocess.Popen([sys.executable, SERVER, "--port", "0", "--port-out", "0", "--max-seq-len", "NONE",
                             "--hidden", str(hidden), "--simulate-gpu-us", str(cost_us),
                             "--simulate-request-ms", str(request_ms)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    fields = dict(part.split("=") for part in line[1:])
    return proc, int(fields["port"]), int(fields["port_out"])


def cpu_of(pid):
    """The CPU seconds a running process has spent so far (from /proc: Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()   # after the command's name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime


def stop_server(proc):
    """Stop the stand-in and return the stats it prints on exit."""
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    return json.loads([line for line in err.splitlines() if line.startswith("{")][-1])


def settle():
    """Before a timed run: write back every dirty page, and touch as much memory as the run will want.

    Without the first, a run pays for an earlier run's output being written out. The
    second is for virtual machines: a guest hands the memory it frees back to the host
    after a few seconds (free page reporting), and the next touch of each page then costs
    a fault into the host (about 2 CPU-s per GB here), so whichever run came after a pause
    paid for its page cache several times over.
    """
    os.sync()
    subprocess.run([sys.executable, "-c", f"import numpy; numpy.ones({WARM_UP_BYTES}, numpy.uint8)"], check=True)


def timed(command, timeout=None, stdout=subprocess.DEVNULL):
    """Run a command; return (seconds, peak RSS in MiB, CPU seconds, of them in the kernel) of that child alone.

    A command still running after ``timeout`` seconds is killed and TimeoutError raised.
    """
    settle()
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE)
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
    return seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, usage.ru_stime


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


# ---------------------------------------------------------------- the floor: the same bytes, and nothing else

def floor_sender(port, messages, nbytes):
    """Push ``messages`` messages of ``nbytes`` zero bytes each (a request's 4 reply frames) to a floor receiver."""
    import numpy as np
    import zmq
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.connect(f"tcp://127.0.0.1:{port}")
    rows = np.zeros(nbytes, np.uint8)   # untouched zero pages, as the stand-in sends
    for number in range(1, messages + 1):
        sock.send_multipart([b"identity", b'{"dtype": "float32"}', rows, b"%d" % number], copy=False)
    sock.close(linger=-1)
    context.term()   # every message sent before the rows are freed


def floor_receiver(messages, nbytes, kept, hidden, output):
    """Receive the messages, gather ``kept`` rows of each with one numpy gather, write them to ``output``; print the CPU seconds of that work."""
    import numpy as np
    import zmq
    sys.path.insert(0, ROOT)
    from bert_token_embed import keep_freed_memory
    keep_freed_memory()   # as the tool does: replies reuse freed memory rather than fault in fresh pages
    sock = zmq.Context.instance().socket(zmq.PULL)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sender = subprocess.Popen([sys.executable, __file__, "--floor-sender", str(port), str(messages), str(nbytes)])
    rows_per_message = nbytes // (4 * hidden)
    index = np.arange(kept) * max(rows_per_message // max(kept, 1), 1)   # kept rows spread over the message
    before = resource.getrusage(resource.RUSAGE_SELF)
    with open(output, "wb") as f:
        for _ in range(messages):
            frames = sock.recv_multipart(copy=False)
            rows = np.frombuffer(frames[2].buffer, dtype=np.float32).reshape(-1, hidden)
            f.write(rows[index])
    after = resource.getrusage(resource.RUSAGE_SELF)
    if sender.wait():
        raise SystemExit("the floor's sender failed")
    print(json.dumps({"cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                      "written": os.path.getsize(output)}))


def measure_floor(scratch, run, hidden):
    """The floor of a run's bytes: CPU seconds to receive its replies' bytes, gather its kept rows and write them.

    Returns (the floor, its part without the writing): the second is measured by a
    receiver that writes to /dev/null, which costs nothing. The floor is the cheaper of
    two runs, which errs against the tool, timed once.
    """
    messages = run["requests"]
    nbytes = run["padded"] // messages * hidden * 4
    kept = max(run["tokens"] // messages, 1)
    output = os.path.join(scratch, "floor.bin")
    cpu = []
    for path in (output, output, os.devnull):
        settle()
        result = subprocess.run([sys.executable, __file__, "--floor-receiver", str(messages), str(nbytes), str(kept),
                                 str(hidden), path], capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"the floor's receiver failed: {result.stderr}")
        cpu.append(json.loads(result.stdout)["cpu"])
        if path == output:
            os.unlink(output)
    return min(cpu[:2]), cpu[2]


# ---------------------------------------------------------------- runs of the tool

def corpus_of(scratch, lines, made={}):
    """A generated corpus of ``lines`` lines in ``scratch`` (made once) and its token count."""
    if lines not in made:
        path = os.path.join(scratch, f"corpus-{lines}.txt")
        make_corpus(path, lines)
        with open(path, encoding="utf-8") as f:
            made[lines] = path, sum(len(line.split()) for line in f)
    return made[lines]


TOOL = os.path.join(ROOT, "bert_token_embed.py")


def measure(scratch, tool, label, lines, cost_us, request_ms=0.5, hidden=768, original=False):
    """One run of a version of the tool (or the original loop) on a fresh stand-in: its wall, CPU, RSS and the server's stats."""
    corpus, tokens = corpus_of(scratch, lines)
    out = os.path.join(scratch, "out.pkl")
    proc, port, port_out = start_server(cost_us, request_ms, hidden)
    if original:
        command = [sys.executable, __file__, "--original-loop", corpus, out, str(port), str(port_out)]
    else:
        command = [sys.executable, tool, corpus, "-o", out,
                   "--merge", "last", "--port", str(port), "--port-out", str(port_out), "-q"]
    try:
        server_cpu = cpu_of(proc.pid)
        seconds, rss, cpu, kernel = timed(command)
        server_cpu = cpu_of(proc.pid) - server_cpu
    finally:
        stats = stop_server(proc)
    written = os.path.getsize(out)
    os.unlink(out)
    limit = stats["useful_positions"] * cost_us / 1e6
    return dict(label=label, lines=lines, tokens=tokens, cost=cost_us, hidden=hidden, wall=seconds, rss=rss, cpu=cpu,
                sys=kernel, server_cpu=server_cpu, busy=stats["busy_seconds"], idle=stats["idle_seconds"], padded=stats["padded_positions"],
                useful=stats["useful_positions"],
                limit=limit, requests=stats["requests"], written=written)


def one_round(scratch, args, tool):
    """Every run of one round of a version of the tool, by name, with the floors of the 1 us runs' bytes."""
    runs = {"fixed": measure(scratch, tool, "1 line", 1, 5.0)}
    runs["fast"] = measure(scratch, tool, "1 us 768-d", 40000, 1.0)
    runs["fast"]["floor"], runs["fast"]["floor_in"] = measure_floor(scratch, runs["fast"], 768)
    runs["slow"] = measure(scratch, tool, "5 us 768-d", 40000, 5.0)
    runs["small"] = measure(scratch, tool, "5 us 768-d", 4000, 5.0)
    runs["narrow"] = measure(scratch, tool, "1 us 64-d", 40000, 1.0, hidden=64)
    runs["narrow"]["floor"], runs["narrow"]["floor_in"] = measure_floor(scratch, runs["narrow"], 64)
    if args.memory:
        runs["wide"] = measure(scratch, tool, "1 us 64-d", 200000, 1.0, hidden=64)
    if args.original:
        for lines in (4000, 40000):
            runs[f"original {lines}"] = measure(scratch, tool, "original loop", lines, 5.0, original=True)
    return runs


def print_round(number, runs):
    """The table of one round's runs, and its fixed cost and floors."""
    print(f"round {number}:")
    print(f"  {'run':<14} {'lines':>6} {'wall s':>7} {'CPU s':>6} {'sys s':>6} {'RSS MiB':>8} {'srv CPU':>7} "
          f"{'busy s':>7} {'idle s':>6} "
          f"{'pad/use':>7} {'limit s':>7} {'wall/limit':>10} {'requests':>8} {'written MB':>10}")
    for r in runs.values():
        print(f"  {r['label']:<14} {r['lines']:>6} {r['wall']:>7.2f} {r['cpu']:>6.2f} {r['sys']:>6.2f} {r['rss']:>8.0f} "
              f"{r['server_cpu']:>7.2f} {r['busy']:>7.2f} {r['idle']:>6.2f} {r['padded'] / r['useful']:>7.2f} {r['limit']:>7.2f} "
              f"{r['wall'] / r['limit']:>10.2f} {r['requests']:>8} {r['written'] / 1e6:>10.0f}")
    fixed, fast, narrow = runs["fixed"], runs["fast"], runs["narrow"]
    print(f"  fixed cost of a run (the 1-line input): {fixed['wall']:.2f} s wall, {fixed['cpu']:.2f} s CPU")
    spent, cores = fast["cpu"] + fast["server_cpu"], os.cpu_count()
    print(f"  the 1 us 768-d run's client and stand-in together spent {spent:.2f} CPU s: on {cores} cores no wall "
          f"under {spent / cores:.2f} s ({spent / cores / fast['limit']:.2f}x the limit) was possible for them")
    print(f"  floor of the 1 us 768-d run's bytes ({fast['requests']} replies, "
          f"{fast['padded'] * 768 * 4 / 1e9:.2f} GB in, {fast['tokens'] * 768 * 4 / 1e9:.2f} GB out): "
          f"{fast['floor']:.2f} CPU s ({fast['floor_in']:.2f} receiving and gathering, "
          f"{fast['floor'] - fast['floor_in']:.2f} writing); of the 64-d run's: {narrow['floor']:.2f} CPU s "
          f"({narrow['floor_in']:.2f} without the writing)")


def figures_of(runs, args):
    """The goals' figures of one round: (name, value, goal)."""
    fixed, fast, slow, small, narrow = (runs[name] for name in ("fixed", "fast", "slow", "small", "narrow"))
    figures = [
        ("1 us, 40,000 lines: wall / limit", fast["wall"] / fast["limit"], GOALS["wall_1us"]),
        ("1 us, 40,000 lines: client CPU / floor", fast["cpu"] / fast["floor"], GOALS["cpu_floor"]),
        ("5 us, 40,000 lines: wall / limit", slow["wall"] / slow["limit"], GOALS["wall_5us_40k"]),
        ("5 us, 4,000 lines: wall / limit", small["wall"] / small["limit"], GOALS["wall_5us_4k"]),
        ("64-d: Python us per token", (narrow["cpu"] - fixed["cpu"] - narrow["floor"]) / narrow["tokens"] * 1e6,
         GOALS["python_us"]),
    ]
    if args.memory:
        figures.append(("peak RSS, 200,000 / 40,000 lines", runs["wide"]["rss"] / narrow["rss"], GOALS["rss"]))
    return figures


def verdict(value, goal):
    return "met" if value <= goal else "NOT met"


def print_goals(rounds, args):
    """Each goal's figure in every round of one version, the median, and whether the median meets the goal; return the medians."""
    table = [figures_of(runs, args) for runs in rounds]
    several = len(rounds) > 1
    print(f"goals (issue 12), {len(rounds)} round{'s' * several}" + (", and their median:" if several else ":"))
    medians = []
    for k, (name, _, goal) in enumerate(table[0]):
        values = [figures[k][1] for figures in table]
        middle = statistics.median(values)
        medians.append((name, middle))
        each = " ".join(f"{value:>6.2f}" for value in values) if len(values) > 1 else ""
        print(f"  {name:<40} {each}  {middle:>6.2f}   goal <= {goal:<5g} {verdict(middle, goal)}")
    if args.original:
        for lines, name in ((4000, "small"), (40000, "slow")):
            ratio = statistics.median(runs[f"original {lines}"]["wall"] / runs[name]["wall"] for runs in rounds)
            print(f"{lines} lines at 5 us: this tool is {ratio:.1f}x faster than the original loop (median)")
    return medians


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of every run; the goals are judged on each figure's median (default: 1)")
    parser.add_argument("--memory", action="store_true", help="also peak RSS at 40,000 vs 200,000 lines (64-d)")
    parser.add_argument("--original", action="store_true", help="also the original loop at 5 us, 4,000 and 40,000 lines")
    parser.add_argument("--output-dir", help="where corpora and outputs go (default: a temporary directory on disk)")
    parser.add_argument("--tool", default=TOOL, help="the bert_token_embed.py to run (another version instead)")
    parser.add_argument("--compare", metavar="OLD", help="another bert_token_embed.py, run in turn with --tool in "
                        "every round; both versions' figures are printed side by side")
    parser.add_argument("--original-loop", nargs=4, metavar=("CORPUS", "OUTPUT", "PORT", "PORT_OUT"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--floor-sender", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor-receiver", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.original_loop:
        corpus, output, port, port_out = args.original_loop
        original_loop(corpus, output, int(port), int(port_out))
        return
    if args.floor_sender:
        floor_sender(*args.floor_sender)
        return
    if args.floor_receiver:
        messages, nbytes, kept, hidden, output = args.floor_receiver
        floor_receiver(int(messages), int(nbytes), int(kept), int(hidden), output)
        return
    tools = [os.path.abspath(path) for path in (args.compare, args.tool) if path]
    rounds = {tool: [] for tool in tools}
    with tempfile.TemporaryDirectory(dir=args.output_dir) as scratch:
        for _ in range(args.rounds):
            for tool in tools:   # in turn, so that both see the machine as it is in that round
                rounds[tool].append(one_round(scratch, args, tool))
    medians = {}
    for tool in tools:
        print(f"{tool}: simulated GPU: us per padded position + 0.5 ms per request; server -max_seq_len NONE; "
              f"--merge last; output pickled to a file on disk")
        for number, runs in enumerate(rounds[tool], 1):
            print_round(number, runs)
        medians[tool] = print_goals(rounds[tool], args)
    if args.compare:
        old, new = tools
        print(f"side by side, the medians: {old} (old) and {new} (new)")
        for (name, before), (_, after) in zip(medians[old], medians[new]):
            print(f"  {name:<40} {before:>6.2f} {after:>6.2f}   new / old {after / before:.2f}")


if __name__ == "__main__":
    main()
