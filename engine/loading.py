"""Builds a ready model from a model name: a Hugging Face directory or `random:NAME`.

Random models draw N(0, 0.02) weights (unit norms) from a fixed seed directly on the target device,
so `random:llama3-8b` needs no file and no host memory.
"""

from __future__ import annotations

import contextlib

import torch

from zipserve.engine.checkpoint import load_checkpoint
from zipserve.engine.checkpoint import resolve_dtype as checkpoint_dtype
from zipserve.engine.config import ModelConfig, random_model_config
from zipserve.engine.model import LlamaModel


def resolve_dtype(
    dtype: str | torch.dtype | None, config: ModelConfig, device: torch.device
) -> torch.dtype:
    """The compute dtype: as asked, else ('auto' or None) bf16 on GPU and fp32 on CPU."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return checkpoint_dtype(dtype, config)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def model_config_for(model: str) -> ModelConfig:
    if model.startswith("random:"):
        return random_model_config(model)
    return ModelConfig.from_dir(model)


def model_class(config: ModelConfig) -> type:
    """The engine module that runs config's architecture."""
    if config.lckv is not None:
        from zipserve.engine.lckv_model import LCKVModel

        return LCKVModel
    return LlamaModel


def build_model(
    model: str,
    dtype: str | torch.dtype | None,
    device: torch.device,
    max_positions: int,
    seed: int = 0,
) -> tuple[ModelConfig, torch.nn.Module, torch.dtype]:
    config = model_config_for(model)
    tensors = None
    if not model.startswith("random:"):
        config, tensors = load_checkpoint(model, dtype=None, device=device)
    dt = resolve_dtype(dtype, config, device)
    with torch.device(device), _default_dtype(dt):
        net = model_class(config)(config, max_positions)
    if tensors is not None:
        net.load_hf_state(tensors)
        del tensors
    else:
        _init_random(net, seed, device)
    return config, net.eval().requires_grad_(False), dt


@torch.no_grad()
def _init_random(net: LlamaModel, seed: int, device: torch.device) -> None:
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in net.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
