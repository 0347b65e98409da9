"""Automatic prefix caching (engine/prefix_cache.py, engine/page_pool.py): cached pages are
reference-counted and evicted least recently released first; with caching on, bf16's greedy
tokens and logprobs equal caching off, and every codec's equal caching off prefilled in chunks at
the cached boundary (the suffix reads the prefix in the codec's form, sinks restored); only the
uncached suffix is computed; a page being written is never handed out; eviction under pressure
and aborts while a page is shared leave every page back in the pool."""

from __future__ import annotations

import pytest
import torch

from zipserve.compress.codecs import codec_names
from zipserve.deploy.engine_options import parse_engine_options
from zipserve.engine.config import ConfigError, EngineConfig
from zipserve.engine.decode_kv import check_decode_kv
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.engine.page_pool import PagePool
from zipserve.engine.prefix_cache import page_hash

P = 32  # the smallest page every codec takes (kivi: multiple of 32)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def _llm(codec: str = "bf16", **kw) -> LLM:
    kw.setdefault("num_pages", 64)
    return LLM("random:tiny", device="cpu", page_size=P, codec=codec, **kw)


def _whole(llm: LLM) -> None:
    """Every page back in the pool, no references left, every slot free, nothing running."""
    eng = llm.engine
    pool = eng.pool
    assert pool.num_free == pool.capacity and pool.num_used == 0, pool.owners()
    assert all(pool.refcount(p) == 0 for p in range(pool.num_pages))
    assert len(eng.scheduler.free_slots) == eng.engine_config.max_num_seqs
    assert not eng.has_unfinished()


def _count_prefill(llm: LLM) -> list[int]:
    """Tokens each prefill step computes, appended to the returned list."""
    runner, computed = llm.engine.runner, []
    inner = runner.prefill

    def counting(seqs, all_logits=False, on_layer_done=None, ends=None):
        stop = ends if ends is not None else [s.num_tokens for s in seqs]
        computed.append(sum(e - s.num_cached for s, e in zip(seqs, stop)))
        return inner(seqs, all_logits=all_logits, on_layer_done=on_layer_done, ends=ends)

    runner.prefill = counting
    return computed


def _tokens(outs):
    return [o.token_ids for o in outs]


def _assert_same(got, want):
    assert _tokens(got) == _tokens(want)
    for a, b in zip(got, want):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


# ---------------------------------------------------------------- page pool and hashes


def test_pool_refcounts_and_evicts_least_recently_released_first():
    pool = PagePool(6)  # 5 usable
    evicted = []
    pool.on_evict = evicted.append
    a = pool.allocate(2, owner=1)
    b = pool.allocate(2, owner=2)
    with pytest.raises(RuntimeError, match="no cached prefix"):
        pool.share(a, owner=3)  # not cached: private to its writer
    for p in a + b:
        pool.mark_cached(p)
    pool.share(a, owner=3)
    assert [pool.refcount(p) for p in a] == [2, 2] and pool.num_used == 4
    pool.free(a[::-1], owner=1)
    assert pool.num_free == 1 and pool.num_cached_free == 0  # still held by 3
    pool.free(b[::-1], owner=2)  # b[1] then b[0] become reusable
    pool.free(a[::-1], owner=3)  # then a[1], a[0]
    assert pool.num_free == pool.capacity and pool.num_cached_free == 4 and pool.num_used == 0
    pool.share([a[0]], owner=4)  # a reusable page taken back out of the eviction order
    got = pool.allocate(4, owner=5)  # the empty page, then b[1], b[0], a[1]
    assert evicted == [b[1], b[0], a[1]] and sorted(got[1:]) == sorted(evicted)
    assert not any(pool.is_cached(p) for p in evicted) and pool.is_cached(a[0])
    assert pool.allocate(1, owner=6) is None  # a[0] is held: nothing left
    with pytest.raises(RuntimeError, match="freed by sequence 6"):
        pool.free([a[0]], owner=6)
    pool.free([a[0]], owner=4)
    pool.free(got, owner=5)
    assert pool.num_free == pool.capacity and pool.num_cached_free == 1


