"""Adversarial inputs of issue 21 against the router (FakeBackend; a real uvicorn on 127.0.0.1
where sockets matter). Each case: the expected status naming the field, an answer within a
second, no traceback in the log, and afterwards the server healthy with every page back.

1. Requests the engine would refuse (token ids outside the vocabulary, a seed past 64 bits) are
   refused at admission, before they take a queue slot; a refusal the backend reports
   (`FinishEvent.client_error`) is a 400 at once, not a 503 after the page wait.
3. A lone surrogate anywhere in the body and JSON nested 100,000 deep are 400s naming the field.
4. logprobs (completions and chat) are implemented; echo, best_of > 1, penalties, logit_bias,
   suffix, tools, non-text response_format and stream_options without stream are 400s.
5. Header (slowloris) and body read timeouts, with raw sockets.
6. /health without the key is minimal; its details need the key.
(2, Ray on loopback, and the real backend: tests/test_hardening_ray.py.)
"""

from __future__ import annotations

import json
import logging
import socket
import time
from contextlib import contextmanager

import anyio
import httpx
import pytest
from fake_backend import FAKE_LOGPROB, FakeBackend

from zipserve.deploy.serve import bind_listener, serve_in_thread
from zipserve.router.app import create_app
from zipserve.router.backend import FinishEvent, Job
from zipserve.router.json_body import MAX_JSON_DEPTH
from zipserve.router.limits import AdmissionConfig
from zipserve.router.read_timeouts import uvicorn_options

pytestmark = pytest.mark.anyio
KEY = "k3y-hardening"
FAST_S = 2.0
"""A rejected request answers within this (well under 0.1 s idle; room for a loaded CI runner)."""


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def backend():
    b = FakeBackend(max_model_len=128, vocab_size=512)
    yield b
    assert not b.active, f"backend streams still running: {b.active}"


@pytest.fixture
def app(backend):
    return create_app(backend, limits=AdmissionConfig(max_queued_jobs=4))


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    ) as c:
        yield c


