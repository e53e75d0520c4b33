"""Several servers, --ip/--port/--port-out, and parse_server."""

import re

import numpy as np
import pytest

from bert_token_embed import (DEFAULT_HOST, Request, RunError, ServerPool, UsageError, address_of, build_parser,
                              check_reply, parse_server, server_addresses)
from conftest import load_pickle

WORDS = ["the", "hankcs", "I'm", "naïve", "中国", "😀", "\u200b", "|||", "1996-08-27", "x", "unaffable", "!" * 30]


def varied_lines(n=200, seed=5):
    """Lines of 0-60 tokens: blank ones, one-window ones and ones that need several windows of max_seq_len 25."""
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(0, 61)))) for _ in range(n)]


@pytest.fixture(scope="module")
def fast(uncased_server):
    with uncased_server(max_seq_len=25) as server:
        yield server


@pytest.fixture(scope="module")
def slow(uncased_server):
    with uncased_server(max_seq_len=25, delay=0.05) as server:
        yield server


@pytest.fixture(scope="module")
def text():
    return "\n".join(varied_lines()) + "\n"


def embed(run_cli, directory, text, server_args, *extra, name="out.pkl", timeout=120):
    source = directory / "in.txt"
    source.write_text(text, encoding="utf-8")
    rc, _, err = run_cli([source, "-o", directory / name, *server_args, *extra], timeout=timeout)
    assert rc == 0, err
    return load_pickle(directory / name), err


@pytest.fixture(scope="module")
def single(fast, text, run_cli, tmp_path_factory, expect):
    arrays, _ = embed(run_cli, tmp_path_factory.mktemp("single"), text, expect.server_args(fast), "-q")
    return arrays


def assert_same(a_list, b_list):
    assert len(a_list) == len(b_list)
    for a, b in zip(a_list, b_list):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_single_server_result_is_right(fast, text, single, expect):
    lines = text.splitlines()
    assert len(single) == len(lines) == 200
    for line, array in zip(lines, single):
        assert array.shape == (len(line.split()), 16)
    # Exact values for every line that fits one window.
    for line, array in zip(lines, single):
        expected = expect.line(fast, line, "mean")
        if expected is not None:
            np.testing.assert_allclose(array, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", ["3", "128"])
def test_order_is_kept_over_a_slow_and_a_fast_server(fast, slow, text, single, run_cli, tmp_path, expect, batch_size):
    before = (fast.stats["requests"], slow.stats["requests"])
    arrays, _ = embed(run_cli, tmp_path, text, expect.server_args(slow, fast), "--batch-size", batch_size, "-q")
    assert_same(arrays, single)
    if batch_size == "3":
        # Both servers got batches (each holds up to --in-flight 3 at once, so the first six go to both).
        assert fast.stats["requests"] - before[0] > 1 and slow.stats["requests"] - before[1] > 1


def test_a_server_holds_sentences_not_requests(slow):
    """--in-flight counts batches' worth of sentences: many short requests may wait where few full ones would."""
    pool = ServerPool([("127.0.0.1", slow.port, slow.port_out)], 30.0, 4)
    try:
        for _ in range(3):
            assert pool.has_room()
            pool.submit(Request("embed", (), ["a b"]))
        pool.submit(Request("embed", (), ["c", "d"]))
        assert not pool.has_room() and pool.servers[0].sentences == 5
        replies = [pool.receive() for _ in range(4)]
        assert [len(request.texts) for _, request, _, _ in replies] == [1, 1, 1, 2]
        assert pool.has_room() and pool.servers[0].sentences == 0 and not pool.busy
    finally:
        pool.close()


def test_three_servers_and_npy(fast, slow, text, single, run_cli, tmp_path, uncased_server, expect):
    with uncased_server(max_seq_len=25, delay=0.01) as third:
        source = tmp_path / "in.txt"
        source.write_text(text, encoding="utf-8")
        rc, _, err = run_cli([source, "-o", tmp_path / "out.npy", "--batch-size", "5", "-q",
                              *expect.server_args(fast, slow, third)], timeout=120)
    assert rc == 0, err
    matrix = np.load(tmp_path / "out.npy")
    offsets = np.load(tmp_path / "out.offsets.npy")
    assert_same([matrix[offsets[i]:offsets[i + 1]] for i in range(len(single))], single)




def test_every_server_is_asked_for_its_configuration_at_once(uncased_server):
    """Each answers 0.1 s after it is asked, as bert-serving-server does: all three are asked before the first answers."""
    with uncased_server(max_seq_len=25) as a, uncased_server(max_seq_len=25) as b, uncased_server(max_seq_len=25) as c:
        ServerPool([("127.0.0.1", s.port, s.port_out) for s in (a, b, c)], 30.0, 4).close()
        [(asked_a, answered_a)], [(asked_b, answered_b)], [(asked_c, answered_c)] = (s.config_replies for s in (a, b, c))
    assert max(asked_a, asked_b, asked_c) < min(answered_a, answered_b, answered_c)


def test_ip_port_port_out(fast, run_cli, tmp_path):
    (tmp_path / "in.txt").write_text("Hello World !\nI'm hankcs\n")
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "--ip", "127.0.0.1",
                          "--port", fast.port, "--port-out", fast.port_out, "-q"])
    assert rc == 0, err
    assert [a.shape for a in load_pickle(tmp_path / "out.pkl")] == [(3, 16), (2, 16)]


