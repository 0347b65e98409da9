"""Chunked prefill over compressed pages: the HACK prefill kernel against its torch reference (Triton
interpreter on CPU), the reference against float64 attention over dequantized K/V, the codec method
against the dequantizing reference, and chunked prefill through the engine (tokens, scoring, pages).

Kernel dtypes are fp16 / fp32 under the interpreter (bf16 dots are wrong there).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # must precede importing triton / the kernel modules

import pytest  # noqa: E402

from zipserve.compress.codecs import HackCodec  # noqa: E402
from zipserve.compress.reference_attention import compressed_past_prefill_attention  # noqa: E402
from zipserve.deploy.cli import REFERENCE_MODEL  # noqa: E402
from zipserve.engine.config import ConfigError, EngineConfig  # noqa: E402
from zipserve.engine.llm import LLM, SamplingParams  # noqa: E402
from zipserve.kernels.hack_encode import hack_dequantize_ref, hack_encode_pages_ref  # noqa: E402
from zipserve.kernels.hack_layout import HackPages, hack_group_v  # noqa: E402
from zipserve.kernels.hack_prefill_attention import (  # noqa: E402
    hack_prefill_attention,
    hack_prefill_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    return (
        (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
    ).item()


def _to(pages, device):
    return HackPages(
        **{n: t.to(device) for n, t in pages.tensors().items()},
        bits=pages.bits,
        group_v=pages.group_v,
    )


def make_case(seed, past, n, kvh, group, d, bits, dtype, page=64, n_sink=4, device=DEVICE):
    """One sequence of `past` cached tokens then a chunk of n -> (kernel kwargs, original K/V).

    The past's full pages are encoded at shuffled pool ids (unused pool pages hold NaN scales / sums,
    so stray reads show up); its sinks and open-page tokens form dense_k/v (sinks only when there
    is at least one full page, as in the engine).  K has outlier channels.
    """
    gen = torch.Generator().manual_seed(seed)
    h, L = kvh * group, past + n
    k = torch.randn(L, kvh, d, generator=gen)
    k[..., : d // 16] = k[..., : d // 16] * 4 + 3
    v = torch.randn(L, kvh, d, generator=gen)
    q = torch.randn(n, h, d, generator=gen)
    m = past // page
    gv = hack_group_v(d, bits)  # HackCodec's V group (a whole number of planes)
    pool = HackPages.empty(m + 2, kvh, page, d, bits, gv)
    for name in ("k_scale", "k_min", "v_scale", "v_min", "k_sums", "v_sums"):
        getattr(pool, name).fill_(float("nan"))
    ids = torch.randperm(m + 2, generator=gen)[:m].to(torch.int32)
    if m:
        full = k[: m * page].view(m, page, kvh, d).transpose(1, 2)  # [m, KVH, P, D]
        fullv = v[: m * page].view(m, page, kvh, d).transpose(1, 2)
        hack_encode_pages_ref(
            full.contiguous(), fullv.contiguous(), bits, gv, out=pool, page_ids=ids
        )
    dense = (list(range(min(n_sink, past))) if m else []) + list(range(m * page, past))
    args = dict(
        q=q.to(dtype),
        k=k[past:].to(dtype),
        v=v[past:].to(dtype),
        pages=pool,
        past_pages=ids,
        dense_k=k[dense].transpose(0, 1).to(dtype),
        dense_v=v[dense].transpose(0, 1).to(dtype),
        scale=d**-0.5,
        bits=bits,
        n_sink=n_sink,
    )
    args = {
        a: (t.to(device).contiguous() if isinstance(t, torch.Tensor) else t)
        for a, t in args.items()
    }
    args["pages"] = _to(pool, device)
    return args, (k, v)


def attention_f64(args):
    """Plain float64 attention: dequantized pages (positions >= n_sink) + dense past, all visible, then
    the chunk causally."""
    pool = _to(args["pages"], "cpu")
    kd, vd = hack_dequantize_ref(pool)
    ids = args["past_pages"].long().cpu()
    q = args["q"].cpu().double()
    n, h, d = q.shape
    kvh = pool.num_kv_heads
    skip = args["n_sink"] if ids.numel() else 0
    kp = torch.cat(
        [
            kd[ids].transpose(0, 1).reshape(kvh, -1, d)[:, skip:].double(),
            args["dense_k"].cpu().double(),
        ],
        1,
    )  # [KVH, past, D]
    vp = torch.cat(
        [
            vd[ids].transpose(0, 1).reshape(kvh, -1, d)[:, skip:].double(),
            args["dense_v"].cpu().double(),
        ],
        1,
    )
    kk = torch.cat([kp, args["k"].cpu().double().transpose(0, 1)], 1).repeat_interleave(h // kvh, 0)
    vv = torch.cat([vp, args["v"].cpu().double().transpose(0, 1)], 1).repeat_interleave(h // kvh, 0)
    s = torch.einsum("nhd,hld->hnl", q, kk) * args["scale"]  # [H, n, past + n]
    past = kp.shape[1]
    vis = torch.ones(n, past + n, dtype=torch.bool).tril(past)
    s = s.masked_fill(~vis, float("-inf"))
    return torch.einsum("hnl,hld->nhd", s.softmax(-1), vv)


# (seed, past, n, kvh, group, d, bits, page, dtype): past and n mod page cover {0, 1, page - 1};
# page 64 in several cases, 16/32 elsewhere to keep the interpreter fast.
CASES = [
    (1, 128, 64, 2, 1, 64, 2, 64, torch.float32),
    (2, 129, 63, 1, 4, 128, 4, 64, torch.float16),
    (3, 191, 1, 1, 8, 64, 2, 64, torch.float32),
    (4, 64, 65, 1, 8, 128, 2, 32, torch.float16),
    (5, 47, 33, 2, 4, 64, 4, 16, torch.float32),
    (6, 33, 31, 1, 1, 128, 4, 32, torch.float32),
    (7, 17, 16, 1, 4, 64, 2, 16, torch.float16),
    (8, 10, 20, 2, 4, 64, 2, 16, torch.float32),  # less than a page cached: dense past only
    (9, 0, 17, 1, 8, 64, 4, 16, torch.float16),  # nothing cached: plain causal attention
]


@pytest.mark.parametrize("mode", ["f16", "int8"])
@pytest.mark.parametrize("seed,past,n,kvh,group,d,bits,page,dtype", CASES)
def test_kernel_matches_reference(mode, seed, past, n, kvh, group, d, bits, page, dtype):
    args, _ = make_case(seed, past, n, kvh, group, d, bits, dtype, page=page)
    ref = hack_prefill_attention_ref(**args, mode=mode)
    out = hack_prefill_attention(**args, mode=mode)
    assert out.shape == ref.shape == args["q"].shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    # f16 mode: the kernel rounds q~ and p~ to fp16, the reference does not; fp16 inputs add output rounding.
    tol = {("f16", torch.float32): 5e-3, ("int8", torch.float32): 2e-3}.get((mode, dtype), 1e-2)
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("mode,tol", [("f16", 1e-5), ("int8", 3e-2)])
@pytest.mark.parametrize(
    "seed,past,n,kvh,group,d,bits,page,n_sink",
    [
        (21, 129, 63, 2, 4, 64, 2, 64, 4),
        (22, 191, 65, 1, 8, 128, 4, 64, 4),
        (23, 96, 32, 2, 1, 128, 2, 32, 0),
        (24, 33, 1, 1, 4, 64, 4, 16, 4),
    ],
)
def test_reference_matches_f64_attention(
    mode, tol, seed, past, n, kvh, group, d, bits, page, n_sink
):
    args, (k, v) = make_case(
        seed, past, n, kvh, group, d, bits, torch.float32, page=page, n_sink=n_sink, device="cpu"
    )
    ref = hack_prefill_attention_ref(**args, mode=mode)
    want = attention_f64(args)
    assert torch.isfinite(ref).all()
    assert rel_err(ref.double(), want) < tol
    # the quantized past is still close to attention over the original K/V
    q = args["q"].double()
    kk = k.double().transpose(0, 1).repeat_interleave(group, 0)  # [H, L, D]
    vv = v.double().transpose(0, 1).repeat_interleave(group, 0)
    s = torch.einsum("nhd,hld->hnl", q, kk) * args["scale"]
    s = s.masked_fill(~torch.ones(n, past + n, dtype=torch.bool).tril(past), float("-inf"))
    exact = torch.einsum("hnl,hld->nhd", s.softmax(-1), vv)
    cos = torch.nn.functional.cosine_similarity(want.flatten(), exact.flatten(), dim=0).item()
    assert cos > (0.75 if bits == 2 else 0.97)


def test_kernel_out_argument_and_strided_q():
    args, _ = make_case(31, 70, 40, 2, 4, 64, 2, torch.float32, page=32)
    ref = hack_prefill_attention_ref(**args)
    wide = torch.zeros(40, 8, 2 * 64, device=DEVICE)  # q as a view with a row stride of 1024
    wide[..., :64] = args["q"]
    args["q"] = wide[..., :64]
    out = torch.full((40, 8, 64), float("nan"), device=DEVICE)
    res = hack_prefill_attention(**args, out=out)
    assert res is out and rel_err(out, ref) < 5e-3


@pytest.mark.parametrize("fn", [hack_prefill_attention, hack_prefill_attention_ref])
def test_bad_arguments_name_the_field(fn):
    args, _ = make_case(41, 40, 8, 2, 2, 64, 2, torch.float32, page=16)
    bad = [
        ("q", dict(q=args["q"].long())),
        ("k", dict(k=args["k"][:3])),
        ("v", dict(v=args["v"].half())),
        ("past_pages", dict(past_pages=args["past_pages"].long())),
        ("dense_k", dict(dense_k=args["dense_k"][:, :, :32])),
        ("num_heads", dict(q=args["q"][:, :1].repeat(1, 3, 1))),
        ("bits", dict(bits=4)),
        ("mode", dict(mode="fp4")),
        ("scale", dict(scale=torch.tensor(0.1))),
        ("n_sink", dict(n_sink=-1)),
        ("out", dict(out=torch.empty(8, 2, 32))),
    ]
    for field, change in bad:
        with pytest.raises(ValueError, match=f"^{field}:"):
            fn(**{**args, **change})


@pytest.mark.parametrize("bits,mode", [(2, "f16"), (4, "int8")])
def test_hack_codec_prefill_matches_dequantizing_reference(bits, mode):
    """The codec method (Hadamard-rotated q/k/v/sinks, output rotated back) equals the dequantizing
    reference the cache used before, on fp32 data."""
    kvh, group, d, page, n_sink = 2, 4, 64, 32, 4
    codec = HackCodec(kvh, page, d, bits, mode=mode)
    gen = torch.Generator().manual_seed(51 + bits)
    past, n = 3 * page, 45
    k = torch.randn(past + n, kvh, d, generator=gen)
    v = torch.randn(past + n, kvh, d, generator=gen)
    q = torch.randn(n, kvh * group, d, generator=gen)
    store = codec.new_store(5, "cpu")
    ids = torch.tensor([4, 0, 2])
    codec.encode(
        store,
        ids,
        k[:past].view(3, page, kvh, d).transpose(1, 2).contiguous(),
        v[:past].view(3, page, kvh, d).transpose(1, 2).contiguous(),
    )
    sink_k, sink_v = k[:n_sink].transpose(0, 1), v[:n_sink].transpose(0, 1)
    got = codec.prefill_attention(q, k[past:], v[past:], store, ids, sink_k, sink_v, d**-0.5)
    want = compressed_past_prefill_attention(
        codec, q, k[past:], v[past:], store, ids, sink_k, sink_v, d**-0.5
    )
    assert rel_err(got, want) < (1e-5 if mode == "f16" else 3e-2)
    # with nothing cached it is plain causal attention over the chunk
    none = torch.zeros(0, dtype=torch.long)
    got0 = codec.prefill_attention(q, k[:n], v[:n], store, none, sink_k, sink_v, d**-0.5)
    want0 = compressed_past_prefill_attention(
        codec, q, k[:n], v[:n], store, none, sink_k, sink_v, d**-0.5
    )
    assert rel_err(got0, want0) < 1e-5


# ---------------------------------------------------------------- engine

_REF = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)


def _prompts(lengths, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _whole(llm):
    eng = llm.engine
    assert eng.pool.num_free == eng.pool.capacity, eng.pool.owners()
    assert len(eng.scheduler.free_slots) == eng.engine_config.max_num_seqs
    assert not eng.has_unfinished()


def test_max_prefill_chunk_is_validated():
    for bad in (-64, 48, 1.5, True):
        with pytest.raises(ConfigError, match="max_prefill_chunk"):
            EngineConfig(page_size=32, max_prefill_chunk=bad)
    assert EngineConfig(page_size=32, max_prefill_chunk=96).max_prefill_chunk == 96


def test_chunked_prefill_same_tokens_bf16():
    """Without a codec chunked prefill is exact: the unchunked engine's greedy tokens. Prompts of
    1..7 chunks, ragged, batched so that chunks and whole prompts share steps."""
    prompts = _prompts((200, 97, 33, 160, 64), 0, 500)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    whole = LLM("random:tiny", device="cpu", page_size=32).generate(prompts, params)
    llm = LLM(
        "random:tiny", device="cpu", page_size=32, max_prefill_chunk=32, max_prefill_tokens=96
    )
    chunked = llm.generate(prompts, params)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    pool = llm.engine.pool
    assert pool.num_free == pool.capacity and not llm.engine.has_unfinished()


@_REF
@pytest.mark.parametrize("codec", ["fp8", "kivi2", "hack2", "hack4"])
def test_chunked_prefill_equals_page_by_page_scoring(codec):
    """With one page per chunk, every prompt token attends to the encoded pages before its page and
    densely within it -- exactly what scoring does. So the first generated token and every decode
    step's logprob equal scoring prompt + output page by page (lossy codecs are not expected to give
    the unchunked engine's tokens: there the whole prompt attends exactly)."""
    llm = LLM(str(REFERENCE_MODEL), device="cpu", codec=codec, max_prefill_chunk=64)
    prompt = _prompts((129,), 3, 8000)[0]  # 2 full chunks and 1 token
    out = llm.generate(
        prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0)
    )[0]
    full = torch.log_softmax(llm.logits(prompt + out.token_ids), dim=-1)
    expect = [full[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expect, abs=2e-3)
    assert out.token_ids[0] == int(full[len(prompt) - 1].argmax())
    _whole(llm)


def test_abort_mid_prompt_frees_pages():
    llm = LLM(
        "random:tiny",
        device="cpu",
        codec="kivi2",
        page_size=32,
        max_prefill_chunk=32,
        num_pages=40,
        max_num_seqs=3,
    )
    eng = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a, b = (eng.add_request(p, params) for p in _prompts((300, 50), 5, 500))
    assert eng.step() == []  # first chunk of a: nothing sampled yet
    assert eng.scheduler.prefilling and eng.pool.num_free < eng.pool.capacity
    eng.abort(a)
    while eng.has_unfinished():
        eng.step()
    eng.release(a)
    eng.release(b)
    _whole(llm)


# ---------------------------------------------------------------- GPU (lead)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,mode", [(2, "f16"), (2, "int8"), (4, "f16")])
def test_gpu_realistic_shape_and_timing(bits, mode):
    """Llama-3-8B heads (32 q / 8 kv, d 128), a 1024-token chunk over 8k cached tokens, bf16."""
    args, _ = make_case(61, 8192 + 36, 1024, 8, 4, 128, bits, torch.bfloat16, device="cuda")
    out = hack_prefill_attention(**args, mode=mode)
    ref = hack_prefill_attention_ref(**args, mode=mode)
    assert rel_err(out, ref) < 2e-2
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for fn in (hack_prefill_attention, hack_prefill_attention_ref):
        fn(**args, mode=mode)
        torch.cuda.synchronize()
        a.record()
        for _ in range(5):
            fn(**args, mode=mode)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 5)
    print(f"\nhack{bits} {mode}: kernel {times[0]:.2f} ms, torch reference {times[1]:.2f} ms")
