"""The CUDA HACK decode kernel's v2 warp, emulated lane by lane on the CPU (tests/hack_cuda_emulator.py),
against a float64 softmax over the same page split: bits 2 and 4, GQA 1 / 4 / 8, first / last split;
and the v2s* variants' shared-memory stage (copy then swizzled reads) against the pool reads."""

import numpy as np
import pytest
import torch

from zipserve.kernels.hack_encode import hack_encode_pages_ref
from zipserve.kernels.hack_layout import HackPages
from zipserve.tests.hack_cuda_emulator import StagePage, reference_split, warp_v2

D, P = 128, 64


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group, split", [(4, 0), (8, 2), (1, 1)])
def test_v2_warp_matches_float64_softmax_of_its_split(bits, group, split):
    gen = torch.Generator().manual_seed(bits * 10 + group)
    kvh, pool_pages, used = 2, 10, 7
    gv = D * bits // 8
    pool = HackPages.empty(pool_pages, kvh, P, D, bits, gv)
    k = torch.randn(pool_pages, kvh, P, D, generator=gen) * 1.5
    v = torch.randn(pool_pages, kvh, P, D, generator=gen)
    ids = torch.arange(pool_pages, dtype=torch.int32)
    hack_encode_pages_ref(k, v, bits, gv, out=pool, page_ids=ids)
    q = torch.randn(kvh * group, D, generator=gen).numpy()
    table_row = torch.randperm(pool_pages, generator=gen)[:used].numpy()
    qk = D**-0.5 * 1.4426950408889634
    for h in range(kvh):
        args = (bits, q, pool, table_row, used, group, h, 3, split, qk, 4)
        out, lse = warp_v2(*args)
        ref_out, ref_lse = reference_split(*args)
        assert np.abs(out - ref_out).max() / np.abs(ref_out).max() < 5e-3
        assert np.abs(lse - ref_lse).max() < 1e-2


@pytest.mark.parametrize("bits", [2, 4])
def test_stage_path_reads_exactly_what_the_pool_path_reads(bits):
    # copy_page_async's chunk map and the swizzled reads, mirrored: every stage byte is written
    # once (StagePage asserts it) and the warp's result is bit-identical to reading the pool
    gen = torch.Generator().manual_seed(40 + bits)
    kvh, pool_pages, group = 2, 6, 4
    gv = D * bits // 8
    pool = HackPages.empty(pool_pages, kvh, P, D, bits, gv)
    k = torch.randn(pool_pages, kvh, P, D, generator=gen)
    v = torch.randn(pool_pages, kvh, P, D, generator=gen)
    hack_encode_pages_ref(
        k, v, bits, gv, out=pool, page_ids=torch.arange(pool_pages, dtype=torch.int32)
    )
    q = torch.randn(kvh * group, D, generator=gen).numpy()
    table_row = torch.randperm(pool_pages, generator=gen)[:4].numpy()
    args = (bits, q, pool, table_row, 4, group, 1, 2, 0, D**-0.5 * 1.4426950408889634, 4)
    out, lse = warp_v2(*args)
    out_s, lse_s = warp_v2(*args, page=StagePage)
    assert np.array_equal(out, out_s) and np.array_equal(lse, lse_s)
    assert np.isfinite(out).all() and np.abs(out).max() > 0
