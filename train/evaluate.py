"""Held-out perplexity of a checkpoint on the corpus's evaluation split (`zipserve eval ppl`, and
the number a trained model's card reports), and an LCKV checkpoint run with another pass count."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path


def eval_ppl(
    model: str, text_dir: str | None, context: int, stride: int, dtype: str, device: str | None
) -> dict:
    from zipserve.engine.llm import LLM
    from zipserve.engine.perplexity import perplexity
    from zipserve.train.corpus import load_corpus

    llm = LLM(model, dtype=dtype, device=device, max_model_len=context + 1)
    corpus = load_corpus(text_dir)
    docs = [llm.tokenizer.encode(d.text) for d in corpus.held_out]
    res = perplexity(llm.logits, docs, context=context, stride=stride)
    return {
        "perplexity": res.perplexity,
        "tokens": res.tokens,
        "context": context,
        "stride": stride,
        "dtype": str(llm.engine.dtype).replace("torch.", ""),
        "device": str(llm.engine.device),
        "held_out_digest": corpus.digest(),
        "corpus_root": str(corpus.root),
    }


@contextlib.contextmanager
def lckv_passes(model: str, passes: int | None) -> Iterator[str]:
    """`model` as is, or (passes given) a temporary copy of its directory, files linked, whose
    LCKV prompt encoding runs `passes` passes over the condensed stack: to measure convergence."""
    if passes is None:
        yield model
        return
    src = Path(model)
    cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    if "lckv" not in cfg:
        raise ValueError(f"lckv-passes: {model} is not an LCKV model directory")
    if passes < 1:
        raise ValueError(f"lckv-passes: must be >= 1, got {passes}")
    cfg["lckv"].update(passes_no_grad=passes - 1, passes_grad=1)
    with tempfile.TemporaryDirectory() as tmp:
        for f in src.iterdir():
            if f.name != "config.json":
                (Path(tmp) / f.name).symlink_to(f.resolve())
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        yield tmp
