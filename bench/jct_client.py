"""`zipserve bench jct --url`: replay a workload against a running deployment over HTTP.

Each request is sent at its arrival offset as a streaming /v1/completions call with the prompt
as token ids, `max_tokens = min_tokens = output tokens` and `ignore_eos`, so it produces exactly
the workload's output length. The client records, on its own clock (`time.time()`, the same
clock the router stamps jobs with when both run on one host):

- send: just before the request goes out; TTFT: the first token's chunk (the server sends one
  per token, with empty text while a character is incomplete or without a tokenizer); time
  between tokens: gaps between token chunks; JCT: `data: [DONE]` received - send.
- afterwards, the job's phases from GET /v1/jobs/{id} (queue, prefill, transfer, decode_queue,
  decode, on the server's clocks), and what the phases do not cover: `http_in_ms` (send ->
  router arrival stamp) and `tail_ms` (end of the last phase -> [DONE] at the client); the KV
  bytes sent, and the prefix caches' share: prompt tokens not computed (`cached_tokens`), prompt
  tokens the decode side held (`kv_cached_tokens`) and the KV bytes it was therefore not sent.

A conversation workload (bench/conversations.py) is replayed by bench/jct_conversations.py with
the same request and the same records, one per turn.

The replay is bounded by `max_requests` and `max_seconds`: requests due after the deadline are
not sent and those still running at it are cancelled (status "cut"; the router then aborts them).
Only loopback or an address of this machine (a deployment running here) is accepted unless
`allow_remote` is set.
"""

from __future__ import annotations

import asyncio
import csv
import ipaddress
import json
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from zipserve.bench.conversations import ConversationWorkload
from zipserve.bench.workloads import Workload, WorkloadRequest
from zipserve.router.jobs import percentile

PHASES = ("queue", "prefill", "transfer", "decode_queue", "decode")
JOB_ID_HEADER = "x-zipserve-job-id"


@dataclass
class RequestResult:
    """One replayed request: client-side timings, then the server's phases (ms)."""

    index: int
    scheduled_s: float
    prompt_tokens: int
    output_tokens: int
    status: str = "not_sent"
    """ok, error (HTTP or stream error), cut (still running at the deadline), not_sent."""
    error: str = ""
    job_id: str = ""
    send_time: float = float("nan")
    """time.time() when sent."""
    lag_ms: float = float("nan")
    """How late the client sent it against its schedule (client overload shows here)."""
    ttft_ms: float = float("nan")
    tbt_mean_ms: float = float("nan")
    tbt_p99_ms: float = float("nan")
    jct_ms: float = float("nan")
    chunks: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    server_jct_ms: float = float("nan")
    """Router's finish - router's arrival."""
    queue_ms: float = float("nan")
    prefill_ms: float = float("nan")
    transfer_ms: float = float("nan")
    decode_queue_ms: float = float("nan")
    decode_ms: float = float("nan")
    phase_sum_ms: float = float("nan")
    http_in_ms: float = float("nan")
    """Router arrival stamp - client send."""
    tail_ms: float = float("nan")
    """Client [DONE] - end of the last phase."""
    wait_ms: float = float("nan")
    """queue + transfer + decode_queue: time spent waiting for the prefill worker, the link and
    a decode slot (the part that grows without bound when a rate is not sustained)."""
    kv_bytes: float = float("nan")
    """KV bytes the prefill worker sent for this request (the codec's wire form)."""
    transfer_start_s: float = float("nan")
    """Router's time.time() when the transfer phase began (link busy while transferring)."""
    transfer_sending_ms: float = float("nan")
    """The part of the transfer phase until the prefill side handed over the last layer (the
    link and the sender); the rest is the decode side receiving and importing."""
    cached_tokens: float = float("nan")
    """Prompt tokens whose KV the prefill side took from its prefix cache (not computed)."""
    kv_cached_tokens: float = float("nan")
    """Prompt tokens whose KV the decode side held already (not sent)."""
    kv_bytes_not_sent: float = float("nan")
    """KV bytes not sent because the decode side held those pages."""
    local_prefill: bool = False
    """The decode side computed the prompt's uncached rest itself (nothing was sent)."""
    conversation: int = -1
    """A conversation workload: the conversation (else -1)."""
    turn: int = -1
    """A conversation workload: the turn, from 0 (else -1)."""
    _token_times: list[float] = field(default_factory=list, repr=False)
    _token_ids: list[int] = field(default_factory=list, repr=False)
    _done_time: float = float("nan")

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


