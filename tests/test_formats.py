"""Input formats (plain, CoNLL-U, CoNLL-2003) and output formats (.pkl/.pickle, .npy, .hdf5/.h5), through the command line."""

import json

import numpy as np
import pytest

import bert_token_embed as tool
from conftest import REPO, load_pickle

CONLLU = """\
# sent_id = 1
# text = Vámonos al mar.
1-2\tVámonos\t_\t_\t_\t_\t_\t_\t_\t_
1\tVamos\tir\tVERB\t_\t_\t0\troot\t_\t_
2\tnos\tnosotros\tPRON\t_\t_\t1\tobj\t_\t_
3-4\tal\t_\t_\t_\t_\t_\t_\t_\t_
3\ta\ta\tADP\t_\t_\t5\tcase\t_\t_
4\tel\tel\tDET\t_\t_\t5\tdet\t_\t_
5\tmar\tmar\tNOUN\t_\t_\t1\tobl\t_\tSpaceAfter=No
6\t.\t.\tPUNCT\t_\t_\t1\tpunct\t_\t_

# sent_id = 2
1\tNew York\tNew York\tPROPN\t_\t_\t0\troot\t_\t_
2\tsleeps\tsleep\tVERB\t_\t_\t1\tnsubj\t_\t_
2.1\tnever\t_\t_\t_\t_\t_\t_\t_\t_
3\t|||\t|||\tPUNCT\t_\t_\t1\tpunct\t_\t_
"""

CONLL2003 = """\
-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER



"""


def read(text, input_format):
    return list(tool.read_sentences(iter(text.splitlines()), input_format, "in"))


def test_conllu_gives_the_form_column_of_each_block():
    assert read(CONLLU, "conllu") == [["Vamos", "nos", "a", "el", "mar", "."], ["New York", "sleeps", "|||"]]


def test_conll2003_gives_the_first_column_without_docstart():
    assert read(CONLL2003, "conll") == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
    assert read("New York\tNNP\nsleeps\tVBZ\n\nd\tY\n", "conll") == [["New York", "sleeps"], ["d"]]


def test_plain_gives_the_whitespace_tokens_of_every_line():
    assert read("a  b\n\n c\u00a0d \n", "plain") == [["a", "b"], [], ["c", "d"]]


def test_a_line_that_is_not_conllu_is_named():
    with pytest.raises(tool.UsageError, match=r"in: line 2 has 3 tab-separated columns, not CoNLL-U's 10"):
        read("1\ta\t_\t_\t_\t_\t_\t_\t_\t_\n2\tb\t_\n", "conllu")


@pytest.fixture(scope="module")
def srv(uncased_server):
    with uncased_server(max_seq_len=None, hidden=8) as server:
        yield server


def run(run_cli, expect, srv, tmp_path, text, *args, name="out.pkl"):
    source = tmp_path / "in.txt"
    source.write_text(text, encoding="utf-8")
    status, _, err = run_cli([source, "-o", tmp_path / name, *expect.server_args(srv), "-q", *args])
    return status, err


def test_conllu_over_a_server_embeds_the_files_own_tokens(srv, run_cli, expect, tmp_path):
    status, err = run(run_cli, expect, srv, tmp_path, CONLLU, "--input-format", "conllu")
    assert status == 0, err
    got = load_pickle(tmp_path / "out.pkl")
    assert [a.shape for a in got] == [(6, 8), (3, 8)]
    np.testing.assert_allclose(got[0], expect.line(srv, "Vamos nos a el mar .", "mean"), rtol=1e-5, atol=1e-6)
    [api] = tool.embed([["New York", "sleeps", "|||"]], servers=f"127.0.0.1:{srv.port}:{srv.port_out}")
    np.testing.assert_array_equal(got[1], api)


def test_conll_in_the_cli(srv, run_cli, expect, tmp_path):
    status, err = run(run_cli, expect, srv, tmp_path, CONLL2003, "--input-format", "conll")
    assert status == 0, err
    got = load_pickle(tmp_path / "out.pkl")
    np.testing.assert_allclose(got[1], expect.line(srv, "Peter Blackburn", "mean"), rtol=1e-5, atol=1e-6)
    assert len(got) == 2


def test_a_bad_conllu_file_fails_in_one_line_before_any_server_is_asked(run_cli, tmp_path):
    (tmp_path / "in.conllu").write_text("1 a b\n", encoding="utf-8")
    status, _, err = run_cli([tmp_path / "in.conllu", "--input-format", "conllu", "-o", tmp_path / "o.pkl",
                              "--port", "1"])
    assert status == 2
    assert err.strip() == ("bert_token_embed: error: " + str(tmp_path / "in.conllu") +
                           ": line 1 has 1 tab-separated columns, not CoNLL-U's 10: is it --input-format conll or plain?")


