"""Issue 21 against the real backend on CPU (embedded Ray, prefill and decode actors, uvicorn on
127.0.0.1, an API key): nothing of the deployment listens beyond loopback; what the engine
refuses fails at once as a 400 naming the field (through the router, and straight from the
backend when the router's own checks are bypassed), holding no queue slot and no page;
logprobs come through with their top alternatives, the first token's included, equal to the
offline engine's; the open /health and the 404 for an unknown model name no path.
Router-level cases with FakeBackend: tests/test_hardening.py."""

from __future__ import annotations

import json
import math
import os
import socket
import time
import urllib.error
import urllib.request

import pytest
from net_helpers import decode_pool_settled

from zipserve.control.config import ServeConfig
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.deploy.serve import running_server
from zipserve.router.backend import FinishEvent, Job
from zipserve.router.limits import AdmissionConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
MODEL = str(REFERENCE_MODEL)
KEY = "K"
FAST_S = 2.0


@pytest.fixture(scope="module")
def server():
    """`zipserve serve --api-key K --max-queued-requests 4` as the CLI starts it (embedded Ray
    on loopback: deploy/local_ray.py)."""
    if ray.is_initialized():
        ray.shutdown()
    cfg = ServeConfig(model=MODEL, codec="bf16")
    with running_server(
        cfg, "127.0.0.1", 0, api_key=KEY, limits=AdmissionConfig(max_queued_jobs=4)
    ) as (base, backend):
        yield base, backend


def call(
    base: str, path: str, body: dict | None = None, key: str | None = KEY, timeout: float = 60
) -> tuple[int, dict, float]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers=headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - t0


def assert_whole(base: str, backend) -> None:
    stats = decode_pool_settled(backend)
    assert stats.free_pages == stats.capacity_pages, stats
    assert stats.reserved == 0 and stats.running == 0, stats
    status, health, _ = call(base, "/health")
    assert status == 200 and health["router"]["admission"]["queued_jobs"] == 0, health


# ----------------------------------------------------------------------------- 2. loopback


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    return kids


def process_tree(root: int) -> set[int]:
    kids, out, todo = _children(), set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += kids.get(pid, [])
    return out


