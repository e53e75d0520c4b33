"""Option checking: the mode table, check_options' defaults and refusals, server addresses and the writer table."""

import pytest

import bert_token_embed as tool


def parsed(*argv):
    args = tool.build_parser().parse_args(tool.join_layer_lists(list(argv)))
    tool.check_options(args)
    return args


def test_each_mode_gets_its_own_defaults():
    assert tool.settings_of_mode("m", {}) == {"layer": "-2", "device": "auto", "max_seq_len": None, "dtype": "float32"}
    server = tool.settings_of_mode(None, {"timeout": 5.0})
    assert (server["timeout"], server["in_flight"]) == (5.0, tool.DEFAULT_IN_FLIGHT)


@pytest.mark.parametrize("model, given, words", [
    ("m", {"timeout": 1.0}, "--model runs the model in this process; leave out --timeout"),
    ("m", {"server": ["h"], "in_flight": 2}, "leave out --server/--in-flight"),
    (None, {"layer": "-1", "max_seq_len": 64}, "--layer/--max-seq-len go with --model"),
])
def test_an_option_of_the_other_mode_is_refused_by_name(model, given, words):
    with pytest.raises(tool.UsageError, match=words):
        tool.settings_of_mode(model, given)


def test_the_command_line_fills_in_the_mode_and_the_input():
    args = parsed("--model", "m")
    assert (args.layer, args.device, args.max_seq_len, args.input) == ("-2", "auto", None, "input.txt")
    args = parsed("in.txt", "--port", "7000")
    assert (args.timeout, args.in_flight) == (tool.DEFAULT_TIMEOUT, tool.DEFAULT_IN_FLIGHT)
    assert tool.server_addresses(args) == [("localhost", 7000, tool.DEFAULT_PORT_OUT)]
    assert tool.server_addresses(parsed("in.txt")) is None   # the API's default server
    assert tool.server_addresses(parsed("in.txt", "--server", "a:1:2", "--server", "b")) == [
        ("a", 1, 2), ("b", tool.DEFAULT_PORT, tool.DEFAULT_PORT_OUT)]


@pytest.mark.parametrize("argv, words", [
    (["--model", "m", "--ip", "h"], "leave out --ip"),
    (["--device", "cpu"], "--device goes with --model"),
    (["-o", "out.txt"], r"unknown output format \.txt; name it NAME\.pkl or NAME\.pickle \(pickle\), NAME\.npy "
                        r"\(a matrix plus NAME\.offsets\.npy\), NAME\.hdf5 or NAME\.h5 \(HDF5, needs h5py\)$"),
    (["-o", "out"], r"unknown output format \(no extension\)"),
    (["--model", "m", "--layer", "-1", "--stack-layers"], "--stack-layers goes with several --layer"),
    (["--model", "m", "--layer", "-1,-2", "--stack-layers", "-o", "x.npy"], "--stack-layers goes with"),
    (["--encoding", "klingon"], "unknown encoding 'klingon'"),
    (["--encoding", "utf-16"], "convert the file first: iconv -f utf-16"),
    (["--layer", "x"], "--layer goes with --model"),
    (["--layer", "-1,-2", "--stack-layers", "-o", "x.hdf5"], "--layer goes with --model"),
    (["--stack-layers", "-o", "x.hdf5"], "--stack-layers goes with several --layer"),   # server mode, no --layer
])
def test_combinations_that_cannot_work_are_refused(argv, words):
    with pytest.raises(tool.UsageError, match=words):
        parsed(*argv)


def test_encodings_are_named_as_codecs_name_them_and_a_bom_needs_no_name():
    assert parsed("--encoding", "LATIN-1").encoding == "iso8859-1"
    assert parsed("--encoding", "utf-8-sig").encoding == "utf-8"


def test_both_server_namings_at_once_are_refused():
    with pytest.raises(tool.UsageError, match="either --server or --ip/--port/--port-out"):
        tool.server_addresses(parsed("--server", "a", "--port", "1"))


def test_the_writer_table_says_which_formats_resume(tmp_path):
    assert {suffix: c.RESUMABLE for suffix, c in tool.OUTPUT_FORMATS.items()} == {
        ".pkl": True, ".pickle": True, ".npy": True, ".hdf5": False, ".h5": False}
    assert tool.output_format("A.PKL") is tool.PickleWriter
    with pytest.raises(tool.UsageError, match="--resume cannot continue HDF5 output"):
        tool.open_writer(str(tmp_path / "x.h5"), True, 1)
    assert not list(tmp_path.iterdir())