@pytest.fixture(autouse=True)
def no_tracebacks(caplog):
    """No case may log an error (the 500 handler logs one with its traceback)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def post(client, path: str, *, json_body=None, content: bytes | None = None):
    t0 = time.perf_counter()
    r = await client.post(
        path, json=json_body, content=content, headers={"content-type": "application/json"}
    )
    return r, time.perf_counter() - t0


def assert_400(r: httpx.Response, dt: float, param: str | None) -> dict:
    assert r.status_code == 400, r.text
    assert dt < FAST_S, dt
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if param is not None:
        assert err["message"].startswith(param), err
    return err


async def assert_healthy_and_whole(client, backend) -> None:
    r = await client.get("/health")
    assert r.status_code == 200, r.text
    decode = next(w for w in backend.health()["workers"] if w["role"] == "decode")
    assert decode["used_pages"] == 0 and decode["free_pages"] == backend.num_pages
    assert r.json()["router"]["admission"]["queued_jobs"] == 0


# ----------------------------------------------------------------------------- 1. refusals


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": [1, 999999]}, "prompt"),
        ({"prompt": [2**70]}, "prompt"),
        ({"prompt": [512]}, "prompt"),  # one past the vocabulary
        ({"prompt": "hi", "seed": 2**64}, "seed"),
        ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    ],
)
async def test_values_the_engine_would_refuse_are_refused_at_admission(
    client, backend, body, param
):
    r, dt = await post(client, "/v1/completions", json_body=body)
    assert_400(r, dt, param)
    assert not backend.jobs  # never queued, never started
    await assert_healthy_and_whole(client, backend)


async def test_bad_requests_do_not_fill_the_queue(client, backend):
    """Issue 21's attack: more bad requests than the queue holds, then a real one."""
    statuses = []

    async def bad() -> None:
        r, dt = await post(client, "/v1/completions", json_body={"prompt": [1, 999999]})
        statuses.append((r.status_code, dt < FAST_S))

    async with anyio.create_task_group() as tg:
        for _ in range(16):  # 4x the queue
            tg.start_soon(bad)
    assert statuses == [(400, True)] * 16
    r, dt = await post(client, "/v1/completions", json_body={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert len(backend.jobs) == 1
    await assert_healthy_and_whole(client, backend)


class RefusingBackend(FakeBackend):
    """Finishes every job at once with the engine's refusal of one of its values."""

    async def stream(self, job: Job):
        self.jobs.append(job)
        yield FinishEvent("error", error="temperature: must be >= 0, got -1.0", client_error=True)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_refusal_reported_by_the_backend_is_a_400_naming_the_field(stream):
    backend = RefusingBackend()
    app = create_app(backend)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    ) as c:
        t0 = time.perf_counter()
        r = await c.post("/v1/completions", json={"prompt": "x", "stream": stream})
        dt = time.perf_counter() - t0
        if stream:  # the 200 went out with the headers: the error is the stream's last event
            assert r.status_code == 200 and dt < FAST_S
            events = [
                json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")
            ]
            err = events[-1]["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == "temperature"
        else:
            assert_400(r, dt, "temperature")
        assert (await c.get("/health")).status_code == 200


# ----------------------------------------------------------------------------- 3. bodies


def nested(depth: int, key: str = "prompt") -> bytes:
    return b'{"' + key.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    "path,content,param",
    [
        ("/v1/completions", b'{"prompt": "abc\\ud800def"}', "prompt"),
        ("/v1/completions", b'{"prompt": "x", "stop": ["a", "\\udfff"]}', "stop[1]"),
        ("/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', "model"),
        ("/v1/completions", b'{"prompt": "x", "\\ud800": 1}', None),  # an (unknown) key
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udbff"}]}]}',
            "messages[0].content[0].text",
        ),
        ("/v1/completions", nested(100_000), "prompt"),
        ("/v1/completions", nested(MAX_JSON_DEPTH + 1, "whatever"), "whatever"),
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, None),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", None),
    ],
)
async def test_malicious_bodies_are_400s_naming_the_field(client, backend, path, content, param):
    r, dt = await post(client, path, content=content)
    assert_400(r, dt, param)
    assert not backend.jobs
    await assert_healthy_and_whole(client, backend)


async def test_a_valid_surrogate_pair_is_text(client):
    r = await client.post(
        "/v1/completions", content=b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}'
    )
    assert r.status_code == 200, r.text


class ThrowingTokenizer(FakeBackend):
    def tokenize(self, text: str) -> list[int]:
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")


async def test_a_tokenizer_failure_is_a_400_naming_the_field():
    app = create_app(ThrowingTokenizer())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    ) as c:
        r, dt = await post(c, "/v1/completions", json_body={"prompt": "x"})
        assert_400(r, dt, "prompt")
        r, dt = await post(
            c, "/v1/chat/completions", json_body={"messages": [{"role": "user", "content": "x"}]}
        )
        assert_400(r, dt, "messages")


# ----------------------------------------------------------------------------- 4. parameters


UNSUPPORTED = [
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"suffix": "}"}, "suffix"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -1}, "frequency_penalty"),
    ("/v1/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    (
        "/v1/chat/completions",
        {"stream_options": {"include_usage": True}, "stream": False},
        "stream_options",
    ),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
]


@pytest.mark.parametrize(
    "path,extra,param", UNSUPPORTED, ids=[f"{p[4:]}-{x}" for p, _, x in UNSUPPORTED]
)
async def test_unsupported_parameters_are_400s_naming_the_field(
    client, backend, path, extra, param
):
    base = (
        {"prompt": "x"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "x"}]}
    )
    r, dt = await post(client, path, json_body={**base, "max_tokens": 2, **extra})
    assert_400(r, dt, param)
    assert not backend.jobs