def test_page_hash_is_chained():
    first = page_hash(b"", [1, 2, 3])
    assert page_hash(b"", [1, 2, 3]) == first
    assert page_hash(first, [4, 5]) != page_hash(page_hash(b"", [9, 2, 3]), [4, 5])
    assert page_hash(b"", [1, 2]) != page_hash(b"", [1, 2, 0])


# ---------------------------------------------------------------- outputs per codec


def _codec_modes():
    out = []
    for codec in codec_names():
        for mode in ("compressed", "dense"):
            try:
                check_decode_kv(codec, mode)
            except ValueError:
                continue  # a codec without a dense form (none shipped)
            if codec == "bf16" and mode == "dense":
                continue  # the same pool as compressed for a dense-pages codec
            out.append((codec, mode))
    return out


@pytest.mark.parametrize("codec,decode_kv", _codec_modes())
def test_hits_equal_caching_off(codec, decode_kv):
    """A 70-token prefix (2 full pages and 6 tokens) is cached by a first request; then two at
    once reuse it: B all 2 pages (diverging in page 3), C only page 1 (diverging in page 2).
    Their greedy tokens and logprobs equal caching off with the prompt prefilled in chunks
    ending at the cached boundary; bf16's equal the whole-prompt prefill too. Only the uncached
    tokens are computed."""
    pre = _ids(70, 1)
    a, b, c = pre + _ids(5, 2), pre + _ids(13, 3), pre[:40] + _ids(20, 4)
    llm = _llm(codec, decode_kv=decode_kv)
    computed = _count_prefill(llm)
    first = llm.generate(a, GREEDY)
    hits = llm.generate([b, c], GREEDY)
    assert [o.cached_tokens for o in first + hits] == [0, 2 * P, P]
    assert computed == [len(a), len(b) - 2 * P + len(c) - P]
    stats = llm.engine.prefix_cache_stats()
    assert (stats.lookups, stats.hits, stats.hit_tokens, stats.evictions) == (3, 2, 3 * P, 0)
    _whole(llm)

    off = dict(codec=codec, decode_kv=decode_kv, prefix_caching=False)
    whole = _llm(**off).generate([a, b, c], GREEDY)
    _assert_same(first, whole[:1])
    if codec == "bf16":
        _assert_same(hits, whole[1:])
    for prompt, hit, chunk in ((b, hits[0], 2 * P), (c, hits[1], P)):
        # one chunk up to the cached boundary, the rest in one more
        assert len(prompt) - chunk <= chunk
        chunked = _llm(**off, max_prefill_chunk=chunk).generate(prompt, GREEDY)
        _assert_same([hit], chunked)


def test_lossy_hit_restores_the_sinks():
    """hack2 keeps the first 4 tokens 16-bit beside its pages: a sequence reusing a cached first
    page gets them from the chain (zeros there would change its attention)."""
    llm = _llm("hack2")
    cache = llm.engine.cache
    assert cache.n_sink == 4
    pre = _ids(70, 5)
    llm.generate(pre + [7], GREEDY)
    eng = llm.engine
    rid = eng.add_request(pre + [8, 9], GREEDY)
    cache.sinks.zero_()  # nothing left in any slot: the hit must bring them
    eng.step()  # admits and prefills the suffix
    seq = eng._seqs[rid]
    assert seq.cached_tokens == 2 * P
    assert cache.sinks[:, :, seq.slot, :, :4].abs().sum() > 0
    while eng.has_unfinished():
        eng.step()
    out = eng._output(seq)
    eng.release(rid)
    want = _llm("hack2", prefix_caching=False, max_prefill_chunk=2 * P).generate(
        pre + [8, 9], GREEDY
    )
    _assert_same([out], want)
    _whole(llm)


# ---------------------------------------------------------------- sharing and pressure


