"""control/placement.py: GPU shares per actor and the engine options of workers that share a GPU
(a prefill pool of one longest prompt, decode engines dividing the rest, user settings kept)."""

import pytest

from zipserve.control.placement import gpu_share, role_engine_options
from zipserve.engine.config import EngineConfig
from zipserve.engine.page_pool import pages_for


def test_gpu_share():
    assert gpu_share(0, 2, pinned=False) == 1.0  # CPU: no GPU asked for
    assert gpu_share(2, 2, pinned=False) == 1.0
    assert gpu_share(1, 2, pinned=False) == 0.5
    assert gpu_share(2, 6, pinned=False) == pytest.approx(1 / 3)
    assert gpu_share(1, 4, pinned=True) == 1.0  # pinned to GPU nodes: a whole GPU each


def opts(role, options=None, *, device="cuda", gpus=1, workers=2, num_decode=1, ctx=8192):
    return role_engine_options(
        options or {},
        role,
        device=device,
        share=gpu_share(gpus, workers, pinned=False),
        gpus=gpus,
        num_decode=num_decode,
        max_model_len=ctx,
    )


def test_shared_gpu_prefill_gets_one_longest_prompt_and_no_graphs():
    o = opts("prefill", {"page_size": 32}, ctx=8000)
    assert o == {"page_size": 32, "cuda_graphs": False, "num_pages": pages_for(8000, 32) + 1}
    EngineConfig(**o)  # valid engine options
    assert opts("decode") == {"gpu_memory_fraction": 0.85}
    # two decode workers on one GPU divide it; on two GPUs each has its own
    assert opts("decode", workers=3, num_decode=2)["gpu_memory_fraction"] == 0.425
    assert opts("decode", gpus=2, workers=4, num_decode=2)["gpu_memory_fraction"] == 0.85
    EngineConfig(**opts("decode", workers=9, num_decode=8))


def test_whole_gpus_and_cpu_and_user_settings_are_left_alone():
    assert opts("prefill", gpus=2) == {"cuda_graphs": False}  # own GPU: sized from memory
    assert opts("decode", gpus=2) == {}
    assert opts("prefill", device="cpu") == {} and opts("decode", device="cpu") == {}
    user = {"num_pages": 100, "cuda_graphs": True}
    assert opts("prefill", user) == user and opts("decode", user) == user
    assert opts("decode", {"gpu_memory_fraction": 0.3}) == {"gpu_memory_fraction": 0.3}
    assert opts("prefill", device="cuda:1")["num_pages"] == pages_for(8192, 64) + 1


def test_serve_config_codecs_are_validated(capsys):
    from zipserve.control.config import ServeConfig
    from zipserve.deploy.cli import REFERENCE_MODEL, main

    model = str(REFERENCE_MODEL)
    cfg = ServeConfig(model=model, codec="hack2", extra_codecs=["bf16"])
    assert cfg.codecs == ("hack2", "bf16")
    with pytest.raises(ValueError, match=r"--codec: unknown codec 'hack3'"):
        ServeConfig(model=model, codec="bf16", extra_codecs=("hack3",))
    with pytest.raises(ValueError, match=r"--codec: a codec is named twice in bf16,bf16"):
        ServeConfig(model=model, codec="bf16", extra_codecs=("bf16",))
    with pytest.raises(ValueError, match=r"--prefill-group: serves one codec"):
        ServeConfig(
            model=model,
            codec="bf16",
            extra_codecs=("hack2",),
            prefill_group=2,
            prefill_group_min_tokens=256,
        )
    assert main(["serve", "--model", model, "--codec", "hack2,zip"]) == 2  # before any start
    assert "unknown codec 'zip'" in capsys.readouterr().err
    lckv = str(REFERENCE_MODEL.parent / "zipserve-lckv")  # no calibrated bases beside it
    with pytest.raises(
        ValueError,
        match=r"--codec: lowrank\+hack2 needs calibrated bases at "
        r".*zipserve-lckv/lowrank.safetensors; create them",
    ):
        ServeConfig(model=lckv, codec="bf16", extra_codecs=("lowrank+hack2",))
    ServeConfig(model=model, codec="lowrank")  # the reference model ships its bases
    ServeConfig(model="random:tiny", codec="lowrank")  # random bases for random weights
    with pytest.raises(ValueError, match=r"--engine-option: .*unexpected keyword argument 'pgs'"):
        ServeConfig(model=model, engine_options={"pgs": 3})
    with pytest.raises(ValueError, match=r"--engine-option: page_size: must be a power of two"):
        ServeConfig(model=model, engine_options={"page_size": 3})
    assert main(["serve", "--model", model, "--engine-option", "num_pages=0"]) == 2
    assert "--engine-option: num_pages" in capsys.readouterr().err