async def test_completion_logprobs(client, backend):
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"] == [" t0", " t1", " t2"] and "".join(lp["tokens"]) == choice["text"]
    assert lp["token_logprobs"] == [FAKE_LOGPROB] * 3
    assert lp["top_logprobs"][1] == {" t1": FAKE_LOGPROB, " t2": FAKE_LOGPROB - 1}
    assert lp["text_offset"] == [0, 3, 6]
    assert backend.jobs[-1].logprobs == 2
    # logprobs 0: the sampled token's logprob, no alternatives
    r = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "logprobs": 0})
    assert r.json()["choices"][0]["logprobs"]["top_logprobs"] == [{}]


async def test_streamed_completion_logprobs_follow_the_tokens(client):
    r = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 3, "logprobs": 1, "stream": True}
    )
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [t for lp in lps for t in lp["tokens"]] == [" t0", " t1", " t2"]
    assert [o for lp in lps for o in lp["text_offset"]] == [0, 3, 6]


async def test_chat_logprobs(client):
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == [" t0", " t1"]
    assert content[0]["bytes"] == list(b" t0") and content[0]["logprob"] == FAKE_LOGPROB
    assert [t["token"] for t in content[0]["top_logprobs"]] == [" t0", " t1"]
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": False},
    )
    assert r.json()["choices"][0]["logprobs"] is None
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 2,
            "logprobs": True,
            "stream": True,
        },
    )
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    tokens = [
        t["token"]
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for t in c["choices"][0]["logprobs"]["content"]
    ]
    assert tokens == [" t0", " t1"]


# ----------------------------------------------------------------------------- 5. timeouts


@contextmanager
def serving(backend, limits: AdmissionConfig, api_key: str | None = None):
    """A real uvicorn on 127.0.0.1 with the read timeouts `zipserve serve` uses, on a socket bound
    before it starts (no window for another process to take the port)."""
    sock = bind_listener("127.0.0.1", 0)
    app = create_app(backend, api_key=api_key, limits=limits)
    with serve_in_thread(app, sock, startup_s=10, log_level="warning", **uvicorn_options(limits)):
        yield sock.getsockname()[1]


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    t0, data = time.perf_counter(), b""
    sock.settimeout(limit_s)
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, float("inf")
        except ConnectionResetError:
            return data, time.perf_counter() - t0
        if not chunk:
            return data, time.perf_counter() - t0
        data += chunk


def good_request(port: int) -> int:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert c.get("/health").status_code == 200
        return r.status_code


TIMEOUTS = AdmissionConfig(header_timeout_s=0.5, body_timeout_s=0.5)


def test_slowloris_connections_are_answered_408_and_closed():
    backend = FakeBackend()
    with serving(backend, TIMEOUTS) as port:
        conns = []
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            conns.append(s)
        t0 = time.perf_counter()
        closed_at: dict[int, float] = {}
        answers: dict[int, bytes] = {i: b"" for i in range(len(conns))}
        while len(closed_at) < len(conns) and time.perf_counter() - t0 < 5:
            for i, s in enumerate(conns):  # one more header line each, every 0.1 s
                if i in closed_at:
                    continue
                try:
                    s.sendall(b"X-Drip: 1\r\n")
                    s.settimeout(0.005)
                    chunk = s.recv(65536)
                    answers[i] += chunk
                    if not chunk:
                        closed_at[i] = time.perf_counter() - t0
                except TimeoutError:
                    pass
                except OSError:
                    closed_at[i] = time.perf_counter() - t0
            time.sleep(0.1)
        for s in conns:
            s.close()
        assert len(closed_at) == len(conns), f"{len(conns) - len(closed_at)} still open"
        assert max(closed_at.values()) < TIMEOUTS.header_timeout_s + 2.0, closed_at
        got_408 = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408 ")]
        assert got_408, answers  # (a reset may swallow some answers; none is anything else)
        assert all(not a or a.startswith(b"HTTP/1.1 408 ") for a in answers.values())
        body = json.loads(got_408[0].split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_timeout"
        assert good_request(port) == 200
    assert not backend.jobs[:-1] and not backend.active


def test_a_connection_that_sends_nothing_is_closed_silently():
    with serving(FakeBackend(), TIMEOUTS) as port:
        s = socket.create_connection(("127.0.0.1", port))
        data, closed_after = read_until_closed(s, 5)
        s.close()
        assert data == b"" and closed_after < TIMEOUTS.header_timeout_s + 2.0


@pytest.mark.parametrize("drip", [False, True], ids=["short-body", "dripped-body"])
def test_a_body_that_does_not_arrive_is_answered_408(drip):
    backend = FakeBackend()
    with serving(backend, TIMEOUTS) as port:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b'\r\nContent-Length: 100\r\n\r\n{"prompt"'
        )
        if drip:  # a byte every 0.1 s: each read is quick, the body never completes in time
            for _ in range(8):
                time.sleep(0.1)
                try:
                    s.sendall(b" ")
                except OSError:
                    break
        data, closed_after = read_until_closed(s, 5)
        s.close()
        assert data.startswith(b"HTTP/1.1 408 "), data
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        assert closed_after < TIMEOUTS.body_timeout_s + 2.0
        assert good_request(port) == 200
    assert len(backend.jobs) == 1  # only the good request's