CSV_FIELDS = [f.name for f in fields(RequestResult) if not f.name.startswith("_")]


def check_url(url: str, allow_remote: bool = False) -> str:
    """The base URL without a trailing slash; ValueError unless its host is loopback or an
    address of this machine (or allow_remote)."""
    import httpx

    try:
        u = httpx.URL(url)
    except Exception as e:
        raise ValueError(f"url: cannot parse {url!r}: {e}") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError(f"url: need http(s)://host:port, got {url!r}")
    if not allow_remote:
        try:
            addrs = {a[4][0] for a in socket.getaddrinfo(u.host, None)}
        except socket.gaierror as e:
            raise ValueError(f"url: cannot resolve {u.host!r}: {e}") from None
        for a in addrs:
            if not (ipaddress.ip_address(a.split("%")[0]).is_loopback or _is_local(a)):
                raise ValueError(
                    f"url: {u.host} ({a}) is neither loopback nor an address of "
                    f"this machine; benchmarks only load a deployment of ours "
                    f"(pass --allow-remote if that host is one)"
                )
    return str(url).rstrip("/")


def _is_local(addr: str) -> bool:
    """True when this machine can bind `addr` (it is one of its own addresses)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


async def send_one(
    client, base: str, req: WorkloadRequest, t0: float, res: RequestResult, codec: str | None
) -> None:
    """Send one request at its arrival offset and time it; the generated token ids (when the
    server returns them: one without a tokenizer) land in res._token_ids."""
    body = {
        "prompt": req.prompt_ids,
        "max_tokens": req.output_tokens,
        "min_tokens": req.output_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if codec:
        body["codec"] = codec
    payload = json.dumps(body).encode()  # encoded before the clock starts: client-side work
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.time()))
    res.send_time = time.time()
    res.lag_ms = 1e3 * (res.send_time - t0 - req.arrival_s)
    res.status = "cut"  # until it completes
    async with client.stream(
        "POST",
        f"{base}/v1/completions",
        content=payload,
        headers={"Content-Type": "application/json"},
    ) as r:
        res.job_id = r.headers.get(JOB_ID_HEADER, "")
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            res.status, res.error = "error", f"HTTP {r.status_code}: {text[:300]}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            now = time.time()
            if line == "data: [DONE]":
                res._done_time = now
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                res.status, res.error = "error", str(chunk["error"].get("message"))[:300]
                return
            if chunk.get("usage"):
                res.completion_tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                if "text" in c and c.get("finish_reason") is None:  # one per token, text or not
                    res._token_times.append(now)
                res._token_ids.extend(c.get("token_ids") or [])
                if c.get("finish_reason"):
                    res.finish_reason = c["finish_reason"]
    if res._done_time != res._done_time:  # NaN: the stream ended without [DONE]
        res.status, res.error = "error", "stream ended without [DONE]"
        return
    res.status = "ok"
    tt = res._token_times
    res.chunks = len(tt)
    res.jct_ms = 1e3 * (res._done_time - res.send_time)
    if tt:
        res.ttft_ms = 1e3 * (tt[0] - res.send_time)
        gaps = sorted(1e3 * (b - a) for a, b in zip(tt, tt[1:]))
        if gaps:
            res.tbt_mean_ms = sum(gaps) / len(gaps)
            res.tbt_p99_ms = percentile(gaps, 99)


def add_job_view(res: RequestResult, job: dict) -> None:
    """Fill the server-side columns from a /v1/jobs/{id} view."""
    phases = {p["name"]: p for p in job.get("phases", []) if p.get("duration") is not None}
    for name in PHASES:
        if name in phases:
            setattr(res, f"{name}_ms", 1e3 * phases[name]["duration"])
    if job.get("jct") is not None:
        res.server_jct_ms = 1e3 * job["jct"]
    for key in ("kv_bytes", "cached_tokens", "kv_cached_tokens", "kv_bytes_not_sent"):
        if job.get(key) is not None:
            setattr(res, key, float(job[key]))
    res.local_prefill = bool(job.get("local_prefill"))
    if "transfer" in phases:
        res.transfer_start_s = phases["transfer"]["start"]
        if job.get("kv_sent_end") is not None:  # layers that left during prefill count 0
            t = phases["transfer"]
            res.transfer_sending_ms = 1e3 * min(
                max(0.0, job["kv_sent_end"] - t["start"]), t["duration"]
            )
    if phases:
        res.phase_sum_ms = 1e3 * sum(p["duration"] for p in phases.values())
        res.wait_ms = sum(
            1e3 * phases[n]["duration"]
            for n in ("queue", "transfer", "decode_queue")
            if n in phases
        )
        if res.send_time == res.send_time:
            res.http_in_ms = 1e3 * (job["arrival"] - res.send_time)
        if res._done_time == res._done_time:
            res.tail_ms = 1e3 * (res._done_time - max(p["end"] for p in phases.values()))


async def replay_async(
    base: str,
    workload: Workload,
    *,
    max_requests: int | None = None,
    max_seconds: float = 600.0,
    codec: str | None = None,
    api_key: str | None = None,
    progress: bool = True,
) -> list[RequestResult]:
    import httpx
    from tqdm import tqdm

    reqs = workload.requests[:max_requests] if max_requests else workload.requests
    results = [RequestResult(r.index, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in reqs]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=64)
    timeout = httpx.Timeout(max_seconds + 30.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        workload.check_fits(await served_max_len(client, base))
        bar = tqdm(
            total=len(reqs), desc=workload.name, unit="req", disable=not progress, leave=False
        )
        t0 = time.time() + 0.05
        deadline = t0 + max_seconds

        async def guarded(req: WorkloadRequest, res: RequestResult) -> None:
            try:
                if req.arrival_s > max_seconds:
                    return  # due after the deadline: not sent
                await send_one(client, base, req, t0, res, codec)
            except httpx.HTTPError as e:
                res.status, res.error = "error", f"{type(e).__name__}: {e}"[:300]
            finally:
                bar.update(1)

        tasks = [asyncio.create_task(guarded(q, s)) for q, s in zip(reqs, results)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.time()))
        for t in pending:  # still running at the deadline: cut (the router aborts them)
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
        await add_job_views(client, base, results)
    return results


async def served_max_len(client, base: str) -> int:
    """The deployment's context length (GET /v1/models); ValueError when none answers."""
    import httpx

    try:
        r = await client.get(f"{base}/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["max_model_len"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"url: no zipserve deployment answers at {base} ({type(e).__name__}: {e})"
        ) from None


