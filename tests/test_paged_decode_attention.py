"""Tests for kernels/paged_decode_attention.py (Triton kernel runs under TRITON_INTERPRET=1 on CPU)."""

import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault(
        "TRITON_INTERPRET", "1"
    )  # must precede importing triton / the kernel module

import pytest  # noqa: E402

from zipserve.kernels.paged_decode_attention import (  # noqa: E402
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_case(
    seed, seq_lens, num_kv_heads, group, head_dim, page_size, dtype, device=DEVICE, extra_pages=3
):
    """Random q, contiguous K/V [B, KVH, L, D] and their paged copy with shuffled page assignment.

    Unused cache slots (tails of last pages, spare pages) hold NaN so any stray read shows up.
    page_table entries past a sequence's pages are -1.
    """
    gen = torch.Generator().manual_seed(seed)
    B, H, L = len(seq_lens), num_kv_heads * group, max(max(seq_lens), 1)
    q = torch.randn(B, H, head_dim, generator=gen)
    k = torch.randn(B, num_kv_heads, L, head_dim, generator=gen)
    v = torch.randn(B, num_kv_heads, L, head_dim, generator=gen)
    pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(pages_per_seq) + extra_pages
    perm = torch.randperm(num_pages, generator=gen).tolist()
    shape = (num_pages, num_kv_heads, page_size, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    page_table = torch.full((B, max(max(pages_per_seq), 1) + 1), -1, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        for i in range(pages_per_seq[b]):
            pid = perm.pop()
            page_table[b, i] = pid
            lo, hi = i * page_size, min((i + 1) * page_size, n)
            k_cache[pid, :, : hi - lo] = k[b, :, lo:hi]
            v_cache[pid, :, : hi - lo] = v[b, :, lo:hi]
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        q=to(q),
        k_cache=to(k_cache),
        v_cache=to(v_cache),
        page_table=page_table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    ), (k, v)


def rel_err(out, ref):
    return (
        (out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
    ).item()


def dense_attention_f64(q, k, v, seq_lens, scale):
    """Plain attention in float64 on contiguous K/V [B, KVH, L, D]."""
    B, H, D = q.shape
    KVH = k.shape[1]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b, n in enumerate(seq_lens):
        if n == 0:
            continue
        kk = k[b, :, :n].double().repeat_interleave(H // KVH, dim=0)  # [H, n, D]
        vv = v[b, :, :n].double().repeat_interleave(H // KVH, dim=0)
        s = torch.einsum("hd,hnd->hn", q[b].double().cpu(), kk) * scale
        out[b] = torch.einsum("hn,hnd->hd", s.softmax(-1), vv)
    return out


# (seed, seq_lens, kv_heads, group, head_dim, page_size, num_splits, dtype)
KERNEL_CASES = [
    (1, [16, 17, 31], 2, 1, 64, 16, 1, torch.float16),  # len % page in {0, 1, page-1}
    (2, [33, 5, 48], 2, 4, 64, 16, 3, torch.float16),  # GQA 4, splits
    (3, [40, 0, 23], 1, 8, 128, 16, 2, torch.float32),  # GQA 8, padding row, d=128
    (4, [20, 1], 2, 4, 128, 16, 8, torch.float16),  # more splits than pages
    (5, [65, 128, 3], 1, 2, 64, 64, 2, torch.float32),  # page_size 64
    (6, [150, 7], 1, 4, 64, 16, 1, torch.float32),  # several BLOCK_N iterations, multi-page blocks
    (7, [300, 257, 0], 1, 2, 128, 256, 3, torch.float32),  # page_size > BLOCK_N
    (8, [127, 64, 200], 2, 2, 128, 64, 4, torch.float16),  # page 64, fp16, d=128, splits
]


@pytest.mark.parametrize("seed,seq_lens,kvh,group,d,page,splits,dtype", KERNEL_CASES)
def test_kernel_matches_reference(seed, seq_lens, kvh, group, d, page, splits, dtype):
    args, _ = make_case(seed, seq_lens, kvh, group, d, page, dtype)
    ref = paged_decode_attention_ref(**args)
    out = paged_decode_attention(**args, num_splits=splits)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    assert rel_err(out, ref) < tol
    for b, n in enumerate(seq_lens):
        if n == 0:
            assert (out[b] == 0).all()


def test_kernel_writes_into_out_and_splits_agree():
    args, _ = make_case(11, [37, 64, 9], 2, 2, 64, 16, torch.float32)
    ref = paged_decode_attention_ref(**args)
    out = torch.full_like(args["q"], float("nan"))
    res = paged_decode_attention(**args, num_splits=4, out=out)
    assert res is out
    assert rel_err(out, ref) < 1e-4
    one = paged_decode_attention(**args, num_splits=1)
    assert rel_err(one, out) < 1e-5


def test_all_padding_rows():
    args, _ = make_case(12, [0, 0], 1, 4, 64, 16, torch.float16)
    for splits in (1, 2):
        out = paged_decode_attention(**args, num_splits=splits)
        assert (out == 0).all()


@pytest.mark.parametrize(
    "seed,seq_lens,kvh,group,d,page",
    [
        (21, [1, 15, 16, 17, 50], 2, 4, 64, 16),
        (22, [64, 65, 0, 200], 4, 1, 128, 64),
        (23, [7, 31], 1, 8, 32, 8),
    ],
)
def test_reference_matches_dense_f64(seed, seq_lens, kvh, group, d, page):
    args, (k, v) = make_case(seed, seq_lens, kvh, group, d, page, torch.float32, device="cpu")
    ref = paged_decode_attention_ref(**args)
    want = dense_attention_f64(args["q"], k, v, seq_lens, args["scale"])
    assert torch.isfinite(ref).all()
    assert (ref.double() - want).abs().max().item() < 1e-5


def _bad(args, **kw):
    return {**args, **kw}


def test_wrapper_errors():
    args, _ = make_case(31, [5, 9], 2, 2, 64, 16, torch.float16)
    fns = (paged_decode_attention, paged_decode_attention_ref)
    bad_cases = {
        "k_cache": _bad(args, k_cache=args["k_cache"].float()),
        "q": _bad(args, q=args["q"].to(torch.int32)),
        "page_table": _bad(args, page_table=args["page_table"].long()),
        "seq_lens": _bad(args, seq_lens=args["seq_lens"].long()),
        "num_heads": _bad(args, q=args["q"][:, :3].contiguous()),
        "head_dim": _bad(args, q=args["q"][..., :32].contiguous()),
        "contiguous": _bad(args, q=args["q"].transpose(1, 2).contiguous().transpose(1, 2)),
        "v_cache": _bad(args, v_cache=args["v_cache"][:1]),
    }
    for fn in fns:
        for kw in bad_cases.values():
            with pytest.raises(ValueError):
                fn(**kw)
        with pytest.raises(ValueError, match="num_splits"):
            fn(**args, num_splits=0)
        with pytest.raises(ValueError, match="out"):
            fn(**args, out=torch.empty(2, 4, 64, dtype=torch.float32, device=DEVICE))
    with pytest.raises(ValueError, match="page_table"):
        paged_decode_attention(**_bad(args, page_table=args["page_table"].long()))
    with pytest.raises(ValueError, match="k_cache"):
        paged_decode_attention(**_bad(args, k_cache=args["k_cache"].float()))


def test_choose_num_splits():
    assert choose_num_splits(64, 8, 8192) == 1
    assert choose_num_splits(1, 8, 8192) > 1
    assert choose_num_splits(1, 8, 100) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cpu_without_interpreter_raises():
    code = (
        "import torch\n"
        "from zipserve.kernels.paged_decode_attention import paged_decode_attention as f\n"
        "q = torch.zeros(1, 2, 64); kc = torch.zeros(1, 1, 16, 64)\n"
        "pt = torch.zeros(1, 1, dtype=torch.int32); sl = torch.ones(1, dtype=torch.int32)\n"
        "try:\n    f(q, kc, kc, pt, sl, 0.125)\nexcept RuntimeError as e:\n    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "RAISED" in res.stdout and "TRITON_INTERPRET" in res.stdout, res.stderr


@gpu
@needs_cuda
@pytest.mark.parametrize("splits", [1, 4])
def test_bf16_realistic_gpu(splits):
    torch.manual_seed(0)
    B, H, KVH, D, page = 8, 32, 8, 128, 64
    lens = torch.randint(1, 2048, (B,)).tolist()
    lens[0], lens[1] = 0, 2048
    args, _ = make_case(41, lens, KVH, H // KVH, D, page, torch.bfloat16, device="cuda")
    ref = paged_decode_attention_ref(
        **{
            **args,
            "q": args["q"].float(),
            "k_cache": args["k_cache"].float(),
            "v_cache": args["v_cache"].float(),
        }
    )
    out = paged_decode_attention(**args, num_splits=splits)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < 2e-2
