"""deploy/: `--engine-option KEY=VALUE` values take the type of the EngineConfig field they set,
and a key or value that cannot be one is refused naming the option; every number and codec list
the CLI takes is checked against its range when parsed; the CLI only dispatches."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from zipserve.deploy.cli import build_parser, main
from zipserve.deploy.cli_serve import serve_config
from zipserve.deploy.cli_values import (
    csv_codecs,
    csv_ints,
    csv_links,
    fraction,
    nonneg_int,
    port_number,
    positive_float,
    positive_int,
)
from zipserve.deploy.engine_options import engine_option_types, parse_engine_options
from zipserve.engine.config import EngineConfig


def test_values_take_their_fields_types():
    opts = parse_engine_options(
        [
            "gpu_memory_fraction=1e-1",
            "max_prefill_chunk=128",
            "cuda_graphs=False",
            "lowrank_fold=1",
            "graph_batch_sizes=4",
            "num_pages=none",
            "lowrank_bases=/m/a,b",
            "decode_splits=-0",
        ]
    )
    assert opts == {
        "gpu_memory_fraction": 0.1,
        "max_prefill_chunk": 128,
        "cuda_graphs": False,
        "lowrank_fold": True,
        "graph_batch_sizes": (4,),
        "num_pages": None,
        "lowrank_bases": "/m/a,b",
        "decode_splits": 0,
    }
    assert [type(v) for v in opts.values()] == [float, int, bool, bool, tuple, type(None), str, int]
    assert type(parse_engine_options(["gpu_memory_fraction=1"])["gpu_memory_fraction"]) is float
    EngineConfig(**opts)


def test_every_engine_config_field_can_be_given():
    types = engine_option_types()
    assert set(types) == {f.name for f in dataclasses.fields(EngineConfig)}
    samples = {int: "3", float: "0.5", bool: "true", str: "x", tuple[int, ...]: "1,2"}
    for name, kind in types.items():
        text = next((t for k, t in samples.items() if k == kind), None) or "none"
        parse_engine_options([f"{name}={text}"])


@pytest.mark.parametrize(
    "option, match",
    [
        (
            "gpu_memory_fraction=lots",
            r"--engine-option gpu_memory_fraction=lots: expected a number",
        ),
        ("num_pages=1.5", r"--engine-option num_pages=1.5: expected an integer"),
        ("cuda_graphs=maybe", r"--engine-option cuda_graphs=maybe: expected true or false"),
        ("graph_batch_sizes=1,x", r"--engine-option graph_batch_sizes=1,x: expected an integer"),
        ("max_num_seq=8", r"--engine-option max_num_seq: no such engine option; known: page_size"),
        ("num_pages", r"--engine-option: expected key=value"),
    ],
)
def test_bad_options_are_refused_by_name(option, match):
    with pytest.raises(ValueError, match=match):
        parse_engine_options([option])


def test_serve_gets_typed_options_and_the_cli_reports_bad_ones(capsys):
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "random:tiny",
            "--codec",
            "bf16",
            "--engine-option",
            "gpu_memory_fraction=5e-1",
            "--engine-option",
            "graph_batch_sizes=1,2",
        ]
    )
    cfg = serve_config(args, args.codec)
    assert cfg.engine_options == {"gpu_memory_fraction": 0.5, "graph_batch_sizes": (1, 2)}
    assert main(["serve", "--model", "random:tiny", "--engine-option", "num_pages=many"]) == 2
    assert (
        "zipserve: error: --engine-option num_pages=many: expected an integer"
        in capsys.readouterr().err
    )


def test_serve_on_a_port_in_use_is_a_one_line_error_before_anything_starts(capsys, monkeypatch):
    import socket

    from zipserve.deploy import serve as serve_mod

    started = []
    monkeypatch.setattr(serve_mod, "start_ray", lambda address: started.append(address))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"port: cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err
    assert started == []  # refused before Ray or any worker


def _numeric_options(parser: argparse.ArgumentParser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _numeric_options(sub, (*path, name))
        elif action.type in (int, float):
            yield " ".join(path), action.option_strings[-1]


def test_every_numeric_option_declares_its_range():
    """A bare int/float lets -5 or 0 through to wherever it breaks (a worker, a socket, a
    division); every number the CLI takes says what it accepts instead (deploy/cli_values.py)."""
    assert list(_numeric_options(build_parser())) == []


@pytest.mark.parametrize(
    "argv, option",
    [
        (["serve", "--port", "-5"], "--port"),
        (["serve", "--port", "65536"], "--port"),
        (["serve", "--link-gbps", "-3"], "--link-gbps"),
        (["serve", "--prefill", "0"], "--prefill"),
        (["serve", "--request-timeout", "nan"], "--request-timeout"),
        (["serve", "--max-body-bytes", "1e3"], "--max-body-bytes"),
        (["demo", "--link-gbps", "-3"], "--link-gbps"),
        (["demo", "--max-tokens", "0"], "--max-tokens"),
        (["demo", "--codecs", "bf16,nope"], "--codecs"),
        (["demo", "--codecs", "bf16,"], "--codecs"),
        (["bench", "quality", "--codecs", "nope"], "--codecs"),
        (["bench", "engine", "--codecs", "hack2/dens"], "--codecs"),
        (["bench", "jct", "--rates", "1,0"], "--rates"),
        (["bench", "jct", "--links", "10,-1"], "--links"),
        (["bench", "jct", "--num-requests", "0"], "--num-requests"),
        (["bench", "kernels", "--batches", "8,0"], "--batches"),
        (["generate", "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["generate", "--prompt", "x", "--top-k", "-2"], "--top-k"),
        (["train", "--lr", "0"], "--lr"),
        (["calibrate", "--budget", "1.5"], "--budget"),
    ],
)
def test_a_bad_value_is_refused_by_name_before_anything_runs(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and "Traceback" not in err, err


def test_bounded_values_at_their_edges():
    assert positive_int("1") == 1 and nonneg_int("0") == 0 and port_number("65535") == 65535
    assert fraction("1") == 1.0 and positive_float("1e-9") == 1e-9
    for bad_type, text in [
        (positive_int, "0"),
        (positive_int, "2.0"),
        (nonneg_int, "-1"),
        (port_number, "65536"),
        (fraction, "0"),
        (positive_float, "inf-ish"),
        (positive_float, "nan"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{text}'"):
            bad_type(text)
    assert csv_codecs(" hack2/dense, bf16 ") == "hack2/dense,bf16"
    assert csv_ints("1,8,32") == [1, 8, 32] and csv_links("10,none") == [10.0, None]


def test_library_configs_refuse_what_the_cli_would():
    from zipserve.control.config import ServeConfig
    from zipserve.deploy.serve import bind_listener

    with pytest.raises(ValueError, match="--link-gbps: must be a number > 0"):
        ServeConfig(model="random:tiny", codec="bf16", link_gbps=-1.0)
    with pytest.raises(ValueError, match=r"port: must be in \[0, 65535\], got 70000"):
        bind_listener("127.0.0.1", 70000)


def test_an_unresolvable_host_is_named(monkeypatch):
    import socket

    from zipserve.deploy import serve as serve_mod

    def no_such_host(host, port):  # what the resolver raises; no network lookup in the test
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(serve_mod, "bind_socket", no_such_host)
    with pytest.raises(ValueError, match=r"host: cannot resolve 'no\.such\.host'"):
        serve_mod.bind_listener("no.such.host", 0)
