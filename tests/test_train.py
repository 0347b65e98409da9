"""The training recipe on a tiny config: loss goes down, and the checkpoint it writes loads in
the engine and in transformers with the same logits."""

from __future__ import annotations

import json
import random

import pytest
import torch

from zipserve.train.corpus import load_corpus
from zipserve.train.recipe import TrainConfig, train

WORDS = ["value", "items", "result", "index", "name", "data", "count", "self", "path", "key"]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        lines = []
        for j in range(30):
            a, b = rng.choice(WORDS), rng.choice(WORDS)
            lines.append(f"def f{i}_{j}({a}, {b}):\n    return {a} + {b} * {j}\n")
        (root / f"mod{i}.py").write_text("\n".join(lines))
    (root / "dup.py").write_text((root / "mod0.py").read_text())  # deduplicated away
    return root


def test_corpus_dedup_and_held_out(text_dir):
    corpus = load_corpus(text_dir)
    paths = [d.path for d in corpus.train + corpus.held_out]
    assert len(paths) == 40 and len(set(paths)) == 40  # dup.py dropped
    assert corpus.held_out and not set(d.path for d in corpus.held_out) & {
        d.path for d in corpus.train
    }


def test_corpus_rejects_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="text_dir"):
        load_corpus(tmp_path / "nope")


@pytest.fixture(scope="module")
def trained(text_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    cfg = TrainConfig(
        vocab_size=300,
        hidden_size=64,
        num_layers=2,
        num_heads=1,
        num_kv_heads=1,
        intermediate_size=128,
        max_position_embeddings=256,
        seq_len=64,
        batch_size=8,
        total_tokens=8 * 64 * 60,
        lr=3e-3,
        warmup_steps=10,
        eval_every=20,
        save_every=1000,
    )
    summary = train(cfg, out, text_dir=text_dir, device="cpu")
    return out, summary


def test_training_reduces_loss(trained):
    _, summary = trained
    losses = [loss for _, loss in summary["log"]["loss"]]
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [loss for _, loss in summary["log"]["eval"]]
    assert evals[-1] < evals[0], evals


def test_checkpoint_loads_in_engine_and_transformers(trained):
    transformers = pytest.importorskip("transformers")
    from zipserve.engine.llm import LLM

    out, _ = trained
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    llm = LLM(str(out), device="cpu", dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = llm.tokenizer.encode("def f1_2(value, items):\n    return")
    hf_ids = transformers.AutoTokenizer.from_pretrained(out)("def f1_2(value, items):\n    return")[
        "input_ids"
    ]
    assert ids == hf_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = llm.logits(ids)
    assert (ours - ref).abs().max().item() / ref.abs().max().item() < 1e-5
