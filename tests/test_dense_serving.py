"""decode_kv through the serving stack: a dense decode worker receives exactly the bytes a
compressed one does, `serve`/`demo`/`bench` take --decode-kv (one mode or one per lane, refused
clearly where it cannot apply), and over Ray + HTTP a dense lane beside a compressed lane answers
like the compressed engine with every page returned."""

from __future__ import annotations

import json
import urllib.request

import pytest

from zipserve.control.config import ServeConfig
from zipserve.decode_worker.worker import DecodeWorker
from zipserve.deploy.cli import REFERENCE_MODEL, build_parser, main
from zipserve.deploy.cli_serve import serve_config
from zipserve.deploy.cli_values import csv_modes
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.prefill_worker.worker import PrefillWorker
from zipserve.transfer.channel import as_byte_tensor
from zipserve.transfer.inprocess import InProcessChannel

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
PROMPT = list(range(100, 230))  # 2 full pages (+ sinks) and 2 open-page tokens
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)  # within the open page


class RecordingChannel(InProcessChannel):
    """An in-process channel that keeps a copy of every message it sends."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sent: list[bytes] = []

    def send(self, buf, tag: int) -> None:
        self.sent.append(as_byte_tensor(buf).numpy().tobytes())
        super().send(buf, tag)


def _serve(pre, dec, peer, rid):
    dec.reserve(rid, PROMPT, PARAMS)
    rep = pre.prefill(rid, PROMPT, PARAMS, peer)
    res = dec.admit(rid, rep.first_token, rep.first_logprob, timeout=10)
    while not res.finished:
        res = dec.poll(rid, 0, timeout=5)
    dec.release(rid)
    return rep, res


def test_dense_decode_worker_gets_the_same_bytes():
    want = LLM(MODEL, device="cpu", codec="hack2").generate(PROMPT, PARAMS)[0].token_ids
    # the same prompt twice: without a prefix cache the prefill worker computes it the same way
    # both times (with one, the second reuses the first's pages: a lossy codec's suffix then
    # attends to the cached prefix in its codes, other bytes; engine/prefix_cache.py)
    pre = PrefillWorker(MODEL, "hack2", "cpu", engine_options={"prefix_caching": False})
    decs = {
        mode: DecodeWorker(MODEL, "hack2", "cpu", engine_options={"decode_kv": mode})
        for mode in ("compressed", "dense")
    }
    sent = {}
    try:
        for mode, dec in decs.items():
            a, b = RecordingChannel.pair()
            pre.attach(mode, a)
            dec.attach("p0", b)
            rep, res = _serve(pre, dec, mode, "same-id")
            assert res.tokens == want, mode
            sent[mode] = (a.sent, rep.bytes_sent)
            stats = dec.stats()
            assert stats.decode_kv == mode and dec.info().decode_kv == mode
            assert stats.used_pages == 0 and stats.free_pages == stats.capacity_pages
            assert stats.reserved == stats.running == 0
        msgs = sent["compressed"][0]
        assert len(msgs) == 6  # one LayerKV per layer, CRC32 in each header
        assert sent["dense"] == sent["compressed"]  # byte for byte, checksums included
    finally:
        for dec in decs.values():
            dec.shutdown()
    assert pre.engine.pool.num_used == 0


def test_serve_prints_each_lanes_decode_kv_and_why():
    from types import SimpleNamespace

    from zipserve.deploy.serve import decode_kv_lines

    cfg = ServeConfig(model=MODEL, codec="hack2", extra_codecs=("kivi2",), decode_kv="auto,dense")
    lanes = {
        "hack2": SimpleNamespace(decode_kv="dense", decode_kv_reason="CPU: torch references"),
        "kivi2": SimpleNamespace(decode_kv="dense", decode_kv_reason="asked for"),
    }
    assert decode_kv_lines(cfg, SimpleNamespace(lanes=lanes)) == [
        "zipserve: hack2: decode KV dense (auto: CPU: torch references)",
        "zipserve: kivi2: decode KV dense (asked for)",
    ]
    one = ServeConfig(model=MODEL, codec="fp8", decode_kv="compressed")
    lane = SimpleNamespace(decode_kv="compressed", decode_kv_reason="asked for")
    assert decode_kv_lines(one, lane) == ["zipserve: fp8: decode KV compressed (asked for)"]


def test_serve_config_decode_kv_per_lane():
    cfg = ServeConfig(
        model=MODEL,
        codec="hack2",
        extra_codecs=("kivi2", "bf16"),
        decode_kv="dense,compressed,auto",
    )
    assert cfg.decode_kv_modes == {"hack2": "dense", "kivi2": "compressed", "bf16": "auto"}
    assert ServeConfig(
        model=MODEL, codec="fp8", extra_codecs=("bf16",), decode_kv="dense"
    ).decode_kv_modes == {"fp8": "dense", "bf16": "dense"}
    assert ServeConfig(  # the low-rank codecs too: K at full dimension, V in its basis
        model=MODEL, codec="lowrank+hack2", decode_kv="dense"
    ).decode_kv_modes == {"lowrank+hack2": "dense"}
    for kw, match in [
        (
            dict(codec="hack2", extra_codecs=("bf16",), decode_kv="dense,dense,dense"),
            "--decode-kv: give one mode, or one per codec",
        ),
        (dict(codec="hack2", decode_kv="fast"), "--decode-kv: must be one of"),
        (dict(codec="hack2", engine_options={"decode_kv": "dense"}), "use --decode-kv"),
    ]:
        with pytest.raises(ValueError, match=match):
            ServeConfig(model=MODEL, **kw)


def test_cli_takes_decode_kv(capsys):
    args = build_parser().parse_args(
        ["serve", "--codec", "hack2,bf16", "--decode-kv", "dense,compressed"]
    )
    assert serve_config(args, args.codec).decode_kv_modes == {
        "hack2": "dense",
        "bf16": "compressed",
    }
    assert build_parser().parse_args(["serve"]).decode_kv == "auto"  # the default
    assert build_parser().parse_args(["demo", "--decode-kv", "auto"]).decode_kv == "auto"
    assert csv_modes("compressed, dense") == ["compressed", "dense"]
    with pytest.raises(ValueError, match="--decode-kv: expected"):
        csv_modes("dense,fast")
    assert (
        main(["bench", "jct", "--url", "http://127.0.0.1:9", "--rate", "1", "--decode-kv", "dense"])
        == 2
    )
    assert "--decode-kv: only with --sweep" in capsys.readouterr().err
    assert main(["serve", "--codec", "lowrank+hack2", "--decode-kv", "dense,dense"]) == 2
    assert "--decode-kv: give one mode, or one per codec" in capsys.readouterr().err


@pytest.mark.usefixtures("local_ray")
def test_http_dense_lane_beside_compressed_lane():
    """--codec hack2,kivi2 --decode-kv dense,compressed: the hack2 lane decodes dense; both
    answer like their codec's compressed engine (tokens within the open page) and report their
    mode; every page comes back."""
    from net_helpers import decode_pool_settled, post_json

    from zipserve.deploy.serve import running_server

    want = {
        c: LLM(MODEL, device="cpu", codec=c).generate(PROMPT, PARAMS)[0].text
        for c in ("hack2", "kivi2")
    }
    cfg = ServeConfig(
        model=MODEL, codec="hack2", extra_codecs=("kivi2",), decode_kv="dense,compressed"
    )
    with running_server(cfg, "127.0.0.1", 0) as (base, backend):
        for codec in ("hack2", "kivi2"):
            out = post_json(
                f"{base}/v1/completions",
                {
                    "prompt": PROMPT,
                    "max_tokens": 10,
                    "min_tokens": 10,
                    "ignore_eos": True,
                    "temperature": 0,
                    "codec": codec,
                },
            )
            assert out["choices"][0]["text"] == want[codec], codec
        health = json.loads(urllib.request.urlopen(f"{base}/health").read())["backend"]
        assert health["lane_decode_kv"] == {"hack2": "dense", "kivi2": "compressed"}
        decode_modes = {
            w["name"]: w["decode_kv"] for w in health["workers"] if w["role"] == "decode"
        }
        assert decode_modes == {"hack2/decode-0": "dense", "kivi2/decode-0": "compressed"}
        for lane in backend.lanes.values():
            stats = decode_pool_settled(lane)
            assert stats.free_pages == stats.capacity_pages and stats.reserved == 0, stats
