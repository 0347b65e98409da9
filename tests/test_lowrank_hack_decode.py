"""lowrank+hack decode through the HACK decode kernel (compress/lowrank.py `_hack_decode`): pages
attended with the projected query and no tail, the 16-bit tail by plain attention, merged by their
log-sum-exps; and the kernel's `return_lse` / `return_partials` it relies on (Triton under
TRITON_INTERPRET=1 on CPU)."""

import os

import torch

if not torch.cuda.is_available():  # the Triton kernel runs in the interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from zipserve.compress.codecs import make_codec  # noqa: E402
from zipserve.compress.reference_attention import dequant_decode_attention  # noqa: E402
from zipserve.kernels.hack_decode_attention import hack_decode_attention  # noqa: E402
from zipserve.kernels.hack_decode_reference import hack_decode_attention_ref  # noqa: E402
from zipserve.kernels.lowrank_tail_merge import merge_parts_ref  # noqa: E402
from zipserve.tests.test_hack_kernels import make_case  # noqa: E402


@pytest.mark.parametrize("bits", [2, 4])
def test_kernel_lse_matches_reference(bits):
    lens = [300, 0, 70, 5]
    args, _ = make_case(3 + bits, lens, 2, 4, 64, bits, torch.float32, group_v=8 * bits)
    out_r, lse_r = hack_decode_attention_ref(**args, num_splits=3, return_lse=True)
    out_k, lse_k = hack_decode_attention(**args, num_splits=3, return_lse=True)
    assert lse_r.shape == lse_k.shape == (len(lens), 8)
    assert torch.isinf(lse_r[1]).all() and torch.isinf(lse_k[1]).all()  # padding row
    live = torch.isfinite(lse_r)
    assert torch.allclose(lse_k[live], lse_r[live], atol=5e-3)  # f16 mode: q~ and p~ in fp16
    assert torch.allclose(out_k.float(), out_r.float(), atol=2e-3)
    plain = hack_decode_attention(**args, num_splits=3)  # the same call without the lse
    assert torch.equal(plain, out_k)


@pytest.mark.parametrize("bits", [2, 4])
def test_kernel_partials_merge_to_its_merged_output(bits):
    """return_partials: the tail program's and the 3 page splits' partials, unmerged; merged in
    torch they are the kernel's own merged output and lse, and the reference's one partial."""
    lens = [300, 0, 70, 5]
    args, _ = make_case(3 + bits, lens, 2, 4, 64, bits, torch.float32, group_v=8 * bits)
    out_k, lse_k = hack_decode_attention(**args, num_splits=3, return_lse=True)
    part, lse = hack_decode_attention(**args, num_splits=3, return_partials=True)
    assert part.shape == (len(lens), 8, 4, 64) and lse.shape == (len(lens), 8, 4)
    o, lse_m = merge_parts_ref(part, lse)
    live = torch.isfinite(lse_k)
    assert torch.equal(torch.isfinite(lse_m), live)
    assert torch.allclose(lse_m[live], lse_k[live], atol=1e-5)
    assert torch.allclose(o, out_k.float(), atol=1e-5)
    part_r, lse_r = hack_decode_attention_ref(**args, num_splits=3, return_partials=True)
    assert part_r.shape == (len(lens), 8, 1, 64) and lse_r.shape == (len(lens), 8, 1)
    assert torch.allclose(merge_parts_ref(part_r, lse_r)[0], o, atol=2e-3)
    with pytest.raises(ValueError, match="return_partials"):
        hack_decode_attention(**args, return_partials=True, return_lse=True)


@pytest.mark.parametrize("codec_name", ["lowrank+hack2", "lowrank+hack4"])
def test_lowrank_hack_decode_equals_the_dequantizing_reference(codec_name):
    kvh, p, d = 8, 64, 128  # random:llama3-8b's bases
    codec = make_codec(codec_name, kvh, p, d, model_dir="random:llama3-8b").for_layer(0)
    gen = torch.Generator().manual_seed(7)
    n_pages = 9
    store = codec.new_store(n_pages, "cpu")
    k = torch.randn(n_pages, kvh, p, d, generator=gen)
    v = torch.randn(n_pages, kvh, p, d, generator=gen)
    codec.encode(store, torch.arange(n_pages), k, v)
    # rows: pages + tail, pages only, tail only, nothing (padding)
    page_table = torch.tensor([[3, 1, 5, 0], [2, 8, -1, -1], [-1] * 4, [-1] * 4], dtype=torch.int32)
    n_full = torch.tensor([4, 2, 0, 0], dtype=torch.int32)
    dense_lens = torch.tensor([37, 0, 20, 0], dtype=torch.int32)
    t = 4 + p
    dk, dv = codec.to_dense(torch.randn(4, t, kvh, d, generator=gen), torch.randn(4, t, kvh, d))
    dense_k, dense_v = dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()
    q = torch.randn(4, 4 * kvh, d, generator=gen)
    args = (q, store, page_table, n_full, dense_k, dense_v, dense_lens, d**-0.5)
    got = codec.decode_attention(*args, num_splits=2)
    want = dequant_decode_attention(codec, *args)
    assert got.shape == want.shape == (4, 4 * kvh, d)
    assert (got[3] == 0).all()
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()
