"""The HACK decode kernel reading its 16-bit tail in place (a row and a first column per sequence
in a bigger buffer) and with the pages in a rotated basis while q, the tail and the output stay in
the model's: kernel against its torch reference, and both against the plain call on moved and
rotated copies. The rotated merge against its reference. Triton runs under TRITON_INTERPRET=1 on CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before importing triton / the kernels

import pytest  # noqa: E402
from test_hack_kernels import DEVICE, make_case, rel_err  # noqa: E402

from zipserve.compress.rotation import hadamard, hadamard_block, rotate  # noqa: E402
from zipserve.kernels.hack_decode_attention import (  # noqa: E402
    hack_decode_attention,
    hack_decode_attention_ref,
)
from zipserve.kernels.paged_decode_attention import merge_splits  # noqa: E402
from zipserve.kernels.rotated_merge import (  # noqa: E402
    merge_rotated,
    merge_rotated_ref,
    merged_lse_ref,
)


def _move_tail(args, seed, rows_total=5, pad=3):
    """The case's dense tail copied into row perm[b], columns start[b]..., of a NaN-filled buffer."""
    gen = torch.Generator().manual_seed(seed)
    dk, dv = args["dense_k"], args["dense_v"]
    b, kvh, t, d = dk.shape
    rows = torch.randperm(rows_total, generator=gen)[:b].to(torch.int32)
    start = torch.randint(0, pad + 1, (b,), generator=gen).to(torch.int32)
    big_k = torch.full((rows_total, kvh, t + pad, d), float("nan"), dtype=dk.dtype)
    big_v = torch.full_like(big_k, float("nan"))
    for i in range(b):
        r, s = int(rows[i]), int(start[i])
        big_k[r, :, s : s + t] = dk[i].cpu()
        big_v[r, :, s : s + t] = dv[i].cpu()
    return {
        **args,
        "dense_k": big_k.to(DEVICE),
        "dense_v": big_v.to(DEVICE),
        "dense_rows": rows.to(DEVICE),
        "dense_start": start.to(DEVICE),
    }


@pytest.mark.parametrize("mode", ["f16", "int8"])
@pytest.mark.parametrize(
    "seed,lens,kvh,group,d,bits,splits",
    [(41, [128, 65, 191], 2, 4, 64, 2, 1), (42, [200, 63, 1, 0], 1, 8, 128, 4, 3)],
)
def test_tail_in_place_equals_gathered_tail(mode, seed, lens, kvh, group, d, bits, splits):
    args, _ = make_case(seed, lens, kvh, group, d, bits, torch.float32)
    moved = _move_tail(args, seed)
    want = hack_decode_attention_ref(**args, mode=mode)
    ref = hack_decode_attention_ref(**moved, mode=mode)
    out = hack_decode_attention(**moved, mode=mode, num_splits=splits)
    assert rel_err(ref, want) < 1e-6  # the reference reads the same numbers where they moved
    assert torch.isfinite(out).all() and rel_err(out, ref) < (5e-3 if mode == "f16" else 2e-3)
    assert (out[torch.tensor(lens, device=out.device) == 0] == 0).all()


@pytest.mark.parametrize("mode", ["f16", "int8"])
@pytest.mark.parametrize(
    "seed,lens,kvh,group,d,bits,splits",
    [(43, [130, 64, 5], 2, 4, 64, 2, 2), (44, [257, 70], 1, 4, 128, 4, 1)],
)
def test_rotated_pages_with_model_basis_tail(mode, seed, lens, kvh, group, d, bits, splits):
    """Pages of K R / V R, q and tail in the model basis: equals the plain call with q R and the
    tail R, output rotated back (R orthonormal and symmetric)."""
    args, _ = make_case(seed, lens, kvh, group, d, bits, torch.float32)
    r = hadamard(d, DEVICE)
    # the case's pages stand for K R, V R; the model basis holds the tail rotated back
    model = {
        **args,
        "q": rotate(args["q"], r),
        "dense_k": rotate(args["dense_k"], r),
        "dense_v": rotate(args["dense_v"], r),
    }
    want = rotate(hack_decode_attention_ref(**args, mode=mode), r)
    ref = hack_decode_attention_ref(**model, mode=mode, rotation=r)
    moved = _move_tail(model, seed)
    out = hack_decode_attention(**moved, mode=mode, num_splits=splits, rotation=r)
    tol_ref = 1e-5 if mode == "f16" else 3e-2  # int8 rounds q~ from q R computed another way
    assert rel_err(ref, want) < tol_ref
    assert torch.isfinite(out).all() and rel_err(out, ref) < (5e-3 if mode == "f16" else 2e-3)


