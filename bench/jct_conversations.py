"""Replay a conversation workload (bench/conversations.py) against a running deployment, and
summarize it per turn.

Each conversation starts at its arrival offset and sends its turns one after another: turn n+1
goes out as soon as turn n's `[DONE]` arrived, its prompt the previous prompt + the answer's
token ids + the new user text (several conversations run at once). Every turn is one streaming
/v1/completions request timed exactly as bench/jct_client.py times any request (same
`RequestResult`, with `conversation` and `turn` set). The answer's token ids come back in the
chunks' `token_ids`, which a server sends when it runs without a tokenizer (`--skip-tokenizer`;
the sweep starts it so for this workload): against a server with a tokenizer the first turn
fails naming that. A turn that fails ends its conversation (later turns are not sent); at
`max_seconds` whatever still runs is cut.

`summarize_turns` gives, per turn index over all conversations: mean JCT and TTFT, prompt tokens,
prompt tokens the prefill side took from its prefix cache, prompt tokens the decode side held,
KV bytes sent and KV bytes not sent.
"""

from __future__ import annotations

import asyncio
import time

from zipserve.bench.conversations import Conversation, ConversationWorkload
from zipserve.bench.jct_client import (
    RequestResult,
    add_job_views,
    send_one,
    served_max_len,
)
from zipserve.bench.workloads import WorkloadRequest


def _records(workload: ConversationWorkload, limit: int | None) -> list[list[RequestResult]]:
    """One not-yet-sent record per turn, numbered in conversation order."""
    out, index = [], 0
    for conv in workload.conversations[:limit] if limit else workload.conversations:
        recs = []
        for k, turn in enumerate(conv.turns):
            recs.append(
                RequestResult(
                    index,
                    conv.arrival_s,
                    0,
                    turn.output_tokens,
                    conversation=conv.index,
                    turn=k,
                )
            )
            index += 1
        out.append(recs)
    return out


async def _conversation(
    client, base: str, conv: Conversation, recs: list[RequestResult], t0: float, codec, bar
) -> None:
    import httpx

    history: list[int] = []
    await asyncio.sleep(max(0.0, t0 + conv.arrival_s - time.time()))
    for turn, res in zip(conv.turns, recs):
        prompt = history + turn.user_ids
        res.prompt_tokens = len(prompt)
        res.scheduled_s = max(0.0, time.time() - t0)  # sent as soon as the last answer is in
        req = WorkloadRequest(res.index, res.scheduled_s, prompt, turn.output_tokens)
        try:
            await send_one(client, base, req, t0, res, codec)
        except httpx.HTTPError as e:
            res.status, res.error = "error", f"{type(e).__name__}: {e}"[:300]
        finally:
            bar.update(1)
        if res.status != "ok":
            return
        if len(res._token_ids) != turn.output_tokens:
            res.status, res.error = (
                "error",
                f"the server returned {len(res._token_ids)} token ids for "
                f"{turn.output_tokens} tokens: a conversation's next prompt needs the answer's "
                f"token ids (serve with --skip-tokenizer)",
            )
            return
        history = prompt + res._token_ids


async def replay_conversations_async(
    base: str,
    workload: ConversationWorkload,
    *,
    max_requests: int | None = None,
    max_seconds: float = 600.0,
    codec: str | None = None,
    api_key: str | None = None,
    progress: bool = True,
    transport=None,
) -> list[RequestResult]:
    """max_requests: at most this many conversations; transport: httpx's (tests pass an app's
    ASGITransport)."""
    import httpx
    from tqdm import tqdm

    per_conv = _records(workload, max_requests)
    results = [r for recs in per_conv for r in recs]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(per_conv) + 8, max_keepalive_connections=64)
    timeout = httpx.Timeout(max_seconds + 30.0, connect=30.0)
    async with httpx.AsyncClient(
        limits=limits, timeout=timeout, headers=headers, transport=transport
    ) as client:
        workload.check_fits(await served_max_len(client, base))
        bar = tqdm(
            total=len(results), desc=workload.name, unit="turn", disable=not progress, leave=False
        )
        t0 = time.time() + 0.05
        tasks = [
            asyncio.create_task(_conversation(client, base, conv, recs, t0, codec, bar))
            for conv, recs in zip(workload.conversations, per_conv)
            if conv.arrival_s <= max_seconds  # due after the deadline: not sent
        ]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + max_seconds - time.time()))
        for t in pending:  # still running at the deadline: cut (the router aborts them)
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        bar.close()
        await add_job_views(client, base, results)
    return results


def _mean(values: list[float]) -> float:
    v = [x for x in values if x == x]
    return sum(v) / len(v) if v else float("nan")


def summarize_turns(results: list[RequestResult]) -> list[dict]:
    """Per turn index (completed requests only): how many, mean JCT / TTFT (ms), mean prompt
    tokens, cached tokens (prefill side), tokens held by the decode side, KV bytes sent and not
    sent, how many the decode side prefilled itself, and the turn's hit rate (cached / prompt
    tokens over its requests)."""
    ok = [r for r in results if r.status == "ok" and r.turn >= 0]
    rows = []
    for turn in sorted({r.turn for r in ok}):
        rs = [r for r in ok if r.turn == turn]
        prompt = sum(r.prompt_tokens for r in rs)
        cached = [r.cached_tokens for r in rs if r.cached_tokens == r.cached_tokens]
        rows.append(
            {
                "turn": turn,
                "requests": len(rs),
                "jct_mean_ms": _mean([r.jct_ms for r in rs]),
                "ttft_mean_ms": _mean([r.ttft_ms for r in rs]),
                "prompt_tokens_mean": prompt / len(rs),
                "cached_tokens_mean": _mean([r.cached_tokens for r in rs]),
                "kv_cached_tokens_mean": _mean([r.kv_cached_tokens for r in rs]),
                "kv_bytes_mean": _mean([r.kv_bytes for r in rs]),
                "kv_bytes_not_sent_mean": _mean([r.kv_bytes_not_sent for r in rs]),
                "local_prefills": sum(r.local_prefill for r in rs),
                "hit_rate": sum(cached) / prompt if cached and prompt else float("nan"),
            }
        )
    return rows


def print_turns(title: str, rows: list[dict]) -> None:
    print(f"{title}: per turn")
    print("  turn   n   JCT ms  TTFT ms  prompt  cached  held  KV sent B  KV not sent B  local")
    for r in rows:
        print(
            f"  {r['turn']:>4} {r['requests']:>3} {r['jct_mean_ms']:>8.0f} "
            f"{r['ttft_mean_ms']:>8.0f} {r['prompt_tokens_mean']:>7.0f} "
            f"{r['cached_tokens_mean']:>7.0f} {r['kv_cached_tokens_mean']:>5.0f} "
            f"{r['kv_bytes_mean']:>10.0f} {r['kv_bytes_not_sent_mean']:>14.0f} "
            f"{r['local_prefills']:>6}"
        )
