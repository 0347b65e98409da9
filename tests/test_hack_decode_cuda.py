"""The CUDA backend of HACK decode attention (kernels/hack_decode_cuda.py, kernels/cuda/).

CPU: the shipped cubin is built from the shipped source, backend choice and its errors, split sizing.
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
    monkeypatch.setenv(hack_decode_cuda.VARIANT_ENV, "v9")
    with pytest.raises(ValueError, match="ZIPSERVE_HACK_CUDA_VARIANT"):
        hack_num_splits(8, 8, 32768, 132, backend="cuda")


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
