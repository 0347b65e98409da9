"""Checkpoints without tokenizer.json: refused at load naming the flag; with skip_tokenizer the
engine takes token ids and returns token ids (the same ones as with a tokenizer) and empty text,
and refuses text, chat and stop strings naming the field. The router's side against FakeBackend
(has_tokenizer=False), and ServeConfig / `zipserve serve` refusing before any worker starts."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from fake_backend import FakeBackend
from hf_fixtures import make_hf_checkpoint

from zipserve.control.config import ServeConfig
from zipserve.engine import llm_engine
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.router.app import create_app

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(with tokenizer, the same weights without tokenizer.json / tokenizer_config.json)."""
    root = tmp_path_factory.mktemp("ckpt")
    full = make_hf_checkpoint(root / "full", init_std=0.15, seed=3, head_dim=16)
    bare = root / "bare"
    shutil.copytree(full, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    return full, bare


def _whole(llm):
    assert llm.engine.pool.num_free == llm.engine.pool.capacity


def test_missing_tokenizer_is_a_load_error_naming_the_flag(checkpoints, monkeypatch):
    _, bare = checkpoints

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the tokenizer was checked")

    monkeypatch.setattr(llm_engine, "build_model", no_weights)
    with pytest.raises(
        ValueError,
        match=r"model: no tokenizer.json in .*skip_tokenizer=True "
        r"\(`zipserve serve --skip-tokenizer`\)",
    ):
        LLM(str(bare), device="cpu")


def test_token_ids_in_token_ids_out(checkpoints):
    full, bare = checkpoints
    want = LLM(str(full), device="cpu", dtype="float32").generate(
        [[1, 5, 9, 200], [7] * 30], GREEDY
    )
    llm = LLM(str(bare), device="cpu", dtype="float32", skip_tokenizer=True)
    got = llm.generate([[1, 5, 9, 200], [7] * 30], GREEDY)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and len(g.token_ids) == 20
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert g.text == "" and g.prompt is None and g.finish_reason == "length"
    one = llm.generate([1, 2, 3], SamplingParams(max_tokens=4))  # one prompt of ids
    assert len(one) == 1 and len(one[0].token_ids) <= 4
    assert llm.engine._eos == {2}  # config.json's eos_token_id, without a tokenizer too
    _whole(llm)


def test_text_chat_and_stop_are_refused_naming_the_field(checkpoints):
    _, bare = checkpoints
    llm = LLM(str(bare), device="cpu", skip_tokenizer=True)
    with pytest.raises(ValueError, match=r"^prompt: .*without a tokenizer.*list of token ids"):
        llm.generate("def f():")
    with pytest.raises(ValueError, match=r"^stop: stop strings need a tokenizer"):
        llm.generate([1, 2, 3], SamplingParams(stop=["\n"]))
    with pytest.raises(ValueError, match=r"^messages: .*without a tokenizer"):
        llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"^prompt: "):
        llm.logits("text")
    assert len(llm.logits([1, 2, 3])) == 3
    _whole(llm)


def test_a_model_with_a_tokenizer_can_skip_it_too(checkpoints):
    full, _ = checkpoints
    out = LLM(str(full), device="cpu", skip_tokenizer=True).generate([[1, 2]], GREEDY)[0]
    assert out.text == "" and len(out.token_ids) == 20
    out = LLM("random:tiny", device="cpu", skip_tokenizer=True).generate([[1, 2]], GREEDY)[0]
    assert out.text == "" and len(out.token_ids) == 20


def test_serve_config_refuses_before_any_worker_starts(checkpoints, capsys):
    from zipserve.deploy.cli import main

    full, bare = checkpoints
    with pytest.raises(ValueError, match=r"--model: no tokenizer.json in .*pass --skip-tokenizer"):
        ServeConfig(model=str(bare))
    assert ServeConfig(model=str(bare), skip_tokenizer=True).engine_options == {
        "skip_tokenizer": True
    }  # what every worker's engine gets
    assert ServeConfig(model=str(bare), engine_options={"skip_tokenizer": True}).skip_tokenizer
    assert not ServeConfig(model=str(full)).skip_tokenizer
    assert main(["serve", "--model", str(bare), "--codec", "bf16"]) == 2
    assert "pass --skip-tokenizer" in capsys.readouterr().err
    # the default codec, hack4, cannot take this model's 16-wide heads: also refused up front
    assert main(["serve", "--model", str(bare), "--skip-tokenizer"]) == 2
    assert (
        "--codec: head_dim: codec hack4 needs head_dim a multiple of 32 in [32, 256] (got 16)"
        in capsys.readouterr().err
    )


# -- the router without a tokenizer (FakeBackend) -------------------------------------------------


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _client(backend):
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(backend)), base_url="http://router", timeout=10
    )


def _error(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}: ")
    return err["message"]


@pytest.mark.anyio
async def test_router_token_ids_in_and_out():
    backend = FakeBackend(has_tokenizer=False, vocab_size=2000)
    async with await _client(backend) as c:
        r = await c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4})
        assert r.status_code == 200, r.text
        (choice,) = r.json()["choices"]
        assert choice["text"] == "" and choice["token_ids"] == [1000, 1001, 1002, 1003]
        assert r.json()["usage"]["completion_tokens"] == 4
        r = await c.post(
            "/v1/completions",
            json={"prompt": [[5, 6]], "max_tokens": 3, "stream": True, "logprobs": 1},
        )
        chunks = [c for c in r.text.split("\n\n") if c.startswith("data: {")]
        bodies = [json.loads(c[6:]) for c in chunks]
        ids = [i for b in bodies for ch in b["choices"] for i in ch.get("token_ids", [])]
        assert ids == [1000, 1001, 1002]  # one chunk per token, though the text is empty
        tokens = [
            t
            for b in bodies
            for ch in b["choices"]
            if ch["logprobs"]
            for t in ch["logprobs"]["tokens"]
        ]
        assert tokens == ["token_id:1000", "token_id:1001", "token_id:1002"]
        offsets = [
            o
            for b in bodies
            for ch in b["choices"]
            if ch["logprobs"]
            for o in ch["logprobs"]["text_offset"]
        ]
        assert offsets == [0, 0, 0]  # into the (empty) text
        r = await c.post("/v1/completions", json={"prompt": [1, 2000], "max_tokens": 2})
        _error(r, "prompt")  # still checked against the vocabulary
    assert not backend.active and len(backend.jobs) == 2


@pytest.mark.anyio
async def test_router_refuses_text_chat_and_stop():
    backend = FakeBackend(has_tokenizer=False)
    async with await _client(backend) as c:
        for body, param in [
            ({"prompt": "hello"}, "prompt"),
            ({"prompt": ["hello"]}, "prompt"),
            ({"prompt": [1, 2], "stop": ["\n"]}, "stop"),
        ]:
            msg = _error(await c.post("/v1/completions", json=body), param)
            assert "--skip-tokenizer" in msg
        msg = _error(
            await c.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            ),
            "messages",
        )
        assert "--skip-tokenizer" in msg
    assert not backend.jobs  # refused at admission, nothing reached the backend


@pytest.mark.anyio
async def test_router_with_a_tokenizer_adds_no_token_ids():
    async with await _client(FakeBackend()) as c:
        r = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        assert "token_ids" not in r.json()["choices"][0]