# ---------------------------------------------------------------- output formats

@pytest.mark.parametrize("name", ["out.pickle", "OUT.PKL"])
def test_pickle_by_either_name(srv, run_cli, expect, tmp_path, name):
    status, err = run(run_cli, expect, srv, tmp_path, "Hello World !\n", name=name)
    assert status == 0, err
    [got] = load_pickle(tmp_path / name)
    np.testing.assert_allclose(got, expect.line(srv, "Hello World !", "mean"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["result.json", "out", "out.txt"])
def test_an_unknown_output_name_is_refused_with_the_formats(run_cli, tmp_path, name):
    status, _, err = run_cli([REPO / "input.txt", "-o", tmp_path / name, "--port", "1"])
    assert status == 2 and len(err.splitlines()) == 1
    assert "unknown output format" in err and ".pkl" in err and ".pickle" in err and ".npy" in err and ".hdf5" in err
    assert not list(tmp_path.iterdir())


h5py = pytest.importorskip("h5py")


@pytest.mark.parametrize("name", ["out.hdf5", "out.h5"])
def test_hdf5_has_the_allennlp_elmo_layout(srv, run_cli, expect, tmp_path, name):
    text = "Hello World !\n\nI'm hankcs\nHello World !\n"
    status, err = run(run_cli, expect, srv, tmp_path, text, "--batch-size", "2", name=name)
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", name]
    with h5py.File(tmp_path / name, "r") as f:
        assert sorted(f.keys()) == ["0", "1", "2", "3", "sentence_to_index"]
        assert json.loads(f["sentence_to_index"][0]) == {"Hello World !": "3", "": "1", "I'm hankcs": "2"}
        assert f["1"].shape == (0, 8) and f["0"].dtype == np.float32
        for i, line in enumerate(text.splitlines()):
            np.testing.assert_allclose(f[str(i)][()], expect.line(srv, line, "mean").reshape(-1, 8), rtol=1e-5,
                                       atol=1e-6)


def test_hdf5_refuses_resume_in_one_line(run_cli, tmp_path):
    status, _, err = run_cli([REPO / "input.txt", "-o", tmp_path / "o.hdf5", "--resume", "--port", "1"])
    assert status == 2 and err.strip() == ("bert_token_embed: error: --resume cannot continue HDF5 output cut off "
                                           "mid-write; use -o NAME.pkl or NAME.pickle (pickle), NAME.npy (a matrix "
                                           "plus NAME.offsets.npy)")
    assert not list(tmp_path.iterdir())


def test_a_failed_hdf5_run_leaves_no_file(run_cli, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"ok\n\xff\n")
    status, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "o.h5", "--port", "1"])
    assert status == 2 and "line 2 is not valid utf-8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_without_h5py_the_message_names_the_install(tmp_path):
    import subprocess
    import sys
    code = ("import runpy, sys; sys.modules['h5py'] = None; "
            f"sys.argv = ['x', {str(REPO / 'input.txt')!r}, '-o', {str(tmp_path / 'o.hdf5')!r}, '--port', '1']; "
            f"runpy.run_path({str(REPO / 'bert_token_embed.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == f"bert_token_embed: error: -o {tmp_path / 'o.hdf5'} needs h5py: pip install h5py\n"


def test_stack_layers_needs_hdf5_and_several_layers(run_cli, tmp_path):
    status, _, err = run_cli([REPO / "input.txt", "--model", "minilm", "--layer", "-1,-2", "--stack-layers",
                              "-o", tmp_path / "o.pkl"])
    assert status == 2 and "--stack-layers goes with several --layer" in err and len(err.splitlines()) == 1


def test_stack_layers_writes_layers_tokens_hidden(run_cli, tmp_path):
    common = [REPO / "input.txt", "--model", "minilm", "--layer", "-1,-2", "--device", "cpu", "-q"]
    assert run_cli([*common, "--stack-layers", "-o", tmp_path / "o.hdf5"]) == (0, "", "")
    assert run_cli([*common, "-o", tmp_path / "o.pkl"]) == (0, "", "")
    concatenated = load_pickle(tmp_path / "o.pkl")
    with h5py.File(tmp_path / "o.hdf5", "r") as f:
        stacked = [f["0"][()], f["1"][()]]
    assert [a.shape for a in stacked] == [(2, 3, 384), (2, 2, 384)]
    for a, b in zip(stacked, concatenated):
        np.testing.assert_array_equal(a[0], b[:, :384])
        np.testing.assert_array_equal(a[1], b[:, 384:])
