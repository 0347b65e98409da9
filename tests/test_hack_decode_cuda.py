"""The CUDA backend of HACK decode attention (kernels/hack_decode_cuda.py, kernels/cuda/).

CPU: the shipped cubin is built from the shipped source, backend choice and its errors, split sizing,
the shared-memory stage of the v2s* variants (its size against the pool's rows, the V swizzle's
bank pattern).
GPU (sm_90): the CUDA backend against the torch reference and the Triton backend, in and out of a
CUDA graph, padding rows exactly zero.
"""

import hashlib

import pytest
import torch

from zipserve.kernels import hack_decode_cuda
from zipserve.kernels.cuda_driver import CUDA_DIR
from zipserve.kernels.hack_decode_attention import (
    hack_decode_attention,
    hack_num_splits,
    resolve_backend,
)
from zipserve.kernels.hack_decode_reference import hack_decode_attention_ref
from zipserve.tests.test_hack_kernels import make_case

GEOM = dict(head_dim=128, page_size=64, bits=2, group_v=32, group=4, mode="f16")


def test_cubin_is_built_from_the_shipped_source():
    src = (CUDA_DIR / "hack_decode.cu").read_bytes()
    recorded = (CUDA_DIR / "hack_decode_sm90.cubin.sha256").read_text().strip()
    assert hashlib.sha256(src).hexdigest() == recorded, "run kernels/cuda/build.sh"
    assert (CUDA_DIR / "hack_decode_sm90.cubin").stat().st_size > 1000


def test_backend_choice_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("ZIPSERVE_HACK_DECODE", raising=False)
    assert resolve_backend("auto", cpu, **GEOM) == "triton"
    assert resolve_backend("triton", cpu, **GEOM) == "triton"
    monkeypatch.setenv("ZIPSERVE_HACK_DECODE", "auto")
    assert resolve_backend("auto", cpu, **GEOM) == "triton"  # the CUDA kernel cannot run here
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        resolve_backend("cuda", cpu, **GEOM)
    monkeypatch.setenv("ZIPSERVE_HACK_DECODE", "fast")
    with pytest.raises(ValueError, match="ZIPSERVE_HACK_DECODE"):
        resolve_backend("auto", cpu, **GEOM)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("gluon", cpu, **GEOM)


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(mode="int8"), "mode 'int8'"),
        (dict(head_dim=64, group_v=16), "head_dim 64"),
        (dict(page_size=32), "page_size 32"),
        (dict(bits=3, group_v=48), "bits 3"),
        (dict(group_v=64), "group_v 64"),
        (dict(group=16), "GQA group 16"),
    ],
)
def test_unsupported_geometry_is_named(monkeypatch, change, reason):
    # pretend to be an sm_90 GPU so that the geometry checks are the ones that speak
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    got = hack_decode_cuda.unsupported_reason(torch.device("cuda", 0), **dict(GEOM, **change))
    assert got is not None and reason in got
    assert hack_decode_cuda.unsupported_reason(torch.device("cuda", 0), **GEOM) is None


def test_cuda_splits_fill_the_gpu_and_keep_pages_per_split(monkeypatch):
    monkeypatch.setenv(hack_decode_cuda.VARIANT_ENV, "v2")
    assert hack_num_splits(8, 8, 32768, 132, backend="cuda") == 17  # 64 items x 17 >= 1056 warps
    assert hack_num_splits(1, 8, 131072, 132, backend="cuda") == 132
    assert hack_num_splits(64, 8, 8192, 132, backend="cuda") == 3
    assert hack_num_splits(1, 8, 256, 132, backend="cuda") == 1  # 4 pages: one split
    assert hack_num_splits(8, 8, 32768, 132) == 4  # the Triton rule is unchanged
    monkeypatch.setenv(hack_decode_cuda.VARIANT_ENV, "v2o3")  # 12 resident warps per SM
    assert hack_num_splits(8, 8, 32768, 132, backend="cuda") == 25
    monkeypatch.delenv(hack_decode_cuda.VARIANT_ENV)  # each bit width's default
    for bits, var in hack_decode_cuda.DEFAULT_VARIANTS.items():
        assert hack_decode_cuda.variant(bits) == var
        assert hack_decode_cuda.function_name(bits) == f"hack_decode_{var}_b{bits}"
    monkeypatch.setenv(hack_decode_cuda.VARIANT_ENV, "v2s3")  # one name for both widths
    assert hack_decode_cuda.variant(2) == hack_decode_cuda.variant(4) == "v2s3"
    monkeypatch.setenv(hack_decode_cuda.VARIANT_ENV, "v9")
    with pytest.raises(ValueError, match="ZIPSERVE_HACK_CUDA_VARIANT"):
        hack_num_splits(8, 8, 32768, 132, backend="cuda")


