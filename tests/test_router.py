"""The router's HTTP API against `FakeBackend`: OpenAI shapes, SSE, job timings, validation errors,
API key, backend errors, and aborts on client disconnect (in-process and over a real socket)."""

from __future__ import annotations

import json
import threading
import time

import anyio
import httpx
import pytest
from fake_backend import FakeBackend, held_back

from zipserve.deploy.serve import serve_in_thread
from zipserve.router.app import create_app
from zipserve.transfer.ports import bind_socket

pytestmark = pytest.mark.anyio

MAX_LEN = 128


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def backend():
    b = FakeBackend(max_model_len=MAX_LEN)
    yield b
    assert not b.active, f"backend streams still running: {b.active}"


@pytest.fixture
async def client(backend):
    app = create_app(backend)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router", timeout=10
    ) as c:
        yield c


def sse_payloads(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    assert body.endswith("\n\n")
    frames = body.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: ") :] for f in frames]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if status < 500:
        assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
        assert param in err["message"]
    return err


# ----------------------------------------------------------------------------- happy paths


async def test_completion(client):
    r = await client.post(
        "/v1/completions",
        json={"model": "zipserve-fake", "prompt": "hello world", "max_tokens": 5, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    job_id = r.headers["x-zipserve-job-id"]
    assert body["id"] == f"cmpl-{job_id}"
    assert body["object"] == "text_completion" and body["model"] == "zipserve-fake"
    (choice,) = body["choices"]
    assert choice["text"] == " t0 t1 t2 t3 t4" and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}


async def test_usage_reports_cached_prompt_tokens_when_the_backend_does(client, backend):
    r = await client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 2})
    assert "prompt_tokens_details" not in r.json()["usage"]  # not reported: not invented
    backend.cached_tokens = 8
    r = await client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    usage = json.loads(payloads[-2])["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": min(8, usage["prompt_tokens"])}


async def test_completion_token_prompt_seed_and_default_max_tokens(client):
    r = await client.post("/v1/completions", json={"prompt": [1, 2, 3], "seed": 7})
    body = r.json()
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["text"].startswith(" t7 t8")


async def test_chat(client, backend):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == f"chatcmpl-{r.headers['x-zipserve-job-id']}"
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": " t0 t1 t2"}
    assert choice["finish_reason"] == "length"
    prompt = backend.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert body["usage"] == {
        "prompt_tokens": len(prompt.encode()),
        "completion_tokens": 3,
        "total_tokens": len(prompt.encode()) + 3,
    }


