"""`zipserve calibrate`: per-layer, per-KV-head low-rank bases for the ZeroC-style `lowrank` codec.

The model runs over calibration text; every layer's post-RoPE queries and keys and its values are
collected per KV head as second moments C_q, C_k, C_v. Bases are chosen for what attention needs,
not for reconstructing K and V:
- K: scores q.k are kept best by the top eigenvectors U of C_q^1/2 C_k C_q^1/2 (queries whitened):
  keys are stored as k @ (C_q^1/2 U) and queries projected with C_q^-1/2 U, so that
  q_red . k_red = q^T C_q^-1/2 U U^T C_q^1/2 k (exactly q.k at full rank).
- V: the attention output passes through W_o, so with M = sum over the group's query heads of
  W_o,h^T W_o,h, values are stored as v @ (M^1/2 U) with U from M^1/2 C_v M^1/2 and lifted back
  with M^-1/2 U (foldable into W_o).
Ranks are chosen per layer (shared by its KV heads, multiples of `rank_step`) under a size budget,
the average fraction of K+V dimensions kept: by default from the perplexity each rank measurably
costs on calibration windows of the training split (`allocation="measured"`,
compress/lowrank_plan.py), or by the earlier greedy allocation that maximizes the retained
(whitened) energy fraction (`"energy"`).
Bases are written beside the checkpoint as lowrank.safetensors, every layer's at full rank (columns
by falling energy: other codecs cut them to their own ranks, e.g. lowrank+hack2mix), and
lowrank.json with `lowrank`'s ranks and what was measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from zipserve.engine.attention import prefill_attention


class _CaptureCache:
    """Stands in for the KV cache during calibration: records second moments, attends exactly."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int):
        def z() -> torch.Tensor:  # [layers, kv_heads, head_dim, head_dim]
            return torch.zeros(num_layers, num_kv_heads, head_dim, head_dim, dtype=torch.float64)

        self.qq, self.kk, self.vv = z(), z(), z()
        self.tokens = 0

    def attention(self, layer, q, k, v, batch, scale):
        t, h, d = q.shape
        kvh = k.shape[1]
        qg = q.double().view(t, kvh, h // kvh, d).transpose(0, 1).reshape(kvh, -1, d)
        kd, vd = k.double().transpose(0, 1), v.double().transpose(0, 1)  # [KVH, T, D]
        self.qq[layer] += (qg.transpose(1, 2) @ qg).cpu()
        self.kk[layer] += (kd.transpose(1, 2) @ kd).cpu()
        self.vv[layer] += (vd.transpose(1, 2) @ vd).cpu()
        if layer == 0:
            self.tokens += t
        return prefill_attention(q, k, v, batch.seq_lens_host, scale)


def _sqrt_pair(m: torch.Tensor, rel_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric square root and inverse square root of PSD matrices [.., D, D]."""
    evals, evecs = torch.linalg.eigh(m)
    evals = evals.clamp(min=rel_eps * evals.amax(-1, keepdim=True).clamp(min=1e-30))
    root = (evecs * evals.sqrt()[..., None, :]) @ evecs.transpose(-1, -2)
    inv = (evecs * evals.rsqrt()[..., None, :]) @ evecs.transpose(-1, -2)
    return root, inv


def _whitened_bases(c_x: torch.Tensor, metric: torch.Tensor):
    """For data second moment c_x and metric [KVH, D, D]: (encode basis, decode basis, cumulative
    energy fraction [KVH, D]), columns by falling energy."""
    root, inv = _sqrt_pair(metric)
    evals, u = torch.linalg.eigh(root @ c_x @ root)  # ascending
    evals, u = evals.flip(-1).clamp(min=0), u.flip(-1)
    cum = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp(min=1e-30)
    enc, dec = root @ u, inv @ u
    # Balance the two sides per head (enc * a, dec / a leaves enc . dec unchanged) so stored
    # values keep the data's magnitude and fit float16.
    a = (dec.norm(dim=(-2, -1)) / enc.norm(dim=(-2, -1))).sqrt()[:, None, None]
    return (enc * a).float(), (dec / a).float(), cum.float()


def allocate_ranks(
    cum_k: torch.Tensor, cum_v: torch.Tensor, budget: float, step: int
) -> tuple[list[int], list[int]]:
    """Greedy per-layer ranks. cum_*: [L, KVH, D] cumulative energy; budget in (0, 1]."""
    layers, _, d = cum_k.shape
    if not 0 < budget <= 1:
        raise ValueError(f"budget: must be in (0, 1], got {budget}")
    gain = lambda cum, r: cum[:, :, r - 1].mean(-1)  # noqa: E731 (mean over heads) [L]
    rk, rv = [step] * layers, [step] * layers
    total = int(budget * 2 * d * layers)
    while sum(rk) + sum(rv) + step <= total:
        best, choice = -1.0, None
        for l in range(layers):
            for ranks, cum in ((rk, cum_k), (rv, cum_v)):
                if ranks[l] + step <= d:
                    g = float(gain(cum, ranks[l] + step)[l] - gain(cum, ranks[l])[l])
                    if g > best:
                        best, choice = g, (ranks, l)
        if choice is None:
            break
        choice[0][choice[1]] += step
    return rk, rv


def collect_moments(llm, texts: list[str], window: int, max_tokens: int) -> _CaptureCache:
    """Second moments of every layer's post-RoPE q, k and v over the first max_tokens tokens of
    texts, run in windows of `window` tokens (exact attention)."""
    engine = llm.engine
    cfg = engine.config
    cap = _CaptureCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    real_cache, engine.runner.cache = engine.runner.cache, cap
    ids = [t for text in texts for t in llm.tokenizer.encode(text)]
    ids = ids[:max_tokens]
    try:
        for start in tqdm(range(0, max(1, len(ids) - 1), window), desc="calibrate"):
            chunk = ids[start : start + window]
            if len(chunk) > 1:
                engine.logits(chunk)
    finally:
        engine.runner.cache = real_cache
    return cap


def full_bases(llm, cap: _CaptureCache) -> tuple[list[dict[str, torch.Tensor]], list, list]:
    """Per layer {k_enc, k_dec, v_enc, v_dec} [KVH, D, D] at full rank (columns by falling
    whitened energy) and the cumulative energy fractions cum_k, cum_v [KVH, D] per layer."""
    engine = llm.engine
    cfg = engine.config
    bases, ck, cv = [], [], []
    g = cfg.num_heads // cfg.num_kv_heads
    for l in range(cfg.num_layers):
        # K: data C_k under the metric C_q (queries of the kv head's group).
        k_enc, k_dec, cum_k = _whitened_bases(cap.kk[l], cap.qq[l])
        # V: data C_v under the metric sum_h W_o,h^T W_o,h.
        w_o = engine.model.layers[l].self_attn.o_proj.weight.detach().double().cpu()
        w_o = w_o.view(cfg.hidden_size, cfg.num_kv_heads, g, cfg.head_dim)  # [hid, KVH, G, D]
        metric = torch.einsum("xkgd,xkge->kde", w_o, w_o)  # [KVH, D, D]
        v_enc, v_dec, cum_v = _whitened_bases(cap.vv[l], metric)
        bases.append({"k_enc": k_enc, "k_dec": k_dec, "v_enc": v_enc, "v_dec": v_dec})
        ck.append(cum_k)
        cv.append(cum_v)
    return bases, ck, cv


def calibrate(
    llm,
    texts: list[str],
    budget: float,
    out_dir: str | Path,
    window: int = 1024,
    max_tokens: int = 200_000,
    rank_step: int = 8,
    allocation: str = "measured",
    measure: list[list[int]] | None = None,
    progress: bool = False,
) -> dict:
    """Bases from `texts` (their first max_tokens tokens), ranks for `budget`, written to out_dir.

    allocation "measured" needs `measure`: token windows of calibration text other than `texts`
    (the training split), whose last half is scored (compress/lowrank_plan.py); "energy" ranks
    by retained energy."""
    if allocation not in ("measured", "energy"):
        raise ValueError(f"allocation: 'measured' or 'energy', got {allocation!r}")
    if allocation == "measured" and not measure:
        raise ValueError("allocation: 'measured' needs calibration windows to measure on")
    cfg = llm.engine.config
    cap = collect_moments(llm, texts, window, max_tokens)
    bases, ck, cv = full_bases(llm, cap)
    info_measured: dict = {}
    if allocation == "energy":
        rk, rv = allocate_ranks(torch.stack(ck), torch.stack(cv), budget, rank_step)
    else:
        rk, rv, info_measured = _measured_ranks(llm, bases, budget, rank_step, measure, progress)
    tensors = {}
    for l in range(cfg.num_layers):
        for name, t in bases[l].items():
            tensors[f"layers.{l}.{name}"] = t.contiguous()  # [KVH, D, D], full rank
    out = Path(out_dir)
    save_file(tensors, str(out / "lowrank.safetensors"))
    info = {
        "budget": budget,
        "tokens": cap.tokens,
        "window": window,
        "k_ranks": rk,
        "v_ranks": rv,
        "head_dim": cfg.head_dim,
        "rank_step": rank_step,
        "allocation": allocation,
        "basis": "whitened (K by C_q, V by W_o); stored at full rank, cut to the ranks on load",
        "k_energy_kept": [
            round(float(ck[l][:, rk[l] - 1].mean()), 5) for l in range(cfg.num_layers)
        ],
        "v_energy_kept": [
            round(float(cv[l][:, rv[l] - 1].mean()), 5) for l in range(cfg.num_layers)
        ],
        **info_measured,
    }
    (out / "lowrank.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _measured_ranks(llm, bases, budget, rank_step, measure, progress):
    """(r_k, r_v, what was measured) by compress/lowrank_plan.py on the `measure` windows."""
    from zipserve.bench import quality_breakdown as qb
    from zipserve.compress import lowrank_plan as lp

    cfg = llm.engine.config
    d = cfg.head_dim
    setup = qb.Setup(llm.engine.model, cfg, "lowrank")
    score = min(len(w) for w in measure) // 2
    ranks = [r for r in range(rank_step, d, rank_step)]
    losses = lp.rank_losses(setup, measure, score, bases, ranks, progress)
    rk, rv, predicted = lp.allocate_ranks_measured(losses, cfg.num_layers, d, budget, rank_step)
    return (
        rk,
        rv,
        {
            "measured": {
                "text": "training split (train/corpus.py), other files than the moments'",
                "windows": len(measure),
                "context": min(len(w) for w in measure),
                "scored_per_window": score,
                "rank_losses": {
                    f"layer {l} {kind} rank {r}": round(x, 6)
                    for (l, kind, r), x in sorted(losses.items())
                },
                "predicted_nll_increase": round(predicted, 6),
            }
        },
    )