def test_stage_holds_one_pool_row_of_each_tensor():
    # the kernel's shared-memory stage (PageBytes in hack_decode.cu) is one row of each of the six
    # tensors it reads: the same byte count as the pool's real layout
    for bits in (2, 4):
        args, _ = make_case(3, [200], 2, 4, 128, bits, torch.float32, group_v=16 * bits)
        pages = args["pages"]
        tensors = (pages.k_codes, pages.v_codes, pages.k_scale, pages.k_min)
        tensors += (pages.v_scale, pages.v_min)
        row = sum(t[0, 0].numel() * t.element_size() for t in tensors)
        assert hack_decode_cuda.stage_bytes(bits) == row == {2: 5632, 4: 9216}[bits]
        assert hack_decode_cuda.stage_bytes(bits) % 512 == 0  # whole 32-lane rounds of 16 B


def test_shared_memory_variants_fit_and_count_their_resident_warps(monkeypatch):
    v = hack_decode_cuda
    assert v.shared_bytes("v2o3", 2) == 0 and v.resident_warps("v2o3", 4) == 12
    assert v.shared_bytes("v2s2", 4) == 4 * 2 * 9216  # 4 warps x 2 stages
    assert v.resident_warps("v2s2", 2) == v.resident_warps("v2s2", 4) == 12
    assert v.resident_warps("v2s3", 2) == 12 and v.resident_warps("v2s3", 4) == 8  # 110.6 KB
    assert v.resident_warps("v2s2o4", 2) == 16 and v.resident_warps("v2s2o4", 4) == 12
    assert v.resident_warps("v2o4", 4) == 16
    for name in v.VARIANTS:
        for bits in (2, 4):
            assert v.shared_bytes(name, bits) <= 227 * 1024  # sm_90's per-block limit
    monkeypatch.setenv(v.VARIANT_ENV, "v2s3")  # fewer resident warps at 4 bits: fewer splits
    assert hack_num_splits(8, 8, 32768, 132, backend="cuda", bits=2) == 25
    assert hack_num_splits(8, 8, 32768, 132, backend="cuda", bits=4) == 17


def v_swizzle(off: int) -> int:
    """Mirror of hack_decode.cu's v_swizzle (test_v_swizzle_source_matches checks the text)."""
    return off ^ ((off >> 2) & 0x60)


def test_v_swizzle_source_matches():
    src = (CUDA_DIR / "hack_decode.cu").read_text()
    assert "return off ^ ((off >> 2) & 0x60u);" in src


