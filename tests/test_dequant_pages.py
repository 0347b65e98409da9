"""The decode_kv=dense dequantization kernels (kernels/dequant_pages.py): Triton (the interpreter
on CPU, fp16 / fp32 outputs: it has no bfloat16) against the torch references on fresh random
pages, the references against each codec's own dequantize, only the named pages written."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402

from zipserve.compress.codecs import make_codec  # noqa: E402
from zipserve.kernels import dequant_pages as dq  # noqa: E402

CODECS = ["fp8", "kivi2", "kivi4", "hack2", "hack4"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _encoded(name: str, n: int, kvh: int, d: int, seed: int, device="cpu", rotate=True):
    """A codec and a store of n fresh random pages [n, KVH, 64, d] (outlier channels too)."""
    codec = make_codec(name, kvh, 64, d)
    if name.startswith("hack"):
        codec.rotate = rotate
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, kvh, 64, d, generator=g) * torch.linspace(0.2, 4.0, d)  # [n, KVH, P, D]
    v = torch.randn(n, kvh, 64, d, generator=g) + 0.5
    store = codec.new_store(n, device)
    codec.encode(store, torch.arange(n, device=device), k.to(device), v.to(device))
    return codec, store


def _run(name, codec, store, ids, out_k, out_v, kernel: bool):
    """Call the kernel (or its reference) of the codec's family with the raw tensors."""
    suffix = "" if kernel else "_ref"
    if name == "fp8":
        getattr(dq, "fp8_dequant_pages" + suffix)(
            store["k"], store["k_scale"], store["v"], store["v_scale"], ids, out_k, out_v
        )
    elif name.startswith("kivi"):
        getattr(dq, "kivi_dequant_pages" + suffix)(
            store["k_codes"],
            store["k_scale"],
            store["k_min"],
            store["v_codes"],
            store["v_scale"],
            store["v_min"],
            codec.bits,
            ids,
            out_k,
            out_v,
        )
    else:
        rot = codec._rot(out_k.device) if codec.rotate else None
        getattr(dq, "hack_dequant_pages" + suffix)(
            codec._pages(store), ids, out_k, out_v, rotation=rot
        )


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype,seed", [(torch.float32, 1), (torch.float16, 2)])
def test_kernel_matches_reference(name, dtype, seed):
    n, kvh, d, pool = 3, 2, 64, 7
    codec, store = _encoded(name, n, kvh, d, seed)
    ids = torch.tensor([5, 1, 3])  # out of order, leaving pages 0, 2, 4, 6 alone
    fill = torch.full((pool, kvh, 64, d), 7.0, dtype=dtype)
    got_k, got_v, ref_k, ref_v = (fill.clone() for _ in range(4))
    _run(name, codec, store, ids, got_k, got_v, kernel=True)
    _run(name, codec, store, ids, ref_k, ref_v, kernel=False)
    bound = 1e-6 if dtype == torch.float32 else 1e-3
    assert rel_err(got_k[ids], ref_k[ids]) < bound and rel_err(got_v[ids], ref_v[ids]) < bound
    untouched = [0, 2, 4, 6]
    for t in (got_k, got_v, ref_k, ref_v):
        assert (t[untouched] == 7.0).all()
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", CODECS)
def test_reference_is_the_codecs_dequantize(name):
    """What the dense pool receives equals codec.dequantize (the compressed reference's values)."""
    codec, store = _encoded(name, 2, 2, 64, 3)
    out_k = torch.zeros(4, 2, 64, 64)
    out_v = torch.zeros_like(out_k)
    ids = torch.tensor([3, 2])
    codec.dequantize_into(store, ids, out_k, out_v)  # CPU: the torch reference
    want_k, want_v = codec.dequantize(store, torch.arange(2))
    assert torch.equal(out_k[ids], want_k) and torch.equal(out_v[ids], want_v)
    assert not out_k[:2].any() and not out_v[:2].any()