def test_ip_port_port_out_and_server_reach_the_same_server(uncased_server, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text("Hello World !\n")
    with uncased_server(max_seq_len=None) as server:
        for args in (["--ip", "127.0.0.1", "--port", server.port, "--port-out", server.port_out],
                     ["--server", f"127.0.0.1:{server.port}:{server.port_out}"]):
            rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "-q", *args])
            assert rc == 0, err
            np.testing.assert_allclose(load_pickle(tmp_path / "out.pkl")[0],
                                       expect.line(server, "Hello World !", "mean"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, expected", [
    ([], None),                                                   # none named: the API's default server
    (["--port", "6000"], [("localhost", 6000, 5556)]),            # as bert-serving-client: port_out stays 5556
    (["--ip", "gpu1", "--port-out", "7000"], [("gpu1", 5555, 7000)]),
    (["--server", "gpu1", "--server", "gpu2:6000:6001"], [("gpu1", 5555, 5556), ("gpu2", 6000, 6001)]),
])
def test_server_addresses_defaults_follow_bert_serving_client(argv, expected):
    assert server_addresses(build_parser().parse_args(argv)) == expected
    assert address_of(DEFAULT_HOST) == ("localhost", 5555, 5556)


def test_server_and_ip_together_is_a_usage_error(fast, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text("a\n")
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *expect.server_args(fast),
                          "--ip", "127.0.0.1"])
    assert rc == 2 and "--server" in err and "Traceback" not in err


def test_servers_with_different_settings_are_refused(fast, uncased_server, run_cli, tmp_path, expect):
    (tmp_path / "in.txt").write_text("a\n")
    (tmp_path / "out.pkl").write_bytes(b"old")
    with uncased_server(max_seq_len=64) as other:
        rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", *expect.server_args(fast, other)])
    assert rc == 2 and "differ" in err and "Traceback" not in err
    assert (tmp_path / "out.pkl").read_bytes() == b"old"


@pytest.mark.parametrize("spec", ["127.0.0.1:-5", "127.0.0.1:99999", "127.0.0.1:5555:0x10", "127.0.0.1:abc"])
def test_invalid_port_is_one_clear_line(run_cli, tmp_path, spec):
    (tmp_path / "in.txt").write_text("a\n")
    rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "--server", spec, "--timeout", "1"],
                         timeout=30)
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_a_server_lost_mid_run_has_its_batches_sent_to_the_other(fast, uncased_server, text, single, run_cli,
                                                                tmp_path, expect):
    with uncased_server(max_seq_len=25, die_after=2) as dying:
        arrays, err = embed(run_cli, tmp_path, text, expect.server_args(dying, fast), "--batch-size", "3",
                            "--timeout", "2")
    assert_same(arrays, single)
    assert "warning" in err and "re-sent" in err
    # The progress bar's line is cleared for the warning, not run on into it.
    assert re.search(r"(^|[\r\n])bert_token_embed: warning: server .* sent no reply", err), err


@pytest.mark.slow   # 2 s; the fast subset has test_faults' test of a server that dies mid-run
def test_the_only_server_lost_mid_run_exits_1_and_keeps_the_old_output(uncased_server, text, run_cli, tmp_path,
                                                                      expect):
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    (tmp_path / "out.pkl").write_bytes(b"old")
    with uncased_server(max_seq_len=25, die_after=2) as dying:
        rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "--batch-size", "3", "--timeout", "2",
                              *expect.server_args(dying)], timeout=60)
    assert rc == 1, err
    assert "Traceback" not in err and "no reply" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.pkl"]
    assert (tmp_path / "out.pkl").read_bytes() == b"old"


