"""The shipped reference checkpoint: loads on CPU, writes plausible Python, and its held-out
perplexity matches the model card."""

from __future__ import annotations

import json

import pytest

from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.train.corpus import load_corpus
from zipserve.train.evaluate import eval_ppl

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)


def test_size_and_shape():
    assert (REFERENCE_MODEL / "model.safetensors").stat().st_size <= 16 * 1024 * 1024
    cfg = json.loads((REFERENCE_MODEL / "config.json").read_text())
    assert cfg["head_dim"] == 64 and cfg["num_key_value_heads"] < cfg["num_attention_heads"]


def test_greedy_generation_is_python():
    llm = LLM(str(REFERENCE_MODEL), device="cpu")
    out = llm.generate("def ", SamplingParams(max_tokens=48, temperature=0.0))[0]
    header = ("def " + out.text).split("\n")[0]
    # The first generated line is a valid function header.
    compile(header + "\n    pass\n", "<generated>", "exec")
    assert llm.engine.pool.num_free == llm.engine.pool.capacity


@pytest.mark.slow
def test_held_out_perplexity_matches_model_card():
    card = json.loads((REFERENCE_MODEL / "eval_ppl.json").read_text())
    if load_corpus().digest() != card["held_out_digest"]:
        pytest.skip("this Python's held-out modules differ from the ones the card was measured on")
    got = eval_ppl(str(REFERENCE_MODEL), None, card["context"], card["stride"], "float32", "cpu")
    assert got["perplexity"] == pytest.approx(card["perplexity"], rel=0.01)
