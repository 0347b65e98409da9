"""Small helpers shared by the tests that start servers or channels on loopback (and wait for a
served deployment's decode pool to settle)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable

from zipserve.deploy.http_client import post_json, stream_text  # noqa: F401 (re-exported)


def stream_and_interrupt(
    url: str, body: dict, after_chunks: int, action: Callable[[], object], timeout: float = 60
) -> tuple[str | None, float | None]:
    """Stream body (stream=True); once `after_chunks` chunks have arrived call action() (e.g. kill
    a worker) and read on to the end. Returns the error message the stream ended with (None if
    it ended cleanly) and the time.time() at which action ran (None if it never did)."""
    req = urllib.request.Request(
        url,
        data=json.dumps(dict(body, stream=True)).encode(),
        headers={"Content-Type": "application/json"},
    )
    chunks, error, acted_at = 0, None, None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            chunks += 1
            if chunks == after_chunks:
                acted_at = time.time()
                action()
    return error, acted_at


def decode_pool_settled(backend, deadline_s: float = 10.0):
    """The first decode worker's stats once every page is free and nothing is reserved or
    running, or its last stats when deadline_s passed first (the caller asserts on them)."""
    import ray

    end = time.time() + deadline_s
    while True:
        stats = ray.get(backend.decode[0].stats.remote())
        if (
            stats.free_pages == stats.capacity_pages and stats.reserved == 0 and stats.running == 0
        ) or time.time() > end:
            return stats
        time.sleep(0.1)