def test_hack_rotation_is_undone():
    """Rotated HACK pages come back in the model's basis: close to the original K/V, and far from
    what the same codes give without the rotation undone."""
    codec = make_codec("hack4", 1, 64, 64)
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 1, 64, 64, generator=g), torch.randn(1, 1, 64, 64, generator=g)
    store = codec.new_store(1, "cpu")
    codec.encode(store, torch.arange(1), k, v)
    out_k, out_v = torch.zeros(2, 1, 64, 64), torch.zeros(2, 1, 64, 64)
    dq.hack_dequant_pages(
        codec._pages(store),
        torch.tensor([1]),
        out_k,
        out_v,
        rotation=codec._rot(torch.device("cpu")),
    )
    raw_k = torch.zeros_like(out_k)
    dq.hack_dequant_pages(codec._pages(store), torch.tensor([1]), raw_k, torch.zeros_like(out_v))
    assert rel_err(out_k[1], k[0]) < 0.15 and rel_err(out_v[1], v[0]) < 0.15  # 4-bit codes
    assert rel_err(raw_k[1], k[0]) > 1.0


def test_argument_errors_name_the_argument():
    codec, store = _encoded("fp8", 2, 2, 64, 5)
    out = torch.zeros(4, 2, 64, 64)
    with pytest.raises(ValueError, match="page_ids"):
        dq.fp8_dequant_pages_ref(
            store["k"],
            store["k_scale"],
            store["v"],
            store["v_scale"],
            torch.tensor([1]),
            out,
            out.clone(),
        )
    with pytest.raises(ValueError, match="out_k"):
        dq.fp8_dequant_pages(
            store["k"],
            store["k_scale"],
            store["v"],
            store["v_scale"],
            torch.tensor([1, 2]),
            torch.zeros(4, 2, 32, 64),
            out,
        )
    with pytest.raises(ValueError, match="out_k"):
        dq.fp8_dequant_pages(
            store["k"],
            store["k_scale"],
            store["v"],
            store["v_scale"],
            torch.tensor([1, 2]),
            out.to(torch.int32),
            out,
        )
    for name in ("lowrank", "lowrank+hack2"):  # the low-rank codecs' dense form (K full, V's basis)
        lowrank = make_codec(name, 2, 64, 32, model_dir="random:tiny").for_layer(0)
        pool = torch.zeros(4, 2, 64, 32)
        with pytest.raises(ValueError, match=r"pages: fields \[\] do not match the pool's"):
            lowrank.dequantize_into({}, torch.tensor([1]), pool, pool.clone())
        with pytest.raises(ValueError, match="pages: must be a lowrank"):
            lowrank.dequantize_into([], torch.tensor([1]), pool, pool.clone())
        pages = lowrank.new_store(2, "cpu")
        first = next(iter(pages))
        with pytest.raises(ValueError, match=f"pages: {first}: .* per page, pool has"):
            bad = {**pages, first: pages[first][:, :1]}
            lowrank.dequantize_into(bad, torch.tensor([1, 2]), pool, pool.clone())
        with pytest.raises(ValueError, match="page_ids"):
            lowrank.dequantize_into(pages, torch.tensor([1]), pool, pool.clone())
        with pytest.raises(ValueError, match="out_k"):
            lowrank.dequantize_into(pages, torch.tensor([1, 2]), out, out.clone())  # D 64, not 32
        lowrank.dequantize_into(pages, torch.tensor([1, 2]), pool, pool.clone())


# -- GPU: bf16 outputs, Llama-3-8B head shape ----------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CODECS)
def test_bf16_kernel_gpu(name):
    n, kvh, d = 40, 8, 128
    codec, store = _encoded(name, n, kvh, d, 6, device="cuda")
    ids = torch.randperm(2 * n, device="cuda")[:n]
    got_k = torch.zeros(2 * n, kvh, 64, d, dtype=torch.bfloat16, device="cuda")
    got_v = torch.zeros_like(got_k)
    _run(name, codec, store, ids, got_k, got_v, kernel=True)
    ref_k, ref_v = codec.dequantize(store, torch.arange(n, device="cuda"))  # fp32
    torch.cuda.synchronize()
    assert rel_err(got_k[ids], ref_k) < 1e-2 and rel_err(got_v[ids], ref_v) < 1e-2
    rest = torch.ones(2 * n, dtype=torch.bool, device="cuda")
    rest[ids] = False
    assert not got_k[rest].any() and not got_v[rest].any()
