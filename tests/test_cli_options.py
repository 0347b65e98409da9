"""deploy/: `--engine-option KEY=VALUE` values take the type of the EngineConfig field they set,
and a key or value that cannot be one is refused naming the option; the CLI only dispatches."""

from __future__ import annotations

import dataclasses

import pytest

from zipserve.deploy.cli import build_parser, main
from zipserve.deploy.cli_serve import serve_config
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
