"""kernels/page_query.py: a decode step's query projected into a low-rank page basis in one launch.
The Triton kernel (the interpreter on CPU) against its torch reference (the fp32 einsum
compress/lowrank.py ran) on fresh random inputs with a relative-error bound: every q dtype, group
sizes and widths that are not powers of two, strided q views; the reference against the product
spelled out head by head; argument checks; and on a GPU the kernel inside a CUDA graph."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import pytest  # noqa: E402

from zipserve.kernels.page_query import (  # noqa: E402
    _project_query_kernel,
    project_query,
    project_query_ref,
)
from zipserve.kernels.paged_decode_attention import is_interpreted  # noqa: E402

DEVICE = "cpu" if is_interpreted(_project_query_kernel) else "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(gen, b, kvh, g, d, w, dtype, device=DEVICE, strided=False):
    """q [B, KVH * G, D] (a strided view of a wider qkv-like buffer when strided) and a random
    fp32 basis [KVH, D, W] scaled like an orthonormal one."""
    h = kvh * g
    if strided:
        q = torch.randn(b, h + 2 * kvh, d, generator=gen).to(device, dtype)[:, :h]
    else:
        q = torch.randn(b, h, d, generator=gen).to(device, dtype)
    basis = (torch.randn(kvh, d, w, generator=gen) / d**0.5).to(device)
    return q, basis


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b,kvh,g,d,w,strided",
    [
        (2, 8, 4, 128, 64, False),  # Llama-3-8B's heads at lowrank+hack2's width
        (3, 2, 3, 64, 40, True),  # a group of 3, a width that is not a power of two
        (1, 1, 1, 48, 16, True),  # MHA, D not a power of two
        (5, 4, 2, 32, 128, False),  # W wider than D (HACK's width for a small head_dim)
    ],
)
def test_kernel_matches_reference(b, kvh, g, d, w, strided, dtype):
    gen = torch.Generator().manual_seed(1000 * b + 10 * g + d)
    q, basis = _inputs(gen, b, kvh, g, d, w, dtype, strided=strided)
    got = project_query(q, basis)
    want = project_query_ref(q, basis)
    assert got.dtype == torch.float32 and got.shape == (b, kvh * g, w) and got.is_contiguous()
    assert _rel_err(got, want) < 1e-5  # both fp32 sums, in different orders


def test_reference_is_the_product_head_by_head():
    gen = torch.Generator().manual_seed(7)
    b, kvh, g, d, w = 2, 3, 2, 16, 8
    q, basis = _inputs(gen, b, kvh, g, d, w, torch.bfloat16, device="cpu")
    got = project_query_ref(q, basis)
    for bi in range(b):
        for h in range(kvh * g):
            want = q[bi, h].double() @ basis[h // g].double()
            assert torch.allclose(got[bi, h].double(), want, rtol=1e-5, atol=1e-6)


def test_empty_batch():
    gen = torch.Generator().manual_seed(3)
    q, basis = _inputs(gen, 0, 2, 2, 32, 16, torch.float32)
    assert project_query(q, basis).shape == (0, 4, 16)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda q, bs: (q[0], bs), "q must be"),
        (lambda q, bs: (q.int(), bs), "q must be"),
        (lambda q, bs: (q, bs.half()), "basis must be float32"),
        (lambda q, bs: (q, bs[:, :-1]), "basis must be float32"),
        (lambda q, bs: (q, torch.cat([bs, bs[:1]])), "must divide"),
        (lambda q, bs: (q.transpose(1, 2).contiguous().transpose(1, 2), bs), "contiguous last"),
        (lambda q, bs: (q, bs.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
    ],
)
def test_bad_arguments_name_the_argument(make, match):
    gen = torch.Generator().manual_seed(5)
    q, basis = _inputs(gen, 2, 2, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        project_query(*make(q, basis))


@pytest.mark.gpu
def test_kernel_in_a_cuda_graph():
    """Captured once, replayed on new queries written into the same buffer: the reference's
    values each time (the decode step replays it so)."""
    gen = torch.Generator().manual_seed(11)
    q, basis = _inputs(gen, 4, 8, 4, 128, 64, torch.bfloat16, device="cuda")
    project_query(q, basis)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = project_query(q, basis)
    for seed in (1, 2):
        q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out, project_query_ref(q, basis)) < 1e-5