def test_read_timeouts_spare_keep_alive_and_long_responses():
    """The header timer restarts after each response, and never cuts a response (a stream
    longer than both timeouts) or an idle keep-alive connection's next request."""
    backend = FakeBackend(token_delay=0.05)
    with serving(backend, TIMEOUTS) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for _ in range(3):
                assert (
                    c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code
                    == 200
                )
                time.sleep(0.2)  # < the timeout each time (0.3 s to spare), > it in total
            with c.stream(
                "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 30, "stream": True}
            ) as r:
                body = b"".join(r.iter_bytes())
            assert body.endswith(b"data: [DONE]\n\n") and body.count(b'"text"') >= 30
            time.sleep(TIMEOUTS.header_timeout_s + 0.3)  # idle past the timeout: closed
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code == 200  # on a fresh connection, not a stale 408


# ----------------------------------------------------------------------------- 6. disclosure


async def test_health_without_the_key_is_minimal(backend):
    app = create_app(backend, api_key=KEY)
    secret = "ActorDiedError: /secret/path/model.safetensors"

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    ) as c:
        r = await c.get("/health")
        assert r.status_code == 200
        assert r.json() == {
            "status": "ok",
            "workers": {"total": 2, "healthy": 2},
            "jobs": {"active": 0, "queued": 0},
        }
        for headers in ({"Authorization": "Bearer nope"}, {}):
            assert set((await c.get("/health", headers=headers)).json()) == {
                "status",
                "workers",
                "jobs",
            }
        r = await c.get("/health", headers={"Authorization": f"Bearer {KEY}"})
        assert r.json()["model"] == backend.model_name and "backend" in r.json()

        original = backend.health

        def failing():
            raise RuntimeError(secret)

        backend.health = failing
        r = await c.get("/health")
        assert r.status_code == 503 and secret not in r.text
        assert r.json()["status"] == "unavailable"
        r = await c.get("/health", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and secret in r.text  # the details are the key holder's
        backend.health = original


def test_the_served_model_name_is_not_a_path():
    from zipserve.control.config import ServeConfig, served_name
    from zipserve.deploy.cli import REFERENCE_MODEL

    assert served_name(str(REFERENCE_MODEL)) == "zipserve-ref"
    assert served_name(str(REFERENCE_MODEL) + "/") == "zipserve-ref"
    assert served_name("random:tiny") == "random:tiny"
    cfg = ServeConfig(model=str(REFERENCE_MODEL), codec="bf16")
    assert cfg.model_name == "zipserve-ref"
    assert (
        ServeConfig(model=str(REFERENCE_MODEL), codec="bf16", served_model_name="ref").model_name
        == "ref"
    )
    with pytest.raises(ValueError, match="served-model-name"):
        ServeConfig(model=str(REFERENCE_MODEL), codec="bf16", served_model_name=" ")
