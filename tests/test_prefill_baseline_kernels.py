"""Chunked-prefill attention over fp8 and KIVI pages: kernels against their torch references (Triton
interpreter on CPU), references against float64 attention over dequantized K/V, and the codec methods
against the dequantizing reference the cache used before.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # must precede importing triton / the kernel modules

import pytest  # noqa: E402

from zipserve.compress.codecs import Fp8Codec, KiviCodec  # noqa: E402
from zipserve.compress.reference_attention import compressed_past_prefill_attention  # noqa: E402
from zipserve.kernels import baseline_prefill_attention as bp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(out, ref):
    return (
        (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
    ).item()


def _codec(fmt, kvh, page, d):
    return Fp8Codec(kvh, page, d) if fmt == "fp8" else KiviCodec(kvh, page, d, int(fmt[-1]))


def make_case(fmt, seed, past, n, kvh, group, d, page, dtype, device=DEVICE):
    """Past tokens (full pages at shuffled pool ids + open-page tokens as dense past), then a chunk of
    n -> (codec, store, kwargs without the pool, positional pool args)."""
    gen = torch.Generator().manual_seed(seed)
    codec = _codec(fmt, kvh, page, d)
    k = torch.randn(past + n, kvh, d, generator=gen)
    k[..., : d // 16] = k[..., : d // 16] * 4 + 3
    v = torch.randn(past + n, kvh, d, generator=gen)
    q = torch.randn(n, kvh * group, d, generator=gen)
    m = past // page
    store = codec.new_store(m + 2, device)
    for t in store.values():
        if t.dtype in (torch.float16, torch.float32):
            t.fill_(float("nan"))  # unused pages: stray reads show up
    ids = torch.randperm(m + 2, generator=gen)[:m].to(torch.int32).to(device)
    if m:
        codec.encode(
            store,
            ids.long(),
            k[: m * page].view(m, page, kvh, d).transpose(1, 2).contiguous().to(device),
            v[: m * page].view(m, page, kvh, d).transpose(1, 2).contiguous().to(device),
        )
    kw = dict(
        q=q.to(dtype),
        k=k[past:].to(dtype),
        v=v[past:].to(dtype),
        past_pages=ids,
        dense_k=k[m * page : past].transpose(0, 1).to(dtype),
        dense_v=v[m * page : past].transpose(0, 1).to(dtype),
    )
    kw = {a: t.to(device).contiguous() for a, t in kw.items()}
    kw["scale"] = d**-0.5
    if fmt == "fp8":
        pool = dict(
            k_pages=store["k"],
            k_scale=store["k_scale"],
            v_pages=store["v"],
            v_scale=store["v_scale"],
        )
    else:
        pool = {
            name: store[name]
            for name in ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")
        }
        kw["bits"] = codec.bits
    return codec, store, {**kw, **pool}


FNS = {
    "fp8": (bp.fp8_prefill_attention, bp.fp8_prefill_attention_ref),
    "kivi2": (bp.kivi_prefill_attention, bp.kivi_prefill_attention_ref),
    "kivi4": (bp.kivi_prefill_attention, bp.kivi_prefill_attention_ref),
}

# (fmt, seed, past, n, kvh, group, d, page, dtype): past and n mod page in {0, 1, page - 1}; page 64 included.
CASES = [
    ("fp8", 1, 128, 65, 2, 1, 64, 64, torch.float32),
    ("fp8", 2, 33, 31, 1, 8, 128, 32, torch.float16),
    ("fp8", 3, 63, 1, 1, 4, 64, 32, torch.float32),
    ("kivi2", 4, 129, 63, 1, 4, 64, 64, torch.float32),
    ("kivi4", 5, 64, 33, 2, 8, 128, 32, torch.float16),
    ("kivi2", 6, 95, 32, 1, 1, 128, 32, torch.float16),
    ("kivi4", 7, 0, 20, 1, 4, 64, 32, torch.float32),
]


@pytest.mark.parametrize("fmt,seed,past,n,kvh,group,d,page,dtype", CASES)
def test_kernel_matches_reference(fmt, seed, past, n, kvh, group, d, page, dtype):
    _, _, kw = make_case(fmt, seed, past, n, kvh, group, d, page, dtype)
    kernel, ref_fn = FNS[fmt]
    out = kernel(**kw)
    ref = ref_fn(**kw)
    assert out.shape == ref.shape == kw["q"].shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < (2e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(
    "fmt,seed,past,n,kvh,group,d,page",
    [
        ("fp8", 11, 129, 63, 2, 4, 64, 64),
        ("kivi2", 12, 97, 31, 1, 8, 64, 32),
        ("kivi4", 13, 64, 1, 2, 1, 128, 32),
    ],
)
def test_reference_matches_f64_attention(fmt, seed, past, n, kvh, group, d, page):
    codec, store, kw = make_case(
        fmt, seed, past, n, kvh, group, d, page, torch.float32, device="cpu"
    )
    ref = FNS[fmt][1](**kw)
    ids = kw["past_pages"].long()
    pk, pv = codec.dequantize(store, ids)  # [m, KVH, P, D]
    keys = torch.cat(
        [pk.transpose(0, 1).reshape(kvh, -1, d), kw["dense_k"], kw["k"].transpose(0, 1)], 1
    )
    vals = torch.cat(
        [pv.transpose(0, 1).reshape(kvh, -1, d), kw["dense_v"], kw["v"].transpose(0, 1)], 1
    )
    keys, vals = (
        keys.double().repeat_interleave(group, 0),
        vals.double().repeat_interleave(group, 0),
    )
    s = torch.einsum("nhd,hld->hnl", kw["q"].double(), keys) * kw["scale"]
    s = s.masked_fill(~torch.ones(n, past + n, dtype=torch.bool).tril(past), float("-inf"))
    want = torch.einsum("hnl,hld->nhd", s.softmax(-1), vals)
    assert rel_err(ref.double(), want) < 1e-5


@pytest.mark.parametrize("fmt", ["fp8", "kivi2"])
def test_codec_prefill_matches_dequantizing_reference(fmt):
    codec, store, kw = make_case(fmt, 21, 96, 40, 2, 4, 64, 32, torch.float32, device="cpu")
    args = (
        kw["q"],
        kw["k"],
        kw["v"],
        store,
        kw["past_pages"].long(),
        kw["dense_k"][:, :0],
        kw["dense_v"][:, :0],
        kw["scale"],
    )
    assert (
        rel_err(codec.prefill_attention(*args), compressed_past_prefill_attention(codec, *args))
        < 1e-5
    )


@pytest.mark.parametrize("fmt", ["fp8", "kivi2"])
def test_bad_arguments_name_the_field(fmt):
    _, _, kw = make_case(fmt, 31, 64, 8, 2, 2, 64, 32, torch.float32, device="cpu")
    pool_name = "k_pages" if fmt == "fp8" else "k_codes"
    bad = [
        ("q", dict(q=kw["q"].long())),
        ("k", dict(k=kw["k"][:3])),
        ("v", dict(v=kw["v"].half())),
        ("past_pages", dict(past_pages=kw["past_pages"].long())),
        ("dense_k", dict(dense_k=kw["dense_k"][:, :, :32])),
        ("num_heads", dict(q=kw["q"][:, :3])),
        ("scale", dict(scale=torch.tensor(0.1))),
        ("out", dict(out=torch.empty(8, 4, 32))),
        (pool_name, {pool_name: kw[pool_name].view(torch.int8)}),
        ("v_scale", dict(v_scale=kw["v_scale"].double())),
    ]
    for fn in FNS[fmt]:
        for field, change in bad:
            with pytest.raises(ValueError, match=f"^{field}:"):
                fn(**{**kw, **change})


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "kivi2", "kivi4"])
def test_gpu_realistic_shape(fmt):
    """Llama-3-8B heads (32 q / 8 kv, d 128), a 1024-token chunk over 8k + 36 cached tokens, bf16."""
    _, _, kw = make_case(fmt, 41, 8192 + 36, 1024, 8, 4, 128, 64, torch.bfloat16, device="cuda")
    kernel, ref_fn = FNS[fmt]
    assert rel_err(kernel(**kw), ref_fn(**kw)) < 2e-2
