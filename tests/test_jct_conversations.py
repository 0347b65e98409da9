"""The prefix-caching workloads of `bench jct` (bench/conversations.py, bench/workloads.py
shared-prefix, bench/jct_conversations.py): multi-turn conversations are seeded and bounded, each
turn's prompt is the previous prompt + the server's answer + new text and is sent only after that
answer, a server that returns no token ids is named as the cause, per-turn summaries add up; a
short CPU sweep over the reference model shows cached tokens and KV bytes not sent from the
second turn on, and none with `prefix_caching=false`."""

from __future__ import annotations

import asyncio
import csv

import httpx
import pytest
from fake_backend import FakeBackend

from zipserve.bench import conversations, workloads
from zipserve.bench.jct_conversations import replay_conversations_async, summarize_turns
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.router.app import create_app


def test_multiturn_is_seeded_bounded_and_rate_independent():
    a = conversations.multiturn(1.0, 30, seed=2, scale=0.5)
    b = conversations.multiturn(4.0, 30, seed=2, scale=0.5)
    c = conversations.multiturn(1.0, 30, seed=3, scale=0.5)
    assert [cv.turns for cv in a.conversations] == [cv.turns for cv in b.conversations]
    assert [cv.turns for cv in a.conversations] != [cv.turns for cv in c.conversations]
    assert b.duration_s < a.duration_s and a.conversations[0].arrival_s == 0.0
    counts = [len(cv.turns) for cv in a.conversations]
    assert min(counts) >= 4 and max(counts) <= 8 and len(set(counts)) > 1
    assert a.num_requests == sum(counts)
    for cv in a.conversations:
        first, later = cv.turns[0], cv.turns[1:]
        assert 32 <= len(first.user_ids) <= 1024 and all(4 <= len(t.user_ids) for t in later)
        assert all(8 <= t.output_tokens <= 512 for t in cv.turns)
        assert all(3 <= i < 8000 for t in cv.turns for i in t.user_ids)
    worst = max(cv.total_tokens for cv in a.conversations)
    a.check_fits(worst)
    with pytest.raises(ValueError, match="smaller --scale"):
        a.check_fits(worst - 1)
    built = workloads.build("multiturn", rate=1.0, num_requests=30, seed=2, scale=0.5, vocab=8192)
    assert built == a
    for bad, match in (({"rate": 0}, "rate"), ({"scale": 1.5}, "scale")):
        kw = {"rate": 1.0, "scale": 0.5, **bad}
        with pytest.raises(ValueError, match=match):
            conversations.multiturn(kw.pop("rate"), 3, **kw)
    with pytest.raises(ValueError, match="conversation shape"):
        workloads.poisson("multiturn", 1.0, 3)


def test_shared_prefix_prompts_start_with_one_long_prefix():
    w = workloads.poisson("shared-prefix", 2.0, 40, seed=1, scale=0.1, vocab=8192)
    n = round(workloads.SHARED_PREFIX_TOKENS * 0.1)
    prefix = w.requests[0].prompt_ids[:n]
    assert all(r.prompt_ids[:n] == prefix for r in w.requests)
    suffixes = [tuple(r.prompt_ids[n:]) for r in w.requests]
    assert len(set(suffixes)) == len(suffixes) and all(len(s) >= 2 for s in suffixes)
    other = workloads.poisson("shared-prefix", 2.0, 40, seed=2, scale=0.1, vocab=8192)
    assert other.requests[0].prompt_ids[:n] != prefix  # the prefix follows the seed


def _replay(backend: FakeBackend, wl, **kw):
    app = create_app(backend)
    return asyncio.run(
        replay_conversations_async(
            "http://router", wl, transport=httpx.ASGITransport(app=app), progress=False, **kw
        )
    )