@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_concurrent_requests_share_pages_while_the_writer_decodes(codec):
    pre = _ids(96, 6)
    llm = _llm(codec)
    eng = llm.engine
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, logprobs=0)
    ra = eng.add_request(pre + _ids(10, 7), params)
    eng.step()  # A prefilled: its 3 full pages are written and cached, A decodes on
    shared = eng._seqs[ra].pages[:3]
    rb = eng.add_request(pre + _ids(9, 8), params)
    rc = eng.add_request(pre[:70] + _ids(3, 9), params)
    eng.step()  # B and C admitted onto A's pages
    assert [eng.pool.refcount(p) for p in shared] == [3, 3, 2]
    assert [eng._seqs[r].cached_tokens for r in (ra, rb, rc)] == [0, 3 * P, 2 * P]
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    for r in (ra, rb, rc):
        eng.release(r)
    _whole(llm)
    prompts = [outs[r].prompt_token_ids for r in (ra, rb, rc)]
    if codec == "bf16":
        want = _llm(prefix_caching=False).generate(prompts, params)
        _assert_same([outs[r] for r in (ra, rb, rc)], want)


def test_page_being_written_is_not_handed_out():
    """A prompt prefilled in chunks: a request arriving after its first chunk reuses only the page
    that chunk wrote, never the pages the writer holds but has not computed yet; one admitted in
    the same step as the writer reuses nothing."""
    prompt = _ids(150, 10)
    llm = _llm(max_prefill_chunk=P)
    eng = llm.engine
    ra = eng.add_request(prompt, GREEDY)
    rsame = eng.add_request(prompt[:100] + [5], GREEDY)  # admitted with A: nothing written yet
    eng.step()
    rb = eng.add_request(prompt + [6], GREEDY)
    eng.step()
    assert eng._seqs[rsame].cached_tokens == 0
    assert eng._seqs[rb].cached_tokens == P  # A has written 2 pages by now, but B came after 1
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    for r in (ra, rsame, rb):
        eng.release(r)
    _whole(llm)
    want = _llm(prefix_caching=False).generate([prompt, prompt[:100] + [5], prompt + [6]], GREEDY)
    _assert_same([outs[r] for r in (ra, rsame, rb)], want)


def test_eviction_under_pressure():
    """5 usable pages: a request needing them all evicts the cached ones (deepest first), a
    request reusing cached pages keeps them while it allocates the rest from empty pages, and
    an evicted prefix is computed again."""
    pre = _ids(70, 11)
    llm = _llm(num_pages=6)
    eng = llm.engine
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=0)
    first = llm.generate(pre, short)  # 3 pages; 2 full ones stay cached
    assert eng.pool.num_cached_free == 2
    longer = llm.generate(pre[:64] + _ids(80, 12), SamplingParams(max_tokens=16, **_g()))
    assert longer[0].cached_tokens == 2 * P  # the 2 cached + 3 empty: all 5 pages
    assert eng.prefix_cache_stats().evictions == 0
    other = llm.generate(_ids(150, 13), SamplingParams(max_tokens=8, **_g()))
    assert other[0].cached_tokens == 0
    assert eng.prefix_cache_stats().evictions > 0
    again = llm.generate(pre, short)
    assert again[0].cached_tokens == 0  # evicted: computed again, same result
    _assert_same(again, first)
    off = _llm(num_pages=6, prefix_caching=False)
    want = off.generate(pre[:64] + _ids(80, 12), SamplingParams(max_tokens=16, **_g()))
    _assert_same(longer, want)
    _whole(llm)


