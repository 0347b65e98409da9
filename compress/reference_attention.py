"""Attention over compressed pages by dequantizing them: the reference every codec's kernel is held
against, and the path used where a codec has no kernel for the device.

Token order does not matter to attention (RoPE is already applied to K), so a row's keys are its
dequantized full pages (without the sink positions when the codec keeps sinks densely) followed by
its dense tail (sinks + open page).
"""

from __future__ import annotations

import torch


def _row_kv(codec, store, page_ids: torch.Tensor, dense_k, dense_v):
    """Keys/values of one row as [KVH, N, D] fp32."""
    parts_k, parts_v = [], []
    if page_ids.numel():
        k, v = codec.dequantize(store, page_ids)  # [n, KVH, P, D]
        k = k.transpose(0, 1).flatten(1, 2)  # [KVH, n*P, D]
        v = v.transpose(0, 1).flatten(1, 2)
        skip = codec.n_sink
        parts_k.append(k[:, skip:])
        parts_v.append(v[:, skip:])
    parts_k.append(dense_k.float())
    parts_v.append(dense_v.float())
    return torch.cat(parts_k, 1), torch.cat(parts_v, 1)


def dequant_decode_attention(
    codec, q, store, page_table, n_full, dense_k, dense_v, dense_lens, scale
):
    """q [B, H, D]; n_full[b] pages of page_table[b] + dense_k[b, :, :dense_lens[b]]."""
    b_sz, h, d = q.shape
    g = h // codec.kvh
    out = torch.zeros(b_sz, h, d, dtype=torch.float32, device=q.device)
    for b, (npg, dl) in enumerate(zip(n_full.tolist(), dense_lens.tolist())):
        if npg == 0 and dl == 0:
            continue
        k, v = _row_kv(
            codec, store, page_table[b, :npg].long(), dense_k[b, :, :dl], dense_v[b, :, :dl]
        )  # [KVH, N, D]
        qb = q[b].float().view(codec.kvh, g, d)
        w = torch.softmax(torch.einsum("kgd,knd->kgn", qb, k) * scale, dim=-1)
        out[b] = torch.einsum("kgn,knd->kgd", w, v).reshape(h, d)
    return out.to(q.dtype)


def compressed_past_prefill_attention(
    codec, q, k, v, store, past_pages: torch.Tensor, sink_k, sink_v, scale
):
    """One sequence's new tokens attending to its compressed past and causally to themselves.

    q [n, H, D], k/v [n, KVH, D] (new tokens, starting at a page boundary); past_pages [m] ids
    of the full pages before them; sink_k/v [KVH, S, D] the dense sinks (used when m > 0).
    Returns [n, H, D]. Equals decode-time attention for each new token when they fill one page.
    """
    n, h, d = q.shape
    g = h // codec.kvh
    if past_pages.numel():
        pk, pv = _row_kv(codec, store, past_pages, sink_k, sink_v)  # [KVH, N, D]
    else:
        pk = pv = torch.zeros(codec.kvh, 0, d, device=q.device)
    keys = torch.cat([pk, k.float().transpose(0, 1)], 1)  # [KVH, N + n, D]
    vals = torch.cat([pv, v.float().transpose(0, 1)], 1)
    s = torch.einsum("tkgd,knd->kgtn", q.float().view(n, codec.kvh, g, d), keys) * scale
    past = pk.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([torch.ones(n, past, dtype=torch.bool, device=q.device), causal], 1)
    s = s.masked_fill(~mask, float("-inf"))
    o = torch.einsum("kgtn,knd->tkgd", torch.softmax(s, -1), vals)
    return o.reshape(n, h, d).to(q.dtype)
