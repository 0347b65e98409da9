"""What `zipserve calibrate` writes beside a checkpoint, from the corpus's training split: the
lowrank codecs' K/V bases and measured ranks (lowrank.safetensors + lowrank.json,
compress/calibrate.py), lowrank+hack2mix's per-layer widths and bits (lowrank_hack.json,
compress/lowrank_plan.py) and hack2mix's per-layer bits (kvbits.json, compress/kvbits.py). Each
refuses what it cannot calibrate, naming why."""

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
    allocation: str = "measured",
    measure_windows: int = 8,
    rank_step: int = 8,
    progress: bool = True,
) -> dict:
    """The bases of `model` for `budget` (average fraction of K+V dimensions kept), written to
    out (default: beside the checkpoint); compress.calibrate.calibrate's summary. The training
    split is shuffled (seed 0); the moments come from its first files, the measured allocation's
    `measure_windows` windows of `window` tokens from its last 200 (other text)."""
    from zipserve.bench.quality_breakdown import windows
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
    docs = list(load_corpus(text_dir).train)
    random.Random(0).shuffle(docs)  # a fixed sample across the whole training split
    held = min(200, len(docs) // 2)
    measure = None
    if allocation == "measured":
        measure = windows(llm.tokenizer, docs[len(docs) - held :], measure_windows, window)
    texts = [d.text for d in docs[: len(docs) - held]]
    return calibrate(
        llm,
        texts,
        budget,
        out or model,
        window=window,
        max_tokens=tokens,
        rank_step=rank_step,
        allocation=allocation,
        measure=measure,
        progress=progress,
    )


def calibrate_lowrank_hack(
    model: str,
    text_dir: str | None,
    budget: float,
    out: str | None,
    window: int,
    measure_windows: int = 8,
    progress: bool = True,
) -> dict:
    """lowrank+hack2mix's plan (per-layer HACK width and bits on the calibrated bases) for
    `budget` (bytes per token as a fraction of bf16's), measured on the same windows as the
    ranks; compress.lowrank_plan.calibrate_hack_plan's summary."""
    from zipserve.bench.quality_breakdown import windows
    from zipserve.compress.lowrank_plan import calibrate_hack_plan
    from zipserve.engine.loading import model_config_for
    from zipserve.engine.tokenizer import load_tokenizer
    from zipserve.train.corpus import load_corpus

    _checkpoint(model, "lowrank_hack.json")
    if model_config_for(model).lckv is not None:
        raise ValueError("model: calibrate --lowrank-hack does not support LCKV models yet")
    docs = list(load_corpus(text_dir).train)
    random.Random(0).shuffle(docs)
    held = min(200, len(docs) // 2)
    measure = windows(load_tokenizer(model), docs[len(docs) - held :], measure_windows, window)
    return calibrate_hack_plan(model, measure, budget, out or model, progress=progress)


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