async def test_stop_string(client):
    r = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 10, "stop": [" t3"]}
    )
    assert r.json()["choices"][0] == {
        "index": 0,
        "text": " t0 t1 t2",
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert r.json()["usage"]["completion_tokens"] == 4


async def test_completion_stream(client):
    req = {"prompt": "hello", "max_tokens": 6}
    whole = (await client.post("/v1/completions", json=req)).json()["choices"][0]["text"]
    r = await client.post("/v1/completions", json={**req, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    job_id = r.headers["x-zipserve-job-id"]
    assert all(c["id"] == f"cmpl-{job_id}" and c["object"] == "text_completion" for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole == " t0 t1 t2 t3 t4 t5"
    assert len(chunks) == 7  # one per token + the final one


async def test_stream_holds_back_stop_string_across_tokens(client):
    r = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 10, "stop": "1 t2", "stream": True}
    )
    chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " t0 t"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert held_back("ab t", ["t1x"]) == 1 and held_back("ab", ["zz"]) == 0


async def test_chat_stream_with_usage(client):
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == " t0 t1 t2 t3"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_models_and_health(client):
    r = await client.get("/v1/models")
    assert r.json()["object"] == "list"
    (card,) = r.json()["data"]
    assert card["id"] == "zipserve-fake" and card["object"] == "model"
    assert card["max_model_len"] == MAX_LEN
    r = await client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["backend"]["status"] == "ok"
    assert h["router"]["active_jobs"] == 0


async def test_health_unavailable_when_backend_says_so(client, backend):
    backend.health = lambda: {"status": "draining"}
    r = await client.get("/health")
    assert r.status_code == 503 and r.json()["backend"]["status"] == "draining"


# ----------------------------------------------------------------------------- job records


async def test_job_record_timings(client):
    r = await client.post(
        "/v1/completions", json={"prompt": "abc", "max_tokens": 8, "codec": "hack4"}
    )
    job_id = r.headers["x-zipserve-job-id"]
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert job["id"] == job_id and job["state"] == "DONE" and job["finish_reason"] == "length"
    assert [p["name"] for p in job["phases"]] == [
        "queue",
        "prefill",
        "encode",
        "transfer",
        "decode_queue",
        "decode",
    ]
    assert all(p["duration"] >= 0 and p["end"] >= p["start"] for p in job["phases"])
    jct = job["jct"]
    total = sum(p["duration"] for p in job["phases"])
    assert 0 < total <= jct + 1e-6 and jct - total < 0.05 + 0.1 * jct
    assert 0 < job["ttft"] <= jct
    assert job["tbt"]["count"] == 7 and 0 <= job["tbt"]["p50"] <= job["tbt"]["p99"]
    assert job["prompt_tokens"] == 3 and job["completion_tokens"] == 8
    assert job["codec"] == "hack4" and job["error"] is None
    # the OpenAI id works as well
    assert (await client.get(f"/v1/jobs/cmpl-{job_id}")).json()["id"] == job_id


async def test_job_list_is_bounded_newest_first(backend):
    app = create_app(backend, job_history=3)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router"
    ) as c:
        ids = []
        for _ in range(5):
            r = await c.post("/v1/completions", json={"prompt": "p", "max_tokens": 1})
            ids.append(r.headers["x-zipserve-job-id"])
        listed = [j["id"] for j in (await c.get("/v1/jobs")).json()["data"]]
        assert listed == ids[::-1][:3]
        assert [j["id"] for j in (await c.get("/v1/jobs?limit=1")).json()["data"]] == [ids[-1]]
        assert_openai_error(await c.get(f"/v1/jobs/{ids[0]}"), 404, "job_id")


async def test_unknown_job_404(client):
    err = assert_openai_error(await client.get("/v1/jobs/nope"), 404, "job_id")
    assert err["code"] == "job_not_found"


# ----------------------------------------------------------------------------- bad requests

BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": "s"}, "seed"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "codec": 3}, "codec"),
    ("/v1/completions", {"prompt": "x", "codec": "zip9"}, "codec"),  # not served here
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "codec": "hack"},
        "codec",
    ),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": 12}, "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x" * MAX_LEN}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 100, "max_tokens": MAX_LEN - 99}, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"prompt": "x"}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x" * MAX_LEN}]},
        "messages",
    ),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p[4:]}-{x}" for p, _, x in BAD])
async def test_bad_request(client, backend, path, body, param):
    assert_openai_error(await client.post(path, json=body), 400, param)
    assert not backend.jobs  # refused before reaching the backend


@pytest.mark.parametrize(
    "content", [b'{"prompt": "x",', b"not json", b"", b"[1, 2]", b'"x"', b"\xff\xfe"]
)
async def test_malformed_body(client, content):
    r = await client.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_openai_error(r, 400)