async def add_job_views(client, base: str, results: list[RequestResult]) -> None:
    """The server-side columns of every sent request, from GET /v1/jobs/{id}."""
    for res in results:
        if res.job_id:
            j = await client.get(f"{base}/v1/jobs/{res.job_id}")
            if j.status_code == 200:
                add_job_view(res, j.json())


def replay(base: str, workload: Workload | ConversationWorkload, **kw) -> list[RequestResult]:
    """Replay a workload (a conversation workload: bench/jct_conversations.py)."""
    if isinstance(workload, ConversationWorkload):
        from zipserve.bench.jct_conversations import replay_conversations_async

        return asyncio.run(replay_conversations_async(base, workload, **kw))
    return asyncio.run(replay_async(base, workload, **kw))


def _stats(values: list[float]) -> tuple[float, float, float]:
    v = sorted(x for x in values if x == x)
    if not v:
        return float("nan"), float("nan"), float("nan")
    return sum(v) / len(v), percentile(v, 50), percentile(v, 99)


def queue_growing(results: list[RequestResult]) -> bool:
    """True when waiting grows over the run: the mean wait (queue + transfer + decode_queue) or
    the mean JCT of the last quarter of the requests (in arrival order) exceeds 1.5x that of
    the second quarter plus 50 ms. The first quarter is left out as warm-up."""
    ok = [r for r in sorted(results, key=lambda r: r.scheduled_s) if r.status == "ok"]
    if len(ok) < 8:
        return False  # too few to tell; failures are judged by the caller
    q = len(ok) // 4
    second, last = ok[q : 2 * q], ok[-q:]
    for key in ("wait_ms", "jct_ms"):
        a = [getattr(r, key) for r in second if getattr(r, key) == getattr(r, key)]
        b = [getattr(r, key) for r in last if getattr(r, key) == getattr(r, key)]
        if a and b and sum(b) / len(b) > 1.5 * sum(a) / len(a) + 50.0:
            return True
    return False