def test_each_turn_sends_the_history_with_the_servers_answer():
    backend = FakeBackend(has_tokenizer=False, max_model_len=4096, token_delay=0.0)
    wl = conversations.multiturn(50.0, 3, seed=0, scale=0.1, vocab=backend.vocab_size)
    results = _replay(backend, wl)
    assert len(results) == wl.num_requests and all(r.status == "ok" for r in results)
    by_id = {j.id: j for j in backend.jobs}
    for conv in wl.conversations:
        recs = [r for r in results if r.conversation == conv.index]
        assert [r.turn for r in recs] == list(range(len(conv.turns)))
        history: list[int] = []
        for turn, rec in zip(conv.turns, recs):
            job = by_id[rec.job_id]
            assert job.prompt_ids == history + turn.user_ids
            assert rec.prompt_tokens == len(job.prompt_ids)
            assert rec.completion_tokens == turn.output_tokens == len(rec._token_ids)
            history = job.prompt_ids + rec._token_ids
        # turn n+1 left only once turn n's answer was complete
        assert all(b.send_time >= a.send_time + a.jct_ms / 1e3 for a, b in zip(recs, recs[1:]))
    rows = summarize_turns(results)
    assert [r["turn"] for r in rows] == list(range(max(len(c.turns) for c in wl.conversations)))
    assert sum(r["requests"] for r in rows) == len(results)
    first = rows[0]
    assert first["prompt_tokens_mean"] == pytest.approx(
        sum(len(c.turns[0].user_ids) for c in wl.conversations) / 3
    )


def test_a_server_with_a_tokenizer_is_named_and_the_conversation_stops():
    backend = FakeBackend(has_tokenizer=True, max_model_len=4096, token_delay=0.0)
    wl = conversations.multiturn(50.0, 2, seed=0, scale=0.1, vocab=backend.vocab_size)
    results = _replay(backend, wl)
    firsts = [r for r in results if r.turn == 0]
    assert all(r.status == "error" and "--skip-tokenizer" in r.error for r in firsts)
    assert all(r.status == "not_sent" for r in results if r.turn > 0)
    assert len(backend.jobs) == 2


@pytest.mark.slow
@pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)
@pytest.mark.parametrize("caching,local", [(True, 0), (False, 0), (True, 2048)])
def test_multiturn_sweep_reports_cache_hits_per_turn(tmp_path, caching, local):
    """The serving stack end to end (Ray, HTTP): with caching, later turns reuse the prefill
    worker's cache and send the decode worker only what it lacks (local 0), or the decode worker
    computes the rest itself and nothing is sent (local 2048); without, nothing is cached."""
    pytest.importorskip("ray")
    from zipserve.bench import jct_sweep

    cfg = jct_sweep.SweepConfig(
        model=str(REFERENCE_MODEL),
        codecs=("hack2",),
        links=(None,),
        rates=(2.0,),
        workload="multiturn",
        num_requests=2,
        seed=0,
        scale=0.2,
        max_seconds=90,
        device="cpu",
        engine_options={} if caching else {"prefix_caching": False},
        decode_kv=("dense",),
        local_prefill_tokens=local,
    )
    jct_sweep.run(cfg, tmp_path)
    with open(tmp_path / "jct_turns.csv") as f:
        turns = list(csv.DictReader(f))
    with open(tmp_path / "jct_requests.csv") as f:
        reqs = list(csv.DictReader(f))
    assert reqs and all(r["status"] == "ok" for r in reqs)
    assert {r["prefix_caching"] for r in turns} == {"on" if caching else "off"}
    assert {r["local_prefill_tokens"] for r in reqs} == {str(local)}
    later = [r for r in reqs if int(r["turn"]) > 0]
    for r in later:
        cached, held, not_sent, sent = (
            float(r[k])
            for k in ("cached_tokens", "kv_cached_tokens", "kv_bytes_not_sent", "kv_bytes")
        )
        if not caching:
            assert cached == held == not_sent == 0 and r["local_prefill"] == "False", r
        elif local and held:
            assert r["local_prefill"] == "True" and sent == 0 and cached == held, r
        else:
            assert cached > 0 and held > 0 and not_sent > 0 and r["local_prefill"] == "False", r
    if local:
        assert any(r["local_prefill"] == "True" for r in later)
    assert float(turns[0]["cached_tokens_mean"]) == 0


