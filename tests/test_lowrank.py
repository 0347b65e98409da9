"""ZeroC-style low-rank codec: calibration respects its budget (ranks by energy or by measured
loss), stores full-rank bases that load cut to the ranks, full rank is lossless, missing bases
are a clear error."""

from __future__ import annotations

import shutil

import pytest
import torch

from zipserve.compress.calibrate import allocate_ranks, calibrate
from zipserve.deploy.cli import REFERENCE_MODEL
from zipserve.engine.llm import LLM, SamplingParams
from zipserve.train.corpus import load_corpus

pytestmark = pytest.mark.skipif(
    not (REFERENCE_MODEL / "config.json").exists(), reason="reference checkpoint not present"
)


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_MODEL / f, d / f)
    return d


def _calibrate(model_dir, budget, **kw):
    llm = LLM(str(model_dir), device="cpu", max_model_len=513)
    texts = [d.text for d in load_corpus().train[200:230]]
    kw.setdefault("allocation", "energy")
    return calibrate(llm, texts, budget, model_dir, window=512, max_tokens=6000, **kw)


def test_missing_bases_is_a_clear_error(model_copy):
    with pytest.raises(ValueError, match="calibrate"):
        LLM(str(model_copy), device="cpu", codec="lowrank")


def test_full_rank_is_lossless(model_copy):
    info = _calibrate(model_copy, 1.0)
    assert info["k_ranks"] == [64] * 6 and info["v_ranks"] == [64] * 6
    ids = load_corpus().held_out[0].text
    plain = LLM(str(model_copy), device="cpu")
    coded = LLM(str(model_copy), device="cpu", codec="lowrank")
    toks = plain.tokenizer.encode(ids)[:300]
    a, b = plain.logits(toks), coded.logits(toks)
    assert (a - b).abs().max().item() / a.abs().max().item() < 2e-2  # float16 storage only


def test_budget_is_respected(model_copy):
    info = _calibrate(model_copy, 0.5)
    total = sum(info["k_ranks"]) + sum(info["v_ranks"])
    assert total <= 0.5 * 2 * 64 * 6
    assert all(r % 8 == 0 and 8 <= r <= 64 for r in info["k_ranks"] + info["v_ranks"])
    llm = LLM(str(model_copy), device="cpu", codec="lowrank")
    # bytes per token follow the ranks exactly (float16 values)
    assert llm.engine.codec.bytes_per_token(6) == pytest.approx(2 * 2 * total)


def test_measured_ranks_are_the_optimum_of_the_measured_losses(model_copy):
    """allocation='measured' on one training window (rank step 32: one measured rank per layer
    and kind): the ranks are the budgeted optimum of the losses it records, the file holds the
    full-rank bases and loading cuts them to the ranks (or to any other ranks asked for)."""
    from zipserve.bench.quality_breakdown import windows
    from zipserve.compress.lowrank_bases import LowRankBases
    from zipserve.compress.lowrank_plan import allocate_ranks_measured

    llm = LLM(str(model_copy), device="cpu", max_model_len=513)
    measure = windows(llm.tokenizer, load_corpus().train[400:420], 1, 256)
    info = _calibrate(model_copy, 0.5, allocation="measured", measure=measure, rank_step=32)
    m = info["measured"]
    assert len(m["rank_losses"]) == 12 and m["windows"] == 1 and m["scored_per_window"] == 128
    losses = {
        (int(k.split()[1]), k.split()[2], int(k.split()[4])): x for k, x in m["rank_losses"].items()
    }
    rk, rv, pred = allocate_ranks_measured(losses, 6, 64, 0.5, 32)
    assert (info["k_ranks"], info["v_ranks"]) == (rk, rv)
    assert sum(rk) + sum(rv) <= 384 and m["predicted_nll_increase"] == pytest.approx(pred, abs=1e-6)
    full = LowRankBases.load(model_copy, ranks=([64] * 6, [64] * 6))
    cut = LowRankBases.load(model_copy)
    for i in range(6):
        assert full.layers[i]["k_enc"].shape == (2, 64, 64)
        assert torch.equal(cut.layers[i]["k_enc"], full.layers[i]["k_enc"][:, :, : rk[i]])
        assert torch.equal(cut.layers[i]["v_dec"], full.layers[i]["v_dec"][:, :, : rv[i]])
    with pytest.raises(ValueError, match="measure"):
        _calibrate(model_copy, 0.5, allocation="measured")


def test_allocate_ranks_prefers_energy():
    d = 64
    steep = torch.linspace(0.9, 1.0, d).clamp(max=1.0)  # most energy in the first dims
    flat = torch.linspace(1.0 / d, 1.0, d)  # energy spread evenly
    cum_k = torch.stack([steep[None], flat[None]])  # [L=2, KVH=1, D]
    cum_v = torch.stack([steep[None], steep[None]])
    rk, rv = allocate_ranks(cum_k, cum_v, 0.5, 16)
    assert rk[1] > rk[0]  # the flat spectrum gets the dims
    with pytest.raises(ValueError, match="budget"):
        allocate_ranks(cum_k, cum_v, 0.0, 16)


def test_random_model_gets_random_orthonormal_bases_for_speed_benchmarks():
    from zipserve.compress.lowrank_bases import LowRankBases
    from zipserve.engine.config import random_model_config

    cfg = random_model_config("random:tiny")
    b = LowRankBases.load("random:tiny")
    assert len(b.layers) == cfg.num_layers and "speed benchmarks only" in b.info["basis"]
    r = round(0.5 * cfg.head_dim)
    for layer in b.layers:
        k = layer["k_enc"]  # [KVH, D, r]
        assert k.shape == (cfg.num_kv_heads, cfg.head_dim, r)
        eye = torch.eye(r).expand(cfg.num_kv_heads, r, r)
        assert torch.allclose(k.transpose(1, 2) @ k, eye, atol=1e-5)
        assert torch.allclose(layer["v_enc"].transpose(1, 2) @ layer["v_enc"], eye, atol=1e-5)
    llm = LLM("random:tiny", device="cpu", codec="lowrank+hack2", num_pages=64)
    out = llm.generate([[5] * 150], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    assert llm.engine.pool.num_free == llm.engine.pool.capacity
