"""Continuous batching and page accounting: every page returns to the pool after normal finish,
stop strings, aborts mid-batch and preemption; bad input is refused with a clear ValueError.
"""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import make_hf_checkpoint

from zipserve.engine.llm import LLM, SamplingParams
from zipserve.engine.page_pool import PagePool


def _whole(llm: LLM) -> None:
    pool = llm.engine.pool
    assert pool.num_free == pool.capacity, f"leaked pages: {pool.owners()}"
    assert not llm.engine.has_unfinished()


@pytest.fixture(scope="module")
def llm():
    return LLM("random:tiny", device="cpu", page_size=16, num_pages=64)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 500, (int(k),), generator=g).tolist()
        for k in torch.randint(1, 40, (n,), generator=g)
    ]


def test_pool_whole_after_normal_finish(llm):
    outs = llm.generate(
        _prompts(6), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )
    assert [len(o.token_ids) for o in outs] == [20] * 6
    _whole(llm)


def test_stop_string_truncates_and_frees(tmp_path):
    # A real byte-level BPE tokenizer, so the output is text that a stop string can match.
    llm = LLM(str(make_hf_checkpoint(tmp_path, init_std=0.15)), device="cpu", page_size=16)
    base = llm.generate("def ", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    stop = base.text[10:13]
    assert len(stop) == 3
    out = llm.generate(
        "def ", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop"
    assert stop not in out.text and base.text.startswith(out.text)
    assert out.text == base.text[: base.text.index(stop)]
    _whole(llm)


def test_stop_token_ids(llm):
    base = llm.generate([5, 6, 7], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[
        0
    ]
    stop_tok = base.token_ids[4]
    out = llm.generate(
        [5, 6, 7],
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok]),
    )[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop"
    _whole(llm)


def test_abort_mid_batch_frees_pages(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in _prompts(5, seed=3)]
    for _ in range(4):
        engine.step()
    assert engine.pool.num_used > 0
    assert engine.abort(ids[1]) and engine.abort(ids[3])
    assert not engine.abort(ids[3])  # already finished
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert set(finished) == {ids[0], ids[2], ids[4]}
    for i in ids:
        engine.release(i)
    _whole(llm)


def test_abort_while_waiting(llm):
    engine = llm.engine
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=5))
    assert engine.abort(rid)
    assert engine.step() == []
    engine.release(rid)
    _whole(llm)


def test_preemption_keeps_outputs_and_pool_whole():
    prompts = _prompts(6, seed=7)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    roomy = LLM("random:tiny", device="cpu", page_size=16, num_pages=128)
    tight = LLM("random:tiny", device="cpu", page_size=16, num_pages=14)  # 13 usable pages
    want = roomy.generate(prompts, params)
    got = tight.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert sum(o.metrics["preemptions"] for o in got) > 0
    _whole(tight)


def test_request_larger_than_pool_is_refused():
    tight = LLM("random:tiny", device="cpu", page_size=16, num_pages=4)
    with pytest.raises(ValueError, match="max_tokens"):
        tight.generate([1] * 40, SamplingParams(max_tokens=20))
    _whole(tight)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", None, "prompt"),
        ([], None, "prompt"),
        ([1] * 2048, None, "prompt"),
        ([1, 2, 512], None, "prompt"),
        ([1, -1], None, "prompt"),
    ],
)
def test_bad_prompt(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(prompt, params)
    _whole(llm)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_bad_sampling_params(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_page_pool_refuses_and_detects_double_free():
    pool = PagePool(5)
    a = pool.allocate(3, owner=1)
    assert a is not None and 0 not in a
    assert pool.allocate(2, owner=2) is None and pool.num_free == 1
    pool.free(a, owner=1)
    with pytest.raises(RuntimeError):
        pool.free(a, owner=1)
    assert pool.num_free == pool.capacity == 4


def test_seeded_sampling_reproducible(llm):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1234)
    a = llm.generate([[4, 5, 6], [7, 8]], params)
    b = llm.generate([[4, 5, 6]], params)
    assert a[0].token_ids == b[0].token_ids
    _whole(llm)
