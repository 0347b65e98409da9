"""What `zipserve calibrate` writes beside a checkpoint, from the corpus's training split: the
lowrank codecs' K/V bases (lowrank.safetensors, compress/calibrate.py) and hack2mix's per-layer
bits (kvbits.json, compress/kvbits.py). Each refuses what it cannot calibrate, naming why."""

from __future__ import annotations

import random


def _checkpoint(model: str, writes: str) -> str:
    if model.startswith("random:"):
        raise ValueError(f"model: calibrate needs a checkpoint directory to write {writes} into")
    return model


def calibrate_lowrank(
    model: str,
    text_dir: str | None,
    budget: float,
    out: str | None,
    window: int,
    tokens: int,
    device: str | None,
) -> dict:
    """The bases of `model` for `budget` (average fraction of K+V dimensions kept), written to
    out (default: beside the checkpoint); compress.calibrate.calibrate's summary."""
    from zipserve.compress.calibrate import calibrate
    from zipserve.engine.llm import LLM
    from zipserve.train.corpus import load_corpus

    _checkpoint(model, "the bases")
    llm = LLM(model, dtype="float32", device=device, max_model_len=window + 1)
    if llm.engine.config.lckv is not None:
        raise ValueError(
            "model: calibrate does not support LCKV models yet (lowrank codecs "
            "need bases per KV layer)"
        )
    texts = [d.text for d in load_corpus(text_dir).train]
    random.Random(0).shuffle(texts)  # a fixed sample across the whole training split
    return calibrate(llm, texts, budget, out or model, window=window, max_tokens=tokens)


def calibrate_layer_bits(
    model: str,
    text_dir: str | None,
    budget: float,
    out: str | None,
    window: int,
    windows: int,
    min_gain: float,
) -> dict:
    """hack2mix's bits per layer for `budget` (bytes per token as a fraction of bf16's);
    compress.kvbits.calibrate_kvbits's summary."""
    from zipserve.compress.kvbits import calibrate_kvbits
    from zipserve.engine.loading import model_config_for

    _checkpoint(model, "kvbits.json")
    if model_config_for(model).lckv is not None:
        raise ValueError(
            "model: calibrate --kvbits does not support LCKV models yet (a plan "
            "needs bits per KV layer)"
        )
    return calibrate_kvbits(
        model, out, text_dir, n_windows=windows, context=window, budget=budget, min_gain=min_gain
    )
