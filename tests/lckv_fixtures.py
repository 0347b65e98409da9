"""Test helper: a tiny random LCKV checkpoint directory (`random:tiny-lckv`'s shape) written from the
training model, with a real tokenizer, loadable by `LLM(path)` and `zipserve serve --model path`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_fixtures import write_tokenizer
from safetensors.torch import save_file

from zipserve.engine.config import RANDOM_MODELS
from zipserve.train.lckv_model import TrainLCKV
from zipserve.train.recipe import hf_config_dict

TINY_LCKV = RANDOM_MODELS["tiny-lckv"]


def write_tiny_lckv_checkpoint(out: Path, seed: int = 0) -> TrainLCKV:
    """config.json + model.safetensors (fp32) + tokenizer into out; returns the training model."""
    model = TrainLCKV(TINY_LCKV)
    model.init_weights(torch.Generator().manual_seed(seed))
    sd = {k: v.contiguous() for k, v in model.hf_state_dict().items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(TINY_LCKV), indent=2))
    write_tokenizer(out, TINY_LCKV.vocab_size)
    return model
