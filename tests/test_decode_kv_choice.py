"""decode_kv=auto's rule (engine/decode_kv.py: choose_decode_kv), case by case."""

from __future__ import annotations

import pytest
import torch

from zipserve.compress.codec import KVCodec
from zipserve.compress.codecs import CodecEntry, register, unregister
from zipserve.engine.decode_kv import (
    MEASURED_SPEED_VS_SDPA,
    DeviceInfo,
    check_decode_kv,
    choose_decode_kv,
    gpu_family,
)

GIB = 1 << 30
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", 40 * GIB)
H200 = DeviceInfo("cuda", "NVIDIA H200", 100 * GIB)
OTHER = DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", 40 * GIB)


@pytest.mark.parametrize(
    "codec,device,need,mode",
    [
        ("hack2", DeviceInfo("cpu"), 0, "dense"),  # CPU: torch references either way
        ("kivi2", DeviceInfo("cpu"), 10**15, "dense"),  # CPU ignores memory (max_kv_tokens)
        ("bf16", H100, 10 * GIB, "dense"),  # already dense
        ("lowrank", DeviceInfo("cpu"), 0, "dense"),  # its dense form: the 16-bit tail's
        ("lowrank", H200, GIB, "compressed"),  # its kernel 1.68x the bf16 paged kernel
        ("lowrank+hack4", H200, GIB, "dense"),  # unmeasured
        ("lowrank+hack2", H100, 10 * GIB, "dense"),  # engine step 0.84x of bf16's
        ("lowrank+hack2", H100, 40 * GIB + 1, "compressed"),  # dense pages do not fit
        ("hack2", H100, 10 * GIB, "compressed"),  # engine step 1.04x of bf16 (CUDA kernel)
        ("hack2", H200, 10 * GIB, "compressed"),  # engine step 1.18x bf16's on H200
        ("hack4", H200, 10 * GIB, "compressed"),
        ("lowrank+hack2", H200, 10 * GIB, "dense"),  # 0.90x
        ("fp8", H200, 10 * GIB, "dense"),
        ("kivi2", H200, 10 * GIB, "dense"),
        ("kivi4", H100, 10 * GIB, "dense"),  # unmeasured on H100
        ("hack2", OTHER, 10 * GIB, "dense"),  # unmeasured GPU
        ("fp8", H200, 200 * GIB, "compressed"),  # dense pages do not fit
        ("hack2", H100, 40 * GIB + 1, "compressed"),
    ],
)
def test_choice(codec, device, need, mode):
    choice = choose_decode_kv(codec, device, need)
    assert choice.mode == mode, choice
    assert choice.reason


def test_gpu_family_and_table():
    assert gpu_family("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_family("NVIDIA H200") == "h200"
    assert gpu_family("NVIDIA A100-SXM4-80GB") is None
    # on the H200 the dense decode beats fp8's and kivi's, HACK's beats it (session 27)
    h200 = MEASURED_SPEED_VS_SDPA["h200"]
    assert all(h200[k] < h200["paged-bf16"] for k in ("fp8", "kivi2", "kivi4", "lowrank+hack2"))
    assert all(h200[k] > h200["paged-bf16"] for k in ("hack2", "hack4"))


class _CodesOnly(KVCodec):
    """A codec that declares no dense form (no shipped codec does)."""

    dense_form, no_dense_form_reason = False, "its pages have no values to expand"


@pytest.fixture
def codes_only_codec():
    register(CodecEntry("codes-only", _CodesOnly))
    yield "codes-only"
    unregister("codes-only")


def test_check_names_decode_kv(codes_only_codec):
    check_decode_kv("hack2", "dense")
    check_decode_kv("lowrank+hack2", "dense")
    check_decode_kv(codes_only_codec, "compressed")
    with pytest.raises(ValueError, match="decode_kv: must be one of compressed, dense, auto"):
        check_decode_kv("hack2", "Dense")
    with pytest.raises(
        ValueError,
        match="decode_kv: 'dense' is not available for codec codes-only: its pages have no values",
    ):
        check_decode_kv(codes_only_codec, "dense")
    assert choose_decode_kv(codes_only_codec, DeviceInfo("cpu"), 0).mode == "compressed"


def test_codec_modes(codes_only_codec):
    from zipserve.engine.decode_kv import codec_modes

    runs, skipped = codec_modes(["bf16", "hack2", codes_only_codec], ["compressed", "dense"])
    assert runs == [
        ("bf16", "compressed"),
        ("hack2", "compressed"),
        ("hack2", "dense"),
        (codes_only_codec, "compressed"),
    ]
    assert len(skipped) == 2 and "codes-only dense" in skipped[1]
    with pytest.raises(ValueError, match="decode_kv"):
        codec_modes(["hack2", codes_only_codec], ["dense"])
    runs, _ = codec_modes(["lowrank+hack2"], ["compressed", "dense"])
    assert runs == [("lowrank+hack2", "compressed"), ("lowrank+hack2", "dense")]


@pytest.mark.parametrize("codec", ["bf16", "hack2", "kivi2"])
def test_decode_splits_come_from_the_kernel_that_runs(codec):
    """Decode graphs take the split count of the kernel the cache runs: the paged bf16 kernel's
    "about two programs per SM" for dense pages (bf16, or a codec decoded dense), the codec's own
    heuristic on codes (HACK: one wave of its two resident programs per SM, not a second wave)."""
    from zipserve.compress.codecs import make_codec
    from zipserve.engine.config import RANDOM_MODELS
    from zipserve.engine.kv_memory import build_cache
    from zipserve.kernels.hack_decode_attention import hack_num_splits
    from zipserve.kernels.paged_decode_attention import paged_decode_splits

    cfg = RANDOM_MODELS["tiny"]
    c = make_codec(codec, cfg.num_kv_heads, 64, cfg.head_dim, dtype=torch.float32)
    for mode in ("dense", "compressed"):
        if mode == "compressed" and c.dense_pages:
            continue
        cache = build_cache(c, mode, cfg, 8, 64, 4, torch.float32, "cpu")
        got = [cache.decode_splits(b, 32768, 132) for b in (1, 8, 33)]
        if mode == "dense":
            want = [paged_decode_splits(b, cfg.num_kv_heads, 132) for b in (1, 8, 33)]
        else:
            want = [c.num_splits(b, 32768, 132) for b in (1, 8, 33)]
        assert got == want, (codec, mode)
    if codec == "hack2":  # Llama-3-8B heads at 8 x 32k on 132 SMs: 4 splits (256 programs)
        assert hack_num_splits(8, 8, 32768, 132) == 4 and paged_decode_splits(8, 8, 132) == 5