def _address(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    return socket.inet_ntop(
        socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    )


def listening_sockets(pids: set[int]) -> list[tuple[str, str, int, int]]:
    """(protocol, address, port, pid) of every listening TCP and bound UDP socket of `pids`,
    from /proc/net/{tcp,tcp6,udp,udp6} (what `ss -ltnup` shows)."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    found = []
    for proto, state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            lines = open(f"/proc/net/{proto}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == state and f[9] in owner:
                addr, port = f[1].split(":")
                found.append((proto, _address(addr), int(port, 16), owner[f[9]]))
    return found


def is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr == "::1" or addr.startswith("::ffff:127.")


def test_nothing_of_a_loopback_deployment_listens_beyond_loopback(server):
    base, backend = server
    assert call(base, "/v1/completions", {"prompt": "def f(x):", "max_tokens": 2})[0] == 200
    socks = listening_sockets(process_tree(os.getpid()))
    port = int(base.rsplit(":", 1)[1])
    assert any(p == port for _, _, p, _ in socks), socks  # the router's own, found
    assert len({pid for *_, pid in socks}) >= 4, socks  # driver, GCS, raylet, workers
    beyond = [s for s in socks if not is_loopback(s[1])]
    assert not beyond, f"listening beyond loopback: {beyond}"
    assert ray.util.get_node_ip_address() == "127.0.0.1"


# ----------------------------------------------------------------------------- 1. refusals


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": [1, 999999], "max_tokens": 2}, "prompt"),
        ({"prompt": [2**70], "max_tokens": 2}, "prompt"),
        ({"prompt": "hi", "max_tokens": 2, "seed": 2**64}, "seed"),
    ],
)
def test_what_the_engine_refuses_is_a_400_at_once(server, body, param):
    base, backend = server
    status, out, dt = call(base, "/v1/completions", body)
    assert status == 400 and dt < FAST_S, (status, out, dt)
    assert out["error"]["param"] == param and out["error"]["message"].startswith(param)
    assert_whole(base, backend)


def test_sixteen_bad_requests_leave_room_for_a_good_one(server):
    import concurrent.futures as cf

    base, backend = server
    with cf.ThreadPoolExecutor(16) as pool:
        bad = list(
            pool.map(lambda _: call(base, "/v1/completions", {"prompt": [1, 999999]}), range(16))
        )
    assert {s for s, _, _ in bad} == {400} and max(dt for *_, dt in bad) < 5 * FAST_S
    status, out, _ = call(base, "/v1/completions", {"prompt": "def f(x):", "max_tokens": 2})
    assert status == 200, out
    assert_whole(base, backend)


@pytest.mark.parametrize(
    "prompt_ids,seed,field", [([1, 999999], None, "prompt"), ([1, 2, 3], 2**64, "seed")]
)
def test_the_backend_itself_fails_a_refused_request_at_once(server, prompt_ids, seed, field):
    """Past the router's checks (another client of the backend): the engine's refusal comes
    back as a client error within a second, not after the page wait; nothing is held."""
    import asyncio

    base, backend = server

    async def run() -> list:
        job = Job(
            id=f"bad-{field}-{time.monotonic_ns()}", prompt_ids=prompt_ids, max_tokens=2, seed=seed
        )
        return [ev async for ev in backend.stream(job)]

    t0 = time.perf_counter()
    events = asyncio.run(run())
    dt = time.perf_counter() - t0
    assert dt < FAST_S, dt
    last = events[-1]
    assert isinstance(last, FinishEvent) and last.reason == "error" and last.client_error
    assert last.error.startswith(f"{field}:"), last.error
    assert_whole(base, backend)


# ----------------------------------------------------------------------------- 4. logprobs


def test_logprobs_equal_the_offline_engine(server):
    from zipserve.engine.llm import LLM, SamplingParams

    base, backend = server
    prompt = "def fibonacci(n):"
    want = LLM(MODEL, device="cpu").generate(
        [prompt], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3)
    )[0]
    status, out, _ = call(
        base,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3},
    )
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(want.token_ids) == 6
    assert "".join(lp["tokens"]) == out["choices"][0]["text"] == want.text
    for i, (got, exp) in enumerate(zip(lp["token_logprobs"], want.logprobs)):
        assert math.isclose(got, exp, abs_tol=1e-3), (i, got, exp)
    for i, (got, exp) in enumerate(zip(lp["top_logprobs"], want.top_logprobs)):
        assert len(got) == 3, (i, got)  # the first token's (sampled in prefill) included
        want_top = {backend.token_strings([t])[0]: v for t, v in exp}
        assert got.keys() == want_top.keys(), (i, got, want_top)
        assert all(math.isclose(got[k], want_top[k], abs_tol=1e-3) for k in got)
    # greedy: the sampled token is the most likely one
    assert all(
        max(top.values()) == pytest.approx(tok)
        for top, tok in zip(lp["top_logprobs"], lp["token_logprobs"])
    )
    status, out, _ = call(
        base,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
        },
    )
    content = out["choices"][0]["logprobs"]["content"]
    assert status == 200 and len(content) == out["usage"]["completion_tokens"]
    assert all(len(c["top_logprobs"]) == 2 for c in content)
    assert_whole(base, backend)


# ----------------------------------------------------------------------------- 6. disclosure


def test_no_path_in_the_open_health_or_the_unknown_model_404(server):
    base, backend = server
    status, health, _ = call(base, "/health", key=None)
    assert status == 200 and set(health) == {"status", "workers", "jobs"}, health
    assert health["workers"] == {"total": 2, "healthy": 2}
    status, out, _ = call(base, "/v1/completions", {"prompt": "x", "model": "gpt-4"})
    assert status == 404 and "zipserve-ref" in out["error"]["message"]
    status, models, _ = call(base, "/v1/models")
    assert [m["id"] for m in models["data"]] == ["zipserve-ref"]
    status, health, _ = call(base, "/health")
    assert health["model"] == "zipserve-ref" and "workers" in health["backend"]
    for text in (json.dumps(out), json.dumps(models), json.dumps(health)):
        assert MODEL not in text and str(REFERENCE_MODEL.parent) not in text
