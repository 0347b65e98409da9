"""A few lines of HTTP client for talking to a zipserve router: JSON in, JSON out, and the text of
an SSE completion stream. Standard library only (the demo and the tests use it)."""

from __future__ import annotations

import json
import urllib.request


def post_json(url: str, body: dict, timeout: float = 120) -> dict:
    """POST body as JSON; the parsed JSON answer (HTTP errors raise urllib.error.HTTPError)."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get_json(url: str, timeout: float = 30) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def stream_text(url: str, body: dict, timeout: float = 120, echo: bool = False) -> str:
    """POST body with stream=True and join the SSE chunks' text (printed as it comes if echo)."""
    req = urllib.request.Request(
        url,
        data=json.dumps(dict(body, stream=True)).encode(),
        headers={"Content-Type": "application/json"},
    )
    text = ""
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("text") or ""
            if echo:
                print(delta, end="", flush=True)
            text += delta
    if echo:
        print()
    return text
