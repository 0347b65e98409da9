"""kernels/tail_write.py: a decode step's K/V written into the compressed cache's 16-bit tail in one
launch. The Triton kernel (the interpreter on CPU) against its torch reference (the index_puts
compress/compressed_cache.py's `_decode` ran) on fresh random inputs, bit for bit: every dtype,
head sizes that are not powers of two, strided k / v views, with and without sinks; the reference
against the writes spelled out; argument checks; and on a GPU the kernel inside a CUDA graph."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402

from zipserve.kernels.paged_decode_attention import is_interpreted  # noqa: E402
from zipserve.kernels.tail_write import (  # noqa: E402
    _check,
    _write_tail_kernel,
    write_tail,
    write_tail_ref,
)

DEVICE = "cpu" if is_interpreted(_write_tail_kernel) else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(gen, b, kvh, d, n_sink, page, dtype, device=DEVICE, n_slots=None, strided=True):
    """A random tail [2, S, KVH, n_sink + page + 1, D] and a step of b rows as step_index builds
    it: distinct slots, an open-page column each, and (with sinks) the sink column of positions
    below n_sink, the junk column of the others. k / v are strided views (of a fused qkv-like
    buffer and of a head-major one) unless strided=False."""
    n_slots = n_slots or b + 3
    cols = n_sink + page + 1
    tail = torch.randn(2, n_slots, kvh, cols, d, generator=gen).to(device, dtype)
    if strided:  # cast first: .to() of a view with gaps would make it contiguous
        qkv = torch.randn(b, 3 * kvh + 1, d, generator=gen).to(device, dtype)  # wider rows
        k = qkv[:, 1 : 1 + kvh]
        v = torch.randn(kvh, b, d, generator=gen).to(device, dtype).transpose(0, 1)  # head-major
    else:
        k, v = torch.randn(2, b, kvh, d, generator=gen).to(device, dtype)
    slots = torch.randperm(n_slots, generator=gen)[:b]
    pos = torch.randint(0, 4 * page, (b,), generator=gen)
    pos[: min(b, 2)] = torch.arange(min(b, 2))  # some rows at the very first positions
    col_open = n_sink + pos % page
    col_sink = torch.where(pos < n_sink, pos, n_sink + page) if n_sink else None
    idx = dict(slots=slots.to(device), col_open=col_open.to(device))
    idx["col_sink"] = None if col_sink is None else col_sink.to(device)
    return dict(tail=tail, k=k, v=v, **idx)


def _copy(args):
    return {**args, "tail": args["tail"].clone()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,kvh,d,n_sink,page",
    [(1, 1, 8, 0, 4), (3, 2, 96, 4, 16), (5, 8, 128, 0, 64), (4, 3, 80, 2, 8), (7, 4, 64, 4, 32)],
)
def test_kernel_matches_reference(dtype, b, kvh, d, n_sink, page):
    gen = torch.Generator().manual_seed(b * 1000 + kvh * 100 + d + n_sink)
    args = _inputs(gen, b, kvh, d, n_sink, page, dtype)
    if b > 1 and kvh > 1:  # (with a single row or head a view may count as contiguous)
        assert not args["k"].is_contiguous() and not args["v"].is_contiguous()
    got, want = _copy(args), _copy(args)
    write_tail(**got)
    write_tail_ref(**want)
    assert not torch.equal(want["tail"], args["tail"])  # the reference wrote something
    assert torch.equal(got["tail"], want["tail"])  # a copy: bit for bit


@pytest.mark.parametrize("n_sink", [0, 4])
def test_int32_indices_and_contiguous_inputs(n_sink):
    gen = torch.Generator().manual_seed(5 + n_sink)
    args = _inputs(gen, 6, 2, 32, n_sink, 8, torch.bfloat16, strided=False)
    for name in ("slots", "col_open", "col_sink"):
        if args[name] is not None:
            args[name] = args[name].to(torch.int32)
    got, want = _copy(args), _copy(args)
    write_tail(**got)
    write_tail_ref(**want)
    assert torch.equal(got["tail"], want["tail"])


@pytest.mark.parametrize("fn", [write_tail, write_tail_ref], ids=["kernel", "reference"])
@pytest.mark.parametrize("n_sink", [0, 3])
def test_writes_exactly_the_columns_named(fn, n_sink):
    """Every row's K / V lands in both planes at its open column (and its sink or junk column);
    every other element of the tail is unchanged."""
    gen = torch.Generator().manual_seed(11 + n_sink)
    args = _inputs(gen, 5, 3, 96, n_sink, 8, torch.float16)
    before = args["tail"].clone()
    out = _copy(args)
    fn(**out)
    tail = out["tail"]
    want = before.clone()
    touched = torch.zeros(tail.shape[:4], dtype=torch.bool, device=tail.device)
    for r in range(args["k"].shape[0]):
        slot = int(args["slots"][r])
        cols = [int(args["col_open"][r])]
        if args["col_sink"] is not None:
            cols.append(int(args["col_sink"][r]))
            assert cols[1] != cols[0]  # a sink / junk column is never the open column
        for c in cols:
            want[0, slot, :, c] = args["k"][r]
            want[1, slot, :, c] = args["v"][r]
            touched[:, slot, :, c] = True
    assert torch.equal(tail, want)
    assert torch.equal(tail[~touched], before[~touched])
    if n_sink:  # rows at positions 0 and 1 wrote their sinks; the others the junk column
        for r in range(2):
            slot = int(args["slots"][r])
            assert torch.equal(tail[0, slot, :, r], args["k"][r])
        assert touched[:, :, :, -1].any()


def test_empty_batch_writes_nothing():
    gen = torch.Generator().manual_seed(3)
    args = _inputs(gen, 4, 2, 16, 2, 4, torch.float32)
    args = {
        **args,
        "k": args["k"][:0],
        "v": args["v"][:0],
        "slots": args["slots"][:0],
        "col_open": args["col_open"][:0],
        "col_sink": args["col_sink"][:0],
    }
    for fn in (write_tail, write_tail_ref):
        out = _copy(args)
        fn(**out)
        assert torch.equal(out["tail"], args["tail"])


def _valid():
    return _inputs(torch.Generator().manual_seed(1), 3, 2, 16, 2, 4, torch.float32, "cpu")


BAD = [
    ("tail", dict(tail=lambda t: t[0])),  # 4-D
    ("tail", dict(tail=lambda t: t.double())),
    ("tail", dict(tail=lambda t: t.transpose(3, 4))),  # last dim strided
    ("k", dict(k=lambda k: k[:, :1])),  # KVH 1 != 2
    ("k", dict(k=lambda k: k[..., :8])),  # D 8 != 16
    ("k", dict(k=lambda k: k.half())),
    ("k", dict(k=lambda k: k.transpose(1, 2).contiguous().transpose(1, 2))),  # D strided
    ("k", dict(k=lambda k: k[None])),
    ("v", dict(v=lambda v: v[:2])),
    ("v", dict(v=lambda v: v.to(torch.bfloat16))),
    ("v", dict(v=lambda v: torch.randn(16, 2, 3).permute(2, 1, 0))),  # last dim strided
    ("slots", dict(slots=lambda s: s.float())),
    ("slots", dict(slots=lambda s: s[:2])),
    ("slots", dict(slots=lambda s: [0, 1, 2])),
    ("col_open", dict(col_open=lambda c: c.to(torch.int16))),
    ("col_open", dict(col_open=lambda c: c[:, None])),
    ("col_sink", dict(col_sink=lambda c: c.double())),
    ("col_sink", dict(col_sink=lambda c: c[1:])),
    ("k", dict(k=lambda k: k.to("meta"))),  # another device
    ("col_open", dict(col_open=lambda c: c.to("meta"))),
    ("col_sink", dict(col_sink=lambda c: c.to("meta"))),
]


@pytest.mark.parametrize("fn", [write_tail, write_tail_ref], ids=["kernel", "reference"])
@pytest.mark.parametrize("name,change", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_raise(fn, name, change):
    args = _valid()
    for key, f in change.items():
        args[key] = f(args[key])
    with pytest.raises(ValueError, match=name):
        fn(**args)


def test_the_check_reads_no_values():
    """The argument checks look at shapes, dtypes, strides and devices only (a value read would be
    a host sync on a GPU, and break a CUDA graph's capture): they pass on meta tensors, which have
    no values to read."""
    args = {k: None if v is None else v.to("meta") for k, v in _valid().items()}
    _check(**args)


@pytest.mark.parametrize("codec", ["hack2", "fp8"])  # with sinks (4) and without
def test_compressed_cache_decode_kernel_equals_reference(monkeypatch, codec):
    """The engine's compressed decode (compress/compressed_cache.py `_decode`) with the kernel and
    with the reference: the same tokens, logprobs and final tails. On CPU the cache takes the
    reference, pointed at the kernel for the second run; on a GPU it takes the kernel, pointed at
    the reference. The first prompt is shorter than the sinks (its first decode tokens write sink
    columns); 20 tokens cross a page of 16 (a seal)."""
    from zipserve.engine.llm import LLM, SamplingParams
    from zipserve.kernels import tail_write

    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = [[5, 6, 7], list(range(10, 40))]
    name, other = (
        ("write_tail_ref", write_tail) if DEVICE == "cpu" else ("write_tail", write_tail_ref)
    )
    calls = []

    def swapped(*args):
        calls.append(1)
        return other(*args)

    runs = []
    for swap in (False, True):
        if swap:
            monkeypatch.setattr(tail_write, name, swapped)
        llm = LLM("random:tiny", device=DEVICE, codec=codec, page_size=16, max_num_seqs=4)
        out = llm.generate(prompts, params)
        assert (llm.engine.cache.n_sink > 0) == (codec == "hack2")
        runs.append(([o.token_ids for o in out], [o.logprobs for o in out], llm.engine.cache.tail))
    assert calls  # the second run took the other path
    (tok_a, lp_a, tail_a), (tok_b, lp_b, tail_b) = runs
    assert tok_a == tok_b and lp_a == lp_b
    assert torch.equal(tail_a, tail_b)


@pytest.mark.gpu
def test_kernel_in_a_cuda_graph_matches_reference():
    """The kernel captured in a CUDA graph (as the decode step is), replayed on new K/V and new
    columns written into the captured inputs, equals the reference run eagerly, with and without
    sinks, at Llama-3-8B's shapes (8 KV heads of 128, bf16, pages of 64)."""
    gen = torch.Generator().manual_seed(23)
    for n_sink in (0, 4):
        args = _inputs(gen, 32, 8, 128, n_sink, 64, torch.bfloat16, "cuda", n_slots=40)
        static = _copy(args)
        write_tail(**_copy(args))  # warm up: compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            write_tail(**static)
        for step in range(3):
            fresh = _inputs(gen, 32, 8, 128, n_sink, 64, torch.bfloat16, "cuda", n_slots=40)
            for name in ("k", "v", "slots", "col_open", "col_sink"):
                if static[name] is not None:
                    static[name].copy_(fresh[name])
            want = {**static, "tail": static["tail"].clone()}
            graph.replay()
            write_tail_ref(**want)
            torch.cuda.synchronize()
            assert torch.equal(static["tail"], want["tail"]), (n_sink, step)
