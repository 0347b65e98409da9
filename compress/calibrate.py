"""`zipserve calibrate`: per-layer, per-KV-head low-rank bases for the ZeroC-style `lowrank` codec.

The model runs over calibration text; every layer's post-RoPE queries and keys and its values are
collected per KV head. The K basis comes from the eigenvectors of the stacked [Q; K] second moment
(each side normalized to equal weight), the V basis from V's second moment. Ranks are chosen per
layer (shared by its KV heads, multiples of `rank_step`) by a greedy allocation that maximizes the
retained energy under a size budget: the average fraction of K+V dimensions kept.
Bases are written beside the checkpoint as lowrank.safetensors (+ lowrank.json).
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
        z = lambda: torch.zeros(num_layers, num_kv_heads, head_dim, head_dim,  # noqa: E731
                                dtype=torch.float64)
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


def _basis(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second moments [KVH, D, D] -> (bases [KVH, D, D] columns by falling energy,
    cumulative energy fraction [KVH, D])."""
    evals, evecs = torch.linalg.eigh(m)  # ascending
    evals, evecs = evals.flip(-1).clamp(min=0), evecs.flip(-1)
    cum = evals.cumsum(-1) / evals.sum(-1, keepdim=True).clamp(min=1e-30)
    return evecs.float(), cum.float()


def allocate_ranks(cum_k: torch.Tensor, cum_v: torch.Tensor, budget: float,
                   step: int) -> tuple[list[int], list[int]]:
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


def calibrate(llm, texts: list[str], budget: float, out_dir: str | Path, window: int = 1024,
              max_tokens: int = 200_000, rank_step: int = 16) -> dict:
    engine = llm.engine
    cfg = engine.config
    cap = _CaptureCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    real_cache, engine.runner.cache = engine.runner.cache, cap
    ids = [t for text in texts for t in llm.tokenizer.encode(text)]
    ids = ids[:max_tokens]
    try:
        for start in tqdm(range(0, max(1, len(ids) - 1), window), desc="calibrate"):
            chunk = ids[start:start + window]
            if len(chunk) > 1:
                engine.logits(chunk)
    finally:
        engine.runner.cache = real_cache
    qn = cap.qq / cap.qq.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp(min=1e-30)
    kn = cap.kk / cap.kk.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp(min=1e-30)
    bk, ck = zip(*[_basis(qn[l] + kn[l]) for l in range(cfg.num_layers)])
    bv, cv = zip(*[_basis(cap.vv[l]) for l in range(cfg.num_layers)])
    rk, rv = allocate_ranks(torch.stack(ck), torch.stack(cv), budget, rank_step)
    tensors = {}
    for l in range(cfg.num_layers):
        tensors[f"layers.{l}.k_basis"] = bk[l][:, :, :rk[l]].contiguous()  # [KVH, D, r_k]
        tensors[f"layers.{l}.v_basis"] = bv[l][:, :, :rv[l]].contiguous()  # [KVH, D, r_v]
    out = Path(out_dir)
    save_file(tensors, str(out / "lowrank.safetensors"))
    info = {"budget": budget, "tokens": cap.tokens, "window": window, "k_ranks": rk,
            "v_ranks": rv, "head_dim": cfg.head_dim,
            "k_energy_kept": [round(float(ck[l][:, rk[l] - 1].mean()), 5)
                              for l in range(cfg.num_layers)],
            "v_energy_kept": [round(float(cv[l][:, rv[l] - 1].mean()), 5)
                              for l in range(cfg.num_layers)]}
    (out / "lowrank.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
