"""SamplingParams validation and Sampler behaviour (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from zipserve.engine.sampler import Sampler, SampleResult
from zipserve.engine.sampling_params import SamplingParams

# ---------------------------------------------------------------- SamplingParams


def test_defaults_valid():
    p = SamplingParams()
    assert p.max_tokens == 16 and p.temperature == 1.0 and p.top_k == 0 and p.top_p == 1.0
    assert p.seed is None and p.stop == () and p.stop_token_ids == () and not p.ignore_eos
    assert p.logprobs is None and p.min_tokens == 0 and not p.greedy


def test_normalization_and_greedy():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(temperature=0).greedy
    assert isinstance(SamplingParams(temperature=0).temperature, float)
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(top_k=-1).greedy
    SamplingParams(top_k=-1, top_p=0.01, seed=0, logprobs=0, min_tokens=16, max_tokens=16)
    SamplingParams(logprobs=20)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().top_p = 0.5


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", True),
        ("max_tokens", 2.0),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("temperature", True),
        ("top_k", -2),
        ("top_k", True),
        ("top_k", 1.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("seed", True),
        ("seed", 1.0),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [1]),
        ("stop", 5),
        ("stop_token_ids", [1, True]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 7),
        ("ignore_eos", 1),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", False),
        ("min_tokens", -1),
        ("min_tokens", 17),
        ("min_tokens", True),
    ],
)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError) as exc:
        SamplingParams(**{field: value})
    assert str(exc.value).startswith(f"{field}:"), str(exc.value)


# ---------------------------------------------------------------- Sampler

sampler = Sampler()


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_greedy_is_argmax_any_dtype():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = logits.to(dtype)
        res = sampler.sample(x, [SamplingParams(temperature=0)] * 6, [None] * 6)
        assert isinstance(res, SampleResult)
        assert res.token_ids.dtype == torch.int64 and res.token_ids.shape == (6,)
        assert torch.equal(res.token_ids, x.float().argmax(-1))
        assert res.logprobs is None and res.top_logprobs == [None] * 6


def test_greedy_ties_lowest_index():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    res = sampler.sample(logits, [SamplingParams(temperature=0)] * 2, [None] * 2)
    assert res.token_ids.tolist() == [1, 0]


def test_top_k_1_equals_greedy_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    params = [
        SamplingParams(top_k=1, temperature=1.5) if i % 2 else SamplingParams() for i in range(8)
    ]
    res = sampler.sample(logits, params, [None] * 8)
    assert torch.equal(res.token_ids[1::2], logits[1::2].argmax(-1))


def test_top_p_keeps_nucleus_and_matches_frequencies():
    probs = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15])  # sorted: 1, 3, 4, 2, 0
    logits = probs.log()
    n = 4000
    g = _gen(123)
    # top_p=0.8: mass before 1,3,4 is 0, .40, .70 (< .8); before 2 it is .85 -> nucleus {1, 3, 4}.
    res = sampler.sample(logits.expand(n, -1), [SamplingParams(top_p=0.8)] * n, [g] * n)
    counts = torch.bincount(res.token_ids, minlength=5).float() / n
    assert counts[0] == 0 and counts[2] == 0
    expected = torch.tensor([0.0, 0.40, 0.0, 0.30, 0.15]) / 0.85
    assert (counts - expected).abs().max() < 0.04, counts
    # top_k=2 then top_p=0.5 on the renormalized pair (.4/.7=.571 >= .5): only token 1.
    res = sampler.sample(
        logits.expand(100, -1), [SamplingParams(top_k=2, top_p=0.5)] * 100, [g] * 100
    )
    assert set(res.token_ids.tolist()) == {1}
    # A tiny top_p always keeps the most probable token.
    res = sampler.sample(logits.expand(50, -1), [SamplingParams(top_p=1e-6)] * 50, [g] * 50)
    assert set(res.token_ids.tolist()) == {1}


def test_top_k_restricts_and_plain_sampling_matches_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log()
    n = 4000
    g = _gen(7)
    res = sampler.sample(logits.expand(n, -1), [SamplingParams(top_k=2)] * n, [g] * n)
    counts = torch.bincount(res.token_ids, minlength=4).float() / n
    assert counts[0] == 0 and counts[1] == 0
    assert abs(counts[3] - 4 / 7) < 0.04
    torch.manual_seed(0)  # unseeded rows use the default RNG
    res = sampler.sample(logits.expand(n, -1), [SamplingParams()] * n, [None] * n)
    counts = torch.bincount(res.token_ids, minlength=4).float() / n
    assert (counts - probs).abs().max() < 0.04, counts
    # temperature 2 flattens: p ~ sqrt(probs)
    res = sampler.sample(logits.expand(n, -1), [SamplingParams(temperature=2.0)] * n, [g] * n)
    counts = torch.bincount(res.token_ids, minlength=4).float() / n
    flat = probs.sqrt() / probs.sqrt().sum()
    assert (counts - flat).abs().max() < 0.04, counts


def test_small_temperature_approaches_greedy():
    torch.manual_seed(2)
    logits = torch.randn(16, 1000) * 3
    params = [SamplingParams(temperature=1e-4)] * 16
    for seed in range(5):
        res = sampler.sample(logits, params, [_gen(seed)] * 16)
        assert torch.equal(res.token_ids, logits.argmax(-1))
    res = sampler.sample(logits, [SamplingParams(temperature=1e-30)] * 16, [None] * 16)
    assert torch.equal(res.token_ids, logits.argmax(-1))


def test_seeded_reproducible_and_batch_independent():
    torch.manual_seed(3)
    V = 200
    row = torch.randn(V)
    p = SamplingParams(temperature=1.3, top_k=50, top_p=0.9, seed=42)
    alone = [sampler.sample(row[None], [p], [_gen(42)]).token_ids.item() for _ in range(3)]
    assert len(set(alone)) == 1
    # Same seeded row inside different batches, at different positions, with unseeded neighbours.
    for b, pos in ((4, 0), (7, 5), (3, 2)):
        logits = torch.randn(b, V)
        logits[pos] = row
        params = [SamplingParams(temperature=0.7, top_p=0.95)] * b
        params[pos] = p
        gens: list = [None] * b
        gens[pos] = _gen(42)
        res = sampler.sample(logits, params, gens)
        assert res.token_ids[pos].item() == alone[0]
    # A sequence of draws from one generator is reproducible.
    seq1 = [
        sampler.sample(row[None], [p], [g]).token_ids.item() for g in [_gen(5)] for _ in range(20)
    ]
    g = _gen(5)
    seq2 = [sampler.sample(row[None], [p], [g]).token_ids.item() for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(4)
    logits = torch.randn(4, 64).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.5, top_k=5, logprobs=3),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(),  # did not ask
        SamplingParams(top_p=0.5, logprobs=20),
    ]
    res = sampler.sample(logits, params, [_gen(i) for i in range(4)])
    ref = logits.float().log_softmax(-1)
    assert res.logprobs is not None and res.logprobs.dtype == torch.float32
    expect = ref.gather(1, res.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(res.logprobs, expect)
    assert res.top_logprobs[1] is None and res.top_logprobs[2] is None
    for i, k in ((0, 3), (3, 20)):
        top = res.top_logprobs[i]
        assert top is not None and len(top) == k
        vals = [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        ref_vals, _ = ref[i].topk(k)
        torch.testing.assert_close(torch.tensor(vals), ref_vals)
        for tok, v in top:
            assert abs(ref[i, tok].item() - v) < 1e-6


def test_bad_batch_arguments():
    with pytest.raises(ValueError):
        sampler.sample(torch.randn(2, 5), [SamplingParams()], [None, None])
    with pytest.raises(ValueError):
        sampler.sample(torch.randn(5), [SamplingParams()], [None])


@pytest.mark.gpu
def test_sampling_on_gpu_queues_without_waiting():
    """A mixed batch (greedy, temperature with top-k and top-p) is sampled on a GPU without one
    host wait: the per-row knobs go through pinned memory, so the sampling kernels queue behind
    the forward pass (a wait there idled the GPU for their launches, and on a GPU shared with a
    prefill cost a time slice). Greedy and top_k=1 rows equal the argmax (SamplingParams()
    samples at temperature 1: the first H100 run compared that row and failed)."""
    from zipserve.bench.host_syncs import host_syncs

    logits = torch.randn(8, 1000, device="cuda")
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=1),
        SamplingParams(temperature=1.2, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=40, top_p=0.95),
    ] * 2
    sampler.sample(logits, params, [None] * 8)  # warm-up: pinned blocks, kernels
    torch.cuda.synchronize()
    with host_syncs("cuda") as waits:
        res = sampler.sample(logits, params, [None] * 8)
    assert waits == []
    tokens = res.token_ids.cpu()
    assert ((tokens >= 0) & (tokens < 1000)).all()
    greedy = logits.argmax(-1).cpu()
    assert all(tokens[i] == greedy[i] for i in (0, 1, 4, 5))