def test_tail_args_are_checked():
    args, _ = make_case(45, [70, 9], 1, 2, 64, 2, torch.float32)
    moved = _move_tail(args, 45)
    bad = {
        "dense_rows": dict(dense_rows=moved["dense_rows"].long()),
        "dense_start": dict(dense_start=moved["dense_start"][:1]),
        "rotation": dict(rotation=torch.eye(32, device=DEVICE)),
    }
    for fn in (hack_decode_attention, hack_decode_attention_ref):
        for name, kw in bad.items():
            with pytest.raises(ValueError, match=name):
                fn(**{**moved, **kw})
    with pytest.raises(ValueError, match="dense_k"):  # more rows than B need dense_rows
        hack_decode_attention_ref(**{**moved, "dense_rows": None})


@pytest.mark.parametrize("butterfly", [True, False])
@pytest.mark.parametrize("d,parts", [(64, 2), (128, 5), (96, 3)])
def test_rotated_merge_matches_reference(d, parts, butterfly):
    """hadamard()'s own tensor takes the butterfly path (hadamard_block), a copy of it the
    general one that reads R; both equal the reference."""
    gen = torch.Generator().manual_seed(d + parts)
    b, h = 3, 4
    part = torch.randn(b, h, parts, d, generator=gen)
    lse = torch.randn(b, h, parts, generator=gen) * 3
    lse[0, 0, 1:] = float("-inf")  # only the tail
    lse[1, 2, 0] = float("-inf")  # no tail
    lse[2, 3] = float("-inf")  # a padding row
    part[1, 2, 0] = float("nan")  # dead partials are never read
    r = hadamard(d, DEVICE) if butterfly else hadamard(d).clone().to(DEVICE)
    assert (hadamard_block(r) == (d & -d)) if butterfly else hadamard_block(r) is None
    part, lse = part.to(DEVICE), lse.to(DEVICE)
    ref = merge_rotated_ref(part, lse, r, torch.empty(b, h, d, device=DEVICE))
    out = merge_rotated(part, lse, r, torch.full((b, h, d), float("nan"), device=DEVICE))
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-5
    assert (out[2, 3] == 0).all()
    # by hand for one row: softmax weights of the partials, pages rotated back
    w = torch.softmax(lse[1, 1] * torch.log(torch.tensor(2.0)), 0)
    hand = (w[1:, None] * part[1, 1, 1:]).sum(0) @ r + w[0] * part[1, 1, 0]
    assert rel_err(ref[1, 1], hand) < 1e-5


@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("d,parts", [(64, 2), (128, 5)])
def test_merges_write_the_merged_lse(d, parts, rotated):
    """lse_out: each row's log2-sum-exp over its partials, -inf for a row with none; the output
    is the same with or without it."""
    gen = torch.Generator().manual_seed(3 * d + parts)
    b, h = 3, 4
    part = torch.randn(b, h, parts, d, generator=gen).to(DEVICE)
    lse = (torch.randn(b, h, parts, generator=gen) * 3).to(DEVICE)
    lse[0, 0, 1:] = float("-inf")
    lse[2, 3] = float("-inf")  # a padding row
    want = merged_lse_ref(lse)
    by_hand = torch.log2(torch.exp2(lse[1, 2]).sum())
    assert abs(want[1, 2].item() - by_hand.item()) < 1e-5
    r = hadamard(d).to(DEVICE)
    lse_out = torch.full((b, h), float("nan"), device=DEVICE)
    if rotated:
        out = merge_rotated(part, lse, r, torch.empty(b, h, d, device=DEVICE), lse_out)
        plain = merge_rotated(part, lse, r, torch.empty(b, h, d, device=DEVICE))
        lse_ref = torch.empty(b, h, device=DEVICE)
        merge_rotated_ref(part, lse, r, torch.empty(b, h, d, device=DEVICE), lse_ref)
        assert torch.equal(lse_ref[torch.isfinite(want)], want[torch.isfinite(want)])
    else:
        out = merge_splits(part, lse, torch.empty(b, h, d, device=DEVICE), lse_out)
        plain = merge_splits(part, lse, torch.empty(b, h, d, device=DEVICE))
    assert torch.equal(out, plain)
    assert torch.isneginf(lse_out[2, 3]) and torch.isneginf(want[2, 3])
    live = torch.isfinite(want)
    assert live.sum() == b * h - 1
    assert (lse_out[live] - want[live]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="lse_out"):
        merge_splits(part, lse, torch.empty(b, h, d, device=DEVICE), lse_out[:, :2])


