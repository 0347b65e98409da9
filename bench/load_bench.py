"""Load generator: N concurrent streaming clients against a zipserve router for a fixed time.

Each client loops: POST /v1/completions with "stream": true, read the SSE chunks, record TTFT
(first chunk with text) and JCT ([DONE]); a 429 is counted as a deliberate refusal and the
client waits its Retry-After (bounded by the time left); anything else (another status, an
error chunk, a broken stream, a timeout) is an error. No new request starts after `duration_s`;
requests in flight then run to completion. Loopback only: it talks to the URL it is given.

    python3 -m zipserve bench load --clients 64 --duration 60     # starts its own server
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main():",
    "class Stack:\n    def __init__(self):",
    'def read_config(path):\n    """Read a JSON config file."""',
    "for i in range(10):\n    ",
    "import json\n" * 12,
]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class LoadResult:
    clients: int
    duration_s: float
    wall_s: float = 0.0
    completed: int = 0
    rejected_429: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    jct_s: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("ttft_s", "jct_s", "errors")}
        out["errors"] = len(self.errors)
        out["first_errors"] = self.errors[:5]
        for name, vals in (("ttft", self.ttft_s), ("jct", self.jct_s)):
            for q in (50, 99):
                v = percentile(vals, q)
                out[f"{name}_p{q}_ms"] = None if v is None else round(1e3 * v, 1)
        out["requests_per_s"] = round(self.completed / self.wall_s, 2) if self.wall_s else None
        out["tokens_per_s"] = round(self.tokens / self.wall_s, 1) if self.wall_s else None
        return out

    def line(self) -> str:
        s = self.summary()
        return (
            f"{s['clients']} clients, {s['wall_s']:.1f} s: {s['completed']} completed, "
            f"{s['rejected_429']} refused (429), {s['errors']} errors; TTFT p50 "
            f"{s['ttft_p50_ms']} ms p99 {s['ttft_p99_ms']} ms; JCT p50 {s['jct_p50_ms']} ms "
            f"p99 {s['jct_p99_ms']} ms; {s['tokens_per_s']} tokens/s"
        )


async def _one(client, url: str, body: dict, res: LoadResult, end: float) -> None:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code == 429:
            res.rejected_429 += 1
            await r.aread()
            wait = float(r.headers.get("retry-after", "1"))
            await asyncio.sleep(max(0.0, min(wait, end - time.time())))
            return
        if r.status_code != 200:
            res.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                res.completed += 1
                res.tokens += tokens
                res.jct_s.append(time.perf_counter() - t0)
                if ttft is not None:
                    res.ttft_s.append(ttft)
                return
            chunk = json.loads(data)
            if "error" in chunk:
                res.errors.append(f"error chunk: {chunk['error']['message'][:200]}")
                return
            if chunk["choices"] and chunk["choices"][0].get("text"):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    res.errors.append("the stream ended without [DONE]")


async def run_load(
    base_url: str,
    clients: int = 64,
    duration_s: float = 60.0,
    max_tokens: int = 16,
    seed: int = 0,
    api_key: str | None = None,
    request_timeout_s: float = 120.0,
) -> LoadResult:
    """Run the load; every request is bounded by `request_timeout_s`, the whole run by
    `duration_s` plus the last requests' completion."""
    import httpx

    res = LoadResult(clients=clients, duration_s=duration_s)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{base_url}/v1/completions"
    start = time.time()
    end = start + duration_s

    async def client_loop(k: int, client) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.time() < end:
            body = {
                "prompt": rng.choice(PROMPTS),
                "max_tokens": rng.randint(4, max_tokens),
                "temperature": 0.8,
                "seed": rng.randrange(1 << 30),
                "stream": True,
            }
            try:
                await _one(client, url, body, res, end)
            except Exception as e:  # transport errors, timeouts: errors, never a hang
                res.errors.append(f"{type(e).__name__}: {e}"[:200])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        timeout=request_timeout_s, limits=limits, headers=headers
    ) as client:
        await asyncio.gather(*(client_loop(k, client) for k in range(clients)))
    res.wall_s = time.time() - start
    return res


def run(
    model: str,
    out: Path,
    clients: int,
    duration_s: float,
    codec: str = "bf16",
    device: str | None = None,
    port: int = 0,
    max_queued_jobs: int = 32,
) -> dict:
    """`zipserve bench load`: start a server, load it, write `load_<device>.json` to `out`."""
    from zipserve.control.config import ServeConfig
    from zipserve.deploy.serve import running_server
    from zipserve.router.limits import AdmissionConfig

    cfg = ServeConfig(model=model, codec=codec, device=device)
    limits = AdmissionConfig(max_queued_jobs=max_queued_jobs)
    with running_server(cfg, "127.0.0.1", port, limits=limits) as (base, backend):
        res = asyncio.run(run_load(base, clients, duration_s))
        summary = dict(
            res.summary(),
            codec=codec,
            device=backend.device,
            model=model,
            max_queued_jobs=max_queued_jobs,
        )
        summary["workers_after"] = backend.health()["workers"]
    print(res.line())
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"load_{'gpu' if 'cuda' in str(summary['device']) else 'cpu'}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path}")
    return summary