@pytest.mark.parametrize("bits", [2, 4])
def test_v_swizzle_moves_whole_chunks_and_spreads_pv_loads_over_banks(bits):
    de = 128 * bits // 8  # V code bytes per token
    size = 64 * de
    # a permutation of 16-byte chunks within each 512-byte block: cp.async chunks stay whole
    moved = [v_swizzle(o) for o in range(size)]
    assert sorted(moved) == list(range(size))
    for o in range(0, size, 16):
        assert all(v_swizzle(o + i) == v_swizzle(o) + i for i in range(16))
        assert v_swizzle(o) // 512 == o // 512
    # the PV loads: lane (gid, tid) reads word wc * 8 + gid of tokens kk * 16 + 2 tid + dt
    for kk in range(4):
        for wc in range(de // 32):
            for dt in (0, 1, 8, 9):
                banks = []
                for lane in range(32):
                    gid, tid = lane >> 2, lane & 3
                    off = (kk * 16 + 2 * tid + dt) * de + 4 * (wc * 8 + gid)
                    banks.append((v_swizzle(off) // 4) % 32)
                assert sorted(banks) == list(range(32)), (kk, wc, dt)  # one wavefront
                linear = [
                    ((kk * 16 + 2 * (ln & 3) + dt) * de + 4 * (wc * 8 + (ln >> 2))) // 4 % 32
                    for ln in range(32)
                ]
                assert len(set(linear)) < 32  # what the swizzle is for: linear rows conflict


def test_shared_memory_variant_refuses_a_misaligned_pool():
    args, _ = make_case(5, [300], 2, 4, 128, 2, torch.float32, group_v=32)
    pages = args["pages"]
    raw = torch.zeros(pages.k_codes.numel() + 1, dtype=torch.uint8)
    pages.k_codes = raw[1:].view(pages.k_codes.shape)  # one byte off
    b, h = args["q"].shape[:2]
    part = torch.zeros(b, h, 2, 128)
    lse = torch.zeros(b, h, 2)
    q = torch.zeros(b, h, 128)
    with pytest.raises(ValueError, match="16-byte aligned"):
        hack_decode_cuda.launch_page_splits(
            q, pages, args["page_table"], args["n_pages"], part, lse, 1.0, 4, 1, var="v2s2"
        )


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")
@pytest.mark.parametrize("variant", sorted(hack_decode_cuda.VARIANTS))
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group, splits, rotate", [(4, 3, True), (8, 1, False), (1, 5, True)])
def test_cuda_backend_matches_reference_and_triton(
    monkeypatch, variant, bits, group, splits, rotate
):
    from zipserve.compress.rotation import hadamard

    monkeypatch.setenv(hack_decode_cuda.VARIANT_ENV, variant)

    lens = [577, 0, 1, 64, 65, 2048 + 7]
    args, _ = make_case(11 + bits, lens, 2, group, 128, bits, torch.bfloat16, group_v=16 * bits)
    assert args["q"].is_cuda  # make_case builds on the GPU when there is one
    rot = hadamard(128, "cuda") if rotate else None
    ref = hack_decode_attention_ref(**args, num_splits=splits, rotation=rot)
    tri = hack_decode_attention(**args, num_splits=splits, rotation=rot, backend="triton")
    out = hack_decode_attention(**args, num_splits=splits, rotation=rot, backend="cuda")
    scale = ref.float().abs().max()
    assert ((out.float() - ref.float()).abs().max() / scale).item() < 2e-2
    assert ((out.float() - tri.float()).abs().max() / scale).item() < 2e-2
    assert (out[1] == 0).all()  # padding row
    # the same call captured in a CUDA graph and replayed
    static = torch.empty_like(out)
    hack_decode_attention(**args, num_splits=splits, rotation=rot, backend="cuda", out=static)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        hack_decode_attention(**args, num_splits=splits, rotation=rot, backend="cuda", out=static)
    static.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static, out)


def test_missing_driver_or_cubin_is_a_named_error():
    from zipserve.kernels import cuda_driver

    missing = cuda_driver.CubinModule("no_such_kernel.cubin")
    assert not missing.available()
    assert hack_decode_cuda.CUBIN.available()
    if not torch.cuda.is_available():
        try:
            cuda_driver._driver()
        except cuda_driver.CudaDriverError as exc:
            assert "libcuda.so.1" in str(exc)
        # where a driver library exists without a GPU, loading it is allowed; launching is not


def test_hack_backends_names_the_fastest_variant_per_bit_width():
    from zipserve.bench.hack_backends import best_variants

    def row(bits, var, batch, x, splits=8):
        return dict(variant=f"hack{bits}/{var}", batch=batch, context=8192, x_sdpa=x, splits=splits)

    rows = [
        dict(variant="sdpa-bf16", batch=8, context=8192, x_sdpa=1.0, splits=0),
        row(2, "triton", 8, 9.0),  # not a CUDA variant
        row(2, "cuda-v2o3", 8, 2.0),
        row(2, "cuda-v2o3", 32, 2.0),
        row(2, "cuda-v2s2", 8, 4.0),
        row(2, "cuda-v2s2", 32, 0.9),  # faster at one cell, slower over both (geomean 1.9)
        row(2, "cuda-v2", 8, 1.5),
        row(2, "cuda-v2", 8, 5.0, splits=16),  # v2 at twice its splits: not the default
        row(2, "cuda-v2", 32, 1.5),
        row(4, "cuda-v2o3", 8, 1.6),
        row(4, "cuda-v2p1", 8, 1.7),
    ]
    best = best_variants(rows)
    assert best[2][0] == "v2o3" and abs(best[2][1] - 2.0) < 1e-9
    assert best[4] == ("v2p1", pytest.approx(1.7))


def test_every_variant_is_in_the_cubin_as_the_source_declares_it():
    import re

    src = (CUDA_DIR / "hack_decode.cu").read_text()
    cubin = (CUDA_DIR / "hack_decode_sm90.cubin").read_bytes()
    entries = {
        (name, int(bits)): (int(ahead), int(stages), int(min_blocks))
        for name, bits, ahead, stages, min_blocks in re.findall(
            r"^HACK_DECODE_ENTRY\(hack_decode_(\w+)_b\d, (\d), (\d+), (\d+), (\d+)\)", src, re.M
        )
    }
    assert {name for name, _ in entries} == set(hack_decode_cuda.VARIANTS)
    for name, v in hack_decode_cuda.VARIANTS.items():
        for bits in (2, 4):
            assert hack_decode_cuda.function_name(bits, name).encode() in cubin
            ahead, stages, min_blocks = entries[(name, bits)]
            assert (v.ahead, v.stages) == (ahead, stages), name
            if min_blocks > 1:  # held to that many blocks' registers by __launch_bounds__
                assert v.blocks_by_registers == min_blocks, name