@pytest.mark.parametrize("d,bits", [(64, 2), (128, 4), (96, 2)])
def test_encode_reads_rows_in_place_and_skips_the_scratch_page(d, bits):
    """A decode step's seal: rows of a bigger (strided) open-page buffer, the rows whose page is
    the scratch page written nowhere; kernel and reference agree and equal a plain encode."""
    from zipserve.kernels.hack_encode import hack_encode_pages, hack_encode_pages_ref
    from zipserve.kernels.hack_layout import HackPages, unpack_planar

    gen = torch.Generator().manual_seed(d + bits)
    kvh, p, gv = 2, 64, d * bits // 8
    slots, cols = 6, p + 5  # a tail buffer: 4 sink columns before the open page, 1 junk after
    buf_k = torch.randn(slots, kvh, cols, d, generator=gen)
    buf_v = torch.randn(slots, kvh, cols, d, generator=gen)
    open_k, open_v = buf_k[:, :, 4 : 4 + p], buf_v[:, :, 4 : 4 + p]  # strided views
    rows = torch.tensor([3, 0, 5, 1], dtype=torch.int32)
    ids = torch.tensor([0, 2, 0, 5], dtype=torch.int64)  # two rows fill no page: scratch 0
    rot = hadamard(d)

    def pool():
        pg = HackPages.empty(7, kvh, p, d, bits, gv)
        for t in pg.tensors().values():
            t.fill_(7 if t.dtype == torch.uint8 else 1.5)
        return pg

    want = pool()
    hack_encode_pages_ref(
        open_k[[0, 1]].contiguous(), open_v[[0, 1]].contiguous(), bits, gv, out=want,
        page_ids=torch.tensor([2, 5]), rotation=rot,
    )  # fmt: skip
    outs = []
    for fn in (hack_encode_pages_ref, hack_encode_pages):
        got = pool()
        fn(
            open_k.to(DEVICE), open_v.to(DEVICE), bits, gv, out=got, page_ids=ids.to(DEVICE),
            rotation=rot.to(DEVICE), src_rows=rows.to(DEVICE), skip_page=0,
        )  # fmt: skip
        outs.append(got)
    for name, t in want.tensors().items():
        for got in outs:
            g = got.tensors()[name].cpu()
            assert torch.equal(g[[0, 1, 3, 4, 6]], t[[0, 1, 3, 4, 6]]), name  # untouched
            if t.dtype == torch.uint8:  # codes: a rare rounding tie may differ by one step
                assert (g[[2, 5]].int() != t[[2, 5]].int()).float().mean() < 0.01, name
            elif name.endswith("_sums"):  # the sums of its own codes (a tie moves them by 1)
                codes = unpack_planar(got.tensors()[name[0] + "_codes"].cpu()[[2, 5]], bits)
                assert torch.equal(g[[2, 5]], codes.float().sum(-1 if name[0] == "k" else -2))
            else:
                assert torch.allclose(g[[2, 5]].float(), t[[2, 5]].float(), rtol=2e-3), name
    with pytest.raises(ValueError, match="src_rows"):
        hack_encode_pages_ref(open_k, open_v, bits, gv, src_rows=rows)  # no pool