# ---------------------------------------------------------------- parse_server

@pytest.mark.parametrize("spec, expected", [
    ("gpu1", ("gpu1", 5555, 5556)),
    ("gpu2:6000", ("gpu2", 6000, 5556)),
    ("gpu2:6000:7000", ("gpu2", 6000, 7000)),
    ("10.0.0.5:5555:5556", ("10.0.0.5", 5555, 5556)),
    (":6000", ("localhost", 6000, 5556)),
    ("", ("localhost", 5555, 5556)),
])
def test_parse_server(spec, expected):
    assert parse_server(spec) == expected


@pytest.mark.parametrize("spec", ["gpu1:", "gpu1:x", "gpu1:6000:y", "gpu1:6000:"])
def test_parse_server_rejects_non_numeric_ports(spec):
    with pytest.raises(UsageError, match="HOST:PORT"):
        parse_server(spec)


def test_a_server_silent_from_its_first_request_is_dropped_at_start(uncased_server, run_cli, tmp_path):
    (tmp_path / "in.txt").write_text("Hello World !\nI'm hankcs\n")
    with uncased_server(max_seq_len=None) as healthy, uncased_server(max_seq_len=None, drop_reply=1) as silent:
        rc, _, err = run_cli([tmp_path / "in.txt", "-o", tmp_path / "out.pkl", "--timeout", "1.5",
                              "--server", f"127.0.0.1:{silent.port}:{silent.port_out}",
                              "--server", f"127.0.0.1:{healthy.port}:{healthy.port_out}"])
    assert rc == 0, err
    assert "sent no reply for 1.5 s (after 0 replies)" in err and "Traceback" not in err
    assert [a.shape for a in load_pickle(tmp_path / "out.pkl")] == [(3, 16), (2, 16)]


# ---------------------------------------------------------------- check_reply

class Named:
    name = "gpu1:5555:5556"


def reply(n=2, length=5, hidden=4, pieces=(3, 5)):
    """A well-formed reply for n sentences: rows up to each one's piece count, zeros after."""
    embedding = np.zeros((n, length, hidden), dtype=np.float32)
    tokens = []
    for i, count in enumerate(pieces[:n]):
        embedding[i, :count] = 1.0
        tokens.append(["[CLS]"] + ["x"] * (count - 2) + ["[SEP]"])
    return Request("embed", (), ["t"] * n), embedding, tokens


def test_a_well_formed_reply_passes():
    check_reply(Named, *reply(), 4)
    check_reply(Named, *reply(), None)   # the probe, before the hidden size is known


@pytest.mark.parametrize("spoil, words", [
    (lambda r, e, t: (r, e, t[:1]), "1 piece lists for 2 sentences"),
    (lambda r, e, t: (r, e, "tokens"), "no piece lists for 2 sentences"),
    (lambda r, e, t: (r, e[:, :, :3], t), "an array of shape [2, 5, 3] for 2 sentences of hidden size 4"),
    (lambda r, e, t: (r, e.astype(np.float64), t), "an array of dtype float64"),
    (lambda r, e, t: (r, e, [t[0], ["x"] + t[1][1:]]), "a malformed piece list for sentence 2"),
    (lambda r, e, t: (r, e, [t[0], t[1] + ["[SEP]"]]), "a malformed piece list for sentence 2"),
    (lambda r, e, t: (r, e, [t[0], " ".join(t[1])]), "a malformed piece list for sentence 2"),
    (lambda r, e, t: (r, e, [[], t[1]]), "a malformed piece list for sentence 1"),
    (lambda r, e, t: (r, e, [t[0], t[1][:-1] + ["x"]]), "a malformed piece list for sentence 2"),
    (lambda r, e, t: (r, e, [t[0][:-2] + ["[SEP]"], t[1]]), "2 pieces but more rows for sentence 1"),
])
def test_a_malformed_reply_is_a_run_error_naming_server_and_problem(spoil, words):
    with pytest.raises(RunError) as caught:
        check_reply(Named, *spoil(*reply()), 4)
    assert str(caught.value).startswith("server gpu1:5555:5556 sent a malformed reply (request embed of 2 sentences)")
    assert words in str(caught.value)