async def test_unknown_fields_are_ignored_and_nulls_mean_default(client):
    """Unknown fields are ignored; known ones this server cannot honour are fine at their
    defaults (other values: tests/test_hardening.py)."""
    r = await client.post(
        "/v1/completions",
        json={
            "prompt": "x",
            "max_tokens": 2,
            "frequency_penalty": 0,
            "presence_penalty": 0.0,
            "logit_bias": {},
            "best_of": 1,
            "suffix": None,
            "stream_options": None,
            "user": "u",
            "logprobs": None,
            "echo": False,
            "whatever": [1],
            "temperature": None,
            "n": 1,
        },
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " t0 t1"


async def test_json_body_without_json_content_type(client):
    r = await client.post(
        "/v1/completions",
        content=b'{"prompt": "x", "max_tokens": 1}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200


async def test_default_max_tokens_is_clamped_to_the_context(client):
    r = await client.post("/v1/completions", json={"prompt": "x" * (MAX_LEN - 4)})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert r.json()["usage"]["total_tokens"] == MAX_LEN
    assert r.json()["choices"][0]["finish_reason"] == "length"


async def test_unknown_model_404(client):
    for path, body in [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ]:
        err = assert_openai_error(
            await client.post(path, json={**body, "model": "gpt-4"}), 404, "model"
        )
        assert err["code"] == "model_not_found"


async def test_unknown_route_is_openai_error(client):
    assert_openai_error(await client.get("/v1/nothing"), 404)


# ----------------------------------------------------------------------------- API key


async def test_api_key(backend):
    app = create_app(backend, api_key="s3cret")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://router"
    ) as c:
        req = {"prompt": "x", "max_tokens": 1}
        for headers in [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"},
        ]:
            err = assert_openai_error(
                await c.post("/v1/completions", json=req, headers=headers), 401
            )
            assert err["code"] == "invalid_api_key"
        # refused before the body is even parsed
        assert_openai_error(await c.post("/v1/completions", content=b"{"), 401)
        assert_openai_error(await c.get("/v1/models"), 401)
        assert_openai_error(await c.get("/v1/jobs"), 401)
        assert not backend.jobs
        ok = {"Authorization": "Bearer s3cret"}
        assert (await c.post("/v1/completions", json=req, headers=ok)).status_code == 200
        assert (await c.get("/v1/models", headers=ok)).status_code == 200
        assert (await c.get("/health")).status_code == 200


# ----------------------------------------------------------------------------- backend errors


async def test_backend_error_non_streaming(client, backend):
    backend.fail_message = "decode worker crashed"
    r = await client.post("/v1/completions", json={"prompt": "x"})
    err = assert_openai_error(r, 500)
    assert err["type"] == "server_error" and "crashed" in err["message"]
    job = (await client.get(f"/v1/jobs/{r.headers['x-zipserve-job-id']}")).json()
    assert job["state"] == "FAILED" and job["error"] == "decode worker crashed"
    assert job["finish_reason"] == "error" and job["jct"] is not None

    backend.fail_message = "decode pool overloaded"
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert_openai_error(r, 503)


async def test_backend_error_streaming(client, backend):
    backend.fail_message = "transfer deadline missed"
    backend.fail_after_tokens = 2
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 200
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:2]] == [" t0", " t1"]
    assert chunks[-1]["error"]["message"] == "transfer deadline missed"
    assert chunks[-1]["error"]["type"] == "server_error"
    job = (await client.get(f"/v1/jobs/{r.headers['x-zipserve-job-id']}")).json()
    assert job["state"] == "FAILED" and job["completion_tokens"] == 2


async def test_backend_exception_is_a_failed_job(client, backend):
    async def broken(job):
        raise RuntimeError("ray actor died")
        yield  # pragma: no cover

    backend.stream = broken
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert "ray actor died" in assert_openai_error(r, 500)["message"]


# ----------------------------------------------------------------------------- disconnects


async def _drive_asgi(
    app,
    body: dict,
    *,
    disconnect_after_chunks: int | None = None,
    disconnect_after_s: float | None = None,
    spec_version: str = "2.3",
) -> list[dict]:
    """Run one request through the ASGI app; the client 'disconnects' on a trigger.

    With ASGI spec 2.3 Starlette listens for the disconnect itself while streaming; with 2.4 it
    relies on send() failing, which this fake client never does, so only the router's own
    polling can notice."""
    raw = json.dumps(body).encode()
    gone = anyio.Event()
    sent: list[dict] = []
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if not gone.is_set():  # like uvicorn: once disconnected, answer without waiting
            await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        chunks = sum(1 for m in sent if m["type"] == "http.response.body" and m.get("body"))
        if disconnect_after_chunks is not None and chunks >= disconnect_after_chunks:
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("router", 80),
    }
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            if disconnect_after_s is not None:

                async def later():
                    await anyio.sleep(disconnect_after_s)
                    gone.set()

                tg.start_soon(later)
            await app(scope, receive, send)
            gone.set()
    return sent


@pytest.mark.parametrize("stream,spec", [(True, "2.3"), (True, "2.4"), (False, "2.3")])
async def test_disconnect_aborts_job_in_process(backend, stream, spec):
    backend.token_delay = 0.05
    app = create_app(backend)
    t0 = time.monotonic()
    await _drive_asgi(
        app,
        {"prompt": "x", "max_tokens": 100, "stream": stream},
        disconnect_after_chunks=3 if stream else None,
        disconnect_after_s=None if stream else 0.2,
        spec_version=spec,
    )
    assert time.monotonic() - t0 < 2.5  # nowhere near 100 tokens * 50 ms
    (job,) = backend.jobs
    assert backend.aborted == [job.id]
    record = app.state.router.registry.get(job.id)
    assert record.state.value == "ABORTED" and record.error == "client disconnected"
    assert not app.state.router.active
    await anyio.sleep(0.05)  # let the cancelled backend stream unwind
    assert not backend.active


