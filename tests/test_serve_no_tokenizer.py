"""`zipserve serve --skip-tokenizer` end to end on CPU (real Ray backend, prefill and decode
workers): the reference model copied without its tokenizer files serves token-id prompts, answers
with the offline engine's greedy token ids (whole and streamed) and empty text, refuses text,
chat, stop strings and out-of-vocabulary ids with a 400 naming the field, and every page of the
decode pool comes back."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest
from net_helpers import decode_pool_settled
from net_helpers import post_json as _post

from zipserve.control.config import ServeConfig
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.serve import running_server
from zipserve.engine.llm import LLM, SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
PROMPTS = [[1, 400, 30, 77, 5], list(range(10, 90))]  # the 2nd: more than a 64-token page


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    """Every test here runs against the module's embedded Ray (tests/conftest.py)."""


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "zipserve-ref-bare"
    shutil.copytree(REFERENCE_MODEL, path, ignore=shutil.ignore_patterns("tokenizer*"))
    return str(path)


def _stream_ids(url: str, body: dict) -> tuple[list[int], str]:
    req = urllib.request.Request(
        url,
        data=json.dumps(dict(body, stream=True)).encode(),
        headers={"Content-Type": "application/json"},
    )
    ids, text = [], ""
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    ids += choice.get("token_ids", [])
                    text += choice.get("text") or ""
    return ids, text


def _refused(url: str, body: dict) -> dict:
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(url, body)
    assert e.value.code == 400
    return json.loads(e.value.read())["error"]


def test_serve_token_ids_without_a_tokenizer(bare_model):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    want = LLM(bare_model, device="cpu", skip_tokenizer=True).generate(PROMPTS, params)
    cfg = ServeConfig(model=bare_model, codec="bf16", skip_tokenizer=True)
    with running_server(cfg, "127.0.0.1", 0) as (base, backend):
        url = f"{base}/v1/completions"
        for prompt, w in zip(PROMPTS, want):
            out = _post(url, {"prompt": prompt, "max_tokens": 12, "temperature": 0})
            (choice,) = out["choices"]
            assert choice["token_ids"] == w.token_ids and choice["text"] == ""
            assert out["usage"]["prompt_tokens"] == len(prompt)
            assert out["usage"]["completion_tokens"] == len(w.token_ids)
        ids, text = _stream_ids(url, {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0})
        assert ids == want[1].token_ids and text == ""
        for body, param in [
            ({"prompt": "def f():"}, "prompt"),
            ({"prompt": [1, 2], "stop": ["\n"]}, "stop"),
            ({"prompt": [1, 8192]}, "prompt"),
        ]:
            err = _refused(url, dict(body, max_tokens=4))
            assert err["param"] == param and err["message"].startswith(f"{param}: ")
        err = _refused(
            f"{base}/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert err["param"] == "messages" and "--skip-tokenizer" in err["message"]
        stats = decode_pool_settled(backend)
        assert stats.free_pages == stats.capacity_pages, stats
        assert stats.reserved == 0 and stats.running == 0, stats