def summarize(results: list[RequestResult]) -> dict:
    """Per-run summary: counts, mean/p50/p99 JCT and TTFT (ms, ok requests), mean phases,
    and `sustained`: every sent request finished ok and the queue did not grow."""
    ok = [r for r in results if r.status == "ok"]
    sent = [r for r in results if r.status != "not_sent"]
    jct = _stats([r.jct_ms for r in ok])
    ttft = _stats([r.ttft_ms for r in ok])
    tbt = _stats([r.tbt_mean_ms for r in ok])
    out = {
        "requests": len(results),
        "sent": len(sent),
        "ok": len(ok),
        "errors": sum(r.status == "error" for r in results),
        "cut": sum(r.status == "cut" for r in results),
        "jct_mean_ms": jct[0],
        "jct_p50_ms": jct[1],
        "jct_p99_ms": jct[2],
        "ttft_mean_ms": ttft[0],
        "ttft_p50_ms": ttft[1],
        "ttft_p99_ms": ttft[2],
        "tbt_mean_ms": tbt[0],
    }
    for name in PHASES + ("wait", "http_in", "tail"):
        out[f"{name}_mean_ms"] = _stats([getattr(r, f"{name}_ms") for r in ok])[0]
    out["unaccounted_max_ms"] = max(
        (abs(r.jct_ms - r.phase_sum_ms) for r in ok if r.phase_sum_ms == r.phase_sum_ms),
        default=float("nan"),
    )
    out["queue_growing"] = queue_growing(results)
    out["sustained"] = bool(ok) and len(ok) == len(sent) and not out["queue_growing"]
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def print_summary(title: str, s: dict) -> None:
    print(
        f"{title}: {s['ok']}/{s['sent']} ok ({s['errors']} errors, {s['cut']} cut); "
        f"JCT mean {s['jct_mean_ms']:.1f} p50 {s['jct_p50_ms']:.1f} p99 {s['jct_p99_ms']:.1f} "
        f"ms; TTFT mean {s['ttft_mean_ms']:.1f} p50 {s['ttft_p50_ms']:.1f} p99 "
        f"{s['ttft_p99_ms']:.1f} ms; {'sustained' if s['sustained'] else 'NOT sustained'}"
    )


def run(
    base: str,
    workload: Workload | ConversationWorkload,
    out_csv: Path,
    *,
    allow_remote: bool = False,
    **kw,
) -> tuple[list[RequestResult], dict]:
    """Replay against `base`, write one CSV row per request to `out_csv`, print the summary."""
    base = check_url(base, allow_remote)
    results = replay(base, workload, **kw)
    write_csv(out_csv, [r.row() for r in results])
    s = summarize(results)
    print_summary(f"{workload.name} against {base}", s)
    print(f"wrote {out_csv}")
    return results, s