def _g():
    return dict(temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.mark.parametrize("codec", ["bf16", "kivi2"])
def test_abort_while_a_shared_page_is_referenced(codec):
    pre = _ids(96, 14)
    llm = _llm(codec, max_prefill_chunk=P)
    eng = llm.engine
    params = SamplingParams(max_tokens=40, **_g())
    ra = eng.add_request(pre + [4], params)
    for _ in range(4):  # A's prompt in 4 chunks
        eng.step()
    shared = eng._seqs[ra].pages[:3]
    rb = eng.add_request(pre + [5, 6], params)
    rc = eng.add_request(pre + _ids(100, 15), params)  # 3 pages cached, 4 chunks to go
    eng.step()
    assert [eng.pool.refcount(p) for p in shared] == [3, 3, 3]
    assert eng.abort(ra)  # the writer goes while B and C read its pages
    assert [eng.pool.refcount(p) for p in shared] == [2, 2, 2]
    eng.step()
    assert eng.abort(rc)  # mid-prompt
    assert [eng.pool.refcount(p) for p in shared] == [1, 1, 1]
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    assert set(outs) == {rb} and len(outs[rb].token_ids) == 40
    for r in (ra, rb, rc):
        eng.release(r)
    _whole(llm)
    assert eng.pool.num_cached_free >= 3
    if codec == "bf16":
        _assert_same([outs[rb]], _llm(prefix_caching=False).generate(pre + [5, 6], params))


# ---------------------------------------------------------------- what is cached


def test_whole_page_prompt_leaves_a_token_to_compute():
    prompt = _ids(3 * P, 16)
    llm = _llm()
    computed = _count_prefill(llm)
    a = llm.generate(prompt, GREEDY)
    b = llm.generate(prompt, GREEDY)
    assert b[0].cached_tokens == 2 * P and computed == [3 * P, P]
    _assert_same(b, a)
    _whole(llm)


def test_generated_pages_are_cached_only_where_pages_are_exact():
    """bf16: a follow-up turn (prompt + reply + more) reuses the reply's full pages too; hack4
    caches only what a prefill computed (decode seals its pages from other values)."""
    prompt = _ids(40, 17)
    params = SamplingParams(max_tokens=60, **_g())
    for codec, cached in (("bf16", 3 * P), ("hack4", P)):
        llm = _llm(codec)
        out = llm.generate(prompt, params)[0]
        turn = prompt + out.token_ids + [9, 10]  # 102 tokens: 3 full pages
        got = llm.generate(turn, GREEDY)
        assert got[0].cached_tokens == cached, codec
        _whole(llm)
        if codec == "bf16":
            _assert_same(got, _llm(prefix_caching=False).generate(turn, GREEDY))


def test_preemption_recomputes_only_past_cached_pages():
    prompts = [_ids(n, 20 + n) for n in (30, 50, 70, 20)]
    params = SamplingParams(max_tokens=60, **_g())
    tight = _llm(num_pages=7)  # 6 usable pages for 4 sequences growing to 3 pages each
    got = tight.generate(prompts, params)
    assert sum(o.metrics["preemptions"] for o in got) > 0
    assert tight.engine.prefix_cache_stats().hits > 0  # a preempted one came back to its pages
    want = _llm(prefix_caching=False).generate(prompts, params)
    _assert_same(got, want)
    _whole(tight)


# ---------------------------------------------------------------- configuration


def test_prefix_caching_option():
    assert EngineConfig().prefix_caching is True
    assert parse_engine_options(["prefix_caching=false"]) == {"prefix_caching": False}
    with pytest.raises(ConfigError, match="prefix_caching"):
        EngineConfig(prefix_caching="no")
    llm = _llm(prefix_caching=False)
    prompt = _ids(80, 18)
    llm.generate(prompt, GREEDY)
    out = llm.generate(prompt, GREEDY)[0]
    assert out.cached_tokens == 0 and llm.engine.prefix_cache_stats() is None
    assert llm.engine.prefix_caching_reason.startswith("off")
    assert llm.engine.pool.num_cached_free == 0
    _whole(llm)


def test_lckv_models_run_without_it():
    llm = LLM("random:tiny-lckv", device="cpu", page_size=P, num_pages=32)
    assert llm.engine.prefix_cache is None and "LCKV" in llm.engine.prefix_caching_reason
    prompt = _ids(80, 19)
    llm.generate(prompt, GREEDY)
    assert llm.generate(prompt, GREEDY)[0].cached_tokens == 0
    _whole(llm)


@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_engine_memory_freed_without_garbage_collection(codec):
    """The pool's eviction hook does not tie the prefix cache (and through it the KV memory) into
    a reference cycle: dropping the LLM frees its pool and cache at once, as a GPU needs before
    the next engine sizes its pool on free memory."""
    import gc
    import weakref

    gc.disable()
    try:
        llm = _llm(codec)
        llm.generate([list(range(3, 3 + 3 * P))], SamplingParams(max_tokens=4, temperature=0.0))
        assert llm.engine.prefix_cache is not None
        pool, cache = weakref.ref(llm.engine.pool), weakref.ref(llm.engine.prefix_cache.kv)
        del llm
        assert pool() is None and cache() is None
    finally:
        gc.enable()