def _fake_sweep(d, caching: str, jct: float, sent: float) -> None:
    import json

    from zipserve.bench.jct_client import write_csv

    conf = {"codec": "hack2", "decode_kv": "dense", "link_gbps": "none", "rate": 1.0}
    conf["prefix_caching"] = caching
    hit = caching == "on"
    reqs = [
        {
            **conf,
            "status": "ok",
            "turn": t,
            "prompt_tokens": 100 * (t + 1),
            "jct_ms": jct,
            "ttft_ms": 10.0,
            "kv_bytes": sent,
            "kv_bytes_not_sent": 3000.0 * t if hit else 0.0,
            "cached_tokens": 64.0 * t if hit else 0.0,
            "kv_cached_tokens": 64.0 * t if hit else 0.0,
        }
        for t in range(2)
    ]
    write_csv(d / "jct_requests.csv", reqs)
    write_csv(d / "jct_turns.csv", [{**conf, "turn": 0, "requests": 1, "jct_mean_ms": jct}])
    meta = {"device": "CPU (x86_64)", "date_utc": "now", "model": "m", "command": f"cmd {caching}"}
    config = {"workload": "multiturn", "seed": 7}
    (d / "jct_meta.json").write_text(json.dumps({**meta, "config": config}))


def test_cache_report_writes_one_block_and_bench_report_keeps_it(tmp_path):
    from zipserve.bench import cache_report

    on, off = tmp_path / "on", tmp_path / "off"
    on.mkdir(), off.mkdir()
    _fake_sweep(on, "on", 50.0, 1000.0)
    _fake_sweep(off, "off", 100.0, 2000.0)
    page = tmp_path / "JCT_RESULTS.md"
    page.write_text("# JCT benchmark results\n\nsome generated section\n")
    for _ in range(2):  # a second write replaces the block
        cache_report.write([on, off], page)
    text = page.read_text()
    assert text.count(cache_report.BEGIN) == 1 and text.startswith("# JCT benchmark results")
    assert "cmd on\ncmd off" in text
    row = next(
        line for line in text.splitlines() if line.startswith("| hack2/dense | on | 1 | 2/2")
    )
    cells = [c.strip() for c in row.split("|")]
    # mean JCT 50 vs 100 with caching off (TTFT 10 vs 10); 2 KB sent, 3 KB not sent; 64 of
    # 300 prompt tokens cached on the prefill side and held on the decode side; none local
    assert cells[5:13] == ["50", "10", "0.50x / 1.00x", "2", "3", "21.3%", "64 of 300", "0"]
    assert "| hack2/dense | on | 1 | 7 | 2/2 | 50 |" in text  # the seed's own row
    turn1 = next(
        line for line in text.splitlines() if line.startswith("| hack2/dense | on | 1 | 1 |")
    )
    assert [c.strip() for c in turn1.split("|")][5:13] == [
        "1", "50", "10", "200", "64", "64", "1", "3"
    ]  # fmt: skip
    block = cache_report.kept_block(page)
    assert block.startswith(cache_report.BEGIN) and block.endswith(cache_report.END)
    from zipserve.bench import jct_report
    from zipserve.bench.jct_sweep import PACKAGE_ROOT

    jct_report.write([PACKAGE_ROOT / "bench" / "results" / "jct_cpu"], page)  # regenerated
    text = page.read_text()
    assert "some generated section" not in text and "## CPU" in text
    assert text.count(cache_report.BEGIN) == 1 and cache_report.kept_block(page) == block
    with pytest.raises(ValueError, match="jct_requests.csv is missing"):
        cache_report.write([tmp_path], page)