def test_disconnect_over_real_socket_aborts_promptly():
    backend = FakeBackend(max_model_len=MAX_LEN, token_delay=0.05)
    app = create_app(backend)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    threads_before = set(threading.enumerate())
    with serve_in_thread(
        app, sock, "uvicorn-test", 10, log_level="warning", lifespan="on"
    ) as thread:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5) as c:
            with c.stream(
                "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 100, "stream": True}
            ) as r:
                assert r.status_code == 200
                job_id = r.headers["x-zipserve-job-id"]
                n = 0
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        assert json.loads(line[6:])["id"] == f"cmpl-{job_id}"
                        n += 1
                        if n == 3:
                            break
            closed_at = time.monotonic()  # leaving the block closes the connection mid-stream
        # Well under 1 s on an idle machine; 2 s leaves room for a loaded CI runner and is still
        # far below the ~5 s the remaining 97 tokens would take.
        assert backend.abort_event.wait(2.0), "backend.abort not called within 2 s"
        assert time.monotonic() - closed_at < 2.0
        assert backend.aborted == [job_id]
        with httpx.Client(base_url=base, timeout=5) as c:
            deadline = time.monotonic() + 2
            while (job := c.get(f"/v1/jobs/{job_id}").json())["state"] != "ABORTED":
                assert time.monotonic() < deadline, job
                time.sleep(0.01)
            assert job["completion_tokens"] < 100 and job["jct"] is not None
            assert c.get("/health").json()["router"]["active_jobs"] == 0
    assert not thread.is_alive(), "uvicorn thread did not stop"
    assert not backend.active
    leaked = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not leaked, leaked


# ----------------------------------------------------------------------------- units


def test_job_record_state_machine():
    from zipserve.router.backend import Backend, FinishEvent, Job, PhaseEvent, TokenEvent
    from zipserve.router.jobs import JobRecord, JobState, percentile

    assert isinstance(FakeBackend(), Backend)
    job = Job(id="j1", prompt_ids=[1, 2], max_tokens=4, arrival=100.0)
    rec = JobRecord.for_job(job, endpoint="completions", model="m")
    assert rec.state is JobState.PENDING
    rec.on_phase(PhaseEvent("queue", 100.0, 100.5))
    rec.on_phase(PhaseEvent("prefill", 100.5))  # started, still running
    assert rec.state is JobState.PREFILLING and rec.phases[-1].duration is None
    rec.on_phase(PhaseEvent("transfer", 100.8, 101.0))  # overlaps prefill (layer-wise)
    rec.on_phase(PhaseEvent("prefill", 100.5, 100.9))  # closes the open span
    assert rec.state is JobState.TRANSFERRING  # never moves back
    assert [p.name for p in rec.phases] == ["queue", "prefill", "transfer"]
    assert [round(p.duration, 6) for p in rec.phases] == [0.5, 0.4, 0.2]
    for t in (101.5, 101.6, 101.8):
        rec.on_token(TokenEvent(5, "x"), t)
    assert rec.state is JobState.DECODING and rec.ttft == 1.5
    rec.on_phase(PhaseEvent("decode", 101.0))  # left open: the router's finish stamp closes it
    rec.on_finish(FinishEvent("stop", completion_tokens=3), 102.0)
    assert rec.state is JobState.DONE and rec.jct == 2.0
    assert rec.phases[-1].name == "decode" and rec.phases[-1].end == 102.0
    rec.on_finish(FinishEvent("error", error="late"), 103.0)  # terminal: ignored
    rec.on_token(TokenEvent(6, "y"), 103.0)
    v = rec.view()
    assert v.state == "DONE" and v.error is None and v.completion_tokens == 3
    assert v.tbt.count == 2 and abs(v.tbt.max - 0.2) < 1e-9
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError, match="max_tokens"):
        Job(id="j", prompt_ids=[1], max_tokens=0)
    with pytest.raises(ValueError, match="name"):
        PhaseEvent("warmup", 0.0)  # type: ignore[arg-type]


async def test_stream_sends_a_chunk_per_token_even_without_text(client):
    """A token whose text is held back (here: it may start the stop string) still gets its own
    chunk, so a client times every token: 4 tokens, 4 token chunks, then the final chunk."""
    r = await client.post(
        "/v1/completions",
        json={"prompt": "x", "stream": True, "max_tokens": 4, "stop": " t1 t9"},
    )
    chunks = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    tokens = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"] is None]
    assert [t["text"] for t in tokens] == [" t0", "", " t1 t2", " t3"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " t0 t1 t2 t3"
