"""The one-launch import of a device-form layer (kernels/row_copy.py, engine/device_import.py):
the copy kernel against its torch reference on fresh random jobs, its argument checks, and a
whole prompt imported both ways (one copy, and `import_pages` with ZIPSERVE_DEVICE_IMPORT=0) into
decode caches of bf16 and of several codecs: the same bytes in every page and tail, the same
errors for a malformed message, every page back in its pool."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402

from zipserve.compress.wire import WireError  # noqa: E402
from zipserve.engine import device_import  # noqa: E402
from zipserve.engine.config import EngineConfig  # noqa: E402
from zipserve.engine.disaggregated import DisaggregatedEngine  # noqa: E402
from zipserve.engine.sampling_params import SamplingParams  # noqa: E402
from zipserve.kernels.paged_decode_attention import is_interpreted  # noqa: E402
from zipserve.kernels.row_copy import (  # noqa: E402
    RowCopy,
    _copy_rows_kernel,
    copy_rows,
    copy_rows_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runnable = pytest.mark.skipif(
    DEVICE == "cpu" and not is_interpreted(_copy_rows_kernel),
    reason="the kernel needs a GPU or TRITON_INTERPRET=1 before import",
)


def _random_case(seed: int, device: str = DEVICE, word: int = 4):
    """A payload, three destination tensors of different dtypes and a mix of indexed and plain
    jobs whose rows do not overlap in any destination."""
    g = torch.Generator().manual_seed(seed)

    def rnd(lo, hi):
        return int(torch.randint(lo, hi, (), generator=g))

    payload = torch.randint(0, 256, (rnd(20000, 40000),), dtype=torch.uint8, generator=g)
    dsts = [
        torch.zeros(rnd(6, 30), 3, 16, dtype=torch.float16),
        torch.zeros(2, rnd(4, 9), 5, 8, dtype=torch.bfloat16),
        torch.zeros(rnd(3000, 6000), dtype=torch.uint8),
    ]
    pages = dsts[0].shape[0]
    n = rnd(1, pages)
    ids = torch.randperm(pages, generator=g)[:n].tolist()
    page_bytes = 3 * 16 * 2
    head_bytes = dsts[1].shape[2] * 8 * 2  # one head's 5 x 8 bf16
    r = rnd(1, 6)  # tokens of a [heads, r, 8] tail
    jobs = [
        RowCopy(0, 0, word * rnd(0, 100), n, page_bytes, page_bytes, page_bytes, True),
        RowCopy(
            1, head_bytes * dsts[1].shape[1], 8000, dsts[1].shape[1], r * 16, r * 16, head_bytes
        ),
        RowCopy(2, word * rnd(0, 50), 12000 + word * rnd(0, 40), 7, 4 * word, 5 * word, 9 * word),
    ]
    return payload.to(device), [t.to(device) for t in dsts], jobs, ids


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@runnable
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("word", [4, 1])
def test_kernel_equals_reference(seed, word):
    payload, dsts, jobs, ids = _random_case(seed, word=word)
    if word == 1:  # an odd offset: the kernel copies bytes
        jobs[2] = RowCopy(2, 3, 12001, 7, 5, 7, 9)
    ref = [t.clone() for t in dsts]
    copy_rows(payload, dsts, jobs, ids)
    copy_rows_ref(payload, ref, jobs, ids)
    for got, want in zip(dsts, ref, strict=True):
        assert torch.equal(_bits(got), _bits(want))
    assert any(_bits(t).any() for t in dsts)  # something was written


@pytest.mark.parametrize("fn", [copy_rows_ref, pytest.param(copy_rows, marks=runnable)])
def test_copy_writes_only_the_rows_named(fn):
    payload = torch.arange(256, dtype=torch.uint8).repeat(4).to(DEVICE)  # [1024]
    dst = torch.full((8, 32), 255, dtype=torch.uint8, device=DEVICE)
    fn(payload, [dst], [RowCopy(0, 4, 64, 2, 8, 16, 32, True)], [5, 2])
    want = torch.full((8, 32), 255, dtype=torch.uint8)
    want[5, 4:12] = torch.arange(64, 72, dtype=torch.uint8)
    want[2, 4:12] = torch.arange(80, 88, dtype=torch.uint8)
    assert torch.equal(dst.cpu(), want)


@pytest.mark.parametrize("fn", [copy_rows_ref, pytest.param(copy_rows, marks=runnable)])
@pytest.mark.parametrize(
    "job, ids, match",
    [
        (RowCopy(1, 0, 0, 1, 4, 4, 4), [], "names no tensor"),
        (RowCopy(0, 0, 1020, 2, 8, 8, 8), [], "past the payload"),
        (RowCopy(0, 0, 0, 2, 8, 8, 8, True), [0, 32], "rows up to byte"),
        (RowCopy(0, 250, 0, 1, 8, 8, 8), [], "rows up to byte"),
        (RowCopy(0, 0, 0, 3, 8, 8, 8, True), [0, 1], "3 rows, 2 ids"),
        (RowCopy(0, 0, 0, 2, 8, 8, 4), [], "overlap"),
        (RowCopy(0, 0, 0, 1, 8, 8, 8, True), [-1], "negative id"),
    ],
)
def test_bad_jobs_raise_before_any_write(fn, job, ids, match):
    payload = torch.zeros(1024, dtype=torch.uint8, device=DEVICE)
    dst = torch.full((256,), 7, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        fn(payload, [dst], [job], ids)
    assert bool((dst == 7).all())


def test_bad_tensors_raise():
    dst = torch.zeros(64, dtype=torch.uint8)
    job = [RowCopy(0, 0, 0, 1, 4, 4, 4)]
    with pytest.raises(ValueError, match="payload"):
        copy_rows_ref(torch.zeros(64, dtype=torch.int32), [dst], job, [])
    with pytest.raises(ValueError, match=r"dsts\[0\] must be a contiguous"):
        copy_rows_ref(torch.zeros(64, dtype=torch.uint8), [dst.view(8, 8).t()], job, [])


# -- whole layers, both import paths --------------------------------------------------------------
def _engine(codec: str, tokens: int, device: str = DEVICE) -> DisaggregatedEngine:
    return DisaggregatedEngine(
        "random:tiny",
        device=device,
        max_model_len=tokens + 64,
        engine_config=EngineConfig(
            codec=codec,
            cuda_graphs=False,
            num_pages=2 * (tokens // EngineConfig.page_size + 2),
            prefix_caching=False,
        ),
    )


def _cache_bytes(engine: DisaggregatedEngine) -> list[torch.Tensor]:
    cache = engine.cache
    if hasattr(cache, "stores"):
        return [_bits(t).cpu() for s in cache.stores for t in s.values()] + [
            _bits(cache.tail).cpu()
        ]
    return [_bits(cache.storage).cpu()]


def _import_prompt(decode, layers, ids, rid, monkeypatch, one_copy: bool) -> None:
    monkeypatch.setenv("ZIPSERVE_DEVICE_IMPORT", "1" if one_copy else "0")
    decode.reserve(rid, ids, SamplingParams(max_tokens=1), use_cache=False)
    for kv in layers:
        kv.request_id = rid
        decode.import_layer(rid, kv)


@pytest.mark.parametrize("codec", ["bf16", "hack2", "kivi2", "fp8", "hack4", "lowrank+hack2"])
@pytest.mark.parametrize("tokens", [16 * 120 + 11, 16 * 5 + 3, 16 * 4, 7])
def test_one_copy_import_equals_import_pages(codec, tokens, monkeypatch):
    """Two prompts imported into one decode cache, the first with import_pages, the second with
    one copy, equal the same two imported with import_pages twice: byte for byte in every page
    and tail (with the kernel itself on the CPU, through the interpreter)."""
    if DEVICE == "cpu" and not is_interpreted(_copy_rows_kernel):
        pytest.skip("the kernel needs TRITON_INTERPRET=1 before import")
    copies = []

    def kernel(*args):  # the kernel itself (interpreted on the CPU), counted
        copies.append(args[2])
        copy_rows(*args)

    monkeypatch.setattr(device_import, "copy_rows_ref", kernel)
    monkeypatch.setattr(device_import, "copy_rows", kernel)
    prefill = _engine(codec, tokens)
    vocab = prefill.config.vocab_size
    prompts = [[3 + (i * p) % (vocab - 3) for i in range(tokens)] for p in (7919, 104729)]
    sent = []
    for j, ids in enumerate(prompts):
        out = prefill.prefill_export(ids, SamplingParams(max_tokens=1), f"p{j}", device_form=True)
        for kv in out.layers:
            kv.check()
        sent.append(out.layers)
    decoded = []
    for one_copy in (False, True):
        decode = _engine(codec, tokens)
        _import_prompt(decode, sent[0], prompts[0], "a", monkeypatch, one_copy=False)
        _import_prompt(decode, sent[1], prompts[1], "b", monkeypatch, one_copy=one_copy)
        decoded.append(_cache_bytes(decode))
        decode.abort("a")
        decode.abort("b")
        assert decode.pool.num_free == decode.pool.capacity
    for plain, fused in zip(*decoded, strict=True):
        assert torch.equal(plain, fused)
    assert len(copies) == len(sent[1])  # one copy per layer of the second prompt, none before
    assert prefill.pool.num_free == prefill.pool.capacity


@pytest.mark.parametrize("codec", ["bf16", "hack2"])
def test_one_copy_import_refuses_what_import_pages_refuses(codec, monkeypatch):
    monkeypatch.setenv("ZIPSERVE_DEVICE_IMPORT", "1")
    tokens = 16 * 3 + 5
    prefill, decode = _engine(codec, tokens), _engine(codec, tokens)
    ids = list(range(3, 3 + tokens))
    layer = prefill.prefill_export(ids, SamplingParams(max_tokens=1), "p", device_form=True).layers[
        0
    ]
    layer.check()
    header = layer.wire.header
    cases = [
        ({"codec": "kivi4"}, WireError),
        ({"num_pages": 2}, ValueError),
        ({"layout_version": 99}, WireError),
        ({"fields": header["fields"][:-1]}, WireError),
        ({"extras": []}, ValueError),
    ]
    for i, (change, error) in enumerate(cases):
        rid = f"r{i}"
        decode.reserve(rid, ids, SamplingParams(max_tokens=1), use_cache=False)
        layer.wire.header = {**header, **change}
        layer.request_id = rid
        with pytest.raises(error):
            decode.import_layer(rid, layer)
        decode.abort(rid)
    layer.wire.header = header
    assert decode.pool.num_free == decode.pool.capacity
    assert prefill.pool.num_free == prefill.pool.capacity


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("codec", ["bf16", "hack2", "kivi2", "lowrank+hack2"])
def test_one_copy_import_on_gpu_equals_import_pages(codec, monkeypatch):
    """The kernel on a GPU against import_pages, a prompt of 1931 tokens (120 full pages and a
    partly filled one: random:tiny's context is 2048)."""
    tokens = 16 * 120 + 11
    prefill = _engine(codec, tokens, "cuda")
    ids = [3 + (i * 7919) % (prefill.config.vocab_size - 3) for i in range(tokens)]
    layers = prefill.prefill_export(ids, SamplingParams(max_tokens=1), "p", device_form=True).layers
    for kv in layers:
        kv.check()
    decoded = []
    for one_copy in (False, True):
        decode = _engine(codec, tokens, "cuda")
        _import_prompt(decode, layers, ids, "a", monkeypatch, one_copy=one_copy)
        torch.cuda.synchronize()
        decoded.append(_cache_bytes(decode))
        decode.abort("a")
        assert decode.pool.num_free == decode.pool.capacity
    for plain, fused in zip(*decoded, strict=True):
        assert torch.equal(plain, fused)
