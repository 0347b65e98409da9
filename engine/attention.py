"""Causal self-attention of freshly computed prompt tokens (the prefill half of every cache), and of
a prompt chunk over the dense KV before it (chunked prefill on the bf16 cache)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], scale: float
) -> torch.Tensor:
    """Causal attention within each packed prompt. q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D]."""
    gqa = q.shape[1] != k.shape[1]
    outs, start = [], 0
    for n in seq_lens:
        qs = q[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        ks = k[start : start + n].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, D]
        vs = v[start : start + n].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))  # [n, H, D]
        start += n
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def past_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """A chunk of n tokens at positions [start, start + n) attending to keys [0, start + n)
    causally. q: [n, H, D], k/v: [KVH, start + n, D] -> [n, H, D]."""
    n, h, _ = q.shape
    visible = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)  # [n, L]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        attn_mask=visible,
        scale=scale,
        enable_gqa=h != k.shape[0],
    )
    return o[0].transpose(0, 1)  # [n, H, D]
